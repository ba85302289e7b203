//! The io_uring backend written directly on the `io-uring` crate.
//!
//! One ring per worker (SINGLE_ISSUER, DEFER_TASKRUN), driven from the worker's tokio
//! current-thread runtime. An operation likely to complete at once (a send, a receive after a
//! full one) is submitted and reaped on the spot, so its bytes are still in cache when the codec
//! or the send touches them. Receives that wait for data and cancellations are queued, and a
//! driver task submits them once per pass of the run queue. Completions are also reaped before
//! the runtime parks, and whenever the ring's eventfd (signalled when the kernel has deferred
//! work for us) wakes the reactor.
//!
//! Receives pick their buffer from a provided buffer ring, so an idle direction holds no buffer:
//! it has one receive armed in the kernel, nothing else. The codec rewrites the kernel-chosen
//! buffer in place and the send is issued from that same buffer. A direction holds at most one
//! buffer (one read→forward→write cycle at a time).
//!
//! The kernel's ring hands out the buffer that has waited longest, which is the cache-coldest
//! one. So the ring is kept only as deep as the load needs (twice the buffers in use, at least
//! [`MIN_DEPTH`]); the other free buffers wait in a last-in-first-out stack. A receive that finds
//! the ring empty fails with ENOBUFS; the direction then takes the warmest buffer from the stack
//! or, when none is free, queues, and buffers coming back are handed to queued directions first
//! come, first served (a plain receive into the handed buffer) before any returns to the ring.
//! A dropped operation is cancelled in the kernel (`AsyncCancel`); whatever it owned is kept
//! until its completion arrives.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::ops::{Deref, DerefMut, Range};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::tunnel::{Io, Pool};
use super::Backend;
use crate::ws::HEADROOM;

/// The buffer group every receive selects from.
const GROUP: u16 = 0;
/// The kernel ring's least depth, whatever the load.
const MIN_DEPTH: usize = 8;
/// IORING_RECVSEND_POLL_FIRST (in the SQE's ioprio): wait for readiness before trying.
const RECV_POLL_FIRST: u16 = 1;
/// `user_data` of cancellations, whose completions nobody waits for.
const CANCEL: u64 = u64::MAX;

thread_local! {
    /// This worker's driver; set by [`Driver::install`] before any socket is adopted.
    static DRIVER: RefCell<Option<Rc<Driver>>> = const { RefCell::new(None) };
}

fn driver() -> Rc<Driver> {
    DRIVER.with(|d| d.borrow().clone()).expect("the io_uring driver is installed on this worker")
}

pub(crate) struct Uring;

impl Backend for Uring {
    type Pool = BufPool;
    type Io = UringIo;

    fn adopt(stream: std::net::TcpStream) -> io::Result<UringIo> {
        super::tune(&stream)?;
        // Non-blocking: io_uring still waits for readiness itself (it arms a poll), and a
        // receive or send asked not to wait (MSG_DONTWAIT) can never park in a kernel worker.
        stream.set_nonblocking(true)?;
        Ok(UringIo { fd: stream.into(), driver: driver(), maybe_more: Cell::new(false) })
    }
}

/// Whether this process may create a ring with the flags the driver uses.
pub(crate) fn probe() -> io::Result<()> {
    new_ring(8).map(drop)
}

/// A ring with the flags the driver relies on: one issuer thread, completions' deferred work
/// run only when we ask (and flagged in the SQ ring so we know when to ask).
fn new_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::<squeue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(entries * 4)
        .build(entries)
}

/// What an operation left behind when its future was dropped before completing: kept alive
/// until the kernel is done with it.
enum Keep {
    Nothing,
    Buf(Buf),
    Bytes(Vec<u8>),
}

impl Keep {
    fn bytes(&self) -> &[u8] {
        match self {
            Keep::Nothing => &[],
            Keep::Buf(b) => b,
            Keep::Bytes(v) => v,
        }
    }
}

