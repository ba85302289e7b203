//! Backend-independent tunnel logic: the two pumps of a paired connection, how a tunnel ends,
//! and the per-worker tunnel table. The backends (`uring`, `epoll`) supply sockets ([`Io`]) and
//! a buffer pool ([`Pool`]); everything else — readiness first, one buffer checked out only
//! while bytes are in flight, in-place forwarding, close codes — is written once, here.
//!
//! Rules this module keeps: a read or write that was started is always awaited to completion,
//! never dropped; only the wait for input and buffer waits are raced against a stop signal, and
//! those are cancel-safe (io_uring's armed receive is cancelled in the kernel, and any bytes it
//! took are dropped with the stopping tunnel).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::ops::{DerefMut, Range};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::Env;
use crate::relay::ending::{CloseReason, Ending, Goodbye, PumpEnd, Side};
use crate::relay::handoff::{ConnEnd, Tally};
use crate::ws::{Event, Forwarder, HEADROOM};

/// A buffer pool that hands buffers out first come, first served.
pub(crate) trait Pool {
    type Buf: DerefMut<Target = [u8]>;
    /// Waits (fairly, FIFO) for a free buffer. Cancel-safe.
    async fn acquire(&self) -> Self::Buf;
    fn release(&self, buf: Self::Buf);
}

/// One side's socket as the data plane drives it.
pub(crate) trait Io {
    type Buf: DerefMut<Target = [u8]>;
    /// Proof of readiness, passed to `read` so it can clear readiness it consumed.
    type Ready<'a>
    where
        Self: 'a;
    /// Waits until the socket has bytes (or EOF) to read. Cancel-safe: no buffer, no IO.
    async fn readable(&self) -> io::Result<Self::Ready<'_>>;
    /// The buffer the readiness wait already filled or was handed, for a backend whose kernel
    /// picks the buffer; `None` means `read` needs one from the pool.
    fn held<'a>(_ready: &mut Self::Ready<'a>) -> Option<Self::Buf>
    where
        Self: 'a,
    {
        None
    }
    /// Reads into `buf[HEADROOM..]`. `Ok(None)`: the readiness was stale, nothing was read.
    async fn read<'a>(&'a self, ready: Self::Ready<'a>, buf: Self::Buf) -> (io::Result<Option<usize>>, Self::Buf);
    /// Writes as much of `buf[range]` as the socket takes right now, without waiting for room;
    /// returns how many bytes went. A pool buffer is never held while a slow reader drains.
    async fn write_now(&self, buf: Self::Buf, range: Range<usize>) -> (io::Result<usize>, Self::Buf);
    /// Writes all of `bytes` (owned, not a pool buffer), waiting for room as long as it takes,
    /// and flushes anything an earlier `write_now` left buffered (TLS).
    async fn write_owned(&self, bytes: Vec<u8>) -> io::Result<()>;
    /// Shuts both directions down (ends any peer's wait on us).
    fn shutdown(&self);
    /// The peer is gone: its TCP connection was reset. Cheap, but a system call: asked only
    /// while a write is stuck.
    fn peer_closed(&self) -> bool;
}

/// How long a tunnel whose device side dropped waits to hear that the agent is gone.
const AGENT_LOSS_GRACE: Duration = Duration::from_secs(2);
/// While a write waits for a destination that takes nothing, how often it checks whether to
/// give up (the tunnel is stopping, or the source hung up).
const WRITE_CHECK: Duration = Duration::from_millis(250);

/// Which way a pump moves bytes. The index of each tunnel array below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    ToDevice = 0,
    ToClient = 1,
}

impl Dir {
    fn source(self) -> Side {
        match self {
            Dir::ToDevice => Side::Client,
            Dir::ToClient => Side::Device,
        }
    }

    fn dest(self) -> Side {
        self.source().other()
    }
}

/// Shared by a tunnel's two pumps and whoever may close it from outside: the tunnel's
/// [`Ending`] (what decides the Close each side gets) and the signal that wakes the pumps.
pub(crate) struct TunnelCtl {
    /// Set once; both pumps race their readiness and buffer waits against it (`stopped`).
    stopping: Cell<bool>,
    /// Wakes whoever waits in `stopped` when `stopping` is set or the agent's state changes.
    wake: Notify,
    /// Decides what each side hears when the tunnel ends, and why it ended.
    ending: RefCell<Ending>,
    /// What moved so far (the pumps count; a tally reads it).
    moved: Moved,
}

