//! WebSocket and HTTP plumbing shared by the edge roles (agent, client, CLI): relay URLs,
//! dialing with a bearer token, control-API calls, and the TCP⇄WebSocket splice. Plain tokio +
//! fastwebsockets + hyper. (The JSON control channels are in [`crate::channel`].)
//!
//! fastwebsockets' `read_frame` is not cancel-safe, so it is never raced in `select!`: each
//! socket is split and the read half lives in a task of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::channel::IntoStatic;

/// The relay as the edge roles address it: `http://`/`ws://` (plain) or `https://`/`wss://`
/// (TLS, the relay's certificate verified against the system roots or a given CA file).
#[derive(Clone)]
pub struct RelayUrl {
    /// `host:port`, as dialed and as sent in `Host`.
    pub authority: String,
    host: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for RelayUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", if self.tls.is_some() { "https" } else { "http" }, self.authority)
    }
}

/// A byte stream to the relay, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl RelayUrl {
    /// A relay URL; `https`/`wss` verify the relay against the system roots.
    pub fn parse(s: &str) -> anyhow::Result<RelayUrl> {
        RelayUrl::parse_with_ca(s, None)
    }

    /// A relay URL; `https`/`wss` verify the relay against `ca` (PEM) if given.
    pub fn parse_with_ca(s: &str, ca: Option<&std::path::Path>) -> anyhow::Result<RelayUrl> {
        let uri: hyper::Uri = s.parse().with_context(|| format!("relay URL {s:?} is not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("http" | "ws") => false,
            Some("https" | "wss") => true,
            _ => bail!("relay URL {s}: use http(s)://HOST:PORT or ws(s)://HOST:PORT"),
        };
        if !matches!(uri.path(), "" | "/") {
            bail!("relay URL {s}: give only scheme, host and port (no path)");
        }
        let (authority, host) = authority_of(&uri, tls).with_context(|| format!("relay URL {s}"))?;
        let tls = if tls { Some(crate::tls::client_config(ca)?) } else { None };
        Ok(RelayUrl { authority, host, tls })
    }

    /// The relay node a full URL (a session's `client_url`) names, reached the way this one is
    /// (plain, or TLS verified against the same roots), and the URL's path.
    pub fn at(&self, url: &str) -> anyhow::Result<(RelayUrl, String)> {
        let uri: hyper::Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
        let (authority, host) = authority_of(&uri, self.tls.is_some()).with_context(|| url.to_string())?;
        Ok((RelayUrl { authority, host, tls: self.tls.clone() }, url_path(url)?))
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Stream>> {
        let tcp = TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("connecting to the relay at {}", self.authority))?;
        tcp.set_nodelay(true)?;
        let Some(config) = &self.tls else { return Ok(Box::new(tcp)) };
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .with_context(|| format!("{:?} is not a valid TLS server name", self.host))?;
        match tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await {
            Ok(tls) => Ok(Box::new(tls)),
            // A plain-HTTP answer to our ClientHello: rustls finds no TLS record in it.
            Err(e)
                if matches!(
                    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
                    Some(rustls::Error::InvalidMessage(_))
                ) =>
            {
                bail!(
                    "the relay at {} does not speak TLS ({e}): use http://{} instead of https://",
                    self.authority,
                    self.authority
                )
            }
            Err(e) => Err(anyhow!(e).context(format!(
                "TLS handshake with the relay at {} failed (is --ca the relay's CA?)",
                self.authority
            ))),
        }
    }

    /// Adds a hint to an HTTP exchange that failed: a relay that answers a plain request with
    /// bytes hyper cannot parse as HTTP is almost always a TLS relay (its answer is a TLS alert).
    fn explain(&self, e: hyper::Error, what: String) -> anyhow::Error {
        if self.tls.is_none() && e.is_parse() {
            return anyhow!(
                "{what}: the relay at {} did not answer in HTTP ({e}); it probably speaks TLS: use https://{}",
                self.authority,
                self.authority
            );
        }
        anyhow!(e).context(what)
    }
}

/// `host:port` as dialed and sent in `Host` (the default port for the scheme when none is
/// given), and the bare host for TLS server names (IPv6 brackets off).
fn authority_of(uri: &hyper::Uri, tls: bool) -> anyhow::Result<(String, String)> {
    let host = uri.host().ok_or_else(|| anyhow!("no host"))?;
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((format!("{host}:{port}"), host.trim_start_matches('[').trim_end_matches(']').to_string()))
}

/// The path and query of a full URL (as the relay returns in `client_url`).
pub fn url_path(s: &str) -> anyhow::Result<String> {
    let uri: hyper::Uri = s.parse().with_context(|| format!("{s:?} is not a URL"))?;
    Ok(uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into()))
}

/// The socket type every dialed or accepted WebSocket runs on.
pub type Ws = WebSocket<TokioIo<Upgraded>>;

/// Opens a WebSocket to `path` on the relay, authenticating with `bearer`. A refusal comes back
/// as an error with the relay's status and message.
pub async fn dial(relay: &RelayUrl, path: &str, bearer: &str) -> anyhow::Result<Ws> {
    let upgraded = upgrade(relay, path, bearer, &[]).await?;
    Ok(WebSocket::after_handshake(upgraded, Role::Client))
}