enum OpState {
    Waiting(Option<Waker>),
    Done { res: i32, flags: u32 },
    Orphan(#[allow(dead_code)] Keep),
}

/// A worker's ring and its buffers.
pub(crate) struct Driver {
    ring: RefCell<IoUring>,
    ops: RefCell<slab::Slab<OpState>>,
    pool: Rc<BufPool>,
    /// Registered with the ring: the kernel signals it when completions need reaping.
    eventfd: AsyncFd<OwnedFd>,
    /// A submission is queued and the driver task has been asked to submit it.
    flush_asked: Cell<bool>,
    flush: Notify,
    /// Wakers of completed ops, woken after the ring and op table are released (kept to reuse
    /// its allocation).
    wake: Cell<Vec<Waker>>,
}

impl Driver {
    /// Creates this worker's ring and buffer ring and makes them the worker's driver. Returns
    /// the task that keeps it running; spawn it on the worker's `LocalSet`.
    pub(crate) fn install(buffers: usize, buffer_size: usize) -> io::Result<(Rc<BufPool>, impl Future<Output = ()>)> {
        let ring = new_ring(4096)?;
        // SAFETY: a plain eventfd(2) call; the descriptor is owned from here on.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` was just created and nobody else owns it.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let pool = Rc::new(BufPool::new(&ring, buffers, buffer_size)?);
        let driver = Rc::new(Driver {
            ring: RefCell::new(ring),
            ops: RefCell::new(slab::Slab::with_capacity(1024)),
            pool: pool.clone(),
            // SAFETY: `efd` is owned by the AsyncFd it is registered with.
            eventfd: unsafe { AsyncFd::register(efd) }.map_err(|e| e.into_parts().1)?,
            flush_asked: Cell::new(false),
            flush: Notify::new(),
            wake: Cell::new(Vec::new()),
        });
        DRIVER.with(|d| *d.borrow_mut() = Some(driver.clone()));
        Ok((pool, run(driver)))
    }

    /// Runs from the runtime's `on_thread_park` hook: reap what is ready before sleeping, so a
    /// busy worker seldom needs the eventfd round trip through epoll.
    pub(crate) fn before_park() {
        DRIVER.with(|d| {
            if let Some(d) = d.borrow().as_ref() {
                d.flush();
            }
        });
    }

    /// Queues `sqe` (its `user_data` set to a fresh op slot) and returns the slot. Whoever
    /// queues also sees to its submission: [`Driver::ask_flush`] or [`Driver::submit_now`].
    fn push(&self, sqe: squeue::Entry) -> usize {
        let key = self.ops.borrow_mut().insert(OpState::Waiting(None));
        self.push_raw(sqe.user_data(key as u64));
        key
    }

    fn push_raw(&self, sqe: squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: every pointer in our entries stays valid until the completion is reaped:
        // ops own (or orphan) their buffers, and the fd is kept open by the kernel's reference.
        while unsafe { ring.submission().push(&sqe) }.is_err() {
            if let Err(e) = ring.submit() {
                tracing::error!("io_uring submit failed with a full submission queue: {e}");
            }
        }
    }

    /// Asks the driver task to submit what is queued on its next turn.
    fn ask_flush(&self) {
        if !self.flush_asked.replace(true) {
            self.flush.notify_one();
        }
    }

    /// Submits what is queued, runs the kernel's deferred work, and completes finished ops.
    fn flush(&self) {
        self.flush_asked.set(false);
        let mut ring = self.ring.borrow_mut();
        let pending = ring.submission().len();
        if pending > 0 || ring.submission().taskrun() || !ring.completion().is_empty() {
            enter(&ring, pending, GETEVENTS);
        }
        self.reap(ring);
    }

    /// Submits what is queued without running deferred work, and completes what finished
    /// inline: an operation that can complete at once (a receive with data waiting, a send
    /// with room) is done before its task goes on, while the bytes it moved are still in the
    /// CPU's cache. (Batched with other tasks' operations, the buffer is evicted by the time
    /// the codec reads it: at 1,000 busy tunnels that cost io_uring half its throughput.)
    fn submit_now(&self) {
        let mut ring = self.ring.borrow_mut();
        let pending = ring.submission().len();
        if pending > 0 {
            enter(&ring, pending, 0);
        }
        self.reap(ring);
    }

