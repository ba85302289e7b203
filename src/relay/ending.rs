//! How a data connection ends: one owner for the decision and for its words.
//!
//! [`CloseReason`] is a close code with its cause. The Close frame a peer gets, the audit
//! log's `code` and `reason`, the relay's log line and the `ringway_connection_ends_total`
//! metric are all rendered from it, so they cannot disagree.
//!
//! [`Ending`] is the sans-IO state machine of a paired tunnel's end: it takes what happened
//! (a pump ended, the relay ordered a stop, the device's agent left or came back) and answers
//! which Close each side gets and why the connection ended. No IO, no clock: the data plane's
//! tunnel feeds it and carries out its answers; the tests below drive it in memory, one per
//! row of README's close-code table.
//!
//! This module must not import the data plane, the registry or the API: they all import it.

use std::fmt;

use crate::ws::encode::{self, ControlFrame};
use crate::ws::{CloseCode, FrameError};

/// One end of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The operator's side (`ringway connect`, or any WebSocket client).
    Client,
    /// The device's side (the agent's data connection).
    Device,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Device,
            Side::Device => Side::Client,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Device => "device",
        }
    }
}

/// Why a connection (or a control connection) ended. [`CloseReason::code`] is the code its
/// peers hear; `Display` is the reason they read, the audit log records and the log prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// That side sent a Close; it was forwarded and the other side answered (1000, normal).
    Closed(Side),
    /// That side's connection ended without a Close (EOF or reset).
    Disconnected(Side),
    /// That side broke the framing rules. It hears the violation's own code (1002, 1007, 1009);
    /// the other side hears 1001.
    Violation(Side, FrameError),
    /// No byte moved either way for this many seconds.
    Idle(u64),
    /// The device side did not arrive within `limits.pair_timeout_secs`.
    PairTimeout,
    /// A device side arrived for a connection nobody waits for.
    NotAwaited,
    /// The relay could not take the device side's socket over.
    AdoptFailed(String),
    /// The device's agent could not reach the service; `why` is the agent's own words,
    /// escaped and bounded by whoever builds this.
    ServiceUnreachable { device: String, service: String, why: String },
    /// The device's agent is not reading its control connection: it cannot be asked to dial.
    AgentNotReading(String),
    /// The device's agent is not connected.
    DeviceOffline(String),
    /// The device's agent left and did not come back within `limits.agent_grace_secs`.
    DeviceLost(String),
    /// An operator closed the session (named).
    OperatorClosed(String),
    /// The session's lifetime ran out.
    Expired,
    /// No client attached to the session within `limits.attach_timeout_secs`.
    NotAttached,
    /// The client's control connection was gone longer than `limits.client_grace_secs`.
    ClientGone,
    /// The relay is shutting down (after its drain period).
    Shutdown,
    /// The connection never reached the data plane (its upgrade or hand-off failed): no Close
    /// frame was sent, so the audit log records 1006 (abnormal closure).
    Abandoned(String),
    /// Agent control connection only: another agent holds the device (at this address).
    DeviceConflict(String),
    /// Agent control connection only: a newer connection for the device took over (on this
    /// node, or on another node of the cluster).
    AgentReplaced,
    /// Agent control connection only: this cluster node cannot take the device now (it has no
    /// registry); the agent tries again, or another node.
    Unavailable(String),
    /// Agent control connection only: this cluster node is draining or cut off from its
    /// registry; the agent reconnects to another node (its tunnels keep running).
    Moving(String),
    /// Session control connection only: a newer control connection replaced this one.
    ControlReplaced,
    /// Agent control connection only: the device was removed from the config or given a new
    /// key (a reload).
    Revoked,
    /// Agent control connection only: an operator (named) disconnected it; it may reconnect.
    Kicked(String),
}

