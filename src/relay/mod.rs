//! The relay role: configuration in, a listening socket, worker threads each running the
//! control plane (hyper) and the data plane (tunnels) for the connections it owns.
//!
//! - `admission`: per-address handshake shares and the failed-login gate.
//! - `api`: hyper routes — control API, health, metrics, WebSocket upgrades and the hand-off of
//!   data sockets to the data plane.
//! - `channels`: the agent and session JSON control channels.
//! - `state`: sessions, agents, tokens — the shared tables.
//! - `metrics`: counters and gauges, Prometheus text.
//! - `audit`: the JSON-lines audit log.
//! - `dataplane`: workers, tunnel tables, buffer pools, forwarding (io_uring or epoll).

mod admission;
pub mod api;
mod audit;
pub mod channels;
pub mod dataplane;
pub mod metrics;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use crate::config::Config;
pub use dataplane::BackendKind;
pub use state::Relay;

/// A relay that is listening: its address, backend and shared state.
pub struct Running {
    pub addr: SocketAddr,
    pub backend: BackendKind,
    pub relay: Arc<Relay>,
}

impl Running {
    /// Graceful shutdown: stop accepting and refuse new sessions, let tunnels finish for up to
    /// `limits.drain_timeout_secs`, then close what is left with 1001 and give the close frames
    /// a moment to go out.
    pub fn shutdown(&self) {
        let relay = &self.relay;
        relay.shutdown.send_replace(true);
        let active = || relay.metrics.tunnels_active.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(tunnels = active(), "shutting down: draining tunnels");
        let drain_until = Instant::now() + Duration::from_secs(relay.config.limits.drain_timeout_secs);
        while active() > 0 && Instant::now() < drain_until {
            std::thread::sleep(Duration::from_millis(100));
        }
        relay.close_all("relay shutting down");
        let close_until = Instant::now() + Duration::from_secs(2);
        while active() > 0 && Instant::now() < close_until {
            std::thread::sleep(Duration::from_millis(20));
        }
        relay.audit.close();
        tracing::info!(tunnels = active(), "relay stopped");
    }
}

/// Chooses the backend: the one asked for, else epoll; fails if this process cannot run it.
pub fn choose_backend(forced: Option<BackendKind>) -> anyhow::Result<BackendKind> {
    // epoll is the default: it won the load benchmark's bake-off on this project's machine
    // (README, Performance). io_uring is there for `--backend uring`, checked before use.
    let kind = forced.unwrap_or(BackendKind::Epoll);
    dataplane::probe(kind).with_context(|| format!("--backend {kind}: this process cannot run it"))?;
    Ok(kind)
}

/// A non-blocking listener whose accept queue holds `backlog` connections (the kernel caps it at
/// `net.core.somaxconn`). std's 128 overflows under a burst of connects — 500 at once from one
/// host in the hostile-input test — and an overflowing queue drops or resets connections from
/// everyone, before the relay can apply its per-address share.
fn listen_on(addr: SocketAddr, backlog: usize) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    // Rebinding a port whose old connections linger in TIME_WAIT (a restart); still no
    // SO_REUSEPORT, so a second live relay cannot take the address.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.clamp(128, 65_535) as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Binds `listen` and starts the workers. Refuses an address another process already serves
/// (no `SO_REUSEPORT`: a second relay must not silently take half the connections).
pub fn start(config: Config, listen: SocketAddr, backend: Option<BackendKind>) -> anyhow::Result<Running> {
    let backend = choose_backend(backend)?;
    let listener = listen_on(listen, config.limits.max_handshakes).with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let workers = match config.dataplane.workers {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
    let relay = Arc::new(Relay::new(config, txs)?);

    for (index, rx) in rxs.into_iter().enumerate() {
        let listener = listener.try_clone()?;
        let relay = relay.clone();
        std::thread::Builder::new().name(format!("ringway-worker-{index}")).spawn(move || {
            // A relay with a dead worker would strand every connection assigned to it.
            if let Err(e) = dataplane::run_worker(backend, index, listener, rx, relay) {
                tracing::error!(worker = index, "worker failed: {e:#}");
                std::process::exit(1);
            }
        })?;
    }
    let reaper = relay.clone();
    std::thread::Builder::new().name("ringway-reaper".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_millis(250));
        reaper.reap();
    })?;
    tracing::info!(%addr, %backend, workers, "relay started");
    Ok(Running { addr, backend, relay })
}