impl TunnelCtl {
    pub(crate) fn new() -> TunnelCtl {
        TunnelCtl {
            stopping: Cell::new(false),
            wake: Notify::new(),
            ending: RefCell::new(Ending::default()),
            moved: Moved::new(),
        }
    }

    /// Bytes forwarded so far: (to the device, to the client).
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (self.moved.bytes[0].get(), self.moved.bytes[1].get())
    }

    /// The device's agent left its control connection (`Some(device)`) or came back (`None`).
    pub(crate) fn agent_link(&self, down: Option<String>) {
        self.ending.borrow_mut().agent_link(down);
        self.wake.notify_waiters();
    }

    /// Resolves once the tunnel is told to stop or its agent is known to be gone. Cancel-safe.
    async fn stopped_or_agent_gone(&self) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stopping.get() || self.ending.borrow().agent_gone() {
                return;
            }
            notified.await;
        }
    }

    /// Stops both pumps; each says goodbye as the tunnel's [`Ending`] decides.
    fn stop(&self) {
        self.stopping.set(true);
        self.wake.notify_waiters();
    }

    /// The relay closes the tunnel: both sides hear `reason` (the first order wins).
    pub(crate) fn close_because(&self, reason: CloseReason) {
        self.ending.borrow_mut().order(reason);
        self.stop();
    }

    /// Resolves once the tunnel is told to stop. Cancel-safe.
    async fn stopped(&self) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            // Register before checking the flag, so a stop between the two is not missed.
            notified.as_mut().enable();
            if self.stopping.get() {
                return;
            }
            notified.await;
        }
    }
}

/// What moved through a tunnel: bytes per direction and when bytes last moved.
pub(crate) struct Moved {
    bytes: [Cell<u64>; 2],
    last: Cell<tokio::time::Instant>,
}

impl Moved {
    fn new() -> Moved {
        Moved { bytes: Default::default(), last: Cell::new(tokio::time::Instant::now()) }
    }
}

/// One direction's fixed context.
struct Leg<'a, I, P> {
    dir: Dir,
    src: &'a I,
    dst: &'a I,
    pool: &'a P,
    ctl: &'a TunnelCtl,
    env: &'a Env,
    moved: &'a Moved,
}

/// Moves frames from `src` to `dst` until the source closes, breaks, or the tunnel stops.
///
/// Only the wait for readiness lives in this future; each read→forward→write cycle and the
/// farewell run in a boxed future of their own, so an idle tunnel carries none of their state.
async fn pump<I: Io, P: Pool<Buf = I::Buf>>(leg: Leg<'_, I, P>, mut leftover: Bytes) -> PumpEnd {
    let mut fwd = Forwarder::new(leg.env.limits.max_frame_bytes);
    let end = loop {
        let ready = if leftover.is_empty() {
            tokio::select! {
                biased;
                _ = leg.ctl.stopped() => break PumpEnd::Stopped,
                ready = leg.src.readable() => match ready {
                    Ok(r) => Some(r),
                    Err(_) => break PumpEnd::Gone,
                },
            }
        } else {
            None
        };
        if let Some(end) = Box::pin(cycle(&leg, &mut fwd, ready, &mut leftover, None)).await {
            break end;
        }
    };
    Box::pin(farewell(&leg, &mut fwd, &mut leftover, &end)).await;
    end
}

/// The tunnel was stopped in the middle of a frame toward `dst`: forward the rest of that frame
/// (and nothing after it) so the farewell Close can follow it, within `limits.close_timeout_secs`.
/// A source that does not deliver the rest in time, or is gone, leaves the frame unfinished: the
/// relay never makes up bytes, so that destination then gets no Close (its client still learns
/// why on the session control connection).
async fn finish_frame<I: Io, P: Pool<Buf = I::Buf>>(leg: &Leg<'_, I, P>, fwd: &mut Forwarder, leftover: &mut Bytes) {
    let deadline = tokio::time::Instant::now() + leg.env.limits.close_timeout;
    while !fwd.at_frame_boundary() {
        let ready = if leftover.is_empty() {
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline) => return,
                ready = leg.src.readable() => match ready {
                    Ok(r) => Some(r),
                    Err(_) => return,
                },
            }
        } else {
            None
        };
        if cycle(leg, fwd, ready, leftover, Some(deadline)).await.is_some() {
            return;
        }
    }
}

