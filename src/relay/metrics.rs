//! The relay's counters and gauges, shared by every worker, rendered as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a WebSocket or API handshake was refused; one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    BadToken,
    UnknownSession,
    UnknownDevice,
    NotWebSocket,
    Limit,
    /// One source address held its share of the handshake slots.
    AddressLimit,
    /// A credential check refused at once: the address has too many failed ones queued.
    Throttled,
    Malformed,
}

impl HandshakeFailure {
    const ALL: [HandshakeFailure; 8] = [
        HandshakeFailure::BadToken,
        HandshakeFailure::UnknownSession,
        HandshakeFailure::UnknownDevice,
        HandshakeFailure::NotWebSocket,
        HandshakeFailure::Limit,
        HandshakeFailure::AddressLimit,
        HandshakeFailure::Throttled,
        HandshakeFailure::Malformed,
    ];

    fn label(self) -> &'static str {
        match self {
            HandshakeFailure::BadToken => "bad_token",
            HandshakeFailure::UnknownSession => "unknown_session",
            HandshakeFailure::UnknownDevice => "unknown_device",
            HandshakeFailure::NotWebSocket => "not_websocket",
            HandshakeFailure::Limit => "limit",
            HandshakeFailure::AddressLimit => "address_limit",
            HandshakeFailure::Throttled => "throttled",
            HandshakeFailure::Malformed => "malformed",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    pub sessions_started: AtomicU64,
    pub sessions_ended: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    /// Cluster: client and control connections this node forwarded to the session's node, and
    /// their bytes both ways (counted as they pass).
    pub forwarded_connections: AtomicU64,
    pub forwarded_bytes: AtomicU64,
    pub tunnels_active: AtomicU64,
    pub bytes_to_device: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub frame_errors: AtomicU64,
    pub buffers_in_use: AtomicU64,
    pub buffers_total: AtomicU64,
    pub agent_takeovers: AtomicU64,
    pub agent_refusals: AtomicU64,
    pub control_dropped: AtomicU64,
    /// Spare device connections parked now, and client connections that took one.
    pub spares_parked: AtomicU64,
    pub spares_used: AtomicU64,
    /// Client connections opened ahead of need (`?ready=1`): waiting now, and used.
    pub ready_waiting: AtomicU64,
    pub ready_used: AtomicU64,
    handshake_failures: [AtomicU64; 8],
    /// Data connections ended, by close code ([`ENDS_BY_CODE`], then one slot for any other).
    ends_by_code: [AtomicU64; ENDS_BY_CODE.len() + 1],
}

/// The close codes a data connection's end is counted under (see `relay::ending`).
const ENDS_BY_CODE: [u16; 12] = [1000, 1001, 1002, 1006, 1007, 1008, 1009, 4001, 4002, 4003, 4004, 4005];

impl Metrics {
    pub fn handshake_failed(&self, why: HandshakeFailure) {
        self.handshake_failures[why as usize].fetch_add(1, Relaxed);
    }

    /// A data connection ended with `code` (its `CloseReason`'s).
    pub fn connection_ended(&self, code: crate::ws::CloseCode) {
        self.connections_closed.fetch_add(1, Relaxed);
        let slot = ENDS_BY_CODE.iter().position(|&c| c == code.0).unwrap_or(ENDS_BY_CODE.len());
        self.ends_by_code[slot].fetch_add(1, Relaxed);
    }