    /// Completes the ops whose completions are in the ring, waking their tasks once the ring
    /// and op table are released.
    fn reap(&self, mut ring: std::cell::RefMut<'_, IoUring>) {
        let mut wake = self.wake.take();
        {
            let mut ops = self.ops.borrow_mut();
            for cqe in ring.completion() {
                let (key, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
                if cqueue::buffer_select(flags).is_some() {
                    self.pool.in_ring.set(self.pool.in_ring.get() - 1);
                }
                if key == CANCEL {
                    continue;
                }
                let key = key as usize;
                match std::mem::replace(&mut ops[key], OpState::Done { res, flags }) {
                    OpState::Waiting(w) => wake.extend(w),
                    OpState::Orphan(_) => {
                        ops.remove(key);
                        if let Some(id) = cqueue::buffer_select(flags) {
                            drop(self.pool.take(id));
                        }
                    }
                    OpState::Done { .. } => unreachable!("one completion per single-shot op"),
                }
            }
        }
        drop(ring);
        for w in wake.drain(..) {
            w.wake();
        }
        self.wake.set(wake);
    }
}

fn enter(ring: &IoUring, submit: usize, flags: u32) {
    // SAFETY: a plain io_uring_enter with no extra argument.
    let res = unsafe { ring.submitter().enter::<libc::sigset_t>(submit as u32, 0, flags, None) };
    if let Err(e) = res {
        if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
            tracing::error!("io_uring_enter failed: {e}");
        }
    }
}

const GETEVENTS: u32 = io_uring::EnterFlags::GETEVENTS.bits();

/// The worker's driver task: submits queued operations once per pass of the run queue and
/// reaps completions when the eventfd says there are some.
async fn run(driver: Rc<Driver>) {
    loop {
        tokio::select! {
            biased;
            _ = driver.flush.notified() => {}
            ready = driver.eventfd.readable() => {
                let Ok(mut guard) = ready else { return };
                let mut count = [0u8; 8];
                // SAFETY: an 8-byte read into a local from the eventfd we own.
                let n = unsafe { libc::read(driver.eventfd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    guard.clear_ready();
                }
            }
        }
        driver.flush();
    }
}

/// A submitted operation; completes with the kernel's result and flags.
struct Op {
    driver: Rc<Driver>,
    key: usize,
    /// What the kernel may still be reading or writing; handed back on completion.
    keep: Keep,
    done: bool,
}

impl Op {
    /// Queues `sqe` for the driver's next submission.
    fn new(driver: &Rc<Driver>, sqe: squeue::Entry, keep: Keep) -> Op {
        let key = driver.push(sqe);
        driver.ask_flush();
        Op { driver: driver.clone(), key, keep, done: false }
    }

    /// Submits `sqe` at once, for an operation likely to complete inline; see
    /// [`Driver::submit_now`].
    fn now(driver: &Rc<Driver>, sqe: squeue::Entry, keep: Keep) -> Op {
        let key = driver.push(sqe);
        driver.submit_now();
        Op { driver: driver.clone(), key, keep, done: false }
    }

    /// Waits for the completion: `(result, flags, what the op kept)`.
    async fn complete(mut self) -> (i32, u32, Keep) {
        let (res, flags) = poll_fn(|cx| self.poll_done(cx)).await;
        (res, flags, std::mem::replace(&mut self.keep, Keep::Nothing))
    }

    fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<(i32, u32)> {
        // Each completion spends a unit of the task's cooperative budget, as tokio's own
        // sockets do: operations that complete inline would otherwise let one busy direction
        // loop without ever yielding to the worker's other tunnels.
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let mut ops = self.driver.ops.borrow_mut();
        match &mut ops[self.key] {
            OpState::Done { res, flags } => {
                coop.made_progress();
                let out = (*res, *flags);
                ops.remove(self.key);
                self.done = true;
                Poll::Ready(out)
            }
            OpState::Waiting(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            OpState::Orphan(_) => unreachable!("an op is orphaned only when its future is dropped"),
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut ops = self.driver.ops.borrow_mut();
        if let OpState::Done { flags, .. } = ops[self.key] {
            ops.remove(self.key);
            if let Some(id) = cqueue::buffer_select(flags) {
                drop(self.driver.pool.take(id));
            }
            return;
        }
        ops[self.key] = OpState::Orphan(std::mem::replace(&mut self.keep, Keep::Nothing));
        drop(ops);
        self.driver.push_raw(opcode::AsyncCancel::new(self.key as u64).build().user_data(CANCEL));
        self.driver.ask_flush();
    }
}

/// A buffer: one of the pool's (returns itself when dropped: to the first queued direction,
/// else to the kernel's ring or the stack), or a heap buffer when `Pool::acquire` finds every
/// free buffer in the kernel's ring.
pub(crate) enum Buf {
    Pooled { pool: Rc<BufPool>, id: u16 },
    Heap(Box<[u8]>),
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            // SAFETY: buffer `id` lies inside the pool's mapping, and this `Buf` is its only
            // owner while it is checked out of the ring.
            Buf::Pooled { pool, id } => unsafe { std::slice::from_raw_parts(pool.addr(*id), pool.size) },
            Buf::Heap(b) => b,
        }
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            // SAFETY: as in `deref`; `&mut self` makes the access exclusive.
            Buf::Pooled { pool, id } => unsafe { std::slice::from_raw_parts_mut(pool.addr(*id), pool.size) },
            Buf::Heap(b) => b,
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Buf::Pooled { pool, id } = self {
            pool.give_back(*id);
        }
    }
}

/// A queued direction's place in line for a buffer.
struct Turn {
    buf: Cell<Option<u16>>,
    waker: Cell<Option<Waker>>,
}

/// The worker's buffers: one anonymous mapping cut into `count` buffers, a provided buffer
/// ring the kernel takes from, and the line of directions that found the ring empty.
pub(crate) struct BufPool {
    base: NonNull<u8>,
    count: usize,
    size: usize,
    /// The buffer ring shared with the kernel (`entries` x 16 bytes, page aligned).
    ring: NonNull<types::BufRingEntry>,
    entries: u16,
    tail: Cell<u16>,
    /// Buffers in the kernel's ring, as far as reaped completions tell.
    in_ring: Cell<usize>,
    /// Free buffers outside the ring, most recently returned last.
    stack: RefCell<Vec<u16>>,
    /// Buffers checked out to directions.
    in_use: Cell<usize>,
    line: RefCell<VecDeque<Rc<Turn>>>,
}

impl BufPool {
    fn new(ring: &IoUring, count: usize, size: usize) -> io::Result<BufPool> {
        // A buffer ring holds at most 2^15 entries; the config refuses more (`dataplane.buffers`).
        if !(1..=1 << 15).contains(&count) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{count} buffers: a ring takes 1..=32768"),
            ));
        }
        let entries = count.next_power_of_two();
        let base = map(count * size)?;
        let ring_mem = map(entries * std::mem::size_of::<types::BufRingEntry>())?;
        let pool = BufPool {
            base: base.cast(),
            count,
            size,
            ring: ring_mem.cast(),
            entries: entries as u16,
            tail: Cell::new(0),
            in_ring: Cell::new(0),
            stack: RefCell::new(Vec::with_capacity(count)),
            in_use: Cell::new(0),
            line: RefCell::new(VecDeque::new()),
        };
        // SAFETY: the ring memory is page aligned, `entries` long, and lives as long as the pool,
        // which outlives the ring (the driver holds both and drops the ring first).
        unsafe { ring.submitter().register_buf_ring_with_flags(ring_mem.as_ptr() as u64, entries as u16, GROUP, 0) }?;
        for id in (0..count).rev() {
            if pool.in_ring.get() < MIN_DEPTH {
                pool.to_ring(id as u16);
            } else {
                pool.stack.borrow_mut().push(id as u16);
            }
        }
        Ok(pool)
    }

    /// How many buffers the pool has.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    fn addr(&self, id: u16) -> *mut u8 {
        debug_assert!((id as usize) < self.count);
        // SAFETY: in bounds of the mapping.
        unsafe { self.base.as_ptr().add(id as usize * self.size) }
    }

    /// Takes ownership of a buffer the kernel picked for a receive (or the stack or line gave).
    fn take(self: &Rc<Self>, id: u16) -> Buf {
        self.in_use.set(self.in_use.get() + 1);
        Buf::Pooled { pool: self.clone(), id }
    }

    /// The warmest free buffer outside the ring, if any.
    fn pop(self: &Rc<Self>) -> Option<Buf> {
        let id = self.stack.borrow_mut().pop()?;
        Some(self.take(id))
    }

    fn to_ring(&self, id: u16) {
        let tail = self.tail.get();
        let mask = self.entries - 1;
        // SAFETY: slot `tail & mask` is ours to write: the kernel consumes only up to the tail
        // we publish below, and at most `count <= entries` buffers are ever in the ring.
        unsafe {
            let entry = &mut *self.ring.as_ptr().add((tail & mask) as usize);
            entry.set_addr(self.addr(id).add(HEADROOM) as u64);
            entry.set_len((self.size - HEADROOM) as u32);
            entry.set_bid(id);
            let tail_ptr = types::BufRingEntry::tail(self.ring.as_ptr()) as *const AtomicU16;
            (*tail_ptr).store(tail.wrapping_add(1), Ordering::Release);
        }
        self.tail.set(tail.wrapping_add(1));
        self.in_ring.set(self.in_ring.get() + 1);
    }

    fn give_back(&self, id: u16) {
        self.in_use.set(self.in_use.get() - 1);
        self.route(id);
    }

    /// A free buffer goes to the first direction in line, else to the ring if the ring is
    /// shallower than the load needs, else onto the stack.
    fn route(&self, id: u16) {
        let mut line = self.line.borrow_mut();
        while let Some(turn) = line.pop_front() {
            // A turn whose waiter left holds the only other reference: skip it.
            if Rc::strong_count(&turn) > 1 {
                turn.buf.set(Some(id));
                if let Some(w) = turn.waker.take() {
                    w.wake();
                }
                return;
            }
        }
        drop(line);
        if self.in_ring.get() < (2 * self.in_use.get()).max(MIN_DEPTH) {
            self.to_ring(id);
        } else {
            self.stack.borrow_mut().push(id);
        }
    }

    /// Waits in line for a buffer coming back. Cancel-safe: a buffer handed to a waiter that
    /// left is passed on.
    async fn wait_turn(self: &Rc<Self>) -> Buf {
        struct Waiting<'a>(&'a Rc<BufPool>, Rc<Turn>);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if let Some(id) = self.1.buf.take() {
                    self.0.route(id);
                }
            }
        }
        let turn = Rc::new(Turn { buf: Cell::new(None), waker: Cell::new(None) });
        self.line.borrow_mut().push_back(turn.clone());
        let waiting = Waiting(self, turn);
        poll_fn(|cx| match waiting.1.buf.take() {
            Some(id) => Poll::Ready(self.take(id)),
            None => {
                waiting.1.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

fn map(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping; never unmapped (it lives as long as the worker).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(NonNull::new(p.cast()).expect("mmap does not return null on success"))
}

impl Pool for BufPool {
    type Buf = Buf;

    /// For the sides that read by themselves (TLS) and for bytes that came with the upgrade:
    /// the warmest free buffer, else a place in line. When every free buffer sits in the kernel's
    /// ring and nobody will give one back, a heap buffer instead of waiting forever.
    async fn acquire(&self) -> Buf {
        let pool = driver().pool.clone();
        if let Some(buf) = pool.pop() {
            return buf;
        }
        if pool.in_use.get() == 0 && pool.line.borrow().is_empty() {
            return Buf::Heap(vec![0; self.size].into_boxed_slice());
        }
        pool.wait_turn().await
    }

    fn release(&self, buf: Buf) {
        drop(buf);
    }
}

pub(crate) struct UringIo {
    fd: OwnedFd,
    driver: Rc<Driver>,
    /// The last receive filled its buffer: the socket likely has more right now.
    maybe_more: Cell<bool>,
}

/// What a direction's wait for input produced.
pub(crate) enum UringReady {
    /// The kernel received `n` bytes into a buffer from the ring.
    Filled(Option<Buf>, usize),
    /// The ring was empty; this buffer was handed over in line, and the socket has input.
    Handed(Option<Buf>),
}

impl UringIo {
    fn fd(&self) -> types::Fd {
        types::Fd(self.fd.as_raw_fd())
    }

    /// Sends `keep`'s bytes in `range`: all of them when `wait`, else what the socket takes
    /// without waiting for room (MSG_DONTWAIT: io_uring answers EAGAIN instead of arming a
    /// poll). Returns how many bytes went, and `keep` back.
    async fn send_all(&self, mut keep: Keep, range: Range<usize>, wait: bool) -> (io::Result<usize>, Keep) {
        let flags = if wait { libc::MSG_NOSIGNAL } else { libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT };
        let mut sent = 0;
        while range.start + sent < range.end {
            let bytes = &keep.bytes()[range.start + sent..range.end];
            let sqe = opcode::Send::new(self.fd(), bytes.as_ptr(), bytes.len() as u32).flags(flags).build();
            let (res, _, k) = Op::now(&self.driver, sqe, keep).complete().await;
            keep = k;
            match result(res) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), keep),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !wait => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (Err(e), keep),
            }
        }
        (Ok(sent), keep)
    }
}

