//! The relay's two JSON control channels: the agent's (one per device) and the session's (one
//! per client). Plain tokio + fastwebsockets over [`crate::channel`], which bounds what a peer
//! can make the relay hold; nothing here is on the data path.
//!
//! A peer counts as alive while it answers the relay's pings (a peer that only sends is not
//! reading). One agent holds a device at a time: a second one is refused while the first
//! answers a probe, and takes over when it does not.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::ending::CloseReason;
use super::registry::{AgentLink, Claim};
use super::Relay;
use crate::channel::{self, Channel, Incoming, Outgoing};
use crate::peer::Ws;
use crate::proto::{printable, FromAgent, SessionEvent, ToAgent};
use crate::ws::CloseCode;

/// Connection requests waiting for an agent's control connection; past this the agent is
/// not keeping up, and new connections to its device fail at once (4001).
const AGENT_QUEUE: usize = 1024;
/// A connection that misses this many pings in a row is dead.
const MISSED_PINGS: u32 = 3;
/// How long an agent gets to send its hello.
const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// Services an agent may name, and how long a name may be.
const MAX_SERVICES: usize = 64;
const MAX_SERVICE_NAME: usize = 64;

fn open(ws: Ws, relay: &Relay) -> Channel {
    let limits = &relay.config.limits;
    channel::channel(
        ws,
        channel::Limits { max_message: limits.max_control_message_bytes, peer_masks: true, stall: stall(relay) },
    )
}

/// How long a control connection's peer may leave the relay's writes unread (or unacknowledged:
/// the accept loop sets it as the socket's TCP user timeout) before it is dropped.
pub(crate) fn stall(relay: &Relay) -> Duration {
    keepalive(relay) * MISSED_PINGS
}

/// A Close rendered from its reason.
fn close(reason: CloseReason) -> Outgoing {
    Outgoing::Close(reason.code().0, reason.to_string())
}

fn keepalive(relay: &Relay) -> Duration {
    Duration::from_secs(relay.config.limits.keepalive_secs)
}

/// A control connection's liveness: pinged every `limits.keepalive_secs`; a peer that lets
/// [`MISSED_PINGS`] pings in a row go unanswered, or does not read them, is dead.
struct Keepalive {
    tick: tokio::time::Interval,
    unanswered: u32,
}

impl Keepalive {
    fn new(relay: &Relay) -> Keepalive {
        Keepalive { tick: tokio::time::interval(keepalive(relay)), unanswered: 0 }
    }

    /// Waits for the next ping's time. Cancel-safe.
    async fn due(&mut self) {
        self.tick.tick().await;
    }

    /// Pings the peer; `Err` says why it is dead.
    fn ping(&mut self, ch: &Channel) -> Result<(), &'static str> {
        self.unanswered += 1;
        if self.unanswered > MISSED_PINGS {
            return Err("stopped answering pings");
        }
        ch.send(Outgoing::Ping).map_err(|_| "stopped reading")
    }

    fn answered(&mut self) {
        self.unanswered = 0;
    }
}

/// Counts and logs a peer the channel dropped (a violation, or not reading); an ordinary end is
/// neither.
fn dropped(relay: &Relay, what: &str, incoming: &Incoming) {
    match incoming {
        Incoming::Violation(code, reason) => drop_peer(relay, what, format_args!("closed it with {code}: {reason}")),
        Incoming::Stalled => drop_peer(relay, what, "it stopped reading; dropped"),
        _ => {}
    }
}

/// Counts and logs a control connection the relay drops.
fn drop_peer(relay: &Relay, what: &str, why: impl std::fmt::Display) {
    relay.metrics.control_dropped.fetch_add(1, Relaxed);
    tracing::warn!("{what}: {why}");
}

/// Serves one agent's control connection until it closes, breaks, or is replaced.
pub async fn agent(ws: Ws, device: String, addr: SocketAddr, relay: Arc<Relay>) {
    let mut ch = open(ws, &relay);
    let who = format!("agent of device {device} at {addr}");
    let Some((services, version)) = hello(&mut ch, &relay, &who).await else { return };

    let (to_agent, mut from_relay) = mpsc::channel::<ToAgent>(AGENT_QUEUE);
    let (probe_tx, mut probes) = mpsc::channel::<oneshot::Sender<()>>(8);
    let (close_tx, mut closes) = mpsc::channel::<CloseReason>(1);
    let link = AgentLink { tx: to_agent, probe: probe_tx, close: close_tx, addr, version };
    let generation = loop {
        match relay.registry.agent_claim(&device, &services, &link).await {
            Claim::Granted(g) => break g,
            Claim::Unavailable(why) => {
                tracing::warn!(device, %addr, "agent refused for now: {why}");
                let _ = ch.send(close(CloseReason::Unavailable(why)));
                return;
            }
            Claim::Held { generation, addr: holder, probe } => {
                if alive(&probe, keepalive(&relay).min(Duration::from_secs(5))).await {
                    relay.agent_refused(&device, addr, holder);
                    let _ = ch.send(close(CloseReason::DeviceConflict(holder.to_string())));
                    return;
                }
                if let Some(g) = relay.registry.agent_take_over(&device, generation, &services, &link).await {
                    break g;
                }
            }
        }
    };
    // Only the relay's tables hold the link now: when a newer agent takes over, they drop it
    // and `from_relay` ends.
    drop(link);

    let mut alive = Keepalive::new(&relay);
    let mut probing: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        tokio::select! {
            msg = from_relay.recv() => match msg {
                Some(m) => {
                    // A burst of connections waits here for the writer rather than failing.
                    let text = serde_json::to_string(&m).expect("ToAgent serializes");
                    if ch.send_wait(Outgoing::Text(text)).await.is_err() {
                        dropped(&relay, &who, &Incoming::Stalled);
                        break;
                    }
                }
                None => {
                    let _ = ch.send(close(CloseReason::AgentReplaced));
                    break;
                }
            },
            Some(reason) = closes.recv() => {
                tracing::info!(device, %addr, "agent control connection closed: {reason}");
                let _ = ch.send(close(reason));
                break;
            }
            Some(waiter) = probes.recv() => {
                probing.push(waiter);
                let _ = ch.send(Outgoing::Ping);
            }
            incoming = ch.rx.recv() => match incoming {
                Some(Incoming::Pong) => {
                    alive.answered();
                    for waiter in probing.drain(..) {
                        let _ = waiter.send(());
                    }
                }
                Some(Incoming::Ping) => {}
                Some(Incoming::Text(t)) => {
                    if let Err(reason) = agent_message(&relay, &device, &t) {
                        tracing::warn!("{who} sent an {reason}");
                        let _ = ch.send(Outgoing::Close(CloseCode::PROTOCOL_ERROR.0, reason));
                        break;
                    }
                }
                Some(end) => {
                    dropped(&relay, &who, &end);
                    break;
                }
                None => break,
            },
            _ = alive.due() => {
                if let Err(why) = alive.ping(&ch) {
                    drop_peer(&relay, &who, format_args!("{why}; dropped"));
                    break;
                }
            }
        }
    }
    relay.registry.agent_down(&device, generation);
}

