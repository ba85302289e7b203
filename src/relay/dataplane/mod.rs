//! The relay's data plane: worker threads, each with its own runtime, tunnel table and buffer
//! pool, forwarding paired WebSocket connections with the in-place codec.
//!
//! This is the only part of ringway that touches io_uring (in `uring`). The backend seam is
//! small: a backend adopts a socket ([`tunnel::Io`]) and owns a pool ([`tunnel::Pool`]); the
//! forwarding logic in `tunnel` is written once for both. `epoll` is the default (it won the
//! load benchmark); `--backend uring` selects io_uring, and [`probe`] refuses it where this
//! process cannot create a ring (Docker's default seccomp profile, old kernels).
//!
//! What it may know of the rest of the relay is narrow: the codec, the hand-off
//! ([`crate::relay::handoff`]: sockets and orders in, connection ends out), how a connection
//! ends ([`crate::relay::ending`]), and an [`Env`] of limits and counters. It never imports the
//! control API or the session registry, and it does not start the HTTP server: the bootstrap
//! (`server`) passes that in as the `control_plane` of [`run_worker`].
//!
//! Both sockets of a connection live on one worker: the control plane hands every upgraded
//! socket (with the bytes hyper read past the request) to the owner worker as a [`Cmd`].

mod epoll;
mod tls;
mod tunnel;
mod uring;

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::DataPlane;
use crate::relay::ending::{self, CloseReason};
use crate::relay::handoff::{Cmd, ConnEnd, ConnEnds, DataSocket};
use crate::relay::metrics::Metrics;
use tunnel::{Entry, Table, TunnelCtl};

/// The limits a worker's tunnels keep.
#[derive(Debug, Clone, Copy)]
pub struct TunnelLimits {
    /// The largest frame a peer may send (`limits.max_frame_bytes`).
    pub max_frame_bytes: u64,
    /// How long a stopping tunnel gives a frame in flight and its Close (`limits.close_timeout_secs`).
    pub close_timeout: Duration,
    /// A tunnel where no byte moved for this long is closed (`limits.idle_timeout_secs`).
    pub idle_timeout: Duration,
    /// How long a client side waits for its device side (`limits.pair_timeout_secs`).
    pub pair_timeout: Duration,
}

impl TunnelLimits {
    pub fn of(limits: &crate::config::Limits) -> TunnelLimits {
        TunnelLimits {
            max_frame_bytes: limits.max_frame_bytes,
            close_timeout: Duration::from_secs(limits.close_timeout_secs),
            idle_timeout: Duration::from_secs(limits.idle_timeout_secs),
            pair_timeout: Duration::from_secs(limits.pair_timeout_secs),
        }
    }
}

/// What a worker's tunnels know of the relay: limits, counters, and where ends are reported.
#[derive(Clone)]
pub struct Env {
    pub limits: TunnelLimits,
    pub metrics: Arc<Metrics>,
    pub ends: Arc<dyn ConnEnds>,
}

/// Which forwarding engine the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// io_uring driven directly (io-uring crate): provided buffer ring, receives armed in the kernel.
    Uring,
    /// tokio on epoll, readiness first, with a shared buffer pool.
    Epoll,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Uring => "io_uring",
            BackendKind::Epoll => "epoll",
        })
    }
}

/// Whether this process may run `kind`; `Err` says why not.
pub fn probe(kind: BackendKind) -> io::Result<()> {
    match kind {
        BackendKind::Uring => uring::probe(),
        BackendKind::Epoll => Ok(()),
    }
}

/// Whether the peer of a TCP socket is gone: the connection was reset (CLOSE), per `TCP_INFO`.
/// A FIN is not enough: a peer that finished sending may still read the tail of the stream
/// (a normal close ends with the source's FIN while its last bytes are still on their way).
pub(crate) fn tcp_peer_closed(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; an all-zero value is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which outlives the call; the
    // descriptor is borrowed, so it is open.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    const CLOSE: u8 = 7;
    rc == 0 && info.tcpi_state == CLOSE
}

/// Shuts both directions of a socket down: ends any peer's wait on us (an error means it is
/// down already). The descriptor stays open until its owner drops it.
pub(crate) fn shut_down(fd: std::os::fd::BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
}

/// Socket options every data connection gets: no Nagle delay, TCP keepalive so that a peer that
/// vanished without a FIN is noticed (about 2 minutes) even on an otherwise quiet tunnel, and
/// the system's default user timeout again (the accept loop sets a short one for control
/// connections; a tunnel may wait on a slow reader for as long as its peers keep the link up).
pub(crate) fn tune(stream: &impl std::os::fd::AsFd) -> io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(None)
}

/// One side of a tunnel: a socket of the worker's backend, or a TLS connection.
pub(crate) enum Side<I: tunnel::Io> {
    Plain(I),
    /// Boxed: a plain tunnel should not pay for rustls's state.
    Tls(Box<tls::TlsIo<I::Buf>>),
}