/// One buffer's round: take a buffer, read (or take leftover bytes), rewrite, write, give the
/// buffer back. `Some` ends the pump.
///
/// `finishing`: the tunnel is stopping and this round only completes the frame in flight: bytes
/// past its end are dropped, and the buffer wait is raced against this deadline instead of the
/// stop signal.
async fn cycle<'a, I: Io, P: Pool<Buf = I::Buf>>(
    leg: &Leg<'a, I, P>,
    fwd: &mut Forwarder,
    mut ready: Option<I::Ready<'a>>,
    leftover: &mut Bytes,
    finishing: Option<tokio::time::Instant>,
) -> Option<PumpEnd> {
    let Leg { dir, src, dst, pool, ctl, env, moved } = *leg;
    let mut buf = match ready.as_mut().and_then(I::held) {
        Some(buf) => buf,
        None => match finishing {
            None => tokio::select! {
                biased;
                _ = ctl.stopped() => return Some(PumpEnd::Stopped),
                buf = pool.acquire() => buf,
            },
            Some(deadline) => tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline) => return Some(PumpEnd::Stopped),
                buf = pool.acquire() => buf,
            },
        },
    };
    env.metrics.buffers_in_use.fetch_add(1, Relaxed);
    let cap = buf.len() - HEADROOM;
    // From here on the buffer is in flight: every operation is awaited to completion.
    let (read, b) = match ready {
        Some(ready) => src.read(ready, buf).await,
        None => {
            let n = leftover.len().min(cap);
            buf[HEADROOM..HEADROOM + n].copy_from_slice(&leftover.split_to(n));
            (Ok(Some(n)), buf)
        }
    };
    buf = b;
    let n = match read {
        Ok(Some(0)) | Err(_) => {
            release(pool, env, buf);
            return Some(PumpEnd::Gone);
        }
        Ok(None) => {
            release(pool, env, buf);
            return None;
        }
        Ok(Some(n)) => n,
    };
    // Finishing: only what is left of the frame in flight (the rest is dropped with the tunnel).
    let n = match finishing {
        Some(_) => n.min(usize::try_from(fwd.frame_remaining()).unwrap_or(usize::MAX)),
        None => n,
    };
    // On a violation the whole frames before it still go on: a Close the source sent before
    // breaking the rules reaches the other side.
    let (out, violation) = match fwd.forward(&mut buf, HEADROOM..HEADROOM + n, |_: Event<'_>| {}) {
        Ok(out) => (out, None),
        Err(e) => (e.out.clone(), Some(e.error)),
    };
    let mut failed = false;
    if !out.is_empty() {
        let len = out.len();
        let (res, b) = dst.write_now(buf, out.clone()).await;
        buf = b;
        // What the destination did not take at once is copied out, so the pool buffer goes
        // back now: a reader that stops reading holds its own bytes, not the pool's buffers.
        let rest = match res {
            Ok(sent) => buf[out.start + sent..out.end].to_vec(),
            Err(_) => {
                failed = true;
                Vec::new()
            }
        };
        release(pool, env, buf);
        failed = failed || write_rest(leg, rest).await.is_err();
        if !failed {
            let counter = match dir {
                Dir::ToDevice => &env.metrics.bytes_to_device,
                Dir::ToClient => &env.metrics.bytes_to_client,
            };
            counter.fetch_add(len as u64, Relaxed);
            moved.bytes[dir as usize].set(moved.bytes[dir as usize].get() + len as u64);
            moved.last.set(tokio::time::Instant::now());
        }
    } else {
        release(pool, env, buf);
    }
    if let Some(e) = violation {
        return Some(PumpEnd::Violation(e));
    }
    if failed {
        // The destination is gone; the other pump will see it too.
        return Some(PumpEnd::DestinationGone);
    }
    fwd.closed().then_some(PumpEnd::Closed)
}

