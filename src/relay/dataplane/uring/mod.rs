//! The io_uring backend written directly on the `io-uring` crate.
//!
//! One ring per worker (SINGLE_ISSUER, COOP_TASKRUN), driven from the worker's tokio
//! current-thread runtime. An operation likely to complete at once (a send, a receive after a
//! full one) is submitted and reaped on the spot, so its bytes are still in cache when the codec
//! or the send touches them. Receives that wait for data and cancellations are queued, and a
//! driver task submits them once per pass of the run queue. Completions are also reaped before
//! the runtime parks, and whenever the ring's eventfd (signalled when completions are posted)
//! wakes the reactor.
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

mod driver;
mod op;
mod pool;

use std::cell::Cell;
use std::io;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::rc::Rc;

use io_uring::cqueue;

use super::tunnel::Io;
use super::Backend;
use crate::ws::HEADROOM;
pub(crate) use driver::Driver;
use op::{Keep, Op};
pub(crate) use pool::{Buf, BufPool};

/// The buffer group every receive selects from.
const GROUP: u16 = 0;
/// The kernel ring's least depth, whatever the load.
const MIN_DEPTH: usize = 8;
/// IORING_RECVSEND_POLL_FIRST (in the SQE's ioprio): wait for readiness before trying.
const RECV_POLL_FIRST: u16 = 1;

pub(crate) struct Uring;

impl Backend for Uring {
    type Pool = BufPool;
    type Io = UringIo;

    fn adopt(stream: std::net::TcpStream) -> io::Result<UringIo> {
        super::tune(&stream)?;
        // Non-blocking: io_uring still waits for readiness itself (it arms a poll), and a
        // receive or send asked not to wait (MSG_DONTWAIT) can never park in a kernel worker.
        stream.set_nonblocking(true)?;
        Ok(UringIo { fd: Rc::new(stream.into()), driver: driver::current(), maybe_more: Cell::new(false) })
    }
}

/// Whether this process may create a ring with the flags the driver uses.
pub(crate) fn probe() -> io::Result<()> {
    driver::new_ring(8).map(drop)
}

pub(crate) struct UringIo {
    /// Shared with the operations in flight on it: the descriptor closes after the last one's
    /// completion, never while an entry naming it may still be submitted.
    fd: Rc<OwnedFd>,
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
    /// Sends `keep`'s bytes in `range`: all of them when `wait`, else what the socket takes
    /// without waiting for room (MSG_DONTWAIT: io_uring answers EAGAIN instead of arming a
    /// poll). Returns how many bytes went, and `keep` back.
    async fn send_all(&self, mut keep: Keep, range: Range<usize>, wait: bool) -> (io::Result<usize>, Keep) {
        let flags = if wait { libc::MSG_NOSIGNAL } else { libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT };
        let mut sent = 0;
        while range.start + sent < range.end {
            let op = Op::send(&self.driver, &self.fd, keep, range.start + sent..range.end, flags);
            let (res, _, k) = op.complete().await;
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
            if self.maybe_more.get() && pool.someone_waits() {
                // Others are in line for buffers and we have input: queue behind them rather
                // than overtake. (Without input we arm a receive, which holds no buffer.)
                return Ok(UringReady::Handed(Some(pool.wait_turn().await)));
            }
            let len = (pool.size - HEADROOM) as u32;
            // The kernel picks the buffer when the receive is issued, before it looks for data:
            // unless the last receive suggests more is waiting, wait for data first (POLL_FIRST),
            // so a quiet socket neither takes a buffer nor fails with ENOBUFS when the ring is dry.
            let poll_first = !self.maybe_more.get();
            let (res, flags, _) = Op::recv_select(&self.driver, &self.fd, len, poll_first).complete().await;
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
                let len = buf.len() - HEADROOM;
                let (res, _, keep) = Op::recv_into(&self.driver, &self.fd, buf).complete().await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io::Write;
    use std::time::Duration;

    const BUFFERS: usize = 12;

    /// Runs `f` on a worker-like runtime with this thread's driver installed (12 buffers: 8 in
    /// the kernel's ring, 4 on the stack).
    fn on_a_worker<F: std::future::Future>(f: impl FnOnce(Rc<BufPool>) -> F) -> F::Output {
        probe().expect("io_uring is available on this machine (CI runs on it)");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(Driver::before_park)
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let (pool, driver) = Driver::install(BUFFERS, 4096).unwrap();
            tokio::task::spawn_local(driver);
            f(pool).await
        })
    }

