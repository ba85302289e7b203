//! The relay's shared tables: sessions and connected agents. Guarded by one mutex, touched only
//! at session start/stop, handshakes and connection ends — never per frame.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::admission::Admission;
use super::audit::{Audit, Record};
use super::dataplane::Cmd;
use super::metrics::{HandshakeFailure, Metrics};
use crate::config::{Config, Role, Secret};
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
    /// A client has attached (control or data connection) at least once; until then the session
    /// is reaped after `limits.attach_timeout_secs`.
    attached: bool,
    /// The client's session control connection, if attached: (attachment id, event sender).
    control: Option<(u64, mpsc::Sender<SessionEvent>)>,
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
    /// The agent has been asked to dial in. A connection made while the agent is reconnecting
    /// is asked for when it is back.
    announced: bool,
}

/// A device's agent as the relay knows it: connected, or within its grace period after its
/// control connection dropped (tunnels keep running; the device is declared lost after it).
struct Agent {
    /// The live control connection; `None` while the agent is reconnecting.
    link: Option<AgentLink>,
    services: Vec<String>,
    since: u64,
    /// Tells a replaced or dropped connection apart from its successor.
    generation: u64,
    /// When the control connection dropped.
    down_since: Option<Instant>,
}

/// What the relay holds of an agent's live control connection.
#[derive(Clone)]
pub struct AgentLink {
    /// Messages to the agent (bounded: an agent that does not read is dropped).
    pub tx: mpsc::Sender<ToAgent>,
    /// Asks the connection to prove it is alive: it pings the agent and answers on the
    /// oneshot when the pong comes.
    pub probe: mpsc::Sender<oneshot::Sender<()>>,
    pub addr: SocketAddr,
}

/// The answer to an agent that wants its device.
pub enum Claim {
    /// It holds the device now (this generation).
    Granted(u64),
    /// Another connection holds it; probe that one before deciding.
    Held { generation: u64, addr: SocketAddr, probe: mpsc::Sender<oneshot::Sender<()>> },
}

/// What asks an agent to dial the service and the device endpoint for connection `conn`.
fn connect_request(session: &str, service: &str, device_token: &Secret, conn: u64) -> ToAgent {
    ToAgent::Connect {
        session: session.to_string(),
        conn,
        service: service.to_string(),
        token: device_token.expose().to_string(),
    }
}

/// Who is calling the control API.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub name: &'a str,
    pub role: Role,
}

