//! The agent role: runs on the device, keeps one control connection to a relay (it may be given
//! several: it starts on one at random and, when it loses it, tries the next, backing off with
//! jitter once it went round them all), and for each connection the relay announces dials the
//! named service locally and that relay's device endpoint, then splices the two.
//!
//! It reaches only the services its own command line names: whatever the relay asks, an
//! unknown service name is refused here, on the device.
//!
//! Spares: besides its control connection the agent keeps a few authenticated data connections
//! open to the relay ([`Spares`]), so that a new connection costs it no TCP, TLS or WebSocket
//! handshake: the relay hands the next connection a spare and tells the agent, on that spare,
//! which service to dial. How many it keeps follows how many connections came in the last 10 s,
//! between the floor and the ceiling of its options. With none parked, the relay asks over the
//! control connection and the agent dials, as before.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::channel::{self, Incoming, Outgoing};
use crate::peer::{self, RelayUrl};
use crate::proto::{FromAgent, ToAgent};
use crate::splice::DataWs;
use crate::ws::CloseCode;

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The relays to connect to, one at a time (at least one).
    pub relays: Vec<RelayUrl>,
    pub device: String,
    pub key: String,
    /// Service name → `host:port` on the device's side.
    pub services: BTreeMap<String, String>,
    pub spares: Spares,
}

/// How many spare data connections the agent keeps open to its relay: at least `min`, at most
/// `max`, as many as connections came in the last 10 s in between.
#[derive(Debug, Clone, Copy)]
pub struct Spares {
    pub min: usize,
    pub max: usize,
}

impl Default for Spares {
    fn default() -> Spares {
        Spares { min: 1, max: 16 }
    }
}

impl Spares {
    /// The most spares a relay parks for one agent.
    pub const LIMIT: usize = crate::proto::MAX_SPARES;