/// Writes what the destination did not take at once (a frame's tail, a farewell), waiting as
/// long as it takes — unless the tunnel is stopping or the source was reset meanwhile: then the
/// destination gets `limits.close_timeout_secs` more, and if it has not taken everything by then,
/// both sockets are shut down (the write fails and the tunnel ends; nothing is dropped while in
/// flight). So a stopped tunnel never waits longer on a peer that stopped reading, and a client
/// that left a service that never reads does not keep its tunnel until the idle timeout.
///
/// The checks run only on this slow path, every `WRITE_CHECK`: an idle tunnel carries no timer
/// for them.
async fn write_rest<I: Io, P>(leg: &Leg<'_, I, P>, rest: Vec<u8>) -> io::Result<()> {
    if rest.is_empty() {
        return Ok(());
    }
    let write = leg.dst.write_owned(rest);
    tokio::pin!(write);
    let close_wait = leg.env.limits.close_timeout;
    let mut giving_up_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            res = &mut write => return res,
            _ = tokio::time::sleep(WRITE_CHECK) => {
                if giving_up_since.is_none() && (leg.ctl.stopping.get() || leg.src.peer_closed()) {
                    giving_up_since = Some(tokio::time::Instant::now());
                }
                if giving_up_since.is_some_and(|at| at.elapsed() >= close_wait) {
                    leg.src.shutdown();
                    leg.dst.shutdown();
                }
            }
        }
    }
}

/// On the way out, tells the destination why, as the tunnel's [`Ending`] decides: stopped in the
/// middle of a frame, it finishes that frame first (if a Close is to follow it).
async fn farewell<I: Io, P: Pool<Buf = I::Buf>>(
    leg: &Leg<'_, I, P>,
    fwd: &mut Forwarder,
    leftover: &mut Bytes,
    end: &PumpEnd,
) {
    let (to, ctl) = (leg.dir.dest(), leg.ctl);
    if matches!(end, PumpEnd::Stopped) && !fwd.at_frame_boundary() && ctl.ending.borrow().finish_frame_for(to) {
        finish_frame(leg, fwd, leftover).await;
    }
    let mut goodbye = ctl.ending.borrow().goodbye(to, *end, false);
    if goodbye == Goodbye::AwaitAgent {
        // A device side that drops without a Close usually means the agent died, and its
        // control connection is about to report it: give that a moment, so the client hears
        // 4004 (device offline) rather than a bare 1001.
        let _ = tokio::time::timeout(AGENT_LOSS_GRACE, ctl.stopped_or_agent_gone()).await;
        goodbye = ctl.ending.borrow().goodbye(to, *end, true);
    }
    if let Goodbye::Send(farewell) = goodbye {
        if fwd.at_frame_boundary() && !fwd.closed() {
            let _ = write_rest(leg, farewell.frame().as_bytes().to_vec()).await;
        }
    }
}

fn release<P: Pool>(pool: &P, env: &Env, buf: P::Buf) {
    pool.release(buf);
    env.metrics.buffers_in_use.fetch_sub(1, Relaxed);
}

