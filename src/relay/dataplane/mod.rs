//! The relay's data plane: worker threads, each with its own runtime, tunnel table and buffer
//! pool, forwarding paired WebSocket connections with the in-place codec.
//!
//! This is the only part of ringway that touches io_uring (in `uring`). The backend seam is
//! small: a backend adopts a socket ([`tunnel::Io`]) and owns a pool ([`tunnel::Pool`]); the
//! forwarding logic in `tunnel` is written once for both. `epoll` is the default (it won the
//! load benchmark); `--backend uring` selects io_uring, and [`probe`] refuses it where this
//! process cannot create a ring (Docker's default seccomp profile, old kernels).
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

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::relay::state::ConnEnd;
use crate::relay::Relay;
use crate::ws::CloseCode;
use tunnel::{Entry, Table, TunnelCtl};

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

/// An upgraded data connection as it leaves hyper.
pub enum DataSocket {
    /// Plain TCP, taken off the accepting runtime's reactor.
    Plain(std::net::TcpStream),
    /// TLS terminated by the relay; stays on the reactor that accepted it.
    Tls(Box<tls::TlsStream>),
}

/// What the control plane hands a worker.
pub enum Cmd {
    /// A client data connection upgraded; park it until its device side arrives.
    Client { conn: u64, session: Arc<str>, stream: DataSocket, leftover: Bytes },
    /// The device side of `conn` upgraded; pair it and start forwarding.
    Device { conn: u64, stream: DataSocket, leftover: Bytes },
    /// End `conn` with this close code on both sides.
    Close { conn: u64, code: CloseCode, reason: String },
    /// The agent of `conn`'s device left its control connection (`Some(reason)`: if the device
    /// side drops now, the client hears 4004 with this reason) or came back (`None`).
    AgentLink { conn: u64, down: Option<String> },
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

/// Socket options every data connection gets: no Nagle delay, and TCP keepalive so that a
/// peer that vanished without a FIN is noticed (about 2 minutes) even on an otherwise quiet tunnel.
pub(crate) fn tune(stream: &impl std::os::fd::AsFd) -> io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    sock.set_tcp_keepalive(&keepalive)
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

/// Runs worker thread `index` until the process ends: its runtime, the control plane's accept
/// loop on `listener`, and the data-plane loop fed by `rx`.
pub fn run_worker(
    kind: BackendKind,
    index: usize,
    listener: std::net::TcpListener,
    rx: mpsc::UnboundedReceiver<Cmd>,
    relay: Arc<Relay>,
) -> anyhow::Result<()> {
    let dp = relay.config.dataplane.clone();
    match kind {
        BackendKind::Uring => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(uring::Driver::before_park)
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let (pool, driver) = uring::Driver::install(dp.buffers, dp.buffer_size)?;
                tokio::task::spawn_local(driver);
                thread_main::<uring::Uring>(index, pool, listener, rx, relay).await
            })
        }
        BackendKind::Epoll => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let pool = Rc::new(epoll::EpollPool::new(dp.buffers, dp.buffer_size));
                thread_main::<epoll::Epoll>(index, pool, listener, rx, relay).await
            })
        }
    }
}

async fn thread_main<B: Backend>(
    index: usize,
    pool: Rc<B::Pool>,
    listener: std::net::TcpListener,
    rx: mpsc::UnboundedReceiver<Cmd>,
    relay: Arc<Relay>,
) -> anyhow::Result<()> {
    relay.metrics.buffers_total.fetch_add(relay.config.dataplane.buffers as u64, Relaxed);
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::task::spawn_local(crate::relay::api::accept_loop(listener, relay.clone(), index));
    worker_loop::<B>(pool, rx, relay).await;
    Ok(())
}

