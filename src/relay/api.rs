//! The relay's HTTP side on hyper: the control API, health and metrics, and every WebSocket
//! upgrade (agent control, session control, client and device data connections). Data
//! connections leave hyper right after the `101`: the socket and the bytes hyper read past the
//! request go to the owning worker's data plane.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, SET_COOKIE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;

use super::admission::Turn;
use super::audit::Record;
use super::ending::CloseReason;
use super::handoff::{Cmd, ConnEnd, DataSocket, TlsStream};
use super::keys::ReloadError;
use super::logins::LoggedIn;
use super::metrics::HandshakeFailure;
use super::registry::{Caller, ClientConn, Forward, Refusal};
use super::{channels, Relay};
use crate::config::Role;
use crate::proto::{ApiError, Launch, LoggedIn as LoggedInBody, Login, StartSession};

type Resp = Response<Full<Bytes>>;

/// Session events queued toward a client's control connection (a few per session lifetime).
const SESSION_EVENTS: usize = 16;

/// Accepts connections on this worker's copy of the listener and serves each with hyper, until
/// the relay starts shutting down.
pub async fn accept_loop(listener: tokio::net::TcpListener, relay: Arc<Relay>, worker: usize) {
    let mut shutdown = relay.shutdown.subscribe();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(worker, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        };
        // Bound the connections still in their HTTP phase, relay-wide and, once half the
        // slots are taken, per source address; beyond that, close at once. One address cannot
        // take every slot.
        let Ok(permit) = relay.handshakes.clone().try_acquire_owned() else {
            relay.metrics.handshake_failed(HandshakeFailure::Limit);
            continue;
        };
        let crowded = relay.handshakes.available_permits() < relay.config.limits.max_handshakes / 2;
        let Some(share) = relay.admission.handshake(peer.ip(), crowded) else {
            relay.metrics.handshake_failed(HandshakeFailure::AddressLimit);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Data the peer does not acknowledge for this long aborts the connection, also after
        // the relay closed it: a peer that stops reading its control connection is dropped after
        // three keepalive periods, and without this its socket would linger in the kernel
        // (FIN-WAIT-1 behind a zero window) holding up to a send buffer, for minutes. Data
        // connections leave it at the system default when they reach the data plane (a tunnel
        // may legitimately wait on a slow reader).
        let _ = socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(channels::stall(&relay)));
        let relay = relay.clone();
        tokio::task::spawn_local(async move {
            let _permit = (permit, share);
            match relay.tls.clone() {
                None => serve_connection(stream, relay, peer).await,
                Some(acceptor) => {
                    // The TLS handshake counts against the same deadline as the HTTP request.
                    let deadline = Duration::from_secs(relay.config.limits.handshake_timeout_secs);
                    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(tls, relay, peer).await,
                        Ok(Err(e)) => {
                            relay.metrics.handshake_failed(HandshakeFailure::Malformed);
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                        }
                        Err(_) => relay.metrics.handshake_failed(HandshakeFailure::Malformed),
                    }
                }
            }
        });
    }
}

/// Serves one accepted connection with hyper until it ends or is upgraded. The HTTP fuzz target
/// drives exactly this code over an in-memory stream (`crate::fuzzing`).
pub async fn serve_connection<S>(io: S, relay: Arc<Relay>, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = &relay.config.limits;
    let (handshake_timeout, max_header) = (Duration::from_secs(limits.handshake_timeout_secs), limits.max_header_bytes);
    let svc = service_fn(|req| {
        let relay = relay.clone();
        async move { Ok::<_, std::convert::Infallible>(gated(req, relay, peer).await) }
    });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .max_buf_size(max_header)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
}

/// Routes a request through the failed-login gate: an address that keeps presenting wrong
/// credentials has its checks spaced out (see [`super::admission`]), and every refused
/// credential is logged and audited with the address and the kind of credential, never its value.
async fn gated(req: Request<Incoming>, relay: Arc<Relay>, peer: SocketAddr) -> Resp {
    let path = req.uri().path().to_string();
    let Some(mut credential) = credential_kind(&path) else {
        return route(req, relay, peer).await;
    };
    if credential == "operator_token" && bearer(&req).is_none() && super::logins::cookie_of(req.headers()).is_some() {
        credential = "login_cookie";
    }
    match relay.admission.login_turn(peer.ip(), std::time::Instant::now()) {
        Turn::Now => {}
        Turn::After(wait) => tokio::time::sleep(wait).await,
        Turn::Refused => {
            relay.metrics.handshake_failed(HandshakeFailure::Throttled);
            return error(StatusCode::TOO_MANY_REQUESTS, "too many failed logins from this address: try again later");
        }
    }
    let resp = route(req, relay.clone(), peer).await;
    if resp.status() == StatusCode::UNAUTHORIZED {
        relay.admission.login_failed(peer.ip(), std::time::Instant::now());
        let path = crate::proto::printable(&path, 120);
        tracing::warn!(addr = %peer, credential, path, "login failed");
        relay.audit.write(Record::AuthFailed { addr: &peer.to_string(), credential, path: &path });
    }
    resp
}