impl CloseReason {
    /// The close code this reason is reported with (to the side that caused it, for a violation).
    pub fn code(&self) -> CloseCode {
        match self {
            CloseReason::Closed(_) | CloseReason::ControlReplaced => CloseCode::NORMAL,
            CloseReason::Disconnected(_)
            | CloseReason::Idle(_)
            | CloseReason::ClientGone
            | CloseReason::Shutdown
            | CloseReason::Moving(_)
            | CloseReason::Kicked(_) => CloseCode::GOING_AWAY,
            CloseReason::Unavailable(_) => CloseCode::TRY_AGAIN_LATER,
            CloseReason::Violation(_, e) => e.close_code(),
            CloseReason::NotAwaited | CloseReason::Revoked => CloseCode::POLICY_VIOLATION,
            CloseReason::PairTimeout
            | CloseReason::AdoptFailed(_)
            | CloseReason::ServiceUnreachable { .. }
            | CloseReason::AgentNotReading(_) => CloseCode::SERVICE_UNREACHABLE,
            CloseReason::Expired | CloseReason::NotAttached => CloseCode::SESSION_EXPIRED,
            CloseReason::OperatorClosed(_) => CloseCode::SESSION_CLOSED,
            CloseReason::DeviceOffline(_) | CloseReason::DeviceLost(_) => CloseCode::DEVICE_OFFLINE,
            CloseReason::DeviceConflict(_) | CloseReason::AgentReplaced => CloseCode::DEVICE_CONFLICT,
            CloseReason::Abandoned(_) => CloseCode::ABNORMAL,
        }
    }

    /// What the peer on side `to` hears: a violator its violation's code, the other side of a
    /// violation 1001, everyone else this reason's code.
    pub fn farewell_to(&self, to: Side) -> Farewell {
        match self {
            CloseReason::Violation(side, e) if *side != to => {
                Farewell { code: CloseCode::GOING_AWAY, reason: format!("{} broke the protocol: {e}", side.name()) }
            }
            CloseReason::Violation(_, e) => Farewell { code: e.close_code(), reason: e.to_string() },
            _ => Farewell { code: self.code(), reason: self.to_string() },
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Closed(side) => write!(f, "{} closed", side.name()),
            CloseReason::Disconnected(side) => write!(f, "{} disconnected", side.name()),
            CloseReason::Violation(side, e) => write!(f, "{} broke the protocol: {e}", side.name()),
            CloseReason::Idle(secs) => write!(f, "idle for {secs} s"),
            CloseReason::PairTimeout => f.write_str("device did not open the connection in time"),
            CloseReason::NotAwaited => f.write_str("no connection waits for this device side"),
            CloseReason::AdoptFailed(e) => write!(f, "the relay could not take over the device side: {e}"),
            CloseReason::ServiceUnreachable { device, service, why } => {
                write!(f, "device {device} could not reach service {service}: {why}")
            }
            CloseReason::AgentNotReading(device) => {
                write!(f, "the agent of device {device} is not reading its control connection")
            }
            CloseReason::DeviceOffline(device) => write!(f, "device {device} is offline"),
            CloseReason::DeviceLost(device) => write!(f, "device {device} went offline"),
            CloseReason::OperatorClosed(name) => write!(f, "session closed by operator {name}"),
            CloseReason::Expired => f.write_str("session expired"),
            CloseReason::NotAttached => f.write_str("no client attached in time"),
            CloseReason::ClientGone => f.write_str("client went away"),
            CloseReason::Shutdown => f.write_str("relay shutting down"),
            CloseReason::Abandoned(why) => write!(f, "connection abandoned before forwarding: {why}"),
            CloseReason::DeviceConflict(holder) => {
                write!(f, "the device is connected through another agent (at {holder})")
            }
            CloseReason::AgentReplaced => f.write_str("replaced by a newer agent connection for this device"),
            CloseReason::ControlReplaced => f.write_str("replaced by a newer control connection"),
            CloseReason::Unavailable(why) => write!(f, "try again later: {why}"),
            CloseReason::Moving(why) => write!(f, "reconnect to another node: {why}"),
            CloseReason::Revoked => f.write_str("the device's key was revoked (the relay's configuration changed)"),
            CloseReason::Kicked(operator) => write!(f, "disconnected by operator {operator}"),
        }
    }
}

/// A Close the relay sends a peer: code and reason (the frame cuts the reason to fit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Farewell {
    pub code: CloseCode,
    pub reason: String,
}

impl Farewell {
    pub fn frame(&self) -> ControlFrame {
        encode::close(self.code, &self.reason)
    }
}

