//! The edges' data path: one local byte stream (a TCP connection, or stdin/stdout) carried over
//! one data WebSocket to the relay, both ways, with frames built and read in place.
//!
//! - **Memory.** A direction holds a buffer only while bytes are in hand: it waits for its
//!   source to be readable with none, takes one from a small shared pool for the read, and gives
//!   it back once the bytes are written on. An idle connection holds no buffer; a busy one at
//!   most one per direction ([`BUF`]); a slow destination stops the reading (backpressure reaches
//!   the sender through TCP), nothing queues in user space.
//! - **Sending** (local → relay): the read lands [`HEADROOM`] bytes into the buffer, the masked
//!   frame header is written in front of it, the payload is masked in place, and the frame goes
//!   out in one write.
//! - **Receiving** (relay → local): the relay's frames are decoded where they lie
//!   ([`Inbound`]) and each payload piece is written to the local socket straight from the
//!   read buffer.
//! - **Ending**, as TCP does it: a local EOF sends Close 1000 and keeps receiving; a Close 1000
//!   shuts the local write side and keeps sending until the local EOF (half-close either way).
//!   A local reset or failure sends Close 4006. Any other end — the relay's Close with another
//!   code, a broken relay connection, a framing violation — resets the local connection, so the
//!   program on it sees the stream cut short rather than a clean end.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex as StdMutex;
use std::task::Poll;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Mutex;

use crate::peer::RelayConn;
use crate::ws::encode;
use crate::ws::inbound::{Inbound, Item};
use crate::ws::unmask::unmask;
use crate::ws::{CloseCode, FrameError, OpCode, HEADROOM, MAX_HEADER};

/// A data connection to the relay after its handshake: the connection and any bytes that
/// arrived behind the 101 answer.
pub struct DataWs {
    pub conn: RelayConn,
    pub early: Bytes,
}

/// How a spliced connection ended, from the WebSocket side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpliceEnd {
    /// The Close the far side (or the relay) sent, if one arrived.
    pub close: Option<(u16, String)>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// The local side's write half: something that can also be reset (an RST instead of a FIN).
pub trait LocalWrite: AsyncWrite + Unpin + Send + Sized {
    /// Gives the write half up so that the connection ends abortively once the read half goes
    /// too, where the transport has such a thing.
    fn reset(self) {}
}

impl LocalWrite for OwnedWriteHalf {
    fn reset(self) {
        let _ = socket2::SockRef::from(self.as_ref()).set_linger(Some(std::time::Duration::ZERO));
        // Dropping the half would send a FIN first, which the peer would take for a clean end.
        self.forget();
    }
}

impl LocalWrite for tokio::io::Stdout {}