/// Which credential a path takes, or `None` for the open endpoints (health, metrics).
fn credential_kind(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    Some(match segments.as_slice() {
        ["healthz"] | ["metrics"] | ["api", "v1", "healthz"] | ["api", "v1", "metrics"] => return None,
        ["api", "v1", "openapi.json"] => return None,
        ["api", "v1", "launch"] => "launch_code",
        ["api", "v1", "agent"] | ["api", "v1", "agent", "spare"] => "device_key",
        ["api", "v1", "sessions", _, "control" | "client"] => "client_token",
        ["api", "v1", "sessions", _, "device"] => "device_token",
        ["api", "v1", ..] => "operator_token",
        _ => return None,
    })
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Resp {
    let bytes = serde_json::to_vec(body).expect("API types serialize");
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts")
}

fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    json(status, &ApiError { error: message.into() })
}

fn refused(relay: &Relay, r: Refusal) -> Resp {
    if let Some(why) = r.why {
        relay.metrics.handshake_failed(why);
    }
    error(r.status, r.message)
}

fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers().get(AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

fn query<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

async fn route(req: Request<Incoming>, relay: Arc<Relay>, peer: SocketAddr) -> Resp {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"] | ["api", "v1", "healthz"]) => Response::builder()
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(b"ok\n")))
            .expect("static response parts"),
        (&Method::GET, ["metrics"] | ["api", "v1", "metrics"]) => {
            let (sessions, agents) = relay.registry.counts();
            let mut text = relay.metrics.render(sessions, agents);
            if let Some(cluster) = relay.registry.cluster_metrics() {
                text.push_str(&cluster);
            }
            if let Some(c) = &relay.config.cluster {
                text = super::metrics::labelled(&text, "node", &c.node);
            }
            Response::builder()
                .header(CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(text)))
                .expect("static response parts")
        }
        (_, ["api", "v1", "agent"]) => agent_upgrade(req, relay, peer).await.unwrap_or_else(|r| *r),
        (_, ["api", "v1", "agent", "spare"]) => spare_upgrade(req, relay).await.unwrap_or_else(|r| *r),
        (_, ["api", "v1", "sessions", id, "control"]) => {
            let id = id.to_string();
            control_upgrade(req, relay, id, peer).await.unwrap_or_else(|r| *r)
        }
        (_, ["api", "v1", "sessions", id, "client"]) => {
            let id = id.to_string();
            client_upgrade(req, relay, id, peer).await.unwrap_or_else(|r| *r)
        }
        (_, ["api", "v1", "sessions", id, "device"]) => {
            let id = id.to_string();
            device_upgrade(req, relay, id).await.unwrap_or_else(|r| *r)
        }
        (&Method::GET, ["api", "v1", "openapi.json"]) => Response::builder()
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(super::openapi::DOCUMENT.as_bytes())))
            .expect("static response parts"),
        (&Method::POST, ["api", "v1", "launch"]) => launch(req, relay, peer).await,
        (&Method::POST, ["api", "v1", "login"]) => login(req, relay, peer).await,
        (_, ["api", "v1", ..]) => operator_api(req, relay, peer, &segments).await,
        (&Method::GET, _) => match super::console::asset(&path) {
            Some(page) => page,
            None => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
        },
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