/// How one direction of a tunnel (one pump, named by its source side) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpEnd {
    /// The source's Close frame was forwarded: a normal close, the other side answers.
    Closed,
    /// The source went away without a Close (EOF or socket error).
    Gone,
    /// The destination failed a write: it is gone.
    DestinationGone,
    /// The source broke the framing rules.
    Violation(FrameError),
    /// The tunnel told it to stop.
    Stopped,
}

/// What the side a pump writes to gets on the pump's way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Goodbye {
    /// Nothing: its peer's own Close went through, or it is gone.
    Nothing,
    /// This Close.
    Send(Farewell),
    /// The device side vanished and nothing says why yet: wait briefly for the agent's
    /// control connection to report (4004 rather than a bare 1001), then ask again with
    /// `waited = true`.
    AwaitAgent,
}

/// A paired tunnel's end, decided in memory. See the module doc.
#[derive(Debug, Default)]
pub struct Ending {
    /// The relay's order to stop: the first one wins, and both sides hear it. Boxed, like the
    /// device name below: every idle tunnel carries an `Ending`, seldom with either set.
    order: Option<Box<CloseReason>>,
    /// The first pump to end, by its source side.
    first: Option<(Side, PumpEnd)>,
    /// Set while the device's agent is off its control connection: what the client hears if
    /// the device side drops meanwhile.
    agent_gone: Option<Box<str>>,
}

impl Ending {
    /// The relay orders the tunnel to stop (operator, expiry, device lost, idle, shutdown).
    /// A later order does not replace an earlier one.
    pub fn order(&mut self, reason: CloseReason) {
        self.order.get_or_insert_with(|| Box::new(reason));
    }

    /// The device's agent left its control connection (`Some(device)`) or came back (`None`).
    pub fn agent_link(&mut self, gone: Option<String>) {
        self.agent_gone = gone.map(String::into_boxed_str);
    }

    /// Whether the relay has ordered a stop.
    pub fn ordered(&self) -> bool {
        self.order.is_some()
    }

    /// Whether the agent is known to be gone (the device side's drop is then explained).
    pub fn agent_gone(&self) -> bool {
        self.agent_gone.is_some()
    }

    /// A pump (named by its source) ended. Returns whether the other pump must be stopped: after
    /// a normal close the other side may keep sending (TCP half-close) until it closes too.
    pub fn pump_ended(&mut self, source: Side, end: PumpEnd) -> bool {
        if self.first.is_none() {
            self.first = Some((source, end));
        }
        !matches!(end, PumpEnd::Closed)
    }

    /// What side `to` gets from the pump that writes to it (whose source is the other side),
    /// which ended with `end`. `waited`: an [`Goodbye::AwaitAgent`] wait is over.
    pub fn goodbye(&self, to: Side, end: PumpEnd, waited: bool) -> Goodbye {
        let source = to.other();
        let order = self.order.as_ref().map(|r| r.farewell_to(to));
        let reason = match end {
            PumpEnd::Closed | PumpEnd::DestinationGone => return Goodbye::Nothing,
            PumpEnd::Gone => {
                if let Some(order) = order {
                    return Goodbye::Send(order);
                }
                if source == Side::Device {
                    match &self.agent_gone {
                        Some(device) => CloseReason::DeviceLost(device.to_string()),
                        None if !waited => return Goodbye::AwaitAgent,
                        None => CloseReason::Disconnected(source),
                    }
                } else {
                    CloseReason::Disconnected(source)
                }
            }
            PumpEnd::Violation(e) => CloseReason::Violation(source, e),
            PumpEnd::Stopped => {
                if let Some(order) = order {
                    return Goodbye::Send(order);
                }
                // Stopped because the other pump ended first: only a violator hears why (the
                // source of a disconnect is gone; a destination that failed is gone too).
                match self.first {
                    Some((first, PumpEnd::Violation(e))) if first == to => CloseReason::Violation(to, e),
                    _ => return Goodbye::Nothing,
                }
            }
        };
        Goodbye::Send(reason.farewell_to(to))
    }

