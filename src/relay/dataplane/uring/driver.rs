//! A worker's ring: submission (batched once per pass of the run queue, or at once for an
//! operation likely to complete inline), completion (reaped before the runtime parks and when
//! the ring's eventfd fires), and the table of operations in flight.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::task::Waker;

use io_uring::{cqueue, opcode, squeue, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::op::OpState;
use super::pool::BufPool;
use super::GROUP;

/// `user_data` of cancellations, whose completions nobody waits for.
const CANCEL: u64 = u64::MAX;

thread_local! {
    /// This worker's driver; set by [`Driver::install`] before any socket is adopted.
    static DRIVER: RefCell<Option<Rc<Driver>>> = const { RefCell::new(None) };
}

pub(super) fn current() -> Rc<Driver> {
    DRIVER.with(|d| d.borrow().clone()).expect("the io_uring driver is installed on this worker")
}

/// A ring with the flags the driver relies on: one issuer thread; completions' task work runs
/// when the worker next enters the kernel, without an interrupt (COOP_TASKRUN), flagged in the
/// SQ ring so that we know when to ask for it. Not DEFER_TASKRUN: with it, this project's
/// machine (Linux 6.18.44) stopped signalling the eventfd for deferred completions, so a
/// sleeping worker noticed them only at some unrelated wake-up: 32 ms per 64-byte round trip in
/// the load benchmark instead of ~0.1 ms (`benches/results/restructure.txt`).
pub(super) fn new_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::<squeue::Entry>::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(entries * 4)
        .build(entries)
}

/// A worker's ring and its buffers.
pub(crate) struct Driver {
    ring: RefCell<IoUring>,
    pub(super) ops: RefCell<slab::Slab<OpState>>,
    pub(super) pool: Rc<BufPool>,
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

    /// Queues `sqe` under a fresh op slot (its `user_data`) and returns the slot. Whoever queues
    /// also sees to its submission: [`Driver::ask_flush`] or [`Driver::submit_now`]. Fails only
    /// if the submission queue stays full after submitting what is in it.
    ///
    /// # Safety
    ///
    /// Every buffer `sqe` points into, and the descriptor it names, must stay valid until its
    /// completion is reaped, even if the operation's future is dropped first. [`super::op::Op`]
    /// is the only caller: it builds each entry from the buffer and the descriptor it owns and
    /// keeps both until then (orphaned, after a drop).
    pub(super) unsafe fn push(&self, sqe: squeue::Entry) -> io::Result<usize> {
        let key = self.ops.borrow_mut().insert(OpState::Waiting(None));
        // SAFETY: the caller's guarantee.
        if let Err(e) = unsafe { self.queue(&sqe.user_data(key as u64)) } {
            self.ops.borrow_mut().remove(key);
            return Err(e);
        }
        Ok(key)
    }

    /// Asks the kernel to cancel the operation in slot `key`; the completion of the request
    /// itself is ignored. If it cannot be queued, the operation completes on its own when its
    /// socket is shut down (a dropped operation belongs to a tunnel that is ending).
    pub(super) fn cancel(&self, key: usize) {
        let sqe = opcode::AsyncCancel::new(key as u64).build().user_data(CANCEL);
        // SAFETY: a cancellation names no buffer and no descriptor.
        match unsafe { self.queue(&sqe) } {
            Ok(()) => self.ask_flush(),
            Err(e) => tracing::warn!("io_uring: could not queue a cancellation: {e}"),
        }
    }

    /// Puts `sqe` in the submission queue; when the queue is full, submits what is in it first
    /// (after reaping completions if the kernel's completion queue is full: EBUSY). Gives up
    /// after a few rounds rather than spin.
    ///
    /// # Safety
    ///
    /// As for [`Driver::push`].
    unsafe fn queue(&self, sqe: &squeue::Entry) -> io::Result<()> {
        for _ in 0..4 {
            let mut ring = self.ring.borrow_mut();
            // SAFETY: the caller's guarantee.
            if unsafe { ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            match ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(ring),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(io::ErrorKind::WouldBlock, "the io_uring submission queue stays full"))
    }

    /// Asks the driver task to submit what is queued on its next turn.
    pub(super) fn ask_flush(&self) {
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
            self.enter(&ring, pending, GETEVENTS);
        }
        self.reap(ring);
    }

    /// Submits what is queued without running deferred work, and completes what finished
    /// inline: an operation that can complete at once (a receive with data waiting, a send
    /// with room) is done before its task goes on, while the bytes it moved are still in the
    /// CPU's cache. (Batched with other tasks' operations, the buffer is evicted by the time
    /// the codec reads it: at 1,000 busy tunnels that cost io_uring half its throughput.)
    pub(super) fn submit_now(&self) {
        let mut ring = self.ring.borrow_mut();
        let pending = ring.submission().len();
        if pending > 0 {
            self.enter(&ring, pending, 0);
        }
        self.reap(ring);
    }

    /// Submits `submit` queued entries (and waits for nothing). On EINTR, or EBUSY (the
    /// completion queue is full: the caller reaps next), what stays queued is submitted on the
    /// driver task's next turn; other errors are logged, and the entries stay queued for the
    /// next submission.
    fn enter(&self, ring: &IoUring, submit: usize, flags: u32) {
        // SAFETY: a plain io_uring_enter with no extra argument.
        let res = unsafe { ring.submitter().enter::<libc::sigset_t>(submit as u32, 0, flags, None) };
        match res {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => self.ask_flush(),
            Err(e) => tracing::error!("io_uring_enter failed: {e}"),
        }
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
                    OpState::Orphan(..) => {
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

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.ring.get_mut().submitter().unregister_buf_ring(GROUP);
    }
}