    /// Prometheus text exposition; `gauges` are the values only the session table knows.
    pub fn render(&self, sessions_active: usize, agents_connected: usize) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| sample(&mut out, name, kind, help, value);
        metric("sessions_active", "gauge", "Sessions currently open.", sessions_active as u64);
        metric("sessions_started_total", "counter", "Sessions started.", self.sessions_started.load(Relaxed));
        metric("sessions_ended_total", "counter", "Sessions ended for any reason.", self.sessions_ended.load(Relaxed));
        metric("agents_connected", "gauge", "Device agents with a live control connection.", agents_connected as u64);
        metric(
            "forwarded_connections_total",
            "counter",
            "Connections forwarded to the cluster node their session lives on.",
            self.forwarded_connections.load(Relaxed),
        );
        metric(
            "forwarded_bytes_total",
            "counter",
            "Bytes of forwarded connections, both ways.",
            self.forwarded_bytes.load(Relaxed),
        );
        metric(
            "connections_opened_total",
            "counter",
            "Client data connections accepted.",
            self.connections_opened.load(Relaxed),
        );
        metric(
            "connections_closed_total",
            "counter",
            "Client data connections ended.",
            self.connections_closed.load(Relaxed),
        );
        metric("tunnels_active", "gauge", "Paired connections forwarding now.", self.tunnels_active.load(Relaxed));
        metric(
            "spare_connections",
            "gauge",
            "Spare device connections agents keep parked at the relay.",
            self.spares_parked.load(Relaxed),
        );
        metric(
            "ready_connections",
            "gauge",
            "Client connections opened ahead of need, waiting for their first byte.",
            self.ready_waiting.load(Relaxed),
        );
        metric(
            "ready_connections_used_total",
            "counter",
            "Client connections opened ahead of need that carried a connection (no handshake for it).",
            self.ready_used.load(Relaxed),
        );
        metric(
            "spare_connections_used_total",
            "counter",
            "Client connections paired with a parked spare device connection (no dial by the agent).",
            self.spares_used.load(Relaxed),
        );
        metric(
            "bytes_to_device_total",
            "counter",
            "Bytes forwarded from clients to devices.",
            self.bytes_to_device.load(Relaxed),
        );
        metric(
            "bytes_to_client_total",
            "counter",
            "Bytes forwarded from devices to clients.",
            self.bytes_to_client.load(Relaxed),
        );
        metric(
            "frame_errors_total",
            "counter",
            "Data connections closed for a framing violation.",
            self.frame_errors.load(Relaxed),
        );
        metric(
            "buffers_in_use",
            "gauge",
            "Data-plane buffers holding bytes in flight.",
            self.buffers_in_use.load(Relaxed),
        );
        metric("buffers_total", "gauge", "Data-plane buffers in all workers' pools.", self.buffers_total.load(Relaxed));
        metric(
            "agent_takeovers_total",
            "counter",
            "Agent connections replaced by a new agent for the same device after failing a liveness probe.",
            self.agent_takeovers.load(Relaxed),
        );
        metric(
            "agent_refusals_total",
            "counter",
            "Agents refused because their device's agent is connected and alive.",
            self.agent_refusals.load(Relaxed),
        );
        metric(
            "control_dropped_total",
            "counter",
            "Control connections dropped for breaking the protocol, not reading, or not answering pings.",
            self.control_dropped.load(Relaxed),
        );
        let _ = writeln!(out, "# HELP ringway_handshake_failures_total Refused handshakes by reason.");
        let _ = writeln!(out, "# TYPE ringway_handshake_failures_total counter");
        for why in HandshakeFailure::ALL {
            let v = self.handshake_failures[why as usize].load(Relaxed);
            let _ = writeln!(out, "ringway_handshake_failures_total{{reason=\"{}\"}} {v}", why.label());
        }
        let _ = writeln!(out, "# HELP ringway_connection_ends_total Data connections ended, by close code.");
        let _ = writeln!(out, "# TYPE ringway_connection_ends_total counter");
        for (slot, count) in self.ends_by_code.iter().enumerate() {
            let code = ENDS_BY_CODE.get(slot).map_or("other".to_string(), |c| c.to_string());
            let _ = writeln!(out, "ringway_connection_ends_total{{code=\"{code}\"}} {}", count.load(Relaxed));
        }
        out
    }
}

/// Appends one unlabelled metric, `ringway_NAME`, with its help and type lines.
pub fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP ringway_{name} {help}\n# TYPE ringway_{name} {kind}\nringway_{name} {value}");
}

/// Prometheus text with `name="value"` added to every sample (a cluster node's `node` label).
pub fn labelled(text: &str, name: &str, value: &str) -> String {
    let label = format!("{name}=\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            out.push_str(line);
        } else if let Some((metric, rest)) = line.split_once('{') {
            out.push_str(&format!("{metric}{{{label},{rest}"));
        } else if let Some((metric, rest)) = line.split_once(' ') {
            out.push_str(&format!("{metric}{{{label}}} {rest}"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}
