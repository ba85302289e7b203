//! The relay's shared tables: sessions and connected agents. Guarded by one mutex, touched only
//! at session start/stop, handshakes and connection ends — never per frame.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio::sync::{mpsc, watch, Semaphore};

use super::audit::{Audit, Record};
use super::dataplane::Cmd;
use super::metrics::{HandshakeFailure, Metrics};
use crate::config::{Config, Secret};
use crate::proto::{unix_now, DeviceInfo, SessionEvent, SessionInfo, SessionStarted, StartSession, ToAgent};
use crate::ws::CloseCode;

/// A refusal: the HTTP status, a message for the caller, and the counter it bumps.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
    pub why: Option<HandshakeFailure>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>, why: Option<HandshakeFailure>) -> Refusal {
        Refusal { status, message: message.into(), why }
    }

    fn bad_token() -> Refusal {
        Refusal::new(StatusCode::UNAUTHORIZED, "invalid credentials", Some(HandshakeFailure::BadToken))
    }

    /// An unknown session looks exactly like a wrong token: no hint which part was wrong.
    fn no_session() -> Refusal {
        Refusal::new(StatusCode::UNAUTHORIZED, "invalid credentials", Some(HandshakeFailure::UnknownSession))
    }
}

/// How a data connection ended, as the data plane reports it.
#[derive(Debug, Default)]
pub struct ConnEnd {
    pub to_device: u64,
    pub to_client: u64,
    pub reason: String,
}

impl ConnEnd {
    pub fn failed(reason: String) -> ConnEnd {
        ConnEnd { reason, ..ConnEnd::default() }
    }
}

struct Session {
    id: Arc<str>,
    device: String,
    service: String,
    operator: String,
    created_at: u64,
    expires_at: u64,
    expires: Instant,
    client_token: Secret,
    device_token: Secret,
    started: Instant,
    /// Live data connections.
    conns: HashMap<u64, ConnMeta>,
    /// The client's session control connection, if attached: (attachment id, event sender).
    control: Option<(u64, mpsc::UnboundedSender<SessionEvent>)>,
    /// When the control connection dropped; the session ends a grace period later.
    control_lost: Option<Instant>,
    bytes_to_device: u64,
    bytes_to_client: u64,
}

/// A live data connection as the session table knows it.
struct ConnMeta {
    /// The worker that owns both of its sockets.
    worker: usize,
    client_addr: String,
    opened: Instant,
}

struct Agent {
    tx: mpsc::UnboundedSender<ToAgent>,
    services: Vec<String>,
    since: u64,
    /// Tells a replaced connection apart from its successor.
    generation: u64,
}

#[derive(Default)]
struct Tables {
    sessions: HashMap<Arc<str>, Session>,
    agents: HashMap<String, Agent>,
}

/// Everything the control plane and the workers share.
pub struct Relay {
    pub config: Config,
    pub metrics: Metrics,
    pub audit: Audit,
    /// Set when the config has `[tls]`: every connection is TLS.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Connections in their HTTP phase (relay-wide), bounded by `limits.max_handshakes`.
    pub handshakes: Arc<Semaphore>,
    /// Flips to true on SIGTERM: accept loops stop, new sessions are refused.
    pub shutdown: watch::Sender<bool>,
    workers: Vec<mpsc::UnboundedSender<Cmd>>,
    tables: Mutex<Tables>,
    /// Recent failed logins per address: (count, start of the window).
    auth_failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    next_id: AtomicU64,
}

/// A client data connection admitted by the control plane.
pub struct ClientConn {
    pub conn: u64,
    pub worker: usize,
    pub session: Arc<str>,
}