async fn worker_loop<B: Backend>(pool: Rc<B::Pool>, mut rx: mpsc::UnboundedReceiver<Cmd>, relay: Arc<Relay>) {
    let table: Rc<RefCell<Table<Side<B::Io>>>> = Rc::new(RefCell::new(Table::new()));
    tokio::task::spawn_local(pair_deadlines::<B>(table.clone(), relay.clone()));
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Cmd::Client { conn, session, stream, leftover } => {
                let client = match adopt::<B>(stream) {
                    Ok(io) => io,
                    Err(e) => {
                        relay.conn_ended(&session, conn, ConnEnd::failed(format!("adopting client socket: {e}")));
                        continue;
                    }
                };
                let mut t = table.borrow_mut();
                if let Some((_, code, reason)) = t.closed_early.remove(&conn) {
                    // Its session ended while it was on its way here.
                    drop(t);
                    let relay = relay.clone();
                    tokio::task::spawn_local(async move {
                        tunnel::refuse(client, code, &reason).await;
                        relay.conn_ended(&session, conn, ConnEnd::failed(format!("{code} {reason}")));
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
                        let (table, relay) = (table.clone(), relay.clone());
                        let reason = format!("the relay could not take over the device side: {e}");
                        tokio::task::spawn_local(async move {
                            close_pending::<B>(&table, &relay, conn, CloseCode::SERVICE_UNREACHABLE, &reason).await
                        });
                        continue;
                    }
                };
                let pending = matches!(table.borrow().get(conn), Some(Entry::Pending { .. }));
                if !pending {
                    tokio::task::spawn_local(tunnel::refuse(
                        device,
                        CloseCode::POLICY_VIOLATION,
                        "no connection waits for this device side",
                    ));
                    continue;
                }
                let Some((session, Entry::Pending { client, leftover: client_leftover })) =
                    table.borrow_mut().remove(conn)
                else {
                    unreachable!("checked pending above")
                };
                let ctl = Rc::new(TunnelCtl::new());
                table.borrow_mut().insert(conn, session.clone(), Entry::Active(ctl.clone()));
                let (table, relay, pool) = (table.clone(), relay.clone(), pool.clone());
                tokio::task::spawn_local(async move {
                    relay.metrics.tunnels_active.fetch_add(1, Relaxed);
                    let end = tunnel::run_tunnel(client, client_leftover, device, leftover, &*pool, &ctl, &relay).await;
                    relay.metrics.tunnels_active.fetch_sub(1, Relaxed);
                    table.borrow_mut().remove(conn);
                    relay.conn_ended(&session, conn, end);
                });
            }
            Cmd::AgentLink { conn, down } => {
                if let Some(Entry::Active(ctl)) = table.borrow().get(conn) {
                    ctl.agent_link(down.as_deref());
                }
            }
            Cmd::Close { conn, code, reason } => {
                let found = match table.borrow().get(conn) {
                    Some(Entry::Active(ctl)) => Some(Some(ctl.clone())),
                    Some(Entry::Pending { .. }) => Some(None),
                    None => None,
                };
                let Some(active) = found else {
                    // Not here (yet): its client side may still be on its way.
                    let now = tokio::time::Instant::now();
                    table.borrow_mut().closed_early.insert(conn, (now, code, reason));
                    continue;
                };
                match active {
                    Some(ctl) => ctl.close_because(code, &reason),
                    None => {
                        let (table, relay) = (table.clone(), relay.clone());
                        tokio::task::spawn_local(async move {
                            close_pending::<B>(&table, &relay, conn, code, &reason).await
                        });
                    }
                }
            }
        }
    }
}

/// Closes client connections whose device side did not arrive within `limits.pair_timeout_secs`.
/// One sweep per worker over the parked connections in arrival order, rather than a timer per
/// connection.
async fn pair_deadlines<B: Backend>(table: Rc<RefCell<Table<Side<B::Io>>>>, relay: Arc<Relay>) {
    let timeout = Duration::from_secs(relay.config.limits.pair_timeout_secs);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        // Close orders for connections that never arrived (they had ended already) expire.
        table.borrow_mut().closed_early.retain(|_, (at, _, _)| now.duration_since(*at) < timeout);
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
            let reason = "device did not open the connection in time";
            close_pending::<B>(&table, &relay, conn, CloseCode::SERVICE_UNREACHABLE, reason).await;
        }
    }
}

async fn close_pending<B: Backend>(
    table: &RefCell<Table<Side<B::Io>>>,
    relay: &Relay,
    conn: u64,
    code: CloseCode,
    reason: &str,
) {
    // Only a parked connection: a paired one is closed through its TunnelCtl.
    let removed = {
        let mut t = table.borrow_mut();
        match t.get(conn) {
            Some(Entry::Pending { .. }) => t.remove(conn),
            _ => None,
        }
    };
    if let Some((session, Entry::Pending { client, .. })) = removed {
        tunnel::refuse(client, code, reason).await;
        relay.conn_ended(&session, conn, ConnEnd::failed(format!("{code} {reason}")));
    }
}
