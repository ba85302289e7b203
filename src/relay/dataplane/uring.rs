//! The io_uring backend on tokio-uring: a registered fixed-buffer pool per worker, readiness
//! first through `AsyncFd` on the same descriptor, then `read_fixed` and `write_fixed_all`.
//!
//! An idle direction holds no buffer: it waits for readiness (an epoll registration, no
//! io_uring operation) and only then checks a buffer out. Registration can fail (memlock limit:
//! `LimitMEMLOCK`/`ulimit -l`); the pool then falls back to unregistered buffers and says so.

use std::cell::{Cell, RefCell};
use std::io;
use std::ops::{Deref, DerefMut, Range};
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::io::Interest;
use tokio::sync::Semaphore;
use tokio_uring::buf::fixed::{FixedBuf, FixedBufPool};
use tokio_uring::buf::BoundedBuf;

use super::tunnel::{Io, Pool};
use super::Backend;
use crate::ws::HEADROOM;

pub(crate) struct Uring;

impl Backend for Uring {
    type Pool = UringPool;
    type Io = UringIo;

    fn adopt(stream: std::net::TcpStream) -> io::Result<UringIo> {
        super::tune(&stream)?;
        stream.set_nonblocking(true)?;
        let fd = stream.as_raw_fd();
        let stream = tokio_uring::net::TcpStream::from_std(stream);
        // SAFETY: `fd` is owned by `stream`, which lives in the same `UringIo` and is dropped
        // after the `AsyncFd` (field order), so it stays open and the same for its lifetime.
        let ready =
            unsafe { AsyncFd::register_with_interest(Fd(fd), Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
        Ok(UringIo { ready, maybe_more: Cell::new(false), stream })
    }
}

/// A buffer from the pool: registered when the kernel let us, plain otherwise.
pub(crate) enum UBuf {
    Fixed(FixedBuf),
    Plain(Vec<u8>),
}

impl Deref for UBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            UBuf::Fixed(b) => b,
            UBuf::Plain(v) => v,
        }
    }
}

impl DerefMut for UBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            UBuf::Fixed(b) => b,
            UBuf::Plain(v) => v,
        }
    }
}

pub(crate) struct UringPool {
    /// FIFO admission (tokio's semaphore is fair): without it a direction that returns its
    /// buffer after a full read takes it straight back ahead of the waiters.
    permits: Semaphore,
    /// The registered pool, or `None` when registration failed.
    fixed: Option<FixedBufPool<Vec<u8>>>,
    plain: RefCell<Vec<Vec<u8>>>,
    size: usize,
}

impl UringPool {
    /// Must run inside the worker's tokio-uring runtime (registration is per ring).
    pub(crate) fn new(count: usize, size: usize, worker: usize) -> UringPool {
        // The kernel's registry takes at most 1024 buffers per ring.
        let count = count.min(1024);
        let pool = FixedBufPool::new((0..count).map(|_| vec![0u8; size]));
        let fixed = match pool.register() {
            Ok(()) => Some(pool),
            Err(e) => {
                tracing::warn!(
                    worker,
                    "registering {count} x {size} B io_uring buffers failed ({e}); using unregistered \
                     buffers (raise the memlock limit, e.g. LimitMEMLOCK= in the systemd unit)"
                );
                None
            }
        };
        UringPool { permits: Semaphore::new(count), fixed, plain: RefCell::new(Vec::new()), size }
    }
}

impl Pool for UringPool {
    type Buf = UBuf;

    async fn acquire(&self) -> UBuf {
        self.permits.acquire().await.expect("the pool's semaphore is never closed").forget();
        match &self.fixed {
            Some(pool) => UBuf::Fixed(pool.try_next(self.size).expect("a permit guarantees a free buffer")),
            None => UBuf::Plain(self.plain.borrow_mut().pop().unwrap_or_else(|| vec![0; self.size])),
        }
    }

    fn release(&self, buf: UBuf) {
        if let UBuf::Plain(v) = buf {
            self.plain.borrow_mut().push(v);
        }
        // A FixedBuf checks itself back in when dropped.
        self.permits.add_permits(1);
    }
}

/// The raw descriptor for `AsyncFd`; the tokio-uring stream owns and closes it.
pub(crate) struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub(crate) struct UringIo {
    /// Declared before `stream`: deregistered from epoll before the descriptor closes.
    ready: AsyncFd<Fd>,
    /// The last read filled its buffer, so the socket may hold more than the readiness says.
    maybe_more: Cell<bool>,
    stream: tokio_uring::net::TcpStream,
}

impl UringIo {
    /// Whether the socket has a byte (or EOF) to read right now, without taking it.
    fn has_input(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: a 1-byte recv into a local, on a descriptor this stream keeps open.
        let n = unsafe {
            libc::recv(self.stream.as_raw_fd(), &mut byte as *mut u8 as *mut _, 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
    }
}

impl Io for UringIo {
    type Buf = UBuf;
    type Ready<'a> = AsyncFdReadyGuard<'a, Fd>;

    async fn readable(&self) -> io::Result<AsyncFdReadyGuard<'_, Fd>> {
        loop {
            let mut guard = self.ready.readable().await?;
            // Edge-triggered readiness stays set after a read that filled its buffer; check
            // the socket before pinning a buffer in a read that could wait indefinitely.
            if self.maybe_more.get() && !self.has_input() {
                self.maybe_more.set(false);
                guard.clear_ready();
                continue;
            }
            return Ok(guard);
        }
    }

    async fn read<'a>(&'a self, mut ready: Self::Ready<'a>, buf: UBuf) -> (io::Result<Option<usize>>, UBuf) {
        let cap = buf.len() - HEADROOM;
        let (res, buf) = match buf {
            UBuf::Fixed(b) => {
                let (res, slice) = self.stream.read_fixed(b.slice(HEADROOM..)).await;
                (res, UBuf::Fixed(slice.into_inner()))
            }
            UBuf::Plain(v) => {
                let (res, slice) = self.stream.read(v.slice(HEADROOM..)).await;
                (res, UBuf::Plain(slice.into_inner()))
            }
        };
        match res {
            Ok(n) if n < cap => {
                // A short read drained the socket: wait for the next edge.
                self.maybe_more.set(false);
                ready.clear_ready();
            }
            Ok(_) => self.maybe_more.set(true),
            Err(_) => {}
        }
        (res.map(Some), buf)
    }

    async fn write(&self, buf: UBuf, range: Range<usize>) -> (io::Result<()>, UBuf) {
        match buf {
            UBuf::Fixed(b) => {
                let (res, slice) = self.stream.write_fixed_all(b.slice(range)).await;
                (res, UBuf::Fixed(slice.into_inner()))
            }
            UBuf::Plain(v) => {
                let (res, slice) = self.stream.write_all(v.slice(range)).await;
                (res, UBuf::Plain(slice.into_inner()))
            }
        }
    }

    async fn write_small(&self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes.to_vec()).await.0
    }

    fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
