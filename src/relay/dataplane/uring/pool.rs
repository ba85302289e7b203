//! The worker's buffers: one anonymous mapping cut into equal buffers, the provided buffer ring
//! the kernel picks receive buffers from, a last-in-first-out stack of the free buffers kept out
//! of the ring (the warmest), and the line of directions waiting for a buffer, served first
//! come, first served.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Poll, Waker};

use io_uring::{types, IoUring};

use super::driver;
use super::{GROUP, MIN_DEPTH};
use crate::relay::dataplane::tunnel::Pool;
use crate::ws::HEADROOM;

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
    pub(super) count: usize,
    pub(super) size: usize,
    /// The buffer ring shared with the kernel (`entries` x 16 bytes, page aligned).
    ring: NonNull<types::BufRingEntry>,
    entries: u16,
    tail: Cell<u16>,
    /// Buffers in the kernel's ring, as far as reaped completions tell.
    pub(super) in_ring: Cell<usize>,
    /// Free buffers outside the ring, most recently returned last.
    stack: RefCell<Vec<u16>>,
    /// Buffers checked out to directions.
    pub(super) in_use: Cell<usize>,
    line: RefCell<VecDeque<Rc<Turn>>>,
}

impl BufPool {
    pub(super) fn new(ring: &IoUring, count: usize, size: usize) -> io::Result<BufPool> {
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

    /// Free buffers: in the kernel's ring or on the stack.
    #[cfg(test)]
    pub(super) fn free(&self) -> usize {
        self.in_ring.get() + self.stack.borrow().len()
    }

    /// Whether directions wait in line for a buffer.
    pub(super) fn someone_waits(&self) -> bool {
        !self.line.borrow().is_empty()
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
    pub(super) fn take(self: &Rc<Self>, id: u16) -> Buf {
        self.in_use.set(self.in_use.get() + 1);
        Buf::Pooled { pool: self.clone(), id }
    }

    /// The warmest free buffer outside the ring, if any.
    pub(super) fn pop(self: &Rc<Self>) -> Option<Buf> {
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
    pub(super) async fn wait_turn(self: &Rc<Self>) -> Buf {
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
        let pool = driver::current().pool.clone();
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