/// The WebSocket handshake for `path` with `extra` headers, and the upgraded connection as
/// bytes (a relay node forwarding a client's connection to another moves them as they are).
pub async fn upgrade(
    relay: &RelayUrl,
    path: &str,
    bearer: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<TokioIo<Upgraded>> {
    let tcp = relay.connect().await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(HOST, &relay.authority)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header("Sec-WebSocket-Key", fastwebsockets::handshake::generate_key())
        .header("Sec-WebSocket-Version", "13")
        .header(AUTHORIZATION, format!("Bearer {bearer}"));
    for (name, value) in extra {
        req = req.header(*name, value);
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let mut resp =
        sender.send_request(req).await.map_err(|e| relay.explain(e, format!("WebSocket handshake for {path}")))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(Refused { path: path.to_string(), status, message: error_text(&body) }.into());
    }
    Ok(TokioIo::new(hyper::upgrade::on(&mut resp).await?))
}

/// The relay answered a WebSocket handshake with an error status.
#[derive(Debug, thiserror::Error)]
#[error("relay refused {path}: {status} {message}")]
pub struct Refused {
    pub path: String,
    pub status: StatusCode,
    pub message: String,
}

/// The `error` field of a control-API error body, or the body itself.
fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<crate::proto::ApiError>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string())
}

/// One control-API call. Returns the status and body; non-2xx answers are errors carrying the
/// relay's message.
pub async fn api(
    relay: &RelayUrl,
    method: Method,
    path: &str,
    token: &str,
    body: Option<String>,
) -> anyhow::Result<Bytes> {
    let tcp = relay.connect().await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(HOST, &relay.authority)
        .header(AUTHORIZATION, format!("Bearer {token}"));
    if body.is_some() {
        req = req.header(CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = sender.send_request(req).await.map_err(|e| relay.explain(e, format!("{method} {path}")))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{method} {path}: {status}: {}", error_text(&body));
    }
    Ok(body)
}

/// Code and reason of a Close payload.
fn close_info(payload: &[u8]) -> Option<(u16, String)> {
    (payload.len() >= 2)
        .then(|| (u16::from_be_bytes([payload[0], payload[1]]), String::from_utf8_lossy(&payload[2..]).into_owned()))
}

/// How a spliced connection ended, from the WebSocket side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpliceEnd {
    /// The Close the far side (or the relay) sent, if one arrived.
    pub close: Option<(u16, String)>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

type WsWrite = fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<TokioIo<Upgraded>>>;

/// Carries one TCP connection over one data WebSocket, both ways, until both are done.
///
/// TCP half-close maps onto the close handshake: local EOF sends Close 1000 and keeps reading;
/// a Close 1000 from the far side shuts our TCP write half and keeps sending until local EOF.
/// Any other close code aborts both directions at once.
pub async fn splice<R, W>(mut tcp_r: R, mut tcp_w: W, mut ws: Ws) -> SpliceEnd
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    ws.set_auto_close(false);
    ws.set_max_message_size(64 << 20);
    let (mut read, write) = ws.split(tokio::io::split);
    let write: Arc<Mutex<WsWrite>> = Arc::new(Mutex::new(write));

    let up_write = write.clone();
    let mut up: Pin<Box<dyn Future<Output = u64> + Send>> = Box::pin(async move {
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            let n = match tcp_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let frame = Frame::binary(Payload::Borrowed(&buf[..n]));
            if up_write.lock().await.write_frame(frame).await.is_err() {
                return total;
            }
            total += n as u64;
        }
        let _ = up_write.lock().await.write_frame(Frame::close(1000, b"")).await;
        total
    });

    let down_write = write.clone();
    let down = async move {
        let mut total = 0u64;
        let close = loop {
            let w = down_write.clone();
            let mut send = move |f: Frame<'_>| {
                let owned = f.into_static();
                let w = w.clone();
                async move { w.lock().await.write_frame(owned).await }
            };
            match read.read_frame(&mut send).await {
                Ok(f) => match f.opcode {
                    OpCode::Binary | OpCode::Continuation | OpCode::Text => {
                        // flush: a no-op for TCP, but stdout (--stdio) buffers until told.
                        if tcp_w.write_all(&f.payload).await.is_err() || tcp_w.flush().await.is_err() {
                            break None;
                        }
                        total += f.payload.len() as u64;
                    }
                    OpCode::Close => break Some(close_info(&f.payload).unwrap_or((1005, String::new()))),
                    OpCode::Ping | OpCode::Pong => {}
                },
                Err(_) => break None,
            }
        };
        let _ = tcp_w.shutdown().await;
        (close, total)
    };
    tokio::pin!(down);

    let mut bytes_up = None;
    let (close, bytes_down) = tokio::select! {
        r = &mut down => r,
        n = &mut up => { bytes_up = Some(n); (&mut down).await }
    };
    let bytes_up = match (bytes_up, &close) {
        (Some(n), _) => n,
        // The far side finished cleanly: keep sending until our side is done too.
        (None, Some((1000, _))) => up.await,
        // Aborted: stop reading the local side; its socket closes when dropped.
        _ => {
            drop(up);
            0
        }
    };
    SpliceEnd { close, bytes_up, bytes_down }
}
