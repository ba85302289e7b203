//! WebSocket and HTTP plumbing shared by the edge roles (agent, client, CLI): relay URLs,
//! connections to the relay (plain or TLS, with TCP keepalive), WebSocket handshakes with a
//! bearer token and control-API calls, on hyper. Control connections continue on
//! fastwebsockets ([`crate::channel`]); data connections are handed to [`crate::splice`] as the
//! bare connection.

use std::pin::Pin;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use fastwebsockets::{Role, WebSocket};
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

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
        f.write_str(&self.base())
    }
}

impl RelayUrl {
    /// The relay's base URL as a user would type it (`https://host:port`).
    pub fn base(&self) -> String {
        format!("{}://{}", if self.tls.is_some() { "https" } else { "http" }, self.authority)
    }
}

/// A connection to the relay, plain or TLS: a concrete type, so that a data connection can be
/// taken back from hyper after its handshake and split without a lock when it is plain.
pub enum RelayConn {
    Plain(TcpStream),
    /// Boxed: a plain connection should not pay for rustls's state.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for RelayConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            RelayConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            RelayConn::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RelayConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            RelayConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            RelayConn::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            RelayConn::Plain(s) => Pin::new(s).poll_flush(cx),
            RelayConn::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            RelayConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            RelayConn::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// TCP keepalive on every connection to the relay: a relay that vanished without a FIN or RST
/// (power loss, a NAT that dropped the mapping) is noticed on a quiet connection within
/// 60 s + 6 × 10 s = 2 minutes. (With data unacknowledged, the kernel's retransmission limit
/// applies instead; no user timeout is set, since a slow reader far away legitimately holds a
/// tunnel's window closed for longer.)
pub const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;

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

    async fn connect(&self) -> anyhow::Result<RelayConn> {
        let tcp = TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("connecting to the relay at {}", self.authority))?;
        tcp.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES);
        socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
        let Some(config) = &self.tls else { return Ok(RelayConn::Plain(tcp)) };
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .with_context(|| format!("{:?} is not a valid TLS server name", self.host))?;
        match tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await {
            Ok(tls) => Ok(RelayConn::Tls(Box::new(tls))),
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

/// Opens a data WebSocket to `path` on the relay: the handshake on hyper, then the connection
/// itself (and any bytes that arrived behind the relay's 101) for [`crate::splice`].
pub async fn dial_data(relay: &RelayUrl, path: &str, bearer: &str) -> anyhow::Result<crate::splice::DataWs> {
    let upgraded = upgrade(relay, path, bearer, &[]).await?.into_inner();
    let parts = upgraded
        .downcast::<TokioIo<RelayConn>>()
        .map_err(|_| anyhow!("the upgraded connection is not the one dialed"))?;
    // What hyper read past the 101 is a slice of its whole read buffer: copy it (usually empty),
    // or every idle connection would keep that buffer (8 KiB) alive.
    let early = if parts.read_buf.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&parts.read_buf) };
    Ok(crate::splice::DataWs { conn: parts.io.into_inner(), early })
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
    let mut req = Request::builder().method(method.clone()).uri(path).header(HOST, &relay.authority);
    if !token.is_empty() {
        req = req.header(AUTHORIZATION, format!("Bearer {token}"));
    }
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