/// Waits for the agent's hello (its services, and its version escaped and bounded); closes the
/// channel with 1002 and returns `None` on anything else.
async fn hello(ch: &mut Channel, relay: &Relay, who: &str) -> Option<(Vec<String>, String)> {
    let first = tokio::time::timeout(HELLO_WITHIN, async {
        loop {
            match ch.rx.recv().await {
                Some(Incoming::Ping | Incoming::Pong) => continue,
                other => return other,
            }
        }
    })
    .await;
    let refuse = |ch: &Channel, reason: &str| {
        let _ = ch.send(Outgoing::Close(CloseCode::PROTOCOL_ERROR.0, reason.to_string()));
    };
    match first {
        Ok(Some(Incoming::Text(t))) => match serde_json::from_str::<FromAgent>(&t) {
            Ok(FromAgent::Hello { services, version }) => {
                if services.len() > MAX_SERVICES || !services.iter().all(|s| valid_service_name(s)) {
                    refuse(ch, "invalid service names (use up to 64 of letters, digits, '-', '_', '.')");
                    return None;
                }
                Some((services, crate::proto::printable(&version, 40)))
            }
            _ => {
                refuse(ch, "expected a hello message");
                None
            }
        },
        Ok(Some(end @ (Incoming::Violation(..) | Incoming::Stalled))) => {
            dropped(relay, who, &end);
            None
        }
        _ => {
            refuse(ch, "expected a hello message");
            None
        }
    }
}

fn valid_service_name(s: &str) -> bool {
    (1..=MAX_SERVICE_NAME).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Whether the connection behind `probe` answers a ping within `within`.
async fn alive(probe: &mpsc::Sender<oneshot::Sender<()>>, within: Duration) -> bool {
    let (tx, rx) = oneshot::channel();
    if probe.send(tx).await.is_err() {
        return false;
    }
    matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())))
}

/// Acts on one message from `device`'s agent after its hello. `Err` says why the message is
/// unacceptable (the channel then closes with 1002); it quotes the agent only escaped and
/// bounded. The agent-message fuzz target drives it (`crate::fuzzing`).
pub fn agent_message(relay: &Relay, device: &str, text: &str) -> Result<(), String> {
    match serde_json::from_str::<FromAgent>(text) {
        Ok(FromAgent::ConnectFailed { session, conn, reason }) => {
            relay.registry.connect_failed(device, &session, conn, &reason);
            Ok(())
        }
        Ok(FromAgent::Hello { .. }) => Ok(()),
        Err(e) => Err(format!("invalid message: {}", printable(&e.to_string(), 100))),
    }
}

/// Serves a client's session control connection: pushes session events until it ends.
pub async fn session_control(ws: Ws, relay: Arc<Relay>, ready: SessionEvent, mut events: mpsc::Receiver<SessionEvent>) {
    let mut ch = open(ws, &relay);
    let send =
        |ch: &Channel, e: &SessionEvent| ch.send(Outgoing::Text(serde_json::to_string(e).expect("events serialize")));
    if send(&ch, &ready).is_err() {
        return;
    }
    let mut alive = Keepalive::new(&relay);
    loop {
        tokio::select! {
            _ = alive.due() => {
                // A client that vanished without a FIN, or stopped reading: the session's
                // grace period starts.
                if let Err(why) = alive.ping(&ch) {
                    drop_peer(&relay, "session control", format_args!("{why}; dropped"));
                    return;
                }
            }
            event = events.recv() => match event {
                Some(SessionEvent::Closing { code, reason }) => {
                    let _ = send(&ch, &SessionEvent::Closing { code, reason: reason.clone() });
                    let _ = ch.send(Outgoing::Close(code, reason));
                    return;
                }
                Some(e) => {
                    if send(&ch, &e).is_err() {
                        dropped(&relay, "session control", &Incoming::Stalled);
                        return;
                    }
                }
                None => return,
            },
            incoming = ch.rx.recv() => match incoming {
                Some(Incoming::Pong) => alive.answered(),
                Some(Incoming::Text(_) | Incoming::Ping) => {}
                Some(end) => {
                    dropped(&relay, "session control", &end);
                    return;
                }
                None => return,
            },
        }
    }
}
