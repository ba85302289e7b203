//! The epoll backend: tokio's reactor, readiness first, a shared LIFO pool of plain buffers
//! (the most recently returned, cache-warm buffer goes out next) behind a fair semaphore.

use std::cell::RefCell;
use std::io;
use std::ops::Range;

use tokio::sync::Semaphore;

use super::tunnel::{Io, Pool};
use super::Backend;
use crate::ws::HEADROOM;

pub(crate) struct Epoll;

impl Backend for Epoll {
    type Pool = EpollPool;
    type Io = EpollIo;

    fn adopt(stream: std::net::TcpStream) -> io::Result<EpollIo> {
        stream.set_nonblocking(true)?;
        super::tune(&stream)?;
        Ok(EpollIo(tokio::net::TcpStream::from_std(stream)?))
    }
}

pub(crate) struct EpollPool {
    /// FIFO admission: a direction that just returned a buffer queues behind the waiters.
    permits: Semaphore,
    /// Free buffers, most recently returned last. Grows lazily up to the permit count.
    free: RefCell<Vec<Box<[u8]>>>,
    size: usize,
}

impl EpollPool {
    pub(crate) fn new(count: usize, size: usize) -> EpollPool {
        EpollPool { permits: Semaphore::new(count), free: RefCell::new(Vec::new()), size }
    }
}

impl Pool for EpollPool {
    type Buf = Box<[u8]>;

    async fn acquire(&self) -> Box<[u8]> {
        self.permits.acquire().await.expect("the pool's semaphore is never closed").forget();
        self.free.borrow_mut().pop().unwrap_or_else(|| vec![0; self.size].into_boxed_slice())
    }

    fn release(&self, buf: Box<[u8]>) {
        self.free.borrow_mut().push(buf);
        self.permits.add_permits(1);
    }
}

pub(crate) struct EpollIo(tokio::net::TcpStream);

impl Io for EpollIo {
    type Buf = Box<[u8]>;
    type Ready<'a> = ();

    async fn readable(&self) -> io::Result<()> {
        self.0.readable().await
    }

    async fn read(&self, _: (), mut buf: Box<[u8]>) -> (io::Result<Option<usize>>, Box<[u8]>) {
        let res = match self.0.try_read(&mut buf[HEADROOM..]) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        };
        (res, buf)
    }

    async fn write_now(&self, buf: Box<[u8]>, range: Range<usize>) -> (io::Result<usize>, Box<[u8]>) {
        let mut sent = 0;
        while range.start + sent < range.end {
            match self.0.try_write(&buf[range.start + sent..range.end]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(sent), buf)
    }

    async fn write_owned(&self, bytes: Vec<u8>) -> io::Result<()> {
        self.write_all(&bytes).await
    }

    fn shutdown(&self) {
        super::shut_down(std::os::fd::AsFd::as_fd(&self.0));
    }

    fn peer_closed(&self) -> bool {
        super::tcp_peer_closed(std::os::fd::AsFd::as_fd(&self.0))
    }
}

impl EpollIo {
    async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.0.writable().await?;
            match self.0.try_write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
