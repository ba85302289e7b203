//! A WebSocket that carries JSON text messages (the agent's and the session's control
//! connections, on the relay and on the edges), bounded in every direction a peer can push:
//!
//! - **In:** a message is bounded whole, fragments included (`max_message`; exactly the limit is
//!   allowed, one byte more closes with 1009). Frames are checked as RFC 6455 asks: a client's
//!   frames must be masked (1002), text must be UTF-8 (1007), control frames ≤ 125 bytes and
//!   whole, continuations in order (1002), no binary messages on a text channel (1003).
//! - **Out:** the owner's messages go through a bounded queue ([`Channel::send`] fails when it is
//!   full: the peer is not reading); a Ping is answered by one pending Pong slot that the next
//!   Ping overwrites (only the latest Pong matters); a write that makes no progress for `stall`
//!   drops the connection.
//! - **Close:** the Close frame goes out, then the write side is shut down and the read side
//!   drained for a moment before the socket closes, so unread bytes do not turn the Close into
//!   an RST that the peer may never see.
//!
//! fastwebsockets' `read_frame` is not cancel-safe, so the reader lives in a task of its own and
//! is never raced in `select!`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, WebSocket, WebSocketError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, Notify};

use crate::ws::{CloseCode, MAX_CONTROL_PAYLOAD};

/// Messages the owner may have queued toward a peer that is slow to read before the peer
/// counts as not reading.
pub const OUTGOING_QUEUE: usize = 64;
/// After the relay's Close, how long the peer gets to answer and close before the socket goes.
const LINGER: Duration = Duration::from_secs(2);

/// What a channel delivers to its owner.
#[derive(Debug)]
pub enum Incoming {
    Text(String),
    /// The peer answered one of our pings: it is reading.
    Pong,
    /// The peer pinged us (already answered).
    Ping,
    /// The peer broke the channel's rules; it was sent this close code and reason.
    Violation(u16, &'static str),
    /// The peer did not read what was written to it for `stall`: the connection is dropped.
    Stalled,
    /// The peer closed (with its code and reason) or the connection broke (`None`).
    Closed(Option<(u16, String)>),
}

/// What the owner sends.
#[derive(Debug)]
pub enum Outgoing {
    Text(String),
    Ping,
    Close(u16, String),
}

/// How a channel treats its peer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message, all fragments together (bytes).
    pub max_message: usize,
    /// The peer is a WebSocket client: its frames must be masked.
    pub peer_masks: bool,
    /// A write that does not finish within this long means the peer is not reading.
    pub stall: Duration,
}

/// The owner's outgoing queue was full (the peer is not reading) or the channel is gone.
#[derive(Debug, thiserror::Error)]
#[error("the peer is not reading its control connection")]
pub struct NotReading;

/// The owner's end of a channel. Dropping it (or sending `Close`) closes the connection.
pub struct Channel {
    tx: mpsc::Sender<Outgoing>,
    pub rx: mpsc::Receiver<Incoming>,
}

impl Channel {
    /// Queues `msg` without waiting. Fails when the queue is full: a peer that lets
    /// [`OUTGOING_QUEUE`] messages pile up is not reading, and the owner should drop it.
    pub fn send(&self, msg: Outgoing) -> Result<(), NotReading> {
        self.tx.try_send(msg).map_err(|_| NotReading)
    }

    /// Queues `msg`, waiting for room: for an owner that would rather slow down than drop a
    /// peer that reads, just slowly. A peer that does not read at all is still dropped: the
    /// writer gives up after `stall`, and this then fails.
    pub async fn send_wait(&self, msg: Outgoing) -> Result<(), NotReading> {
        self.tx.send(msg).await.map_err(|_| NotReading)
    }
}

/// One socket shared by the frame reader, the frame writer and the close path, which needs the
/// raw stream back (to shut the write side down and drain the read side) after fastwebsockets
/// has taken its halves. Each poll takes the lock only for that poll.
struct Shared<S>(Arc<Mutex<S>>);

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<S> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, S> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Shared<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Shared<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

/// What the reader hands the writer besides the owner's messages.
#[derive(Default)]
struct Obligations {
    /// The latest Ping's payload, to answer with a Pong; a newer Ping overwrites it.
    pong: Mutex<Option<Vec<u8>>>,
    /// A Close the reader owes the peer: an echo of the peer's, or a violation's code.
    close: Mutex<Option<(u16, String)>>,
    wake: Notify,
}