async fn operator_api(req: Request<Incoming>, relay: Arc<Relay>, peer: SocketAddr, segs: &[&str]) -> Resp {
    let anonymous = bearer(&req).is_none() && super::logins::cookie_of(req.headers()).is_none();
    if anonymous && req.method() == Method::GET && segs[2..] == ["login"] {
        // The console asks whether it is logged in; presenting nothing is not a failed login.
        return no_content();
    }
    let who = match authenticate(&req, &relay) {
        Ok(who) => who,
        Err(refusal) => return *refusal,
    };
    let (operator, role) = (who.operator.clone(), who.role);
    let caller = Caller { name: &operator, role };
    match (req.method().clone(), &segs[2..]) {
        (Method::POST, ["sessions"]) => {
            let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost").to_string();
            // Authenticated (and, from the console, with its CSRF proof): any content type.
            let start: StartSession = match json_body(req, &relay, false).await {
                Ok(s) => s,
                Err(r) => return *r,
            };
            if relay.shutting_down() {
                return error(StatusCode::SERVICE_UNAVAILABLE, "the relay is shutting down");
            }
            match relay.registry.start_session(&operator, &peer.to_string(), start, &host).await {
                Ok(mut started) => {
                    tracing::info!(operator, session = started.id, "session started");
                    started.launch_code = Some(relay.launch.issue(&started, &operator, std::time::Instant::now()));
                    json(StatusCode::CREATED, &started)
                }
                Err(r) => refused(&relay, r),
            }
        }
        (Method::GET, ["sessions"]) => json(StatusCode::OK, &relay.sessions_live(caller).await),
        (Method::GET, ["sessions", "ended"]) => json(StatusCode::OK, &relay.registry.ended_sessions(caller)),
        (Method::GET, ["sessions", id]) => match relay.registry.session(caller, id) {
            Some(mut info) => {
                if info.connections > 0 {
                    if let Some((to_device, to_client)) = relay.live_bytes().await.get(info.id.as_str()) {
                        info.bytes_to_device += to_device;
                        info.bytes_to_client += to_client;
                    }
                }
                json(StatusCode::OK, &info)
            }
            None => error(StatusCode::NOT_FOUND, "no such session"),
        },
        (Method::DELETE, ["sessions", id]) => match relay.registry.close_session_as(caller, id).await {
            Ok(true) => no_content(),
            Ok(false) => error(StatusCode::NOT_FOUND, "no such session"),
            Err(r) => refused(&relay, r),
        },
        (Method::GET, ["devices"]) => json(StatusCode::OK, &relay.registry.devices()),
        (Method::POST, ["devices", _, "disconnect"]) if role != Role::Admin => {
            error(StatusCode::FORBIDDEN, "disconnecting an agent takes an admin operator")
        }
        (Method::POST, ["devices", device, "disconnect"]) => {
            if !relay.keys.device_known(device) {
                return error(StatusCode::NOT_FOUND, "no such device");
            }
            if !relay.registry.disconnect_agent(device, CloseReason::Kicked(operator.clone())) {
                return error(StatusCode::CONFLICT, "the device's agent is not connected to this relay");
            }
            tracing::warn!(device, operator, "agent disconnected by an operator");
            relay.audit.write(Record::AgentDisconnected { device, operator: &operator, addr: &peer.to_string() });
            no_content()
        }
        (Method::GET, ["audit"]) => audit_search(&req, &relay, caller).await,
        (Method::GET, ["login"]) => json(StatusCode::OK, &logged_in(&relay, &who)),
        (Method::POST, ["logout"]) => {
            if let Some(login) = &who.login {
                relay.logins.end(&login.key);
                relay.audit.write(Record::Logout { operator: &operator, addr: &peer.to_string() });
            }
            let mut resp = no_content();
            let cookie = super::logins::clear_cookie(relay.tls.is_some());
            resp.headers_mut().insert(SET_COOKIE, cookie.parse().expect("a valid header value"));
            resp
        }
        (_, ["live"]) => live_upgrade(req, relay, who).await.unwrap_or_else(|r| *r),
        (Method::POST, ["reload"]) if role != Role::Admin => {
            error(StatusCode::FORBIDDEN, "reloading the configuration takes an admin operator")
        }
        (Method::POST, ["reload"]) => {
            tracing::info!(operator, "configuration reload requested through the API");
            let reloading = relay.clone();
            let by = operator.clone();
            match tokio::task::spawn_blocking(move || reloading.reload(&by)).await {
                Ok(Ok(done)) => json(StatusCode::OK, &done),
                Ok(Err(e @ ReloadError::NoFile)) => error(StatusCode::CONFLICT, e.to_string()),
                Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, format!("reload refused, nothing changed: {e}")),
                Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the reload failed"),
            }
        }
        (_, ["sessions"] | ["sessions", _] | ["devices"] | ["devices", _, "disconnect"] | ["reload"] | ["audit"])
        | (_, ["login"] | ["logout"]) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

fn no_content() -> Resp {
    Response::builder().status(StatusCode::NO_CONTENT).body(Full::default()).expect("static response parts")
}

/// The operator behind a control API request: its bearer token, or its console login cookie.
struct Who {
    operator: String,
    role: Role,
    login: Option<LoggedIn>,
}

/// Who is calling, or the refusal: 401 for a missing or bad credential (a stale cookie too),
/// 403 for a cookie request that changes state without its login's CSRF proof or that comes
/// from another site's page.
fn authenticate(req: &Request<Incoming>, relay: &Relay) -> Result<Who, Box<Resp>> {
    let unauthorized = || {
        relay.metrics.handshake_failed(HandshakeFailure::BadToken);
        Box::new(error(StatusCode::UNAUTHORIZED, "invalid credentials"))
    };
    if let Some(token) = bearer(req) {
        let (operator, role) = relay.keys.operator(token).ok_or_else(unauthorized)?;
        return Ok(Who { operator, role, login: None });
    }
    let id = super::logins::cookie_of(req.headers()).ok_or_else(unauthorized)?;
    let login = relay.logins.check(id, std::time::Instant::now()).ok_or_else(unauthorized)?;
    let Some(role) = relay.keys.operator_named(&login.operator) else {
        // Its operator left the configuration: so does the login.
        relay.logins.end(&login.key);
        return Err(unauthorized());
    };
    if !same_origin(req) {
        return Err(Box::new(error(StatusCode::FORBIDDEN, "cross-site request refused")));
    }
    let reads = matches!(*req.method(), Method::GET | Method::HEAD);
    let proof = req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !reads && !login.csrf_ok(proof) {
        return Err(Box::new(error(StatusCode::FORBIDDEN, "missing or wrong CSRF proof (X-CSRF-Token header)")));
    }
    Ok(Who { operator: login.operator.clone(), role, login: Some(login) })
}

/// The header a console request that changes state carries its login's CSRF proof in.
const CSRF_HEADER: &str = "x-csrf-token";

/// Whether a request's `Origin` (when a browser sent one) is the relay's own address as the
/// request names it (`Host`, or `X-Forwarded-Host` behind a reverse proxy that rewrites
/// `Host`): a page of another site may not use a console login, not even by WebSocket (which
/// CSRF proofs do not cover). Believing `X-Forwarded-Host` gives a cross-site page nothing: a
/// browser sends no such header cross-site without a CORS preflight, which the relay never
/// grants.
fn same_origin(req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(hyper::header::ORIGIN) else { return true };
    let Some(authority) = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, rest)| rest) else {
        return false;
    };
    let named = |name: &str| {
        let value = req.headers().get(name).and_then(|h| h.to_str().ok()).unwrap_or("");
        // A proxy chain lists hosts comma-separated, the first being what the browser used.
        let first = value.split(',').next().unwrap_or("").trim();
        !first.is_empty() && first.eq_ignore_ascii_case(authority)
    };
    named(HOST.as_str()) || named("x-forwarded-host")
}

