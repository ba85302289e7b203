//! An operation on the ring. Each kind has one constructor, which builds the submission entry
//! from what the operation owns: the socket (a counted reference to its descriptor, so that no
//! close(2) can come while the kernel may still use the number) and the buffer the kernel reads
//! or writes. Both stay with the operation until its completion is reaped; a dropped operation
//! is cancelled in the kernel and orphaned — what it owns is kept until the completion comes.

use std::future::poll_fn;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types};

use super::driver::Driver;
use super::pool::Buf;
use super::{GROUP, RECV_POLL_FIRST};
use crate::ws::HEADROOM;

/// The memory an operation lets the kernel read or write, kept until its completion.
pub(super) enum Keep {
    Nothing,
    Buf(Buf),
    Bytes(Vec<u8>),
}

impl Keep {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Keep::Nothing => &[],
            Keep::Buf(b) => b,
            Keep::Bytes(v) => v,
        }
    }
}

/// An operation slot in the driver's table.
pub(super) enum OpState {
    Waiting(Option<Waker>),
    Done {
        res: i32,
        flags: u32,
    },
    /// Its future was dropped: what it owned waits here for the completion.
    Orphan(#[allow(dead_code)] Keep, #[allow(dead_code)] Rc<OwnedFd>),
}

/// A submitted operation; completes with the kernel's result and flags.
pub(super) struct Op {
    driver: Rc<Driver>,
    /// Its slot in the driver's table; `None` if it could not be queued (`refused` says why).
    key: Option<usize>,
    refused: i32,
    /// What the kernel may still be reading or writing; handed back on completion.
    keep: Keep,
    /// The socket the entry names, open at least until the completion is reaped.
    fd: Rc<OwnedFd>,
    done: bool,
}

impl Op {
    /// A receive into a buffer the kernel picks from the provided ring once data is there.
    /// `poll_first`: wait for readiness before trying (a quiet socket takes no buffer); such a
    /// receive goes with the driver's next batch. Otherwise it is submitted at once, so the
    /// bytes are still in cache when the codec reads them.
    pub(super) fn recv_select(driver: &Rc<Driver>, fd: &Rc<OwnedFd>, len: u32, poll_first: bool) -> Op {
        let sqe = opcode::Recv::new(types::Fd(fd.as_raw_fd()), std::ptr::null_mut(), len)
            .buf_group(GROUP)
            .ioprio(if poll_first { RECV_POLL_FIRST } else { 0 })
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        // SAFETY: the entry points into no memory of ours (the kernel picks a ring buffer, which
        // the pool keeps mapped for the worker's life); its descriptor is `fd`'s.
        unsafe { Op::start(driver, sqe, Keep::Nothing, fd, !poll_first) }
    }

    /// A receive into `buf[HEADROOM..]` that does not wait for data (MSG_DONTWAIT: a handed
    /// buffer is never parked on a quiet socket), submitted at once.
    pub(super) fn recv_into(driver: &Rc<Driver>, fd: &Rc<OwnedFd>, mut buf: Buf) -> Op {
        let dst = buf[HEADROOM..].as_mut_ptr();
        let len = (buf.len() - HEADROOM) as u32;
        let sqe = opcode::Recv::new(types::Fd(fd.as_raw_fd()), dst, len).flags(libc::MSG_DONTWAIT).build();
        // SAFETY: `dst..dst + len` lies in `buf`'s memory (the pool's mapping or a heap box: moving
        // the `Buf` into the op does not move it); its descriptor is `fd`'s.
        unsafe { Op::start(driver, sqe, Keep::Buf(buf), fd, true) }
    }

    /// A send of `keep`'s bytes in `range` with `flags` (MSG_* bits), submitted at once.
    pub(super) fn send(driver: &Rc<Driver>, fd: &Rc<OwnedFd>, keep: Keep, range: Range<usize>, flags: i32) -> Op {
        let bytes = &keep.bytes()[range];
        let sqe = opcode::Send::new(types::Fd(fd.as_raw_fd()), bytes.as_ptr(), bytes.len() as u32).flags(flags).build();
        // SAFETY: the bytes lie in `keep`'s heap memory, which moving `keep` does not move; the
        // descriptor is `fd`'s.
        unsafe { Op::start(driver, sqe, keep, fd, true) }
    }

    /// Queues `sqe` and sees to its submission: at once (`now`) or on the driver's next turn.
    ///
    /// # Safety
    ///
    /// Every pointer in `sqe` points into memory owned by `keep` that moving `keep` does not
    /// move, and the descriptor in `sqe` is `fd`'s.
    unsafe fn start(driver: &Rc<Driver>, sqe: squeue::Entry, keep: Keep, fd: &Rc<OwnedFd>, now: bool) -> Op {
        // SAFETY: the caller's guarantee, and the op keeps `keep` and `fd` until the completion
        // is reaped (in an orphaned slot if it is dropped first).
        let (key, refused) = match unsafe { driver.push(sqe) } {
            Ok(key) => {
                if now {
                    driver.submit_now();
                } else {
                    driver.ask_flush();
                }
                (Some(key), 0)
            }
            Err(e) => {
                tracing::warn!("io_uring: an operation could not be queued: {e}");
                (None, -e.raw_os_error().unwrap_or(libc::EAGAIN))
            }
        };
        Op { driver: driver.clone(), key, refused, keep, fd: fd.clone(), done: key.is_none() }
    }

    /// Waits for the completion: `(result, flags, what the op kept)`. An op that could not be
    /// queued completes at once with its error.
    pub(super) async fn complete(mut self) -> (i32, u32, Keep) {
        let (res, flags) = match self.key {
            Some(_) => poll_fn(|cx| self.poll_done(cx)).await,
            None => (self.refused, 0),
        };
        (res, flags, std::mem::replace(&mut self.keep, Keep::Nothing))
    }

    fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<(i32, u32)> {
        let key = self.key.expect("polled only when queued");
        // Each completion spends a unit of the task's cooperative budget, as tokio's own
        // sockets do: operations that complete inline would otherwise let one busy direction
        // loop without ever yielding to the worker's other tunnels.
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let mut ops = self.driver.ops.borrow_mut();
        match &mut ops[key] {
            OpState::Done { res, flags } => {
                coop.made_progress();
                let out = (*res, *flags);
                ops.remove(key);
                self.done = true;
                Poll::Ready(out)
            }
            OpState::Waiting(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            OpState::Orphan(..) => unreachable!("an op is orphaned only when its future is dropped"),
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let Some(key) = self.key.filter(|_| !self.done) else { return };
        let mut ops = self.driver.ops.borrow_mut();
        if let OpState::Done { flags, .. } = ops[key] {
            ops.remove(key);
            if let Some(id) = cqueue::buffer_select(flags) {
                drop(self.driver.pool.take(id));
            }
            return;
        }
        ops[key] = OpState::Orphan(std::mem::replace(&mut self.keep, Keep::Nothing), self.fd.clone());
        drop(ops);
        self.driver.cancel(key);
    }
}