impl Relay {
    /// The shared state for a relay whose workers listen on `workers` (one sender each).
    pub fn new(config: Config, workers: Vec<mpsc::UnboundedSender<Cmd>>) -> anyhow::Result<Relay> {
        let handshakes = Arc::new(Semaphore::new(config.limits.max_handshakes));
        let audit = Audit::open(config.audit.path.as_deref())?;
        let tls = match &config.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(&t.cert, &t.key)?)),
            None => None,
        };
        Ok(Relay {
            config,
            metrics: Metrics::default(),
            audit,
            tls,
            handshakes,
            shutdown: watch::Sender::new(false),
            workers,
            tables: Mutex::default(),
            auth_failures: Mutex::default(),
            next_id: AtomicU64::new(1),
        })
    }

    /// Records a failed login from `ip`; returns how long to hold the answer back.
    pub fn auth_failed(&self, ip: IpAddr) -> Option<Duration> {
        const WINDOW: Duration = Duration::from_secs(60);
        const FREE: u32 = 5;
        let mut failures = self.auth_failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if failures.len() > 100_000 {
            failures.retain(|_, (_, since)| now.duration_since(*since) < WINDOW);
        }
        let entry = failures.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        (entry.0 > FREE).then(|| Duration::from_millis(self.config.limits.auth_failure_delay_ms))
    }

    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }

    pub fn send_to_worker(&self, worker: usize, cmd: Cmd) {
        let _ = self.workers[worker].send(cmd);
    }

    pub fn start_session(
        &self,
        operator: &str,
        operator_addr: &str,
        req: StartSession,
        host: &str,
    ) -> Result<SessionStarted, Refusal> {
        let limits = &self.config.limits;
        if self.shutting_down() {
            return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "the relay is shutting down", None));
        }
        if self.config.device(&req.device).is_none() {
            return Err(Refusal::new(StatusCode::NOT_FOUND, format!("unknown device {:?}", req.device), None));
        }
        let ttl = req.ttl_secs.unwrap_or(limits.session_ttl_secs);
        if ttl == 0 || ttl > limits.max_session_ttl_secs {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("ttl_secs must be 1..={}", limits.max_session_ttl_secs),
                None,
            ));
        }
        let mut t = self.tables();
        if let Some(agent) = t.agents.get(&req.device) {
            if !agent.services.contains(&req.service) {
                return Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "device {} offers no service {:?} (it offers: {})",
                        req.device,
                        req.service,
                        agent.services.join(", ")
                    ),
                    None,
                ));
            }
        }
        if t.sessions.len() >= limits.max_sessions {
            return Err(Refusal::new(StatusCode::TOO_MANY_REQUESTS, "the relay's session limit is reached", None));
        }
        let id: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        self.audit.write(Record::SessionStart {
            session: &id,
            operator,
            operator_addr,
            device: &req.device,
            service: &req.service,
            expires_at: unix_now() + ttl,
        });
        let client_token = Secret::random();
        let now = unix_now();
        let started = SessionStarted {
            id: id.to_string(),
            client_url: format!(
                "{}://{host}/api/v1/sessions/{id}/client",
                if self.config.tls.is_some() { "wss" } else { "ws" }
            ),
            client_token: client_token.expose().to_string(),
            expires_at: now + ttl,
        };
        t.sessions.insert(
            id.clone(),
            Session {
                id,
                device: req.device,
                service: req.service,
                operator: operator.to_string(),
                created_at: now,
                expires_at: now + ttl,
                expires: Instant::now() + Duration::from_secs(ttl),
                started: Instant::now(),
                client_token,
                device_token: Secret::random(),
                conns: HashMap::new(),
                control: None,
                control_lost: None,
                bytes_to_device: 0,
                bytes_to_client: 0,
            },
        );
        self.metrics.sessions_started.fetch_add(1, Relaxed);
        Ok(started)
    }

    fn info(t: &Tables, s: &Session) -> SessionInfo {
        SessionInfo {
            id: s.id.to_string(),
            device: s.device.clone(),
            service: s.service.clone(),
            operator: s.operator.clone(),
            created_at: s.created_at,
            expires_at: s.expires_at,
            device_online: t.agents.contains_key(&s.device),
            client_connected: s.control.is_some(),
            connections: s.conns.len(),
            bytes_to_device: s.bytes_to_device,
            bytes_to_client: s.bytes_to_client,
        }
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        let t = self.tables();
        let mut v: Vec<_> = t.sessions.values().map(|s| Relay::info(&t, s)).collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    pub fn session(&self, id: &str) -> Option<SessionInfo> {
        let t = self.tables();
        t.sessions.get(id).map(|s| Relay::info(&t, s))
    }

    pub fn devices(&self) -> Vec<DeviceInfo> {
        let t = self.tables();
        self.config
            .device
            .iter()
            .map(|d| {
                let agent = t.agents.get(&d.id);
                DeviceInfo {
                    id: d.id.clone(),
                    online: agent.is_some(),
                    services: agent.map(|a| a.services.clone()).unwrap_or_default(),
                    connected_since: agent.map(|a| a.since),
                }
            })
            .collect()
    }

    pub fn counts(&self) -> (usize, usize) {
        let t = self.tables();
        (t.sessions.len(), t.agents.len())
    }

    /// Ends a session: its client hears `code` on the control connection and every data
    /// connection, and its tokens die with it.
    pub fn close_session(&self, id: &str, code: CloseCode, reason: &str) -> bool {
        let Some(s) = self.tables().sessions.remove(id) else {
            return false;
        };
        self.metrics.sessions_ended.fetch_add(1, Relaxed);
        tracing::info!(session = %s.id, device = %s.device, service = %s.service, code = code.0, reason, "session ended");
        self.audit.write(Record::SessionEnd {
            session: &s.id,
            operator: &s.operator,
            device: &s.device,
            service: &s.service,
            code: code.0,
            reason,
            duration_secs: s.started.elapsed().as_secs(),
            bytes_to_device: s.bytes_to_device,
            bytes_to_client: s.bytes_to_client,
        });
        if let Some((_, tx)) = &s.control {
            let _ = tx.send(SessionEvent::Closing { code: code.0, reason: reason.to_string() });
        }
        for (&conn, meta) in &s.conns {
            self.send_to_worker(meta.worker, Cmd::Close { conn, code, reason: reason.to_string() });
        }
        true
    }

    /// Admits a client data connection for `session` presenting `token`.
    pub fn client_conn(&self, session: &str, token: &str, client_addr: SocketAddr) -> Result<ClientConn, Refusal> {
        let mut t = self.tables();
        let s = t.sessions.get_mut(session).ok_or_else(Refusal::no_session)?;
        if !s.client_token.matches(token) {
            return Err(Refusal::bad_token());
        }
        if s.conns.len() >= self.config.limits.max_connections_per_session {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("session has {} connections, the limit", s.conns.len()),
                Some(HandshakeFailure::Limit),
            ));
        }
        let conn = self.next_id();
        let worker = (conn as usize) % self.workers.len();
        s.conns.insert(conn, ConnMeta { worker, client_addr: client_addr.to_string(), opened: Instant::now() });
        self.metrics.connections_opened.fetch_add(1, Relaxed);
        Ok(ClientConn { conn, worker, session: s.id.clone() })
    }

    /// After the client side of `conn` reached its worker: ask the device's agent to dial in,
    /// or close the connection at once if the device is offline.
    pub fn announce_conn(&self, c: &ClientConn) {
        let t = self.tables();
        let Some(s) = t.sessions.get(&c.session) else {
            return;
        };
        let msg = ToAgent::Connect {
            session: s.id.to_string(),
            conn: c.conn,
            service: s.service.clone(),
            token: s.device_token.expose().to_string(),
        };
        let sent = t.agents.get(&s.device).is_some_and(|a| a.tx.send(msg).is_ok());
        if !sent {
            let reason = format!("device {} is offline", s.device);
            self.send_to_worker(c.worker, Cmd::Close { conn: c.conn, code: CloseCode::DEVICE_OFFLINE, reason });
        }
    }

    /// Admits the device side of `conn`; returns the worker that owns the connection.
    pub fn device_conn(&self, session: &str, conn: u64, token: &str) -> Result<usize, Refusal> {
        let t = self.tables();
        let s = t.sessions.get(session).ok_or_else(Refusal::no_session)?;
        if !s.device_token.matches(token) {
            return Err(Refusal::bad_token());
        }
        s.conns.get(&conn).map(|m| m.worker).ok_or_else(|| {
            Refusal::new(StatusCode::UNAUTHORIZED, "invalid credentials", Some(HandshakeFailure::UnknownSession))
        })
    }

    pub fn conn_ended(&self, session: &str, conn: u64, end: ConnEnd) {
        self.metrics.connections_closed.fetch_add(1, Relaxed);
        let mut t = self.tables();
        if let Some(s) = t.sessions.get_mut(session) {
            if let Some(meta) = s.conns.remove(&conn) {
                self.audit.write(Record::ConnectionEnd {
                    session,
                    conn,
                    operator: &s.operator,
                    device: &s.device,
                    service: &s.service,
                    client_addr: &meta.client_addr,
                    bytes_to_device: end.to_device,
                    bytes_to_client: end.to_client,
                    duration_ms: meta.opened.elapsed().as_millis() as u64,
                    reason: &end.reason,
                });
            }
            s.bytes_to_device += end.to_device;
            s.bytes_to_client += end.to_client;
        }
        tracing::debug!(session, conn, to_device = end.to_device, to_client = end.to_client, reason = %end.reason, "connection ended");
    }

    /// The agent's side said it cannot reach the service for `conn`.
    pub fn connect_failed(&self, device: &str, session: &str, conn: u64, reason: &str) {
        let t = self.tables();
        let Some(s) = t.sessions.get(session).filter(|s| s.device == device) else {
            return;
        };
        if let Some(worker) = s.conns.get(&conn).map(|m| m.worker) {
            let reason = format!("device {device} could not reach service {}: {reason}", s.service);
            self.send_to_worker(worker, Cmd::Close { conn, code: CloseCode::SERVICE_UNREACHABLE, reason });
        }
    }

    /// Checks a device key.
    pub fn device_key_ok(&self, device: &str, key: &str) -> Result<(), Refusal> {
        match self.config.device(device) {
            Some(d) if d.key.matches(key) => Ok(()),
            _ => Err(Refusal::bad_token()),
        }
    }

    /// An agent's control connection came up; a previous one for the same device is replaced.
    pub fn agent_up(&self, device: &str, services: Vec<String>, tx: mpsc::UnboundedSender<ToAgent>) -> u64 {
        let generation = self.next_id();
        let mut t = self.tables();
        t.agents.insert(device.to_string(), Agent { tx, services, since: unix_now(), generation });
        for s in t.sessions.values().filter(|s| s.device == device) {
            if let Some((_, tx)) = &s.control {
                let _ = tx.send(SessionEvent::DeviceOnline);
            }
        }
        tracing::info!(device, "agent connected");
        generation
    }

    /// An agent's control connection went away: its device's connections end with 4004.
    pub fn agent_down(&self, device: &str, generation: u64) {
        let mut t = self.tables();
        if t.agents.get(device).is_none_or(|a| a.generation != generation) {
            return;
        }
        t.agents.remove(device);
        tracing::info!(device, "agent disconnected");
        let reason = format!("device {device} went offline");
        for s in t.sessions.values().filter(|s| s.device == device) {
            if let Some((_, tx)) = &s.control {
                let _ = tx.send(SessionEvent::DeviceOffline);
            }
            for (&conn, meta) in &s.conns {
                self.send_to_worker(
                    meta.worker,
                    Cmd::Close { conn, code: CloseCode::DEVICE_OFFLINE, reason: reason.clone() },
                );
            }
        }
    }

    /// Attaches the client's session control connection; returns its id and the first event.
    pub fn attach_control(
        &self,
        session: &str,
        token: &str,
        tx: mpsc::UnboundedSender<SessionEvent>,
    ) -> Result<(u64, SessionEvent), Refusal> {
        let id = self.next_id();
        let mut t = self.tables();
        let online = {
            let s = t.sessions.get(session).ok_or_else(Refusal::no_session)?;
            if !s.client_token.matches(token) {
                return Err(Refusal::bad_token());
            }
            t.agents.contains_key(&s.device)
        };
        let s = t.sessions.get_mut(session).expect("checked above");
        if let Some((_, old)) = s.control.replace((id, tx)) {
            let _ =
                old.send(SessionEvent::Closing { code: 1000, reason: "replaced by a newer control connection".into() });
        }
        s.control_lost = None;
        let ready = SessionEvent::Ready {
            session: s.id.to_string(),
            device: s.device.clone(),
            service: s.service.clone(),
            device_online: online,
            expires_at: s.expires_at,
        };
        Ok((id, ready))
    }

    pub fn detach_control(&self, session: &str, id: u64) {
        let mut t = self.tables();
        if let Some(s) = t.sessions.get_mut(session) {
            if s.control.as_ref().is_some_and(|(c, _)| *c == id) {
                s.control = None;
                s.control_lost = Some(Instant::now());
            }
        }
    }

    /// Ends every session (graceful shutdown, after the drain period): 1001 on every connection.
    pub fn close_all(&self, reason: &str) {
        let ids: Vec<Arc<str>> = self.tables().sessions.keys().cloned().collect();
        for id in ids {
            self.close_session(&id, CloseCode::GOING_AWAY, reason);
        }
    }

    /// Ends sessions whose time is up, or whose client vanished longer than the grace period.
    pub fn reap(&self) {
        let now = Instant::now();
        let grace = Duration::from_secs(self.config.limits.client_grace_secs);
        let (expired, abandoned): (Vec<_>, Vec<_>) = {
            let t = self.tables();
            (
                t.sessions.values().filter(|s| s.expires <= now).map(|s| s.id.clone()).collect(),
                t.sessions
                    .values()
                    .filter(|s| s.control_lost.is_some_and(|at| now.duration_since(at) >= grace))
                    .map(|s| s.id.clone())
                    .collect(),
            )
        };
        for id in expired {
            self.close_session(&id, CloseCode::SESSION_EXPIRED, "session expired");
        }
        for id in abandoned {
            self.close_session(&id, CloseCode::GOING_AWAY, "client went away");
        }
    }
}