    /// Whether a pump stopped in the middle of a frame toward `to` should finish that frame: only
    /// when a Close is to follow it.
    pub fn finish_frame_for(&self, to: Side) -> bool {
        matches!(self.goodbye(to, PumpEnd::Stopped, true), Goodbye::Send(_))
    }

    /// Why the connection ended, for the audit log and metrics.
    pub fn reason(&self) -> CloseReason {
        match (&self.order, self.first) {
            (Some(order), Some((_, PumpEnd::Stopped)) | None) => (**order).clone(),
            (_, Some((side, PumpEnd::Closed))) => CloseReason::Closed(side),
            (_, Some((Side::Device, PumpEnd::Gone))) if self.agent_gone.is_some() => {
                CloseReason::DeviceLost(self.agent_gone.as_deref().unwrap_or_default().to_string())
            }
            (_, Some((side, PumpEnd::Gone))) => CloseReason::Disconnected(side),
            (_, Some((side, PumpEnd::DestinationGone))) => CloseReason::Disconnected(side.other()),
            (_, Some((side, PumpEnd::Violation(e)))) => CloseReason::Violation(side, e),
            (None, Some((_, PumpEnd::Stopped)) | None) => CloseReason::Abandoned("stopped without a reason".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(g: Goodbye) -> (u16, String) {
        match g {
            Goodbye::Send(f) => (f.code.0, f.reason),
            other => panic!("expected a Close, got {other:?}"),
        }
    }

    /// A tunnel whose first pump (from `source`) ended with `end`: what each side gets and why.
    fn after(source: Side, end: PumpEnd) -> Ending {
        let mut e = Ending::default();
        e.pump_ended(source, end);
        e
    }

    #[test]
    fn row_1000_a_normal_close_is_forwarded_and_nothing_is_added() {
        let mut e = after(Side::Client, PumpEnd::Closed);
        // The client's own Close went to the device; the relay adds nothing there.
        assert_eq!(e.goodbye(Side::Device, PumpEnd::Closed, false), Goodbye::Nothing);
        // The device answers with its Close; then its pump ends Closed too.
        assert!(!e.pump_ended(Side::Device, PumpEnd::Closed), "a normal close stops nobody");
        assert_eq!(e.goodbye(Side::Client, PumpEnd::Closed, false), Goodbye::Nothing);
        assert_eq!(e.reason(), CloseReason::Closed(Side::Client));
        assert_eq!(e.reason().code().0, 1000);
    }

    #[test]
    fn row_1001_a_side_that_disconnects_is_reported_to_the_other() {
        let mut e = Ending::default();
        assert!(e.pump_ended(Side::Client, PumpEnd::Gone));
        assert_eq!(sent(e.goodbye(Side::Device, PumpEnd::Gone, false)), (1001, "client disconnected".into()));
        // The other pump is stopped; the client is gone, so it gets nothing.
        assert_eq!(e.goodbye(Side::Client, PumpEnd::Stopped, false), Goodbye::Nothing);
        assert_eq!(e.reason(), CloseReason::Disconnected(Side::Client));
    }

    #[test]
    fn row_1001_shutdown_idle_and_a_vanished_client_close_both_sides() {
        for (reason, text) in [
            (CloseReason::Shutdown, "relay shutting down"),
            (CloseReason::Idle(300), "idle for 300 s"),
            (CloseReason::ClientGone, "client went away"),
        ] {
            let mut e = Ending::default();
            e.order(reason.clone());
            e.pump_ended(Side::Device, PumpEnd::Stopped);
            for to in [Side::Client, Side::Device] {
                assert_eq!(sent(e.goodbye(to, PumpEnd::Stopped, false)), (1001, text.into()));
                assert!(e.finish_frame_for(to), "a frame in flight is finished before the Close");
            }
            assert_eq!(e.reason(), reason);
        }
    }

    #[test]
    fn row_1001_a_device_side_that_drops_without_news_from_its_agent_gets_a_moment_then_1001() {
        let e = after(Side::Device, PumpEnd::Gone);
        assert_eq!(e.goodbye(Side::Client, PumpEnd::Gone, false), Goodbye::AwaitAgent);
        assert_eq!(sent(e.goodbye(Side::Client, PumpEnd::Gone, true)), (1001, "device disconnected".into()));
    }

    /// A violator hears its violation's code; the other side hears 1001 and the cause.
    fn violation(e: FrameError, code: u16) {
        let mut end = Ending::default();
        assert!(end.pump_ended(Side::Device, PumpEnd::Violation(e)));
        let (to_client, text) = sent(end.goodbye(Side::Client, PumpEnd::Violation(e), false));
        assert_eq!((to_client, text), (1001, format!("device broke the protocol: {e}")));
        // The pump toward the violator is stopped and says why.
        assert_eq!(sent(end.goodbye(Side::Device, PumpEnd::Stopped, false)), (code, e.to_string()));
        assert_eq!(end.reason(), CloseReason::Violation(Side::Device, e));
        assert_eq!(end.reason().code().0, code);
    }

    #[test]
    fn row_1002_bad_framing_is_a_protocol_error() {
        violation(FrameError::Unmasked, 1002);
        violation(FrameError::ReservedBits, 1002);
    }

    #[test]
    fn row_1007_a_close_reason_that_is_not_utf8_is_invalid_payload() {
        violation(FrameError::InvalidCloseReason, 1007);
    }

    #[test]
    fn row_1008_a_device_side_nobody_waits_for_is_a_policy_violation() {
        assert_eq!(CloseReason::NotAwaited.farewell_to(Side::Device).code.0, 1008);
    }

    #[test]
    fn row_1009_a_frame_over_the_limit_is_too_big() {
        violation(FrameError::FrameTooLarge { len: 1 << 30, max: 1 << 20 }, 1009);
    }

    #[test]
    fn row_4001_the_device_could_not_reach_the_service() {
        for reason in [
            CloseReason::PairTimeout,
            CloseReason::ServiceUnreachable { device: "d".into(), service: "ssh".into(), why: "refused".into() },
            CloseReason::AgentNotReading("d".into()),
            CloseReason::AdoptFailed("EBADF".into()),
        ] {
            assert_eq!(reason.farewell_to(Side::Client).code.0, 4001, "{reason}");
        }
        assert_eq!(
            CloseReason::ServiceUnreachable { device: "d".into(), service: "ssh".into(), why: "refused".into() }
                .to_string(),
            "device d could not reach service ssh: refused"
        );
    }

    #[test]
    fn row_4002_an_expired_session_closes_both_sides() {
        for reason in [CloseReason::Expired, CloseReason::NotAttached] {
            let mut e = Ending::default();
            e.order(reason.clone());
            assert_eq!(sent(e.goodbye(Side::Client, PumpEnd::Stopped, false)).0, 4002);
            assert_eq!(sent(e.goodbye(Side::Device, PumpEnd::Stopped, false)).0, 4002);
        }
    }

    #[test]
    fn row_4003_an_operator_close_wins_over_what_happens_after_it() {
        let mut e = Ending::default();
        e.order(CloseReason::OperatorClosed("alice".into()));
        e.order(CloseReason::Shutdown);
        e.pump_ended(Side::Client, PumpEnd::Stopped);
        // The device side dropped while the stop was under way: the client still hears 4003.
        assert_eq!(
            sent(e.goodbye(Side::Client, PumpEnd::Gone, false)),
            (4003, "session closed by operator alice".into())
        );
        assert_eq!(e.reason(), CloseReason::OperatorClosed("alice".into()));
    }

    #[test]
    fn row_4004_a_lost_device_closes_both_sides_and_a_drop_while_its_agent_is_away_says_so() {
        let mut e = Ending::default();
        e.order(CloseReason::DeviceLost("d".into()));
        assert_eq!(sent(e.goodbye(Side::Client, PumpEnd::Stopped, false)), (4004, "device d went offline".into()));

        let mut e = Ending::default();
        e.agent_link(Some("d".into()));
        e.pump_ended(Side::Device, PumpEnd::Gone);
        assert_eq!(sent(e.goodbye(Side::Client, PumpEnd::Gone, false)).0, 4004);
        assert_eq!(e.reason(), CloseReason::DeviceLost("d".into()));

        // The agent came back before the drop: an ordinary disconnect.
        let mut e = Ending::default();
        e.agent_link(Some("d".into()));
        e.agent_link(None);
        e.pump_ended(Side::Device, PumpEnd::Gone);
        assert_eq!(e.goodbye(Side::Client, PumpEnd::Gone, false), Goodbye::AwaitAgent);
    }

    #[test]
    fn row_4005_is_the_agent_control_connection_s_own() {
        assert_eq!(CloseReason::DeviceConflict("127.0.0.2:5000".into()).code().0, 4005);
        assert_eq!(CloseReason::AgentReplaced.code().0, 4005);
    }

    #[test]
    fn row_1013_is_the_agent_control_connection_s_own() {
        assert_eq!(CloseReason::Unavailable("no registry".into()).code().0, 1013);
        assert_eq!(CloseReason::Moving("draining".into()).code().0, 1001);
    }

    #[test]
    fn a_destination_that_failed_ends_the_tunnel_as_its_disconnect() {
        let mut e = Ending::default();
        // The pump from the client failed writing to the device.
        assert!(e.pump_ended(Side::Client, PumpEnd::DestinationGone));
        assert_eq!(e.goodbye(Side::Device, PumpEnd::DestinationGone, false), Goodbye::Nothing);
        assert_eq!(e.goodbye(Side::Client, PumpEnd::Stopped, false), Goodbye::Nothing);
        assert_eq!(e.reason(), CloseReason::Disconnected(Side::Device));
    }

    #[test]
    fn a_stop_without_an_order_finishes_no_frame() {
        let e = after(Side::Client, PumpEnd::Gone);
        assert!(!e.finish_frame_for(Side::Client));
    }

    /// Every code in README's close-code table is one the relay uses, and every code a
    /// [`CloseReason`] renders is in the table.
    #[test]
    fn readme_close_code_table_matches_the_code() {
        let readme = include_str!("../../README.md");
        let section = readme.split("### How a connection ends").nth(1).expect("README has the close-code section");
        let table: std::collections::BTreeSet<u16> = section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| l.trim_matches('|').split('|').next()?.trim().parse().ok())
            .collect();
        let e = FrameError::Unmasked;
        let reasons = [
            CloseReason::Closed(Side::Client),
            CloseReason::Disconnected(Side::Client),
            CloseReason::Violation(Side::Client, e),
            CloseReason::Violation(Side::Client, FrameError::InvalidCloseReason),
            CloseReason::Violation(Side::Client, FrameError::FrameTooLarge { len: 2, max: 1 }),
            CloseReason::Idle(1),
            CloseReason::PairTimeout,
            CloseReason::NotAwaited,
            CloseReason::AdoptFailed(String::new()),
            CloseReason::ServiceUnreachable { device: String::new(), service: String::new(), why: String::new() },
            CloseReason::AgentNotReading(String::new()),
            CloseReason::DeviceOffline(String::new()),
            CloseReason::DeviceLost(String::new()),
            CloseReason::OperatorClosed(String::new()),
            CloseReason::Expired,
            CloseReason::NotAttached,
            CloseReason::ClientGone,
            CloseReason::Shutdown,
            CloseReason::DeviceConflict(String::new()),
            CloseReason::AgentReplaced,
            CloseReason::ControlReplaced,
            CloseReason::Unavailable(String::new()),
            CloseReason::Moving(String::new()),
            CloseReason::Revoked,
            CloseReason::Kicked(String::new()),
        ];
        let mut used: std::collections::BTreeSet<u16> = reasons.iter().map(|r| r.code().0).collect();
        // The control channels' own: a binary message (crate::channel).
        used.insert(CloseCode::UNSUPPORTED_DATA.0);
        // The edges' own, forwarded by the relay: a local connection was reset (crate::splice).
        used.insert(CloseCode::CONNECTION_RESET.0);
        // 1006 is never sent (audit only), so it is not in the table of codes peers hear.
        let sent: std::collections::BTreeSet<u16> = used.into_iter().filter(|&c| c != 1006).collect();
        assert_eq!(table, sent, "README's close-code table and the codes CloseReason sends differ");
        for code in &table {
            assert!(CloseCode(*code).is_sendable(), "{code} in README cannot be sent");
        }
    }
}