/// A violation of the channel's rules by the peer: the close code and a reason.
type Violation = (CloseCode, &'static str);

/// Splits `ws` into a [`Channel`] driven by a reader and a writer task.
pub fn channel<S>(mut ws: WebSocket<S>, limits: Limits) -> Channel
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The frame limit is the message limit (fastwebsockets refuses a frame of `>=` its
    // setting, so one more); the whole message is bounded below.
    ws.set_max_message_size(limits.max_message.saturating_add(1));
    ws.set_auto_close(false);
    ws.set_auto_pong(false);
    let raw: Arc<Mutex<Option<Shared<S>>>> = Arc::default();
    let stash = raw.clone();
    let (mut read, mut write) = ws.split(|s| {
        let shared = Shared(Arc::new(Mutex::new(s)));
        *stash.lock().unwrap_or_else(|p| p.into_inner()) = Some(shared.clone());
        (shared.clone(), shared)
    });
    let raw = raw.lock().unwrap_or_else(|p| p.into_inner()).take().expect("split ran");
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(OUTGOING_QUEUE);
    let (in_tx, in_rx) = mpsc::channel(64);
    let duties = Arc::new(Obligations::default());
    let stalled_tx = in_tx.clone();

    let reader_duties = duties.clone();
    let reader = tokio::spawn(async move {
        let duties = reader_duties;
        let mut message: Option<Vec<u8>> = None;
        let mut never = |_: Frame<'_>| std::future::ready(Ok::<(), std::convert::Infallible>(()));
        let end = loop {
            let frame = match read.read_frame(&mut never).await {
                Ok(f) => f,
                Err(e) => match violation_of(&e) {
                    Some(v) => break owe_close(&duties, v),
                    None => break Incoming::Closed(None),
                },
            };
            let mut frame = frame;
            let incoming = match check(&mut frame, &mut message, limits) {
                Err(v) => break owe_close(&duties, v),
                Ok(None) => continue,
                Ok(Some(incoming)) => incoming,
            };
            let incoming = match incoming {
                Checked::Text(t) => Incoming::Text(t),
                Checked::Ping(payload) => {
                    *duties.pong.lock().unwrap_or_else(|p| p.into_inner()) = Some(payload);
                    duties.wake.notify_one();
                    Incoming::Ping
                }
                Checked::Pong => Incoming::Pong,
                Checked::Close(code, reason) => {
                    // Echo the peer's code, as RFC 6455 asks.
                    *duties.close.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, reason.clone()));
                    duties.wake.notify_one();
                    break Incoming::Closed(Some((code, reason)));
                }
            };
            if in_tx.send(incoming).await.is_err() {
                break Incoming::Closed(None);
            }
        };
        let _ = in_tx.try_send(end);
    });

    tokio::spawn(async move {
        let stall = limits.stall;
        let in_tx = stalled_tx;
        let mut sent_close = false;
        loop {
            let frame = tokio::select! {
                biased;
                _ = duties.wake.notified() => {
                    if let Some((code, reason)) = duties.close.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        Frame::close(code, reason.as_bytes()).into_static()
                    } else if let Some(payload) = duties.pong.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        Frame::pong(Payload::Owned(payload))
                    } else {
                        continue;
                    }
                }
                out = out_rx.recv() => match out {
                    Some(Outgoing::Text(t)) => Frame::text(Payload::Owned(t.into_bytes())),
                    Some(Outgoing::Ping) => Frame::new(true, OpCode::Ping, None, Payload::Owned(Vec::new())),
                    Some(Outgoing::Close(code, reason)) => Frame::close(code, reason.as_bytes()).into_static(),
                    // The owner is gone without a word: going away.
                    None => Frame::close(CloseCode::GOING_AWAY.0, b"").into_static(),
                },
            };
            let close = frame.opcode == OpCode::Close;
            match tokio::time::timeout(stall, write.write_frame(frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    let _ = in_tx.try_send(Incoming::Stalled);
                    break;
                }
            }
            if close {
                sent_close = true;
                break;
            }
        }
        if sent_close {
            // Our Close is out: shut the write side so the peer sees it followed by a FIN, and
            // drain what the peer still sends, so that closing the socket sends no RST over
            // unread bytes. Bounded by LINGER.
            let mut raw = raw;
            let _ = tokio::time::timeout(LINGER, async {
                let _ = raw.shutdown().await;
                let mut sink = [0u8; 4096];
                while matches!(raw.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        reader.abort();
    });
    Channel { tx: out_tx, rx: in_rx }
}

fn owe_close(duties: &Obligations, (code, reason): Violation) -> Incoming {
    *duties.close.lock().unwrap_or_else(|p| p.into_inner()) = Some((code.0, reason.to_string()));
    duties.wake.notify_one();
    Incoming::Violation(code.0, reason)
}

/// The close code for a read error, or `None` when the connection just broke.
fn violation_of(e: &WebSocketError) -> Option<Violation> {
    Some(match e {
        WebSocketError::FrameTooLarge => (CloseCode::MESSAGE_TOO_BIG, "control message too large"),
        WebSocketError::InvalidUTF8 => (CloseCode::INVALID_PAYLOAD, "text is not valid UTF-8"),
        WebSocketError::ReservedBitsNotZero
        | WebSocketError::ControlFrameFragmented
        | WebSocketError::PingFrameTooLarge
        | WebSocketError::InvalidFragment
        | WebSocketError::InvalidContinuationFrame
        | WebSocketError::InvalidCloseFrame
        | WebSocketError::InvalidCloseCode
        | WebSocketError::InvalidValue => (CloseCode::PROTOCOL_ERROR, "protocol error"),
        // fastwebsockets reports a reserved opcode as InvalidValue; anything else is IO.
        _ => return None,
    })
}

/// A frame the channel accepted.
enum Checked {
    Text(String),
    Ping(Vec<u8>),
    Pong,
    Close(u16, String),
}

/// Applies the channel's rules to one frame. `message` holds an unfinished text message.
fn check(frame: &mut Frame<'_>, message: &mut Option<Vec<u8>>, limits: Limits) -> Result<Option<Checked>, Violation> {
    // fastwebsockets unmasks a client's frame but keeps its key, which the header it formats
    // shows: no key, no mask bit.
    let mut head = [0u8; 14];
    frame.fmt_head(&mut head);
    if limits.peer_masks && head[1] & 0x80 == 0 {
        return Err((CloseCode::PROTOCOL_ERROR, "frame from a client is not masked"));
    }
    let payload = &frame.payload[..];
    match frame.opcode {
        OpCode::Ping | OpCode::Pong | OpCode::Close if payload.len() > MAX_CONTROL_PAYLOAD => {
            Err((CloseCode::PROTOCOL_ERROR, "control frame over 125 bytes"))
        }
        OpCode::Ping => Ok(Some(Checked::Ping(payload.to_vec()))),
        OpCode::Pong => Ok(Some(Checked::Pong)),
        OpCode::Close => match payload {
            [] => Ok(Some(Checked::Close(CloseCode::NORMAL.0, String::new()))),
            [_] => Err((CloseCode::PROTOCOL_ERROR, "close frame with a 1-byte payload")),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !CloseCode(code).is_sendable() {
                    return Err((CloseCode::PROTOCOL_ERROR, "close code not allowed on the wire"));
                }
                let reason = std::str::from_utf8(reason)
                    .map_err(|_| (CloseCode::INVALID_PAYLOAD, "close reason is not valid UTF-8"))?;
                Ok(Some(Checked::Close(code, reason.to_string())))
            }
        },
        OpCode::Binary => Err((CloseCode::UNSUPPORTED_DATA, "control connections carry text messages only")),
        OpCode::Text if message.is_some() => {
            Err((CloseCode::PROTOCOL_ERROR, "new message while a fragmented one is unfinished"))
        }
        OpCode::Text if frame.fin => text(payload.to_vec()).map(Some),
        OpCode::Text => {
            *message = Some(payload.to_vec());
            Ok(None)
        }
        OpCode::Continuation => {
            let Some(buf) = message.as_mut() else {
                return Err((CloseCode::PROTOCOL_ERROR, "continuation without a message to continue"));
            };
            if buf.len() + payload.len() > limits.max_message {
                return Err((CloseCode::MESSAGE_TOO_BIG, "control message too large"));
            }
            buf.extend_from_slice(payload);
            if !frame.fin {
                return Ok(None);
            }
            text(message.take().expect("checked above")).map(Some)
        }
    }
}

fn text(bytes: Vec<u8>) -> Result<Checked, Violation> {
    String::from_utf8(bytes).map(Checked::Text).map_err(|_| (CloseCode::INVALID_PAYLOAD, "text is not valid UTF-8"))
}

/// A frame that owns its payload.
trait IntoStatic {
    fn into_static(self) -> Frame<'static>;
}

impl IntoStatic for Frame<'_> {
    fn into_static(self) -> Frame<'static> {
        Frame::new(self.fin, self.opcode, None, Payload::Owned(self.payload.to_vec()))
    }
}