pub(crate) enum SideReady<'a, I: tunnel::Io + 'a> {
    Plain(I::Ready<'a>),
    Tls,
}

impl<I: tunnel::Io> tunnel::Io for Side<I> {
    type Buf = I::Buf;
    type Ready<'a>
        = SideReady<'a, I>
    where
        I: 'a;

    async fn readable(&self) -> io::Result<SideReady<'_, I>> {
        match self {
            Side::Plain(io) => io.readable().await.map(SideReady::Plain),
            Side::Tls(io) => io.readable().await.map(|()| SideReady::Tls),
        }
    }

    fn held<'a>(ready: &mut SideReady<'a, I>) -> Option<I::Buf>
    where
        Self: 'a,
    {
        match ready {
            SideReady::Plain(r) => I::held(r),
            SideReady::Tls => None,
        }
    }

    async fn read<'a>(&'a self, ready: SideReady<'a, I>, buf: I::Buf) -> (io::Result<Option<usize>>, I::Buf) {
        match (self, ready) {
            (Side::Plain(io), SideReady::Plain(r)) => io.read(r, buf).await,
            (Side::Tls(io), _) => io.read((), buf).await,
            (Side::Plain(_), SideReady::Tls) => unreachable!("readiness comes from the same side"),
        }
    }

    async fn write_now(&self, buf: I::Buf, range: std::ops::Range<usize>) -> (io::Result<usize>, I::Buf) {
        match self {
            Side::Plain(io) => io.write_now(buf, range).await,
            Side::Tls(io) => io.write_now(buf, range).await,
        }
    }

    async fn write_owned(&self, bytes: Vec<u8>) -> io::Result<()> {
        match self {
            Side::Plain(io) => io.write_owned(bytes).await,
            Side::Tls(io) => io.write_owned(bytes).await,
        }
    }

    fn shutdown(&self) {
        match self {
            Side::Plain(io) => io.shutdown(),
            Side::Tls(io) => io.shutdown(),
        }
    }

    fn peer_closed(&self) -> bool {
        match self {
            Side::Plain(io) => io.peer_closed(),
            Side::Tls(io) => io.peer_closed(),
        }
    }
}

fn adopt<B: Backend>(socket: DataSocket) -> io::Result<Side<B::Io>> {
    match socket {
        DataSocket::Plain(s) => B::adopt(s).map(Side::Plain),
        DataSocket::Tls(t) => tls::TlsIo::new(*t).map(|io| Side::Tls(Box::new(io))),
    }
}

/// A backend: how sockets are adopted and buffers pooled.
pub(crate) trait Backend: 'static {
    type Pool: tunnel::Pool + 'static;
    type Io: tunnel::Io<Buf = <Self::Pool as tunnel::Pool>::Buf> + 'static;
    fn adopt(stream: std::net::TcpStream) -> io::Result<Self::Io>;
}

/// Runs a worker thread until `halt` resolves: its runtime, whatever `control_plane` spawns on
/// it (the bootstrap passes the HTTP accept loop), and the data-plane loop fed by `rx`. What is
/// still running when `halt` resolves is dropped with the runtime.
pub fn run_worker(
    kind: BackendKind,
    dp: &DataPlane,
    env: Env,
    rx: mpsc::UnboundedReceiver<Cmd>,
    control_plane: impl FnOnce() -> io::Result<()>,
    halt: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    match kind {
        BackendKind::Uring => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(uring::Driver::before_park)
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let (pool, driver) = uring::Driver::install(dp.buffers, dp.buffer_size)?;
                env.metrics.buffers_total.fetch_add(pool.count() as u64, Relaxed);
                tokio::task::spawn_local(driver);
                control_plane()?;
                tokio::select! {
                    _ = worker_loop::<uring::Uring>(pool, rx, env) => {}
                    _ = halt => {}
                }
                Ok(())
            })
        }
        BackendKind::Epoll => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let pool = Rc::new(epoll::EpollPool::new(dp.buffers, dp.buffer_size));
                env.metrics.buffers_total.fetch_add(dp.buffers as u64, Relaxed);
                control_plane()?;
                tokio::select! {
                    _ = worker_loop::<epoll::Epoll>(pool, rx, env) => {}
                    _ = halt => {}
                }
                Ok(())
            })
        }
    }
}