fn result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

impl Io for UringIo {
    type Buf = Buf;
    type Ready<'a> = UringReady;

    async fn readable(&self) -> io::Result<UringReady> {
        let pool = &self.driver.pool;
        loop {
            if self.maybe_more.get() && !pool.line.borrow().is_empty() {
                // Others are in line for buffers and we have input: queue behind them rather
                // than overtake. (Without input we arm a receive, which holds no buffer.)
                return Ok(UringReady::Handed(Some(pool.wait_turn().await)));
            }
            let len = (pool.size - HEADROOM) as u32;
            // The kernel picks the buffer when the receive is issued, before it looks for data:
            // unless the last receive suggests more is waiting, wait for data first (POLL_FIRST),
            // so a quiet socket neither takes a buffer nor fails with ENOBUFS when the ring is dry.
            let poll_first = if self.maybe_more.get() { 0 } else { RECV_POLL_FIRST };
            let sqe = opcode::Recv::new(self.fd(), std::ptr::null_mut(), len)
                .buf_group(GROUP)
                .ioprio(poll_first)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT);
            // A receive that waits for data goes with the next batch; one that likely finds
            // data is done at once, so the codec reads its bytes while they are cache-hot.
            let op = if poll_first == 0 { Op::now } else { Op::new };
            let (res, flags, _) = op(&self.driver, sqe, Keep::Nothing).complete().await;
            let buf = cqueue::buffer_select(flags).map(|id| pool.take(id));
            match res {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n > 0 => {
                    self.maybe_more.set(n as usize == len as usize);
                    return Ok(UringReady::Filled(buf, n as usize));
                }
                e if -e == libc::ENOBUFS => {
                    if let Some(buf) = pool.pop() {
                        return Ok(UringReady::Handed(Some(buf)));
                    }
                    // Queue whenever some buffer is out of the ring: it comes back to the line
                    // before the ring. Retrying instead would lose, again and again, to receives
                    // that find data at once: those take ring buffers while they are submitted,
                    // before the kernel runs the deferred work of receives that waited for data.
                    if pool.in_ring.get() < pool.count {
                        return Ok(UringReady::Handed(Some(pool.wait_turn().await)));
                    }
                    // Every buffer went back to the ring since the kernel looked: try again.
                }
                e if -e == libc::EINTR || -e == libc::EAGAIN => {}
                e => return Err(io::Error::from_raw_os_error(-e)),
            }
        }
    }

    fn held<'a>(ready: &mut UringReady) -> Option<Buf>
    where
        Self: 'a,
    {
        match ready {
            UringReady::Filled(b, _) | UringReady::Handed(b) => b.take(),
        }
    }

    async fn read(&self, ready: UringReady, buf: Buf) -> (io::Result<Option<usize>>, Buf) {
        match ready {
            UringReady::Filled(_, n) => (Ok(Some(n)), buf),
            UringReady::Handed(_) => {
                let mut buf = buf;
                let dst = buf[HEADROOM..].as_mut_ptr();
                let len = buf.len() - HEADROOM;
                // MSG_DONTWAIT: a handed buffer is never parked on a socket with nothing to read.
                let sqe = opcode::Recv::new(self.fd(), dst, len as u32).flags(libc::MSG_DONTWAIT).build();
                let (res, _, keep) = Op::now(&self.driver, sqe, Keep::Buf(buf)).complete().await;
                let Keep::Buf(buf) = keep else { unreachable!("the op hands back what it kept") };
                let res = match result(res) {
                    Ok(n) => Ok(Some(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                };
                self.maybe_more.set(matches!(res, Ok(Some(n)) if n == len));
                (res, buf)
            }
        }
    }

    async fn write_now(&self, buf: Buf, range: Range<usize>) -> (io::Result<usize>, Buf) {
        let (res, keep) = self.send_all(Keep::Buf(buf), range, false).await;
        let Keep::Buf(buf) = keep else { unreachable!("send_all hands back what it was given") };
        (res, buf)
    }

    async fn write_owned(&self, bytes: Vec<u8>) -> io::Result<()> {
        let len = bytes.len();
        self.send_all(Keep::Bytes(bytes), 0..len, true).await.0.map(drop)
    }

    fn shutdown(&self) {
        super::shut_down(std::os::fd::AsFd::as_fd(&self.fd));
    }

    fn peer_closed(&self) -> bool {
        super::tcp_peer_closed(std::os::fd::AsFd::as_fd(&self.fd))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.ring.get_mut().submitter().unregister_buf_ring(GROUP);
    }
}