/// Runs a paired tunnel to its end: both pumps, the close handshake, then both sockets closed.
pub(crate) async fn run_tunnel<I: Io, P: Pool<Buf = I::Buf>>(
    client: I,
    client_leftover: Bytes,
    device: I,
    device_leftover: Bytes,
    pool: &P,
    ctl: &TunnelCtl,
    env: &Env,
) -> ConnEnd {
    let moved = &ctl.moved;
    let leg = |dir, src, dst| Leg { dir, src, dst, pool, ctl, env, moved };
    let to_device = pump(leg(Dir::ToDevice, &client, &device), client_leftover);
    let to_client = pump(leg(Dir::ToClient, &device, &client), device_leftover);
    let idle = idle_watch(moved, ctl, env.limits.idle_timeout);
    tokio::pin!(to_device, to_client, idle);
    let (first_dir, first) = tokio::select! {
        end = &mut to_device => (Dir::ToDevice, end),
        end = &mut to_client => (Dir::ToClient, end),
        _ = &mut idle => unreachable!("the idle watch never returns"),
    };
    // The close runs in a boxed future of its own: an idle tunnel's task carries none of its
    // state (the close timer alone is ~100 bytes).
    Box::pin(async {
        if matches!(first, PumpEnd::Violation(_)) {
            env.metrics.frame_errors.fetch_add(1, Relaxed);
        }
        // The other pump writes to the first pump's source: a violator hears why.
        if ctl.ending.borrow_mut().pump_ended(first_dir.source(), first) {
            ctl.stop();
        }
        let other = async {
            match first_dir {
                Dir::ToDevice => (&mut to_client).await,
                Dir::ToClient => (&mut to_device).await,
            }
        };
        tokio::pin!(other);
        // After a normal close the other side may keep sending (TCP half-close) until it closes
        // too; only the idle timeout (or a stop) ends a half-closed tunnel early.
        // Whatever the other pump still does is bounded: its writes by `write_rest`, a frame it
        // finishes by its own deadline.
        tokio::select! {
            _ = &mut other => {}
            _ = &mut idle => unreachable!("the idle watch never returns"),
        }
    })
    .await;
    client.shutdown();
    device.shutdown();
    let reason = ctl.ending.borrow().reason();
    ConnEnd { to_device: moved.bytes[0].get(), to_client: moved.bytes[1].get(), reason }
}

/// Closes the tunnel with 1001 once no byte moved either way for `idle`; then waits forever.
async fn idle_watch(moved: &Moved, ctl: &TunnelCtl, idle: Duration) {
    loop {
        let deadline = moved.last.get() + idle;
        if tokio::time::Instant::now() >= deadline {
            ctl.close_because(CloseReason::Idle(idle.as_secs()));
            return std::future::pending().await;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Sends a Close to a side (`to`) that never got paired, then closes it.
pub(crate) async fn refuse<I: Io>(io: I, to: Side, reason: &CloseReason) {
    let farewell = reason.farewell_to(to);
    let _ = io.write_owned(farewell.frame().as_bytes().to_vec()).await;
    io.shutdown();
}

/// A connection in the worker's tunnel table.
pub(crate) enum Entry<I> {
    /// The client side arrived and waits for the device side; nothing is read from it yet.
    Pending { client: I, leftover: Bytes },
    /// Paired and forwarding.
    Active(Rc<TunnelCtl>),
}

/// The worker's tunnel table: its connections by id, touched at pairing and close time only
/// (the forwarding path never looks here).
pub(crate) struct Table<I> {
    entries: HashMap<u64, (Arc<str>, Entry<I>)>,
    /// Parked client connections in arrival order, for the pairing deadline. An entry whose
    /// connection was paired or closed meanwhile is skipped when it comes up.
    pub(crate) waiting: std::collections::VecDeque<(tokio::time::Instant, u64)>,
    /// Close orders for connections whose client side had not reached this worker yet (the
    /// session ended between the relay admitting the connection and the hand-off): the client
    /// side is answered with this reason as soon as it arrives. Kept at most a pairing deadline.
    pub(crate) closed_early: HashMap<u64, (tokio::time::Instant, CloseReason)>,
}

impl<I> Table<I> {
    pub(crate) fn new() -> Table<I> {
        Table { entries: HashMap::new(), waiting: Default::default(), closed_early: HashMap::new() }
    }

    pub(crate) fn insert(&mut self, conn: u64, session: Arc<str>, entry: Entry<I>) {
        self.entries.insert(conn, (session, entry));
    }

    pub(crate) fn remove(&mut self, conn: u64) -> Option<(Arc<str>, Entry<I>)> {
        self.entries.remove(&conn)
    }

    pub(crate) fn get(&self, conn: u64) -> Option<&Entry<I>> {
        self.entries.get(&conn).map(|(_, e)| e)
    }

    /// Bytes forwarded so far by each session's running tunnels on this worker.
    pub(crate) fn tally(&self) -> Tally {
        let mut out = Tally::new();
        for (session, entry) in self.entries.values() {
            let Entry::Active(ctl) = entry else { continue };
            let (to_device, to_client) = ctl.bytes();
            match out.iter_mut().find(|(s, ..)| s == session) {
                Some(row) => (row.1, row.2) = (row.1 + to_device, row.2 + to_client),
                None => out.push((session.clone(), to_device, to_client)),
            }
        }
        out
    }
}