async fn worker_loop<B: Backend>(pool: Rc<B::Pool>, mut rx: mpsc::UnboundedReceiver<Cmd>, env: Env) {
    // Shared by reference count: every tunnel's task holds it, and an idle tunnel's task should
    // carry 8 bytes for it, not 80 (the task's allocation is within a few bytes of a size class).
    let env = Rc::new(env);
    let table: Rc<RefCell<Table<Side<B::Io>>>> = Rc::new(RefCell::new(Table::new()));
    tokio::task::spawn_local(pair_deadlines::<B>(table.clone(), env.clone()));
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Cmd::Client { conn, session, stream, leftover } => {
                let client = match adopt::<B>(stream) {
                    Ok(io) => io,
                    Err(e) => {
                        let reason = CloseReason::Abandoned(format!("adopting the client socket: {e}"));
                        env.ends.conn_ended(&session, conn, ConnEnd::before_forwarding(reason));
                        continue;
                    }
                };
                let mut t = table.borrow_mut();
                if let Some((_, reason)) = t.closed_early.remove(&conn) {
                    // Its session ended while it was on its way here.
                    drop(t);
                    let env = env.clone();
                    tokio::task::spawn_local(async move {
                        tunnel::refuse(client, ending::Side::Client, &reason).await;
                        env.ends.conn_ended(&session, conn, ConnEnd::before_forwarding(reason));
                    });
                    continue;
                }
                t.insert(conn, session.clone(), Entry::Pending { client, leftover });
                t.waiting.push_back((tokio::time::Instant::now(), conn));
            }
            Cmd::Device { conn, stream, leftover } => {
                let device = match adopt::<B>(stream) {
                    Ok(device) => device,
                    Err(e) => {
                        // Its client waits for it: answer that one now, not at the deadline.
                        tracing::warn!(conn, "taking over the device side failed: {e}");
                        let (table, env) = (table.clone(), env.clone());
                        let reason = CloseReason::AdoptFailed(e.to_string());
                        tokio::task::spawn_local(async move { close_pending::<B>(&table, &env, conn, reason).await });
                        continue;
                    }
                };
                let pending = matches!(table.borrow().get(conn), Some(Entry::Pending { .. }));
                if !pending {
                    tokio::task::spawn_local(async move {
                        tunnel::refuse(device, ending::Side::Device, &CloseReason::NotAwaited).await
                    });
                    continue;
                }
                let Some((session, Entry::Pending { client, leftover: client_leftover })) =
                    table.borrow_mut().remove(conn)
                else {
                    unreachable!("checked pending above")
                };
                let ctl = Rc::new(TunnelCtl::new());
                table.borrow_mut().insert(conn, session.clone(), Entry::Active(ctl.clone()));
                let (table, env, pool) = (table.clone(), env.clone(), pool.clone());
                tokio::task::spawn_local(async move {
                    env.metrics.tunnels_active.fetch_add(1, Relaxed);
                    let end = tunnel::run_tunnel(client, client_leftover, device, leftover, &*pool, &ctl, &env).await;
                    env.metrics.tunnels_active.fetch_sub(1, Relaxed);
                    table.borrow_mut().remove(conn);
                    env.ends.conn_ended(&session, conn, end);
                });
            }
            Cmd::Tally(reply) => {
                let _ = reply.send(table.borrow().tally());
            }
            Cmd::AgentLink { conn, down } => {
                if let Some(Entry::Active(ctl)) = table.borrow().get(conn) {
                    ctl.agent_link(down);
                }
            }
            Cmd::Close { conn, reason } => {
                let found = match table.borrow().get(conn) {
                    Some(Entry::Active(ctl)) => Some(Some(ctl.clone())),
                    Some(Entry::Pending { .. }) => Some(None),
                    None => None,
                };
                let Some(active) = found else {
                    // Not here (yet): its client side may still be on its way.
                    let now = tokio::time::Instant::now();
                    table.borrow_mut().closed_early.insert(conn, (now, reason));
                    continue;
                };
                match active {
                    Some(ctl) => ctl.close_because(reason),
                    None => {
                        let (table, env) = (table.clone(), env.clone());
                        tokio::task::spawn_local(async move { close_pending::<B>(&table, &env, conn, reason).await });
                    }
                }
            }
        }
    }
}

/// Closes client connections whose device side did not arrive within `limits.pair_timeout_secs`.
/// One sweep per worker over the parked connections in arrival order, rather than a timer per
/// connection.
async fn pair_deadlines<B: Backend>(table: Rc<RefCell<Table<Side<B::Io>>>>, env: Rc<Env>) {
    let timeout = env.limits.pair_timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        // Close orders for connections that never arrived (they had ended already) expire.
        table.borrow_mut().closed_early.retain(|_, (at, _)| now.duration_since(*at) < timeout);
        loop {
            let next = {
                let mut t = table.borrow_mut();
                match t.waiting.front() {
                    Some(&(since, conn)) if now.duration_since(since) >= timeout => {
                        t.waiting.pop_front();
                        Some(conn)
                    }
                    _ => None,
                }
            };
            let Some(conn) = next else { break };
            close_pending::<B>(&table, &env, conn, CloseReason::PairTimeout).await;
        }
    }
}

async fn close_pending<B: Backend>(table: &RefCell<Table<Side<B::Io>>>, env: &Env, conn: u64, reason: CloseReason) {
    // Only a parked connection: a paired one is closed through its TunnelCtl.
    let removed = {
        let mut t = table.borrow_mut();
        match t.get(conn) {
            Some(Entry::Pending { .. }) => t.remove(conn),
            _ => None,
        }
    };
    if let Some((session, Entry::Pending { client, .. })) = removed {
        tunnel::refuse(client, ending::Side::Client, &reason).await;
        env.ends.conn_ended(&session, conn, ConnEnd::before_forwarding(reason));
    }
}
