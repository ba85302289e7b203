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
use crate::ws::HEADROOM;

pub type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// One TLS data connection; `B` is the worker pool's buffer type.
pub(crate) struct TlsIo<B> {
    /// Borrowed only inside a single poll, never across an await.
    tls: RefCell<TlsStream>,
    /// The last read filled its buffer: rustls may hold more plaintext than the socket shows.
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
        let cap = buf.len() - HEADROOM;
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
        self.maybe_more.set(matches!(res, Ok(Some(n)) if n == cap));
        (res, buf)
    }

    async fn write(&self, buf: B, range: Range<usize>) -> (io::Result<()>, B) {
        let res = self.write_all(&buf[range]).await;
        (res, buf)
    }

    async fn write_small(&self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes).await
    }

    fn shutdown(&self) {
        let _ = socket2::SockRef::from(self.tls.borrow().get_ref().0).shutdown(std::net::Shutdown::Both);
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