fn logged_in(relay: &Relay, who: &Who) -> LoggedInBody {
    LoggedInBody {
        operator: who.operator.clone(),
        role: role_name(who.role).into(),
        csrf_token: who.login.as_ref().map(|l| l.csrf.clone()).unwrap_or_default(),
        idle_timeout_secs: relay.logins.idle_timeout().as_secs(),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Operator => "operator",
    }
}

/// Reads a small JSON body (64 KiB at most), within the handshake deadline: a request that
/// trickles in does not hold its handshake slot for longer. With `strict`, a body that does not
/// say it is `application/json` is refused: browsers send forms cross-site without asking, but
/// not JSON (the unauthenticated login and launch endpoints rely on it).
async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    relay: &Relay,
    strict: bool,
) -> Result<T, Box<Resp>> {
    let is_json =
        !strict
            || req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
                v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
    if !is_json {
        return Err(Box::new(error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the body must be application/json")));
    }
    let deadline = Duration::from_secs(relay.config.limits.handshake_timeout_secs);
    let body = match tokio::time::timeout(deadline, Limited::new(req.into_body(), 64 << 10).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => return Err(Box::new(error(StatusCode::PAYLOAD_TOO_LARGE, "request body over 64 KiB"))),
        Err(_) => return Err(Box::new(error(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time"))),
    };
    serde_json::from_slice(&body)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}"))))
}

/// `POST /api/v1/login`: an operator token for a console login (cookie) and its CSRF proof.
async fn login(req: Request<Incoming>, relay: Arc<Relay>, peer: SocketAddr) -> Resp {
    let body: Login = match json_body(req, &relay, true).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some((operator, role)) = relay.keys.operator(&body.token) else {
        relay.metrics.handshake_failed(HandshakeFailure::BadToken);
        return error(StatusCode::UNAUTHORIZED, "invalid credentials");
    };
    let (id, login) = relay.logins.create(&operator, std::time::Instant::now());
    tracing::info!(operator, addr = %peer, "console login");
    relay.audit.write(Record::Login { operator: &operator, addr: &peer.to_string() });
    let who = Who { operator, role, login: Some(login) };
    let mut resp = json(StatusCode::OK, &logged_in(&relay, &who));
    let cookie = super::logins::set_cookie(&id, relay.tls.is_some());
    resp.headers_mut().insert(SET_COOKIE, cookie.parse().expect("a valid header value"));
    resp
}

/// `POST /api/v1/launch`: a launch code for its session's client credentials, once. A wrong,
/// used or expired code, or one whose session has ended, is the same 401 as any bad credential.
async fn launch(req: Request<Incoming>, relay: Arc<Relay>, peer: SocketAddr) -> Resp {
    let body: Launch = match json_body(req, &relay, true).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let anyone = Caller { name: "", role: Role::Admin };
    let redeemed = relay.launch.redeem(&body.code, std::time::Instant::now());
    let live = redeemed.and_then(|r| relay.registry.session(anyone, &r.started.id).map(|s| (r, s)));
    let Some((r, session)) = live else {
        relay.metrics.handshake_failed(HandshakeFailure::BadToken);
        return error(StatusCode::UNAUTHORIZED, "invalid credentials");
    };
    tracing::info!(session = r.started.id, operator = r.operator, addr = %peer, "launch code redeemed");
    let (id, addr) = (&r.started.id, &peer.to_string());
    relay.audit.write(Record::LaunchRedeemed { session: id, operator: &r.operator, device: &session.device, addr });
    json(StatusCode::OK, &r.started)
}

/// `GET /api/v1/audit`: the audit log filtered, as JSON lines. An operator sees only records
/// naming it; an admin any.
async fn audit_search(req: &Request<Incoming>, relay: &Arc<Relay>, caller: Caller<'_>) -> Resp {
    if !relay.audit.enabled() {
        return error(StatusCode::CONFLICT, "this relay keeps no audit log ([audit] path)");
    }
    let mut filter = match super::audit::Filter::parse(req.uri().query().unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, crate::proto::printable(&e, 200)),
    };
    if caller.role != Role::Admin {
        if filter.operator.as_deref().is_some_and(|o| o != caller.name) {
            return error(StatusCode::FORBIDDEN, "an operator sees only its own audit records");
        }
        filter.operator = Some(caller.name.to_string());
    }
    let searching = relay.clone();
    match tokio::task::spawn_blocking(move || searching.audit.search(&filter)).await {
        Ok(Ok(lines)) => Response::builder()
            .header(CONTENT_TYPE, "application/x-ndjson")
            .body(Full::new(Bytes::from(lines)))
            .expect("static response parts"),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the audit log: {e}")),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "reading the audit log failed"),
    }
}

/// `GET /api/v1/live`: the console's live view, a WebSocket ([`super::console::live`]).
async fn live_upgrade(mut req: Request<Incoming>, relay: Arc<Relay>, who: Who) -> Upgrade {
    let (resp, fut) = upgrade(&relay, &mut req)?;
    let watcher = super::console::Watcher { operator: who.operator, role: who.role, login: who.login.map(|l| l.key) };
    tokio::task::spawn_local(async move {
        if let Ok(ws) = fut.await {
            super::console::live(ws, relay, watcher).await;
        }
    });
    Ok(resp)
}

/// An upgrade handler's answer: the `101`, or a refusal returned early with `?` (boxed: a
/// response is large for an `Err`).
type Upgrade = Result<Resp, Box<Resp>>;

/// A request without what the endpoint needs: counted as malformed, answered 400.
fn malformed(relay: &Relay, message: &str) -> Box<Resp> {
    relay.metrics.handshake_failed(HandshakeFailure::Malformed);
    Box::new(error(StatusCode::BAD_REQUEST, message))
}

/// Starts the WebSocket handshake, or says why it cannot.
fn upgrade(
    relay: &Relay,
    req: &mut Request<Incoming>,
) -> Result<(Resp, fastwebsockets::upgrade::UpgradeFut), Box<Resp>> {
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        relay.metrics.handshake_failed(HandshakeFailure::NotWebSocket);
        return Err(Box::new(error(StatusCode::UPGRADE_REQUIRED, "this endpoint takes a WebSocket upgrade")));
    }
    match fastwebsockets::upgrade::upgrade(req) {
        Ok((resp, fut)) => Ok((resp.map(|_| Full::default()), fut)),
        Err(e) => {
            relay.metrics.handshake_failed(HandshakeFailure::Malformed);
            Err(Box::new(error(StatusCode::BAD_REQUEST, format!("bad WebSocket handshake: {e}"))))
        }
    }
}

async fn agent_upgrade(mut req: Request<Incoming>, relay: Arc<Relay>, peer: SocketAddr) -> Upgrade {
    let device = query(&req, "device").map(str::to_string).ok_or_else(|| malformed(&relay, "missing ?device=ID"))?;
    relay.device_key_ok(&device, bearer(&req).unwrap_or("")).map_err(|r| Box::new(refused(&relay, r)))?;
    let (resp, fut) = upgrade(&relay, &mut req)?;
    tokio::task::spawn_local(async move {
        if let Ok(ws) = fut.await {
            channels::agent(ws, device, peer, relay).await;
        }
    });
    Ok(resp)
}

async fn control_upgrade(mut req: Request<Incoming>, relay: Arc<Relay>, session: String, peer: SocketAddr) -> Upgrade {
    let token = bearer(&req).unwrap_or("");
    if let Some(home) = elsewhere(&req, &relay, &session, token) {
        let home = home.map_err(|r| Box::new(refused(&relay, r)))?;
        return forward(req, relay, home, peer).await;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(SESSION_EVENTS);
    let (attachment, ready) =
        relay.registry.attach_control(&session, token, tx).map_err(|r| Box::new(refused(&relay, r)))?;
    let (resp, fut) = upgrade(&relay, &mut req).inspect_err(|_| relay.registry.detach_control(&session, attachment))?;
    tokio::task::spawn_local(async move {
        if let Ok(ws) = fut.await {
            channels::session_control(ws, relay.clone(), ready, rx).await;
        }
        relay.registry.detach_control(&session, attachment);
    });
    Ok(resp)
}

/// An upgraded connection still on this runtime's reactor (a spare waits here for its order).
enum Live {
    Plain(tokio::net::TcpStream),
    Tls(Box<TlsStream>),
}

impl Live {
    /// Until the peer sends something or closes.
    async fn readable(&self) {
        let _ = match self {
            Live::Plain(s) => s.readable().await,
            Live::Tls(s) => s.get_ref().0.readable().await,
        };
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            Live::Plain(s) => s.write_all(bytes).await,
            Live::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    /// Once the peer sent something or closed: `None` if it closed (or, over TLS, sent no
    /// whole record within `within`), else what had to be read to tell — nothing on a plain
    /// connection, which is only peeked; over TLS a close cannot be told from data without
    /// reading a record, and what was read is the connection's first bytes.
    async fn first_bytes(&mut self, within: Duration) -> Option<Bytes> {
        match self {
            Live::Plain(s) => match s.peek(&mut [0u8; 1]).await {
                Ok(n) if n > 0 => Some(Bytes::new()),
                _ => None,
            },
            Live::Tls(s) => {
                use tokio::io::AsyncReadExt;
                let mut first = vec![0u8; 4096];
                match tokio::time::timeout(within, s.read(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => {
                        first.truncate(n);
                        Some(Bytes::from(first))
                    }
                    _ => None,
                }
            }
        }
    }

    fn into_data_socket(self) -> Option<DataSocket> {
        Some(match self {
            Live::Plain(s) => DataSocket::Plain(s.into_std().ok()?),
            Live::Tls(s) => DataSocket::Tls(s),
        })
    }
}

/// The connection under a completed upgrade, and what hyper had read past the request.
async fn take_live(fut: fastwebsockets::upgrade::UpgradeFut) -> Option<(Live, Bytes)> {
    let ws = fut.await.ok()?;
    let upgraded = ws.into_inner().into_inner();
    // What hyper read past the request is a slice of its whole read buffer: copy it (usually
    // empty) so a parked or idle connection does not keep that buffer alive.
    let own = |b: Bytes| if b.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&b) };
    match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
        Ok(parts) => Some((Live::Plain(parts.io.into_inner()), own(parts.read_buf))),
        Err(upgraded) => {
            let parts = upgraded.downcast::<TokioIo<TlsStream>>().ok()?;
            Some((Live::Tls(Box::new(parts.io.into_inner())), own(parts.read_buf)))
        }
    }
}

/// The socket under an upgraded connection, off the reactor for a worker, and what hyper had
/// read past the request.
async fn take_socket(fut: fastwebsockets::upgrade::UpgradeFut) -> Option<(DataSocket, Bytes)> {
    let (live, leftover) = take_live(fut).await?;
    Some((live.into_data_socket()?, leftover))
}

/// A spare device connection: the agent dials it ahead of need and it waits here, parked with
/// the registry, until a client connection takes it. Then the agent is told which connection
/// it serves (one text message: the `connect` the control channel would carry) and the socket
/// goes to that connection's worker as if the agent had just dialed it. A spare whose agent
/// leaves, that sends anything while waiting, or that the relay no longer wants, is closed.
async fn spare_upgrade(mut req: Request<Incoming>, relay: Arc<Relay>) -> Upgrade {
    let device = query(&req, "device").map(str::to_string).ok_or_else(|| malformed(&relay, "missing ?device=ID"))?;
    relay.device_key_ok(&device, bearer(&req).unwrap_or("")).map_err(|r| Box::new(refused(&relay, r)))?;
    let (resp, fut) = upgrade(&relay, &mut req)?;
    tokio::task::spawn_local(async move {
        let Some((mut live, leftover)) = take_live(fut).await else { return };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !leftover.is_empty() || !relay.registry.park_spare(&device, tx) {
            return;
        }
        relay.metrics.spares_parked.fetch_add(1, Relaxed);
        let mut shutdown = relay.shutdown.subscribe();
        let order = tokio::select! {
            order = rx => order.ok(),
            () = live.readable() => None,
            _ = shutdown.wait_for(|s| *s) => None,
        };
        relay.metrics.spares_parked.fetch_sub(1, Relaxed);
        let Some(order) = order else { return };
        let mut frame = Vec::with_capacity(order.message.len() + 4);
        crate::ws::encode::frame(&mut frame, true, crate::ws::OpCode::Text, order.message.as_bytes(), None);
        // A spare that cannot take its order leaves the connection to the pairing timeout
        // (4001), as an agent that never dials back would.
        if live.write_all(&frame).await.is_ok() {
            if let Some(stream) = live.into_data_socket() {
                relay.workers.send(order.worker, Cmd::Device { conn: order.conn, stream, leftover });
            }
        }
    });
    Ok(resp)
}

async fn client_upgrade(mut req: Request<Incoming>, relay: Arc<Relay>, session: String, peer: SocketAddr) -> Upgrade {
    let token = bearer(&req).unwrap_or("");
    if let Some(home) = elsewhere(&req, &relay, &session, token) {
        let home = home.map_err(|r| Box::new(refused(&relay, r)))?;
        return forward(req, relay, home, peer).await;
    }
    let peer = forwarded_for(&req, &relay, &session)?.unwrap_or(peer);
    if query(&req, "ready").is_some() {
        return ready_upgrade(req, relay, session, peer).await;
    }
    let conn: ClientConn =
        relay.registry.client_conn(&session, token, peer).map_err(|r| Box::new(refused(&relay, r)))?;
    let (resp, fut) =
        upgrade(&relay, &mut req).inspect_err(|_| abandon(&relay, &conn, "not a valid WebSocket upgrade"))?;
    tokio::task::spawn_local(async move {
        let Some((stream, leftover)) = take_socket(fut).await else {
            return abandon(&relay, &conn, "the upgrade did not complete");
        };
        tracing::debug!(session = %conn.session, conn = conn.conn, %peer, "client connection");
        admit(&relay, &conn, stream, leftover);
    });
    Ok(resp)
}

/// An admitted client connection goes to its worker, and the agent is asked for its device
/// side (a parked spare, or a dial).
fn admit(relay: &Relay, conn: &ClientConn, stream: DataSocket, leftover: Bytes) {
    let session = conn.session.clone();
    relay.workers.send(conn.worker, Cmd::Client { conn: conn.conn, session, stream, leftover });
    relay.registry.announce_conn(conn);
}

/// A ready client connection (`?ready=1`): `ringway connect` opens one ahead of need, so that
/// its next local connection costs no handshake. The token is checked now; the connection is
/// opened in the session, and the agent asked for its device side, only when the first byte
/// comes (an empty frame is enough). Until then it waits here, for at most the idle timeout and
/// at most [`MAX_READY`](super::registry::memory::MAX_READY) per session; a client that closes
/// it leaves no trace. A refusal at that point (the session ended, its connection limit) is a
/// Close 1008 with the reason.
async fn ready_upgrade(mut req: Request<Incoming>, relay: Arc<Relay>, session: String, peer: SocketAddr) -> Upgrade {
    let token = bearer(&req).unwrap_or("").to_string();
    relay.registry.ready_begin(&session, &token).map_err(|r| Box::new(refused(&relay, r)))?;
    let (resp, fut) = upgrade(&relay, &mut req).inspect_err(|_| relay.registry.ready_end(&session))?;
    tokio::task::spawn_local(async move {
        relay.metrics.ready_waiting.fetch_add(1, Relaxed);
        let waited = wait_ready(&relay, fut).await;
        relay.metrics.ready_waiting.fetch_sub(1, Relaxed);
        relay.registry.ready_end(&session);
        let Some((mut live, leftover)) = waited else { return };
        let conn = match relay.registry.client_conn(&session, &token, peer) {
            Ok(conn) => conn,
            Err(r) => {
                let close = crate::ws::encode::close(crate::ws::CloseCode::POLICY_VIOLATION, &r.message);
                let _ = live.write_all(close.as_bytes()).await;
                return;
            }
        };
        let Some(stream) = live.into_data_socket() else {
            return abandon(&relay, &conn, "the connection could not be taken over");
        };
        relay.metrics.ready_used.fetch_add(1, Relaxed);
        tracing::debug!(session = %conn.session, conn = conn.conn, %peer, "client connection (ready)");
        admit(&relay, &conn, stream, leftover);
    });
    Ok(resp)
}

/// A ready connection's wait for its first byte: the connection, or `None` if it closed, timed
/// out or the relay is shutting down.
async fn wait_ready(relay: &Relay, fut: fastwebsockets::upgrade::UpgradeFut) -> Option<(Live, Bytes)> {
    let (mut live, leftover) = take_live(fut).await?;
    if !leftover.is_empty() {
        return Some((live, leftover));
    }
    let mut shutdown = relay.shutdown.subscribe();
    let idle = Duration::from_secs(relay.config.limits.idle_timeout_secs);
    tokio::select! {
        () = live.readable() => {}
        () = tokio::time::sleep(idle) => {
            let close = crate::ws::encode::close(crate::ws::CloseCode::GOING_AWAY, "ready connection unused");
            let _ = live.write_all(close.as_bytes()).await;
            return None;
        }
        _ = shutdown.wait_for(|s| *s) => return None,
    }
    // A client that closed its ready connection leaves no trace: no connection, no dial.
    let first = live.first_bytes(Duration::from_secs(relay.config.limits.handshake_timeout_secs)).await?;
    Some((live, first))
}

/// Header names of a connection one cluster node forwards to another: the forwarding node's
/// proof of membership, and the client's address as it saw it.
const FORWARDED: &str = "x-ringway-forwarded";
const FORWARDED_FOR: &str = "x-ringway-forwarded-for";

/// Where a connection for a session living on another node goes. A connection another node
/// forwarded is never forwarded again (two nodes whose mirrors disagree for a moment would
/// otherwise pass it back and forth): it is served here or refused.
fn elsewhere(req: &Request<Incoming>, relay: &Relay, session: &str, token: &str) -> Option<Result<Forward, Refusal>> {
    if req.headers().contains_key(FORWARDED) {
        return None;
    }
    relay.registry.elsewhere(session, token)
}

/// The client's address a forwarding node vouches for; a forged vouch is refused.
fn forwarded_for(req: &Request<Incoming>, relay: &Relay, session: &str) -> Result<Option<SocketAddr>, Box<Resp>> {
    let Some(proof) = req.headers().get(FORWARDED).and_then(|v| v.to_str().ok()) else { return Ok(None) };
    if !relay.registry.forwarded_by_peer(session, proof) {
        tracing::warn!(session, "refused a forwarded connection whose node proof does not verify");
        return Err(Box::new(refused(relay, Refusal::bad_token())));
    }
    Ok(req.headers().get(FORWARDED_FOR).and_then(|v| v.to_str().ok()?.parse().ok()))
}

/// A connection for a session that lives on another node (behind `public_url`, or a client
/// that came to the wrong node): once the client's handshake is checked, the WebSocket
/// handshake is made with that node (its refusal is the client's answer), then the client gets
/// its `101`, then the bytes are moved both ways as they are; the session's node unmasks and
/// forwards as for any client.
async fn forward(mut req: Request<Incoming>, relay: Arc<Relay>, home: Forward, peer: SocketAddr) -> Upgrade {
    // The client's own handshake first: a request that is no WebSocket upgrade costs no dial.
    let (resp, fut) = upgrade(&relay, &mut req)?;
    let path = req.uri().path_and_query().map_or_else(|| req.uri().path().to_string(), |p| p.to_string());
    let token = bearer(&req).unwrap_or("").to_string();
    let peer_ca = relay.config.cluster.as_ref().and_then(|c| c.peer_ca.as_deref());
    let target = crate::peer::RelayUrl::parse_with_ca(&home.advertise, peer_ca)
        .map_err(|e| Box::new(error(StatusCode::BAD_GATEWAY, format!("node {}: {e:#}", home.node))))?;
    let headers = [(FORWARDED, home.proof), (FORWARDED_FOR, peer.to_string())];
    let deadline = Duration::from_secs(relay.config.limits.handshake_timeout_secs);
    let theirs = match tokio::time::timeout(deadline, crate::peer::upgrade(&target, &path, &token, &headers)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            return Err(Box::new(match e.downcast_ref::<crate::peer::Refused>() {
                Some(r) => error(r.status, r.message.clone()),
                None => error(StatusCode::BAD_GATEWAY, format!("the session's node {} cannot be reached", home.node)),
            }))
        }
        Err(_) => {
            return Err(Box::new(error(StatusCode::GATEWAY_TIMEOUT, format!("node {} did not answer", home.node))))
        }
    };
    relay.metrics.forwarded_connections.fetch_add(1, Relaxed);
    tracing::debug!(node = home.node, %peer, path, "forwarding a connection to the session's node");
    tokio::task::spawn_local(async move {
        let Ok(ws) = fut.await else { return };
        let mut ours = Counted { io: ws.into_inner(), relay: relay.clone() };
        let mut theirs = theirs;
        // Ends when both directions are done, or at the first error (a TLS peer that vanishes
        // without close_notify is one); the bytes were counted as they passed.
        let _ = tokio::io::copy_bidirectional_with_sizes(&mut ours, &mut theirs, 64 << 10, 64 << 10).await;
    });
    Ok(resp)
}

/// The client side of a forwarded connection, counting what passes (both ways) into
/// `ringway_forwarded_bytes_total` as it goes.
struct Counted<T> {
    io: T,
    relay: Arc<Relay>,
}

impl<T> Counted<T> {
    fn count(&self, n: usize) {
        self.relay.metrics.forwarded_bytes.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = polled {
            self.count(buf.filled().len() - before);
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_write(cx, data);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.count(n);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An admitted client connection that never reached the data plane: its end is reported.
fn abandon(relay: &Relay, conn: &ClientConn, why: &str) {
    let end = ConnEnd::before_forwarding(CloseReason::Abandoned(why.to_string()));
    relay.registry.conn_ended(&conn.session, conn.conn, end);
}

async fn device_upgrade(mut req: Request<Incoming>, relay: Arc<Relay>, session: String) -> Upgrade {
    let token = bearer(&req).unwrap_or("");
    let conn =
        query(&req, "conn").and_then(|c| c.parse::<u64>().ok()).ok_or_else(|| malformed(&relay, "missing ?conn=N"))?;
    let worker = relay.registry.device_conn(&session, conn, token).map_err(|r| Box::new(refused(&relay, r)))?;
    let (resp, fut) = upgrade(&relay, &mut req)?;
    tokio::task::spawn_local(async move {
        if let Some((stream, leftover)) = take_socket(fut).await {
            relay.workers.send(worker, Cmd::Device { conn, stream, leftover });
        }
    });
    Ok(resp)
}