/// Reads the relay's first message on a spare connection: its order, one unfragmented text
/// frame (at most 64 KiB). Bytes behind it stay in `ws.early` for the splice.
pub async fn first_message(ws: &mut DataWs) -> io::Result<String> {
    use tokio::io::AsyncReadExt;
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let mut got = std::mem::take(&mut ws.early).to_vec();
    loop {
        match crate::ws::inbound::parse(&got) {
            Err(e) => return Err(invalid(&e.to_string())),
            Ok(Some(h)) if h.opcode == OpCode::Text && h.fin && h.len <= 64 << 10 => {
                let end = h.size + h.len as usize;
                if got.len() >= end {
                    let text = std::str::from_utf8(&got[h.size..end]).map_err(|_| invalid("order is not UTF-8"))?;
                    ws.early = Bytes::copy_from_slice(&got[end..]);
                    return Ok(text.to_string());
                }
            }
            Ok(Some(_)) => return Err(invalid("the relay closed the spare connection or sent no order")),
            Ok(None) => {}
        }
        got.reserve(1024);
        if ws.conn.read_buf(&mut got).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

impl DataWs {
    /// Whether the relay has closed it or sent something (a ready connection waits in silence:
    /// anything readable means it is gone). Checked without waiting.
    pub fn is_stale(&self) -> bool {
        let tcp = match &self.conn {
            RelayConn::Plain(tcp) => tcp,
            RelayConn::Tls(tls) => tls.get_ref().0,
        };
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        !self.early.is_empty() || tcp.poll_read_ready(&mut cx).is_ready()
    }
}

/// Starts a ready connection: an empty data frame, so that the relay opens it in the session
/// and the agent dials the service even when the local side waits for the service to speak
/// first (ssh, VNC).
pub async fn start(ws: &mut DataWs) -> io::Result<()> {
    let mut frame = Vec::with_capacity(MAX_HEADER);
    encode::frame(&mut frame, true, OpCode::Binary, &[], Some(rand::random()));
    ws.conn.write_all(&frame).await?;
    ws.conn.flush().await
}

/// Closes a data connection with `code` and `reason` before any data moved (a spare whose
/// service could not be reached).
pub async fn refuse(ws: DataWs, code: CloseCode, reason: &str) {
    let w = Mutex::new(ws.conn);
    send_close(&w, code, reason).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async { w.lock().await.shutdown().await }).await;
}

/// Payload bytes one read takes (and so the largest frame the edges send).
pub const BUF: usize = 64 << 10;
/// Free buffers the pool keeps; more are freed. Enough for a few busy connections at once.
const POOL_KEEP: usize = 16;

static POOL: StdMutex<Vec<Box<[u8]>>> = StdMutex::new(Vec::new());

/// A buffer from the pool, returned to it when dropped.
struct Buf(Option<Box<[u8]>>);

impl Buf {
    fn take() -> Buf {
        let pooled = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
        Buf(Some(pooled.unwrap_or_else(|| vec![0u8; HEADROOM + BUF].into_boxed_slice())))
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_KEEP {
            pool.extend(self.0.take());
        }
    }
}

/// Reads from `r` into a pooled buffer at offset `at`, holding the buffer only for the read
/// itself: while `r` has nothing, the buffer is back in the pool. Returns the buffer and the
/// number of bytes read (0 at EOF).
async fn read_pooled<R: AsyncRead + Unpin>(r: &mut R, at: usize) -> io::Result<(Buf, usize)> {
    std::future::poll_fn(|cx| {
        let mut buf = Buf::take();
        let mut rb = ReadBuf::new(&mut buf[at..]);
        match Pin::new(&mut *r).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                Poll::Ready(Ok((buf, n)))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    })
    .await
}

/// Writes one masked frame whose payload is `buf[HEADROOM..HEADROOM + n]`, header in front.
async fn send_in_place<W: AsyncWrite + Unpin>(w: &Mutex<W>, buf: &mut [u8], n: usize) -> io::Result<()> {
    let mask = rand::random::<[u8; 4]>();
    let mut head = [0u8; MAX_HEADER];
    let h = encode::header(&mut head, true, OpCode::Binary, n as u64, Some(mask));
    buf[HEADROOM - h..HEADROOM].copy_from_slice(&head[..h]);
    unmask(&mut buf[HEADROOM..HEADROOM + n], mask, 0);
    let mut w = w.lock().await;
    w.write_all(&buf[HEADROOM - h..HEADROOM + n]).await?;
    w.flush().await
}

/// Writes one small masked frame (a Close or a Pong).
async fn send_small<W: AsyncWrite + Unpin>(w: &Mutex<W>, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(MAX_HEADER + payload.len());
    encode::frame(&mut frame, true, opcode, payload, Some(rand::random()));
    let mut w = w.lock().await;
    w.write_all(&frame).await?;
    w.flush().await
}

async fn send_close<W: AsyncWrite + Unpin>(w: &Mutex<W>, code: CloseCode, reason: &str) {
    let frame = encode::close(code, reason);
    let _ = send_small(w, OpCode::Close, &frame.as_bytes()[2..]).await;
}

/// How the sending direction ended.
enum UpEnd {
    /// Local EOF: Close 1000 is sent.
    Eof,
    /// The local side reset or failed: Close 4006 is sent.
    Reset,
    /// Writing to the relay failed.
    RelayGone,
}

/// How the receiving direction ended.
#[derive(Debug)]
enum DownEnd {
    /// The relay sent a Close (code, reason).
    Closed(u16, String),
    /// The relay connection ended without a Close.
    Broken,
    /// The relay broke the framing rules.
    Violation(FrameError),
    /// Writing to the local side failed.
    LocalGone,
}

/// Carries `local` over `ws` until both directions are done; see the module doc for how it ends.
pub async fn splice<R, W>(local_r: R, local_w: W, ws: DataWs) -> SpliceEnd
where
    R: AsyncRead + Unpin + Send,
    W: LocalWrite,
{
    let DataWs { conn, early } = ws;
    match conn {
        RelayConn::Plain(tcp) => {
            let (r, w) = tcp.into_split();
            run(local_r, local_w, r, w, early).await
        }
        RelayConn::Tls(tls) => {
            let (r, w) = tokio::io::split(*tls);
            run(local_r, local_w, r, w, early).await
        }
    }
}

async fn run<R, W, WR, WW>(mut local_r: R, mut local_w: W, mut ws_r: WR, ws_w: WW, early: Bytes) -> SpliceEnd
where
    R: AsyncRead + Unpin + Send,
    W: LocalWrite,
    WR: AsyncRead + Unpin + Send,
    WW: AsyncWrite + Unpin + Send,
{
    let ws_w = Mutex::new(ws_w);
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let (close, clean) = {
        let up = async {
            loop {
                match read_pooled(&mut local_r, HEADROOM).await {
                    Ok((_, 0)) => {
                        send_close(&ws_w, CloseCode::NORMAL, "").await;
                        return UpEnd::Eof;
                    }
                    Ok((mut buf, n)) => {
                        if send_in_place(&ws_w, &mut buf, n).await.is_err() {
                            return UpEnd::RelayGone;
                        }
                        up_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!("local side failed: {e}");
                        send_close(&ws_w, CloseCode::CONNECTION_RESET, "connection reset").await;
                        return UpEnd::Reset;
                    }
                }
            }
        };
        let down = receive(&mut ws_r, early, &mut local_w, &ws_w, &down_bytes);
        let mut up = std::pin::pin!(up);
        let mut down = std::pin::pin!(down);
        tokio::select! {
            d = &mut down => match d {
                // Half-closed by the far side: keep sending until the local EOF.
                DownEnd::Closed(1000, reason) => {
                    let clean = matches!(up.await, UpEnd::Eof);
                    (Some((1000, reason)), clean)
                }
                DownEnd::Closed(code, reason) => (Some((code, reason)), false),
                DownEnd::Broken | DownEnd::Violation(_) | DownEnd::LocalGone => (None, false),
            },
            u = &mut up => match u {
                // Half-closed here: keep receiving until the far side's Close.
                UpEnd::Eof => match down.await {
                    DownEnd::Closed(code, reason) => (Some((code, reason)), code == 1000),
                    _ => (None, false),
                },
                UpEnd::Reset | UpEnd::RelayGone => (None, false),
            },
        }
    };
    if clean {
        drop(local_w);
    } else {
        local_w.reset();
    }
    // The local connection ends here (with an RST after a reset).
    drop(local_r);
    // Our Close (if any) is out: end the relay connection (a TLS close_notify, then FIN). A
    // relay that does not read gets no more than a moment.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async { ws_w.lock().await.shutdown().await }).await;
    SpliceEnd { close, bytes_up: up_bytes.into_inner(), bytes_down: down_bytes.into_inner() }
}

/// The receiving direction: the early bytes, then reads from the relay, until a Close or an end.
async fn receive<WR, W, WW>(
    ws_r: &mut WR,
    early: Bytes,
    local_w: &mut W,
    ws_w: &Mutex<WW>,
    count: &AtomicU64,
) -> DownEnd
where
    WR: AsyncRead + Unpin,
    W: LocalWrite,
    WW: AsyncWrite + Unpin,
{
    let mut inbound = Inbound::default();
    let mut end = consume(&mut inbound, &early, local_w, ws_w, count).await;
    drop(early);
    while end.is_none() {
        end = match read_pooled(ws_r, 0).await {
            Ok((_, 0)) | Err(_) => Some(DownEnd::Broken),
            Ok((buf, n)) => consume(&mut inbound, &buf[..n], local_w, ws_w, count).await,
        };
    }
    let end = end.expect("loop ends with an end");
    match &end {
        DownEnd::Closed(1000, _) => {
            // TCP half-close: FIN to the local side, which may still send.
            let _ = local_w.shutdown().await;
        }
        DownEnd::Closed(code, _) => {
            // Answer the Close, as RFC 6455 asks (1005 means it carried no code).
            let code = if CloseCode(*code).is_sendable() { CloseCode(*code) } else { CloseCode::NORMAL };
            send_close(ws_w, code, "").await;
        }
        DownEnd::Violation(e) => send_close(ws_w, e.close_code(), &e.to_string()).await,
        DownEnd::LocalGone => send_close(ws_w, CloseCode::CONNECTION_RESET, "connection reset").await,
        DownEnd::Broken => {}
    }
    end
}

/// Decodes `bytes` from the relay: payloads go to the local side, Pings are answered. Returns
/// how the direction ended, if it did.
async fn consume<W, WW>(
    inbound: &mut Inbound,
    bytes: &[u8],
    local_w: &mut W,
    ws_w: &Mutex<WW>,
    count: &AtomicU64,
) -> Option<DownEnd>
where
    W: LocalWrite,
    WW: AsyncWrite + Unpin,
{
    let mut at = 0;
    let mut wrote = false;
    while at < bytes.len() {
        let (used, item) = match inbound.next(&bytes[at..]) {
            Ok(step) => step,
            Err(e) => return Some(DownEnd::Violation(e)),
        };
        match item {
            Some(Item::Data(range)) => {
                let piece = &bytes[at..][range];
                if local_w.write_all(piece).await.is_err() {
                    return Some(DownEnd::LocalGone);
                }
                count.fetch_add(piece.len() as u64, Ordering::Relaxed);
                wrote = true;
            }
            Some(Item::Ping(payload)) => {
                let _ = send_small(ws_w, OpCode::Pong, &payload).await;
            }
            Some(Item::Pong) | None => {}
            Some(Item::Close(code, reason)) => {
                if wrote && local_w.flush().await.is_err() {
                    return Some(DownEnd::LocalGone);
                }
                return Some(DownEnd::Closed(code, reason));
            }
        }
        at += used;
    }
    // A no-op for TCP; stdout (--stdio) buffers until told.
    if wrote && local_w.flush().await.is_err() {
        return Some(DownEnd::LocalGone);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle connection keeps besides its two sockets is this future (its task's
    /// allocation): no buffer. README's per-connection figure rests on it staying small.
    #[test]
    fn an_idle_connection_costs_little() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let b = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (r, w) = a.into_split();
            let ws = DataWs { conn: RelayConn::Plain(b), early: Bytes::new() };
            let fut = splice(r, w, ws);
            let size = std::mem::size_of_val(&fut);
            assert!(size <= 2048, "the splice future grew to {size} bytes");
        });
    }
}
