//! Bootstrap: binds the listener, builds the shared context, starts one thread per worker (each
//! running the control plane's accept loop and the data plane on one runtime) and the reaper,
//! and stops them all again. [`run`] is the whole relay as one future, for `main` and for tests
//! that run it in-process.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use super::context::Relay;
use super::dataplane::{self, BackendKind, Env, TunnelLimits};
use super::ending::CloseReason;
use super::handoff::Workers;
use crate::config::Config;

/// A relay that is listening: its address, backend and shared context.
pub struct Running {
    pub addr: SocketAddr,
    pub backend: BackendKind,
    pub relay: Arc<Relay>,
    /// Flipped after the shutdown's drain and close: the worker threads and the reaper end.
    halt: watch::Sender<bool>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Running {
    /// Graceful shutdown: stop accepting and refuse new sessions (a cluster node also sends its
    /// agents to other nodes), let tunnels finish for up to
    /// `limits.drain_timeout_secs`, then close what is left with 1001, give the close frames a
    /// moment to go out, write out the audit log and end the relay's threads. Blocks.
    pub fn shutdown(&self) {
        let relay = &self.relay;
        relay.shutdown.send_replace(true);
        relay.registry.drain();
        let active = || relay.metrics.tunnels_active.load(Relaxed);
        tracing::info!(tunnels = active(), "shutting down: draining tunnels");
        let drain_until = Instant::now() + Duration::from_secs(relay.config.limits.drain_timeout_secs);
        while active() > 0 && Instant::now() < drain_until {
            std::thread::sleep(Duration::from_millis(100));
        }
        relay.registry.close_all(CloseReason::Shutdown);
        let close_until = Instant::now() + Duration::from_secs(2);
        while active() > 0 && Instant::now() < close_until {
            std::thread::sleep(Duration::from_millis(20));
        }
        relay.registry.stopped();
        relay.audit.close();
        tracing::info!(tunnels = active(), "relay stopped");
        self.halt.send_replace(true);
        for thread in std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner())) {
            let _ = thread.join();
        }
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
pub fn listen_on(addr: SocketAddr, backlog: usize) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    // Rebinding a port whose old connections linger in TIME_WAIT (a restart); still no
    // SO_REUSEPORT, so a second live relay cannot take the address.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.clamp(128, 65_535) as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Binds `listen` and starts the relay on it. Refuses an address another process already
/// serves (no `SO_REUSEPORT`: a second relay must not silently take half the connections).
pub fn start(config: Config, listen: SocketAddr, backend: Option<BackendKind>) -> anyhow::Result<Running> {
    let listener = listen_on(listen, config.limits.max_handshakes).with_context(|| format!("binding {listen}"))?;
    serve(config, listener, backend)
}

/// Starts the relay on a bound listener: the worker threads and the reaper. Returns at once.
pub fn serve(
    mut config: Config,
    listener: std::net::TcpListener,
    backend: Option<BackendKind>,
) -> anyhow::Result<Running> {
    let backend = choose_backend(backend)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    if let Some(cluster) = &mut config.cluster {
        // Port 0 in `advertise` stands for the port this relay listens on (`--listen HOST:0`).
        if let Some(host) = cluster.advertise.strip_suffix(":0") {
            cluster.advertise = format!("{host}:{}", addr.port());
        }
    }
    let workers = match config.dataplane.workers {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let (senders, inboxes) = Workers::new(workers);
    let relay = Arc::new(Relay::new(config, senders)?);
    let (halt, halted) = watch::channel(false);
    let mut threads = Vec::new();

    for (index, rx) in inboxes.into_iter().enumerate() {
        let listener = listener.try_clone()?;
        let relay = relay.clone();
        let mut halted = halted.clone();
        let env = Env {
            limits: TunnelLimits::of(&relay.config.limits),
            metrics: relay.metrics.clone(),
            ends: relay.registry.clone(),
        };
        threads.push(std::thread::Builder::new().name(format!("ringway-worker-{index}")).spawn(move || {
            let dp = relay.config.dataplane.clone();
            let control_plane = move || {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                tokio::task::spawn_local(super::api::accept_loop(listener, relay, index));
                Ok(())
            };
            let halt = async move {
                let _ = halted.wait_for(|h| *h).await;
            };
            // A relay with a dead worker would strand every connection assigned to it.
            if let Err(e) = dataplane::run_worker(backend, &dp, env, rx, control_plane, halt) {
                tracing::error!(worker = index, "worker failed: {e:#}");
                std::process::exit(1);
            }
        })?);
    }
    let (watched, halted_feed) = (relay.clone(), halted.clone());
    threads.push(std::thread::Builder::new().name("ringway-console".into()).spawn(move || {
        if let Err(e) = super::console::feed(watched, halted_feed) {
            tracing::error!("the console's live feed failed to start: {e}");
        }
    })?);
    let reaper = relay.clone();
    let halted = halted.clone();
    threads.push(std::thread::Builder::new().name("ringway-reaper".into()).spawn(move || {
        while !*halted.borrow() {
            std::thread::sleep(Duration::from_millis(250));
            reaper.registry.reap();
        }
    })?);
    tracing::info!(%addr, %backend, workers, "relay started");
    Ok(Running { addr, backend, relay, halt, threads: std::sync::Mutex::new(threads) })
}

/// The whole relay on `listener` until `shutdown` resolves, then a graceful shutdown
/// ([`Running::shutdown`]). Prints nothing; the caller may print [`Running::addr`] first by
/// using [`serve`] instead.
pub async fn run(
    config: Config,
    listener: std::net::TcpListener,
    backend: Option<BackendKind>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let running = serve(config, listener, backend)?;
    shutdown.await;
    tokio::task::spawn_blocking(move || running.shutdown()).await?;
    Ok(())
}