    pub fn new(min: usize, max: usize) -> anyhow::Result<Spares> {
        anyhow::ensure!(min <= max, "--spares-min {min} is above --spares-max {max}");
        anyhow::ensure!(
            max <= Spares::LIMIT,
            "--spares-max {max} is above {} (what a relay parks per agent)",
            Spares::LIMIT
        );
        Ok(Spares { min, max })
    }
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
    // Spares to this relay for as long as this control connection lasts (the connections they
    // came to serve run on).
    let keeper = tokio::spawn(keep_spares(Arc::new(SpareCtx {
        relay: relay.clone(),
        device: opts.device.clone(),
        key: opts.key.clone(),
        services: opts.services.clone(),
        failures: fail_tx.clone(),
        spares: opts.spares,
    })));
    let _keeper = AbortOnDrop(keeper);
    loop {
        tokio::select! {
            incoming = tokio::time::timeout(RELAY_SILENCE, ch.rx.recv()) => match incoming.unwrap_or(Some(Incoming::Closed(None))) {
                Some(Incoming::Ping | Incoming::Pong) => {}
                Some(Incoming::Text(t)) => match serde_json::from_str::<ToAgent>(&t) {
                    Ok(ToAgent::Connect { session, conn, service, token }) => {
                        // The device side goes to the relay that asked for it.
                        let side = DeviceSide::Dial(relay.clone(), token);
                        let addr = opts.services.get(&service).cloned();
                        tokio::spawn(connect(side, addr, session, conn, service, fail_tx.clone()));
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

/// The device side of a connection: dialed on request, or a spare already open.
enum DeviceSide {
    /// Dial the relay's device endpoint with this device token.
    Dial(RelayUrl, String),
    Ready(DataWs),
}

/// Serves one connection: dial the service (its configured address, if any), then the relay
/// unless a spare is already there, then splice.
async fn connect(
    side: DeviceSide,
    addr: Option<String>,
    session: String,
    conn: u64,
    service: String,
    failures: mpsc::UnboundedSender<FromAgent>,
) {
    let failed = match addr {
        None => Err(format!("service {service:?} is not configured on this device")),
        Some(addr) => match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr)).await {
            Ok(Ok(tcp)) => Ok(tcp),
            Ok(Err(e)) => Err(format!("{e} at {addr}")),
            Err(_) => Err(format!("timed out connecting to {addr}")),
        },
    };
    let tcp = match failed {
        Ok(tcp) => tcp,
        Err(reason) => {
            tracing::warn!(session, conn, service, "{reason}");
            if let DeviceSide::Ready(ws) = side {
                // The spare is paired already: its own Close carries the reason to the client.
                crate::splice::refuse(ws, CloseCode::SERVICE_UNREACHABLE, &reason).await;
            }
            let _ = failures.send(FromAgent::ConnectFailed { session, conn, reason });
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let ws = match side {
        DeviceSide::Ready(ws) => ws,
        DeviceSide::Dial(relay, token) => {
            let path = format!("/api/v1/sessions/{session}/device?conn={conn}");
            match peer::dial_data(&relay, &path, &token).await {
                Ok(ws) => ws,
                Err(e) => {
                    tracing::warn!(session, conn, "dialing the relay's device endpoint: {e:#}");
                    return;
                }
            }
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

/// What the spare keeper and its spares need.
struct SpareCtx {
    relay: RelayUrl,
    device: String,
    key: String,
    services: BTreeMap<String, String>,
    failures: mpsc::UnboundedSender<FromAgent>,
    spares: Spares,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a spare ended.
#[derive(Debug, PartialEq)]
enum SpareEnd {
    /// It took an order: a connection runs on it now.
    Served,
    /// It could not be opened, or the relay closed it.
    Failed,
}

/// Keeps the spares: as many idle ones as connections came in the last 10 s, within the
/// options' bounds (one more each time one is used, one fewer each second above the mark);
/// a failing relay is retried with a growing pause.
async fn keep_spares(ctx: Arc<SpareCtx>) {
    const WINDOW: Duration = Duration::from_secs(10);
    let (used_tx, mut used) = mpsc::unbounded_channel::<()>();
    let mut recent: VecDeque<Instant> = VecDeque::new();
    let mut idle = tokio::task::JoinSet::new();
    // Oldest first, to close the surplus; ids of spares that ended are skipped.
    let mut handles: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
    let mut backoff = MIN_BACKOFF;
    let mut trimmed = Instant::now();
    loop {
        while recent.front().is_some_and(|t| t.elapsed() > WINDOW) {
            recent.pop_front();
        }
        let target = recent.len().clamp(ctx.spares.min, ctx.spares.max);
        while idle.len() < target {
            handles.push_back(idle.spawn(spare(ctx.clone(), used_tx.clone())));
        }
        handles.retain(|h| !h.is_finished());
        // The relay hands out the newest spare; the oldest goes here.
        if idle.len() > target && trimmed.elapsed() >= Duration::from_secs(1) {
            if let Some(oldest) = handles.pop_front() {
                oldest.abort();
                trimmed = Instant::now();
            }
        }
        tokio::select! {
            Some(()) = used.recv() => recent.push_back(Instant::now()),
            Some(end) = idle.join_next() => {
                if matches!(end, Ok(SpareEnd::Failed)) {
                    tokio::time::sleep(backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                } else {
                    backoff = MIN_BACKOFF;
                }
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One spare: open it, wait for its order, start the connection it names.
async fn spare(ctx: Arc<SpareCtx>, used: mpsc::UnboundedSender<()>) -> SpareEnd {
    let path = format!("/api/v1/agent/spare?device={}", ctx.device);
    let mut ws = match peer::dial_data(&ctx.relay, &path, &ctx.key).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(device = ctx.device, "opening a spare connection: {e:#}");
            return SpareEnd::Failed;
        }
    };
    let order = match crate::splice::first_message(&mut ws).await {
        Ok(order) => order,
        Err(e) => {
            tracing::debug!(device = ctx.device, "spare connection ended: {e}");
            return SpareEnd::Failed;
        }
    };
    let _ = used.send(());
    match serde_json::from_str::<ToAgent>(&order) {
        Ok(ToAgent::Connect { session, conn, service, .. }) => {
            let addr = ctx.services.get(&service).cloned();
            tokio::spawn(connect(DeviceSide::Ready(ws), addr, session, conn, service, ctx.failures.clone()));
            SpareEnd::Served
        }
        Err(e) => {
            tracing::warn!("relay sent an unknown order on a spare connection ({e}): closed");
            SpareEnd::Failed
        }
    }
}
