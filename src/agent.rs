//! The agent role: runs on the device, keeps one control connection to a relay (it may be given
//! several: it starts on one at random and, when it loses it, tries the next, backing off with
//! jitter once it went round them all), and for each connection the relay announces dials the
//! named service locally and that relay's device endpoint, then splices the two.
//!
//! It reaches only the services its own command line names: whatever the relay asks, an
//! unknown service name is refused here, on the device.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::channel::{self, Incoming, Outgoing};
use crate::peer::{self, RelayUrl};
use crate::proto::{FromAgent, ToAgent};
use crate::ws::CloseCode;

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The relays to connect to, one at a time (at least one).
    pub relays: Vec<RelayUrl>,
    pub device: String,
    pub key: String,
    /// Service name → `host:port` on the device's side.
    pub services: BTreeMap<String, String>,
}

/// Parses `NAME=HOST:PORT`.
pub fn parse_service(s: &str) -> anyhow::Result<(String, String)> {
    let (name, addr) = s.split_once('=').with_context(|| format!("--service {s:?}: expected NAME=HOST:PORT"))?;
    if name.is_empty() || addr.rsplit_once(':').is_none_or(|(_, p)| p.parse::<u16>().is_err()) {
        bail!("--service {s:?}: expected NAME=HOST:PORT");
    }
    Ok((name.to_string(), addr.to_string()))
}

/// The relay pings every 10 s; this long without a word from it means the link is dead.
const RELAY_SILENCE: Duration = Duration::from_secs(35);
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The relay refused this agent: another agent holds the device id.
#[derive(Debug, thiserror::Error)]
#[error("the relay refused this agent: {0} (is this device's key in use on another device?)")]
struct Conflict(String);

/// Runs the agent until the process ends.
///
/// With several relays it starts on one at random (a fleet spreads over them) and, when a
/// control connection ends, goes on to the next one after a short pause; only once it has been
/// round all of them without a connection that lasted does the pause grow (doubling, with
/// jitter, up to [`MAX_BACKOFF`]).
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    anyhow::ensure!(!opts.relays.is_empty(), "no relay to connect to");
    let mut at = rand::random_range(0..opts.relays.len());
    let mut backoff = MIN_BACKOFF;
    // Relays tried since a control connection last lasted.
    let mut failed_in_a_row = 0;
    loop {
        let relay = &opts.relays[at];
        let began = Instant::now();
        match control_session(&opts, relay).await {
            Ok(()) => {
                tracing::warn!(device = opts.device, relay = relay.authority, "relay closed the control connection")
            }
            Err(e) if e.is::<Conflict>() => {
                tracing::error!(device = opts.device, relay = relay.authority, "{e:#}");
                backoff = MAX_BACKOFF;
            }
            Err(e) => tracing::warn!(device = opts.device, relay = relay.authority, "control connection: {e:#}"),
        }
        if began.elapsed() > Duration::from_secs(10) {
            backoff = MIN_BACKOFF;
            failed_in_a_row = 0;
        }
        failed_in_a_row += 1;
        at = (at + 1) % opts.relays.len();
        // Round all relays once at the shortest pause; then back off. Full jitter either way: a
        // fleet that lost the same relay does not come back in lockstep.
        let pause = if failed_in_a_row < opts.relays.len() { MIN_BACKOFF } else { backoff };
        let wait = pause.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tracing::info!(device = opts.device, relay = opts.relays[at].authority, "reconnecting in {wait:.1?}");
        tokio::time::sleep(wait).await;
        if failed_in_a_row >= opts.relays.len() {
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

async fn control_session(opts: &AgentOptions, relay: &RelayUrl) -> anyhow::Result<()> {
    let path = format!("/api/v1/agent?device={}", opts.device);
    let ws = peer::dial(relay, &path, &opts.key).await?;
    let limits = channel::Limits { max_message: 64 << 10, peer_masks: false, stall: RELAY_SILENCE };
    let mut ch = channel::channel(ws, limits);
    let hello = FromAgent::Hello {
        services: opts.services.keys().cloned().collect(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    ch.send(Outgoing::Text(serde_json::to_string(&hello)?))?;
    tracing::info!(device = opts.device, relay = relay.authority, "connected to relay");
    let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<FromAgent>();
    loop {
        tokio::select! {
            incoming = tokio::time::timeout(RELAY_SILENCE, ch.rx.recv()) => match incoming.unwrap_or(Some(Incoming::Closed(None))) {
                Some(Incoming::Ping | Incoming::Pong) => {}
                Some(Incoming::Text(t)) => match serde_json::from_str::<ToAgent>(&t) {
                    Ok(ToAgent::Connect { session, conn, service, token }) => {
                        // The device side goes to the relay that asked for it.
                        let target = (relay.clone(), opts.services.get(&service).cloned());
                        tokio::spawn(connect(target, session, conn, service, token, fail_tx.clone()));
                    }
                    Err(e) => tracing::warn!("relay sent an unknown message ({e}): ignored"),
                },
                Some(Incoming::Closed(Some((code, reason)))) if code == CloseCode::DEVICE_CONFLICT.0 => {
                    return Err(Conflict(crate::proto::printable(&reason, 200)).into());
                }
                Some(Incoming::Closed(Some((code, reason)))) => {
                    bail!("relay closed the control connection: {code} {}", crate::proto::printable(&reason, 200))
                }
                Some(Incoming::Violation(code, why)) => bail!("the relay broke the protocol ({why}); closed with {code}"),
                Some(Incoming::Stalled) => bail!("the relay stopped reading the control connection"),
                Some(Incoming::Closed(None)) | None => bail!("control connection lost"),
            },
            Some(failure) = fail_rx.recv() => {
                ch.send(Outgoing::Text(serde_json::to_string(&failure)?))?;
            }
        }
    }
}

/// Serves one announced connection: dial the service (its configured address, if any), then
/// the relay, then splice.
async fn connect(
    (relay, addr): (RelayUrl, Option<String>),
    session: String,
    conn: u64,
    service: String,
    token: String,
    failures: mpsc::UnboundedSender<FromAgent>,
) {
    let fail = |reason: String| {
        tracing::warn!(session, conn, service, "{reason}");
        let _ = failures.send(FromAgent::ConnectFailed { session: session.clone(), conn, reason });
    };
    let Some(addr) = addr else {
        return fail(format!("service {service:?} is not configured on this device"));
    };
    let tcp = match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return fail(format!("{e} at {addr}")),
        Err(_) => return fail(format!("timed out connecting to {addr}")),
    };
    let _ = tcp.set_nodelay(true);
    let path = format!("/api/v1/sessions/{session}/device?conn={conn}");
    let ws = match peer::dial_data(&relay, &path, &token).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::warn!(session, conn, "dialing the relay's device endpoint: {e:#}");
            return;
        }
    };
    // A task of its own, sized for the splice alone: the dialing above took more state than an
    // idle connection should keep for its lifetime.
    let (r, w) = tcp.into_split();
    tokio::spawn(async move {
        let end = crate::splice::splice(r, w, ws).await;
        tracing::debug!(session, conn, up = end.bytes_up, down = end.bytes_down, close = ?end.close, "connection ended");
    });
}
