//! TLS data connections: the relay terminates TLS, so the frames inside are forwarded by the
//! same pumps on decrypted bytes, through tokio-rustls on the tokio reactor (io_uring cannot
//! read a TLS record stream into place). Readiness first still holds: a direction waits on the
//! TCP socket's readiness without a buffer, then one non-blocking read attempt decrypts into a
//! pool buffer; plaintext rustls still holds after a full read is taken before waiting again.

use std::cell::{Cell, RefCell};
use std::io;
use std::marker::PhantomData;
use std::ops::{DerefMut, Range};
use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::tunnel::Io;
use crate::relay::handoff::TlsStream;
use crate::ws::HEADROOM;

/// One TLS data connection; `B` is the worker pool's buffer type.
pub(crate) struct TlsIo<B> {
    /// Borrowed only inside a single poll, never across an await.
    tls: RefCell<TlsStream>,
    /// The last read got plaintext: rustls may hold more than the socket's readiness shows.
    maybe_more: Cell<bool>,
    _buf: PhantomData<B>,
}

impl<B> TlsIo<B> {
    pub(crate) fn new(tls: TlsStream) -> io::Result<TlsIo<B>> {
        super::tune(tls.get_ref().0)?;
        Ok(TlsIo { tls: RefCell::new(tls), maybe_more: Cell::new(false), _buf: PhantomData })
    }
}

impl<B: DerefMut<Target = [u8]>> Io for TlsIo<B> {
    type Buf = B;
    type Ready<'a>
        = ()
    where
        B: 'a;

    async fn readable(&self) -> io::Result<()> {
        if self.maybe_more.get() {
            return Ok(());
        }
        std::future::poll_fn(|cx| self.tls.borrow().get_ref().0.poll_read_ready(cx)).await
    }

    async fn read(&self, _: (), mut buf: B) -> (io::Result<Option<usize>>, B) {
        let res = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf[HEADROOM..]);
            Poll::Ready(match Pin::new(&mut *self.tls.borrow_mut()).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Ok(Some(rb.filled().len())),
                Poll::Ready(Err(e)) => Err(e),
                // Nothing decryptable yet: the readiness was stale or a record is incomplete.
                Poll::Pending => Ok(None),
            })
        })
        .await;
        // Any plaintext read means rustls may hold more (its plaintext limit can leave whole
        // records undecrypted, with the socket already drained): read again until it says
        // Pending, which it does only after the socket would block.
        self.maybe_more.set(matches!(res, Ok(Some(n)) if n > 0));
        (res, buf)
    }

    async fn write_now(&self, buf: B, range: Range<usize>) -> (io::Result<usize>, B) {
        // rustls takes plaintext into its own buffer (up to its limit) and sends what the
        // socket takes; `write_owned` flushes the rest.
        let bytes = &buf[range];
        let mut sent = 0;
        let res = std::future::poll_fn(|cx| loop {
            if sent == bytes.len() {
                return Poll::Ready(Ok(sent));
            }
            match Pin::new(&mut *self.tls.borrow_mut()).poll_write(cx, &bytes[sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Ready(Ok(sent)),
            }
        })
        .await;
        (res, buf)
    }

    async fn write_owned(&self, bytes: Vec<u8>) -> io::Result<()> {
        self.write_all(&bytes).await
    }

    fn shutdown(&self) {
        super::shut_down(std::os::fd::AsFd::as_fd(self.tls.borrow().get_ref().0));
    }

    fn peer_closed(&self) -> bool {
        super::tcp_peer_closed(std::os::fd::AsFd::as_fd(self.tls.borrow().get_ref().0))
    }
}

impl<B> TlsIo<B> {
    async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = std::future::poll_fn(|cx| Pin::new(&mut *self.tls.borrow_mut()).poll_write(cx, bytes)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
        }
        std::future::poll_fn(|cx| Pin::new(&mut *self.tls.borrow_mut()).poll_flush(cx)).await
    }
}