    /// A connected pair: our side adopted by the backend, the peer a plain socket.
    fn pair() -> (UringIo, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        (Uring::adopt(ours).unwrap(), peer)
    }

    /// Lets the driver reap until no operation is in flight; fails if one never completes.
    async fn settle() {
        for _ in 0..2000 {
            if driver::current().ops.borrow().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{} operations never completed", driver::current().ops.borrow().len());
    }

    #[test]
    fn a_dropped_receive_is_cancelled_and_takes_no_bytes_with_it() {
        on_a_worker(|pool| async move {
            let (io, mut peer) = pair();
            // An armed receive on a quiet socket, dropped before anything arrives.
            let waiting = tokio::time::timeout(Duration::from_millis(20), io.readable()).await;
            assert!(waiting.is_err(), "a quiet socket had input");
            settle().await;
            assert_eq!((pool.in_use.get(), pool.free()), (0, BUFFERS), "the cancelled receive kept a buffer");
            // The bytes that come next go to the next receive, whole.
            peer.write_all(b"after the cancel").unwrap();
            let mut ready = io.readable().await.unwrap();
            let buf = UringIo::held(&mut ready).expect("the kernel picked a buffer");
            let UringReady::Filled(_, n) = ready else { panic!("expected a filled buffer") };
            assert_eq!(&buf[HEADROOM..HEADROOM + n], b"after the cancel");
            drop(buf);
            assert_eq!((pool.in_use.get(), pool.free()), (0, BUFFERS));
        });
    }

    #[test]
    fn a_receive_dropped_with_a_buffer_in_hand_gives_it_back() {
        on_a_worker(|pool| async move {
            let (io, mut peer) = pair();
            peer.write_all(&[7; 1000]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            for round in 0..50 {
                // Submitted at once on a socket with data: the kernel takes a ring buffer. The
                // op is dropped unreaped, in whatever state it is.
                let op = Op::recv_select(&io.driver, &io.fd, 4096 - HEADROOM as u32, false);
                drop(op);
                settle().await;
                assert_eq!((pool.in_use.get(), pool.free()), (0, BUFFERS), "round {round}");
                peer.write_all(&[7; 1000]).unwrap();
            }
            // A handed buffer, in a receive that finds nothing: back as well.
            let (quiet, _peer) = pair();
            let buf = pool.pop().expect("a buffer on the stack");
            let (res, _, keep) = Op::recv_into(&quiet.driver, &quiet.fd, buf).complete().await;
            assert_eq!(-res, libc::EAGAIN);
            drop(keep);
            assert_eq!((pool.in_use.get(), pool.free()), (0, BUFFERS));
        });
    }

    #[test]
    fn directions_waiting_for_a_buffer_are_served_first_come_first_served() {
        on_a_worker(|pool| async move {
            // Every buffer outside the ring checked out.
            let held: Vec<Buf> = std::iter::from_fn(|| pool.pop()).collect();
            assert_eq!(held.len(), BUFFERS - MIN_DEPTH);
            let served = Rc::new(RefCell::new(Vec::new()));
            let waiters: Vec<_> = (0..3)
                .map(|i| {
                    let (pool, served) = (pool.clone(), served.clone());
                    tokio::task::spawn_local(async move {
                        let buf = pool.wait_turn().await;
                        served.borrow_mut().push(i);
                        buf
                    })
                })
                .collect();
            tokio::task::yield_now().await;
            assert!(pool.someone_waits());
            for buf in held {
                drop(buf);
                tokio::task::yield_now().await;
            }
            let mut got = Vec::new();
            for w in waiters {
                got.push(w.await.unwrap());
            }
            assert_eq!(*served.borrow(), vec![0, 1, 2]);
            assert_eq!(pool.in_use.get(), 3);
            drop(got);
            assert_eq!((pool.in_use.get(), pool.free()), (0, BUFFERS));
        });
    }

    #[test]
    fn a_socket_closes_only_after_its_last_operation_completed() {
        on_a_worker(|_pool| async move {
            let (io, _peer) = pair();
            let fd = Rc::downgrade(&io.fd);
            // A receive queued (batched) but not yet submitted when its socket's owner goes.
            let op = Op::recv_select(&io.driver, &io.fd, 1024, true);
            drop(io);
            assert!(fd.upgrade().is_some(), "the descriptor closed while an entry naming it was queued");
            drop(op);
            settle().await;
            assert!(fd.upgrade().is_none(), "the descriptor outlived its operations");
        });
    }
}