impl Caller<'_> {
    fn may_see(&self, s: &Session) -> bool {
        self.role == Role::Admin || s.operator == self.name
    }
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
    /// Per-address handshake shares and the failed-login gate.
    pub admission: Arc<Admission>,
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
        let admission = Admission::new(
            config.limits.max_handshakes_per_address.min(config.limits.max_handshakes),
            Duration::from_millis(config.limits.auth_failure_delay_ms),
        );
        Ok(Relay {
            config,
            admission,
            metrics: Metrics::default(),
            audit,
            tls,
            handshakes,
            shutdown: watch::Sender::new(false),
            workers,
            tables: Mutex::default(),
            next_id: AtomicU64::new(1),
        })
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
        // Checked here too: an API request is not the only way in, and the check is cheap.
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
        let own = t.sessions.values().filter(|s| s.operator == operator).count();
        if own >= limits.max_sessions_per_operator {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("operator {operator} has {own} open sessions, the limit (limits.max_sessions_per_operator)"),
                None,
            ));
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
                attached: false,
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
            device_online: t.agents.get(&s.device).is_some_and(|a| a.link.is_some()),
            client_connected: s.control.is_some(),
            connections: s.conns.len(),
            bytes_to_device: s.bytes_to_device,
            bytes_to_client: s.bytes_to_client,
        }
    }

    /// The sessions `caller` may see: its own, or all for an admin.
    pub fn sessions(&self, caller: Caller<'_>) -> Vec<SessionInfo> {
        let t = self.tables();
        let mut v: Vec<_> = t.sessions.values().filter(|s| caller.may_see(s)).map(|s| Relay::info(&t, s)).collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    /// One session, if `caller` may see it (another operator's looks like no session at all).
    pub fn session(&self, caller: Caller<'_>, id: &str) -> Option<SessionInfo> {
        let t = self.tables();
        t.sessions.get(id).filter(|s| caller.may_see(s)).map(|s| Relay::info(&t, s))
    }

    /// Ends a session on an operator's request: only its own, unless it is an admin.
    pub fn close_session_as(&self, caller: Caller<'_>, id: &str) -> bool {
        if !self.tables().sessions.get(id).is_some_and(|s| caller.may_see(s)) {
            return false;
        }
        self.close_session(id, CloseCode::SESSION_CLOSED, &format!("session closed by operator {}", caller.name))
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
                    online: agent.is_some_and(|a| a.link.is_some()),
                    services: agent.map(|a| a.services.clone()).unwrap_or_default(),
                    connected_since: agent.map(|a| a.since),
                }
            })
            .collect()
    }

    /// Sessions open, agents connected.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.tables();
        (t.sessions.len(), t.agents.values().filter(|a| a.link.is_some()).count())
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
            let _ = tx.try_send(SessionEvent::Closing { code: code.0, reason: reason.to_string() });
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
        s.attached = true;
        s.conns.insert(
            conn,
            ConnMeta { worker, client_addr: client_addr.to_string(), opened: Instant::now(), announced: false },
        );
        self.metrics.connections_opened.fetch_add(1, Relaxed);
        Ok(ClientConn { conn, worker, session: s.id.clone() })
    }

    /// After the client side of `conn` reached its worker: ask the device's agent to dial in,
    /// or close the connection at once if the device is offline.
    /// If the agent is reconnecting, the connection waits for it (within its pairing deadline).
    pub fn announce_conn(&self, c: &ClientConn) {
        let mut guard = self.tables();
        let t = &mut *guard;
        let Some(s) = t.sessions.get_mut(&c.session) else {
            return;
        };
        let Some(meta) = s.conns.get_mut(&c.conn) else { return };
        let close = |code, reason| Cmd::Close { conn: c.conn, code, reason };
        match t.agents.get(&s.device) {
            None => {
                let reason = format!("device {} is offline", s.device);
                self.send_to_worker(c.worker, close(CloseCode::DEVICE_OFFLINE, reason));
            }
            Some(Agent { link: None, .. }) => {}
            Some(Agent { link: Some(link), .. }) => {
                match link.tx.try_send(connect_request(&s.id, &s.service, &s.device_token, c.conn)) {
                    Ok(()) => meta.announced = true,
                    Err(_) => {
                        let reason = format!("the agent of device {} is not reading its control connection", s.device);
                        self.send_to_worker(c.worker, close(CloseCode::SERVICE_UNREACHABLE, reason));
                    }
                }
            }
        }
    }

    /// Admits the device side of `conn`; returns the worker that owns the connection.
    pub fn device_conn(&self, session: &str, conn: u64, token: &str) -> Result<usize, Refusal> {
        let t = self.tables();
        let s = t.sessions.get(session).ok_or_else(Refusal::no_session)?;
        if !s.device_token.matches(token) {
            return Err(Refusal::bad_token());
        }
        // The token is right: a connection that already ended is no failed login (the agent
        // dials back for every client connection, and some end before it arrives).
        s.conns.get(&conn).map(|m| m.worker).ok_or_else(|| {
            Refusal::new(StatusCode::GONE, "that connection has ended", Some(HandshakeFailure::UnknownSession))
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
            // The agent's words, escaped and bounded: they go into a close reason and the logs.
            let reason = crate::proto::printable(reason, 80);
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

    /// An agent (connected from `link.addr`) wants its device. It gets it unless another live
    /// connection holds it: then the caller probes that one and either refuses the newcomer
    /// ([`Relay::agent_refused`]) or takes over ([`Relay::agent_take_over`]).
    pub fn agent_claim(&self, device: &str, services: &[String], link: &AgentLink) -> Claim {
        let mut t = self.tables();
        if let Some(Agent { link: Some(held), generation, .. }) = t.agents.get(device) {
            return Claim::Held { generation: *generation, addr: held.addr, probe: held.probe.clone() };
        }
        Claim::Granted(self.link_agent(&mut t, device, services, link))
    }

    /// Replaces the connection of generation `stale` (it did not answer a probe) with `link`.
    /// `None` if that connection is gone or replaced already: claim again.
    pub fn agent_take_over(&self, device: &str, stale: u64, services: &[String], link: &AgentLink) -> Option<u64> {
        let mut t = self.tables();
        let old = t.agents.get(device).filter(|a| a.generation == stale)?.link.as_ref()?.addr;
        self.metrics.agent_takeovers.fetch_add(1, Relaxed);
        tracing::warn!(device, %old, new = %link.addr, "agent takeover: the connected agent did not answer a probe; the new one replaces it");
        self.audit.write(Record::AgentTakeover { device, addr: &link.addr.to_string(), replaced: &old.to_string() });
        Some(self.link_agent(&mut t, device, services, link))
    }

    /// A second agent for a device whose agent answered: refused, logged, audited, counted.
    pub fn agent_refused(&self, device: &str, addr: SocketAddr, holder: SocketAddr) {
        self.metrics.agent_refusals.fetch_add(1, Relaxed);
        tracing::warn!(device, %addr, %holder, "agent refused: this device's agent is connected and alive (a copied key?)");
        self.audit.write(Record::AgentRefused { device, addr: &addr.to_string(), holder: &holder.to_string() });
    }

    fn link_agent(&self, t: &mut Tables, device: &str, services: &[String], link: &AgentLink) -> u64 {
        let generation = self.next_id();
        let back = t.agents.get(device).is_some_and(|a| a.down_since.is_some());
        let since = match t.agents.get(device) {
            Some(a) if back => a.since,
            _ => unix_now(),
        };
        let agent =
            Agent { link: Some(link.clone()), services: services.to_vec(), since, generation, down_since: None };
        let known = t.agents.insert(device.to_string(), agent).is_some();
        for s in t.sessions.values_mut().filter(|s| s.device == device) {
            if !known {
                if let Some((_, tx)) = &s.control {
                    let _ = tx.try_send(SessionEvent::DeviceOnline);
                }
            }
            for (&conn, meta) in s.conns.iter_mut() {
                if back {
                    self.send_to_worker(meta.worker, Cmd::AgentLink { conn, down: None });
                }
                if !meta.announced {
                    let msg = connect_request(&s.id, &s.service, &s.device_token, conn);
                    meta.announced = link.tx.try_send(msg).is_ok();
                }
            }
        }
        if back {
            tracing::info!(device, addr = %link.addr, "agent reconnected within its grace period; its tunnels kept running");
        } else {
            tracing::info!(device, addr = %link.addr, "agent connected");
        }
        generation
    }

    /// An agent's control connection went away. Its device's tunnels keep running: the agent
    /// has `limits.agent_grace_secs` to come back before the device is declared lost (4004).
    /// Tunnels whose device side drops meanwhile learn the agent is gone, and close with 4004.
    pub fn agent_down(&self, device: &str, generation: u64) {
        let mut t = self.tables();
        let Some(agent) = t.agents.get_mut(device).filter(|a| a.generation == generation && a.link.is_some()) else {
            return;
        };
        agent.link = None;
        agent.down_since = Some(Instant::now());
        let grace = self.config.limits.agent_grace_secs;
        tracing::info!(device, "agent disconnected; the device is lost unless it reconnects within {grace} s");
        let reason = format!("device {device} went offline");
        for s in t.sessions.values().filter(|s| s.device == device) {
            for (&conn, meta) in &s.conns {
                self.send_to_worker(meta.worker, Cmd::AgentLink { conn, down: Some(reason.clone()) });
            }
        }
    }

    /// The grace period ran out: the device is lost; its connections end with 4004.
    fn device_lost(&self, t: &mut Tables, device: &str) {
        t.agents.remove(device);
        tracing::info!(device, "device lost: its agent did not reconnect in time");
        let reason = format!("device {device} went offline");
        for s in t.sessions.values().filter(|s| s.device == device) {
            if let Some((_, tx)) = &s.control {
                let _ = tx.try_send(SessionEvent::DeviceOffline);
            }
            for (&conn, meta) in &s.conns {
                let close = Cmd::Close { conn, code: CloseCode::DEVICE_OFFLINE, reason: reason.clone() };
                self.send_to_worker(meta.worker, close);
            }
        }
    }

    /// Attaches the client's session control connection; returns its id and the first event.
    pub fn attach_control(
        &self,
        session: &str,
        token: &str,
        tx: mpsc::Sender<SessionEvent>,
    ) -> Result<(u64, SessionEvent), Refusal> {
        let id = self.next_id();
        let mut t = self.tables();
        let online = {
            let s = t.sessions.get(session).ok_or_else(Refusal::no_session)?;
            if !s.client_token.matches(token) {
                return Err(Refusal::bad_token());
            }
            t.agents.get(&s.device).is_some_and(|a| a.link.is_some())
        };
        let s = t.sessions.get_mut(session).expect("checked above");
        if let Some((_, old)) = s.control.replace((id, tx)) {
            let replaced = "replaced by a newer control connection".into();
            let _ = old.try_send(SessionEvent::Closing { code: 1000, reason: replaced });
        }
        s.control_lost = None;
        s.attached = true;
        let ready = SessionEvent::Ready {
            session: s.id.to_string(),
            device: s.device.clone(),
            service: s.service.clone(),
            device_online: online,
            expires_at: s.expires_at,
            client_grace_secs: Some(self.config.limits.client_grace_secs),
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

    /// Ends sessions whose time is up, whose client vanished longer than the grace period, or
    /// that no client attached to in time; declares lost the devices whose agents did not come
    /// back within theirs.
    pub fn reap(&self) {
        let now = Instant::now();
        let limits = &self.config.limits;
        let grace = Duration::from_secs(limits.client_grace_secs);
        let attach = Duration::from_secs(limits.attach_timeout_secs);
        let agent_grace = Duration::from_secs(limits.agent_grace_secs);
        let mut ends: Vec<(Arc<str>, CloseCode, &str)> = Vec::new();
        {
            let mut t = self.tables();
            for s in t.sessions.values() {
                if s.expires <= now {
                    ends.push((s.id.clone(), CloseCode::SESSION_EXPIRED, "session expired"));
                } else if s.control_lost.is_some_and(|at| now.duration_since(at) >= grace) {
                    ends.push((s.id.clone(), CloseCode::GOING_AWAY, "client went away"));
                } else if !s.attached && now.duration_since(s.started) >= attach {
                    ends.push((s.id.clone(), CloseCode::SESSION_EXPIRED, "no client attached in time"));
                }
            }
            let lost: Vec<String> = t
                .agents
                .iter()
                .filter(|(_, a)| a.down_since.is_some_and(|at| now.duration_since(at) >= agent_grace))
                .map(|(d, _)| d.clone())
                .collect();
            for device in lost {
                self.device_lost(&mut t, &device);
            }
        }
        for (id, code, reason) in ends {
            self.close_session(&id, code, reason);
        }
    }
}
