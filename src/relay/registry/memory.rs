//! The embedded registry: everything in this process's memory, under one mutex that is taken
//! at session start and stop, handshakes and connection ends — never per frame. Audit lines are
//! queued after the lock is released.

use crate::relay::keys::Keys;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio::sync::mpsc;

use super::{AgentLink, Caller, Claim, ClientConn, Clock, Pending, Refusal, Registry, Spare, SpareOrder};
use crate::config::{Config, Credential, Secret};
use crate::proto::{DeviceInfo, SessionEvent, SessionInfo, SessionStarted, StartSession, ToAgent};
use crate::relay::audit::{Audit, Record};
use crate::relay::ending::CloseReason;
use crate::relay::handoff::{Cmd, ConnEnd, ConnEnds, Workers};
use crate::relay::metrics::{HandshakeFailure, Metrics};

struct Session {
    id: Arc<str>,
    device: String,
    service: String,
    operator: String,
    created_at: u64,
    expires_at: u64,
    expires: Instant,
    /// The client's token, or only its hash (a session opened for another node's caller).
    client_token: Credential,
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
    /// Ready client connections waiting for their first byte.
    ready: usize,
    /// Where its client connections came from (distinct, at most [`MAX_CLIENT_ADDRS`]).
    client_addrs: Vec<String>,
}

/// Client addresses one session remembers.
const MAX_CLIENT_ADDRS: usize = 8;

/// Ready client connections one session may keep waiting.
pub const MAX_READY: usize = 8;

impl Session {
    fn new(
        id: Arc<str>,
        req: &StartSession,
        operator: &str,
        (created_at, expires_at): (u64, u64),
        client_token: Credential,
        now: Instant,
    ) -> Session {
        Session {
            id,
            device: req.device.clone(),
            service: req.service.clone(),
            operator: operator.to_string(),
            created_at,
            expires_at,
            expires: now + Duration::from_secs(expires_at.saturating_sub(created_at)),
            started: now,
            client_token,
            device_token: Secret::random(),
            conns: HashMap::new(),
            attached: false,
            control: None,
            control_lost: None,
            bytes_to_device: 0,
            bytes_to_client: 0,
            ready: 0,
            client_addrs: Vec::new(),
        }
    }
}

/// A fresh session id: 64 random bits, hex.
pub fn new_session_id() -> Arc<str> {
    format!("{:016x}", rand::random::<u64>()).into()
}

/// A live data connection as the session table knows it.
#[derive(Clone)]
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
    /// Spare device connections parked by the linked agent, newest last.
    spares: Vec<Spare>,
}

/// A connection of an ended session, until it ends too.
struct Closing {
    operator: String,
    device: String,
    service: String,
    meta: ConnMeta,
}

/// What is remembered of a device's last agent here, for the console: when it was last
/// connected, its version and address.
struct Seen {
    at: u64,
    version: String,
    addr: SocketAddr,
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

#[derive(Default)]
struct Tables {
    sessions: HashMap<Arc<str>, Session>,
    agents: HashMap<String, Agent>,
    /// Sessions that ended (not by shutdown) since the cluster registry last asked.
    ended: Vec<Arc<str>>,
    /// The last `limits.recent_sessions` ended sessions, newest last.
    recent: std::collections::VecDeque<SessionInfo>,
    /// Per configured device: its agent's last connection here (bounded by the device keys).
    seen: HashMap<String, Seen>,
    /// Connections still running for sessions that ended, until their worker reports their end:
    /// it is audited and counted in the ended session's entry in `recent`.
    closing: HashMap<u64, Closing>,
    /// Connections still running for sessions that moved to another cluster node: their
    /// owning worker, so that a shutdown still closes them.
    adrift: HashMap<u64, usize>,
}

/// An agent as [`MemoryRegistry::agents`] reports it.
pub struct AgentState {
    pub device: String,
    /// Its control connection is up (false: within its grace period).
    pub linked: bool,
    pub services: Vec<String>,
    pub since: u64,
    pub addr: Option<SocketAddr>,
}

/// A session as [`MemoryRegistry::session_stats`] reports it.
pub struct SessionStats {
    pub id: Arc<str>,
    pub connections: usize,
    pub bytes_to_device: u64,
    pub bytes_to_client: u64,
    pub client_connected: bool,
    pub client_addrs: Vec<String>,
}

/// The in-memory [`Registry`].
pub struct MemoryRegistry {
    config: Arc<Config>,
    /// Which devices exist (the config as last reloaded).
    keys: Arc<Keys>,
    metrics: Arc<Metrics>,
    audit: Arc<Audit>,
    /// Where close orders go: the worker that owns each connection.
    workers: Workers,
    clock: Arc<dyn Clock>,
    tables: Mutex<Tables>,
    /// Session connection ids, agent generations and control attachments: unique per process.
    next_id: AtomicU64,
}

impl MemoryRegistry {
    pub fn new(
        config: Arc<Config>,
        keys: Arc<Keys>,
        metrics: Arc<Metrics>,
        audit: Arc<Audit>,
        workers: Workers,
        clock: Arc<dyn Clock>,
    ) -> MemoryRegistry {
        MemoryRegistry {
            config,
            keys,
            metrics,
            audit,
            workers,
            clock,
            tables: Mutex::default(),
            next_id: AtomicU64::new(1),
        }
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }

    fn send_to_worker(&self, worker: usize, cmd: Cmd) {
        self.workers.send(worker, cmd);
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
            node: None,
            client_url: None,
            client_addrs: s.client_addrs.clone(),
            ended_at: None,
            close_code: None,
            close_reason: None,
        }
    }

    fn link_agent(&self, t: &mut Tables, device: &str, services: &[String], link: &AgentLink) -> u64 {
        let generation = self.next_id();
        let back = t.agents.get(device).is_some_and(|a| a.down_since.is_some());
        let since = match t.agents.get(device) {
            Some(a) if back => a.since,
            _ => self.clock.unix(),
        };
        let agent = Agent {
            link: Some(link.clone()),
            services: services.to_vec(),
            since,
            generation,
            down_since: None,
            spares: Vec::new(),
        };
        let known = t.agents.insert(device.to_string(), agent).is_some();
        let seen = Seen { at: self.clock.unix(), version: link.version.clone(), addr: link.addr };
        t.seen.insert(device.to_string(), seen);
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

    /// The grace period ran out: the device is lost; its connections end with 4004.
    fn device_lost(&self, t: &mut Tables, device: &str) {
        t.agents.remove(device);
        tracing::info!(device, "device lost: its agent did not reconnect in time");
        for s in t.sessions.values().filter(|s| s.device == device) {
            if let Some((_, tx)) = &s.control {
                let _ = tx.try_send(SessionEvent::DeviceOffline);
            }
            for (&conn, meta) in &s.conns {
                let close = Cmd::Close { conn, reason: CloseReason::DeviceLost(device.to_string()) };
                self.send_to_worker(meta.worker, close);
            }
        }
    }
}

impl ConnEnds for MemoryRegistry {
    fn conn_ended(&self, session: &str, conn: u64, end: ConnEnd) {
        self.metrics.connection_ended(end.reason.code());
        let now = self.clock.now();
        // What the audit line needs is copied out, and the line is queued after the lock.
        let ended = {
            let mut t = self.tables();
            t.adrift.remove(&conn);
            match t.sessions.get_mut(session) {
                Some(s) => {
                    s.bytes_to_device += end.to_device;
                    s.bytes_to_client += end.to_client;
                    s.conns.remove(&conn).map(|meta| (s.operator.clone(), s.device.clone(), s.service.clone(), meta))
                }
                // Its session ended while it ran (closed, expired, device lost).
                None => t.closing.remove(&conn).map(|c| {
                    if let Some(r) = t.recent.iter_mut().rev().find(|r| r.id == session) {
                        r.bytes_to_device += end.to_device;
                        r.bytes_to_client += end.to_client;
                    }
                    (c.operator, c.device, c.service, c.meta)
                }),
            }
        };
        let reason = end.reason.to_string();
        if let Some((operator, device, service, meta)) = ended {
            self.audit.write(Record::ConnectionEnd {
                session,
                conn,
                operator: &operator,
                device: &device,
                service: &service,
                client_addr: &meta.client_addr,
                bytes_to_device: end.to_device,
                bytes_to_client: end.to_client,
                duration_ms: now.saturating_duration_since(meta.opened).as_millis() as u64,
                code: end.reason.code().0,
                reason: &reason,
            });
        }
        tracing::debug!(
            session,
            conn,
            to_device = end.to_device,
            to_client = end.to_client,
            code = end.reason.code().0,
            reason,
            "connection ended"
        );
    }
}

/// The registry's rules, callable directly (tests, and the cluster registry that keeps its
/// node's share of the tables here).
impl MemoryRegistry {
    pub fn start_session(
        &self,
        operator: &str,
        operator_addr: &str,
        req: StartSession,
        host: &str,
    ) -> Result<SessionStarted, Refusal> {
        let ttl = self.check_request(&req)?;
        let id = new_session_id();
        let client_token = Secret::random();
        let expires_at =
            self.open(id.clone(), operator, operator_addr, &req, ttl, Credential::Plain(client_token.clone()))?;
        let scheme = if self.config.tls.is_some() { "wss" } else { "ws" };
        Ok(SessionStarted {
            client_url: format!("{scheme}://{host}/api/v1/sessions/{id}/client"),
            id: id.to_string(),
            client_token: client_token.expose().to_string(),
            expires_at,
            launch_code: None,
        })
    }

    /// Checks what a session request asks for that does not depend on the tables: a known
    /// device and a lifetime within bounds. Returns the lifetime.
    pub fn check_request(&self, req: &StartSession) -> Result<u64, Refusal> {
        let limits = &self.config.limits;
        if !self.keys.device_known(&req.device) {
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
        Ok(ttl)
    }

    /// Opens session `id` for `operator` with a client token the caller minted (a cluster node
    /// receives only its hash), within the relay's limits. Returns when it expires (Unix).
    pub fn open(
        &self,
        id: Arc<str>,
        operator: &str,
        operator_addr: &str,
        req: &StartSession,
        ttl: u64,
        client_token: Credential,
    ) -> Result<u64, Refusal> {
        let limits = &self.config.limits;
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
        let now = self.clock.unix();
        t.sessions.insert(
            id.clone(),
            Session::new(id.clone(), req, operator, (now, now + ttl), client_token, self.clock.now()),
        );
        drop(t);
        self.metrics.sessions_started.fetch_add(1, Relaxed);
        self.audit.write(Record::SessionStart {
            session: &id,
            operator,
            operator_addr,
            device: &req.device,
            service: &req.service,
            expires_at: now + ttl,
        });
        Ok(now + ttl)
    }

    /// Takes in a session another node opened (its node is gone and its device is here now).
    /// `created_at` and `expires_at` are Unix seconds; it keeps its id, client token hash and
    /// expiry; the client has the attach timeout to come back. False if it is known already.
    pub fn adopt(
        &self,
        id: &str,
        req: &StartSession,
        operator: &str,
        times: (u64, u64),
        client_token: Credential,
    ) -> bool {
        let mut t = self.tables();
        if t.sessions.contains_key(id) {
            return false;
        }
        let id: Arc<str> = id.into();
        let mut s = Session::new(id.clone(), req, operator, times, client_token, self.clock.now());
        let left = times.1.saturating_sub(self.clock.unix());
        s.expires = self.clock.now() + Duration::from_secs(left);
        t.sessions.insert(id, s);
        true
    }

    pub fn sessions(&self, caller: Caller<'_>) -> Vec<SessionInfo> {
        let t = self.tables();
        let mut v: Vec<_> =
            t.sessions.values().filter(|s| caller.may_see(&s.operator)).map(|s| MemoryRegistry::info(&t, s)).collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    pub fn ended_sessions(&self, caller: Caller<'_>) -> Vec<SessionInfo> {
        let t = self.tables();
        t.recent.iter().rev().filter(|s| caller.may_see(&s.operator)).cloned().collect()
    }

    pub fn session(&self, caller: Caller<'_>, id: &str) -> Option<SessionInfo> {
        let t = self.tables();
        t.sessions.get(id).filter(|s| caller.may_see(&s.operator)).map(|s| MemoryRegistry::info(&t, s))
    }

    pub fn close_session_as(&self, caller: Caller<'_>, id: &str) -> bool {
        if !self.tables().sessions.get(id).is_some_and(|s| caller.may_see(&s.operator)) {
            return false;
        }
        self.close_session(id, CloseReason::OperatorClosed(caller.name.to_string()))
    }

    pub fn close_session(&self, id: &str, reason: CloseReason) -> bool {
        let (code, text) = (reason.code(), reason.to_string());
        let Some(s) = ({
            let mut t = self.tables();
            let s = t.sessions.remove(id);
            if let Some(s) = &s {
                if reason != CloseReason::Shutdown {
                    t.ended.push(id.into());
                }
                let info = SessionInfo {
                    ended_at: Some(self.clock.unix()),
                    close_code: Some(code.0),
                    close_reason: Some(text.clone()),
                    device_online: false,
                    client_connected: false,
                    connections: 0,
                    ..MemoryRegistry::info(&t, s)
                };
                t.recent.push_back(info);
                while t.recent.len() > self.config.limits.recent_sessions {
                    t.recent.pop_front();
                }
                for (&conn, meta) in &s.conns {
                    let (operator, device, service) = (s.operator.clone(), s.device.clone(), s.service.clone());
                    t.closing.insert(conn, Closing { operator, device, service, meta: meta.clone() });
                }
            }
            s
        }) else {
            return false;
        };
        self.metrics.sessions_ended.fetch_add(1, Relaxed);
        tracing::info!(session = %s.id, device = %s.device, service = %s.service, code = code.0, reason = text, "session ended");
        self.audit.write(Record::SessionEnd {
            session: &s.id,
            operator: &s.operator,
            device: &s.device,
            service: &s.service,
            code: code.0,
            reason: &text,
            duration_secs: self.clock.now().saturating_duration_since(s.started).as_secs(),
            bytes_to_device: s.bytes_to_device,
            bytes_to_client: s.bytes_to_client,
        });
        if let Some((_, tx)) = &s.control {
            let _ = tx.try_send(SessionEvent::Closing { code: code.0, reason: text });
        }
        for (&conn, meta) in &s.conns {
            self.send_to_worker(meta.worker, Cmd::Close { conn, reason: reason.clone() });
        }
        true
    }

    pub fn close_all(&self, reason: CloseReason) {
        let ids: Vec<Arc<str>> = self.tables().sessions.keys().cloned().collect();
        for id in ids {
            self.close_session(&id, reason.clone());
        }
        for (conn, worker) in std::mem::take(&mut self.tables().adrift) {
            self.send_to_worker(worker, Cmd::Close { conn, reason: reason.clone() });
        }
    }

    /// Every configured device's id, as the configuration says now.
    pub fn device_ids(&self) -> Vec<String> {
        self.keys.device_ids()
    }

    pub fn devices(&self) -> Vec<DeviceInfo> {
        let ids = self.device_ids();
        let t = self.tables();
        ids.into_iter()
            .map(|id| {
                let agent = t.agents.get(&id);
                let online = agent.is_some_and(|a| a.link.is_some());
                let seen = t.seen.get(&id);
                DeviceInfo {
                    online,
                    services: agent.map(|a| a.services.clone()).unwrap_or_default(),
                    connected_since: agent.map(|a| a.since),
                    node: None,
                    last_seen: if online { Some(self.clock.unix()) } else { seen.map(|s| s.at) },
                    agent_version: seen.map(|s| s.version.clone()),
                    agent_addr: seen.map(|s| s.addr.to_string()),
                    id,
                }
            })
            .collect()
    }

    pub fn counts(&self) -> (usize, usize) {
        let t = self.tables();
        (t.sessions.len(), t.agents.values().filter(|a| a.link.is_some()).count())
    }

    pub fn ready_begin(&self, session: &str, token: &str) -> Result<(), Refusal> {
        let mut t = self.tables();
        let s = t.sessions.get_mut(session).ok_or_else(Refusal::no_session)?;
        if !s.client_token.matches(token) {
            return Err(Refusal::bad_token());
        }
        if s.ready >= MAX_READY {
            let message = format!("session has {MAX_READY} ready connections waiting, the limit");
            return Err(Refusal::new(StatusCode::TOO_MANY_REQUESTS, message, Some(HandshakeFailure::Limit)));
        }
        s.ready += 1;
        Ok(())
    }

    pub fn ready_end(&self, session: &str) {
        if let Some(s) = self.tables().sessions.get_mut(session) {
            s.ready = s.ready.saturating_sub(1);
        }
    }

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
        let worker = self.workers.of(conn);
        s.attached = true;
        let ip = client_addr.ip().to_string();
        if s.client_addrs.len() < MAX_CLIENT_ADDRS && !s.client_addrs.contains(&ip) {
            s.client_addrs.push(ip);
        }
        let opened = self.clock.now();
        s.conns.insert(conn, ConnMeta { worker, client_addr: client_addr.to_string(), opened, announced: false });
        self.metrics.connections_opened.fetch_add(1, Relaxed);
        Ok(ClientConn { conn, worker, session: s.id.clone() })
    }

    pub fn announce_conn(&self, c: &ClientConn) {
        let mut guard = self.tables();
        let t = &mut *guard;
        let Some(s) = t.sessions.get_mut(&c.session) else {
            return;
        };
        let Some(meta) = s.conns.get_mut(&c.conn) else { return };
        let close = |reason| Cmd::Close { conn: c.conn, reason };
        let Some(agent) = t.agents.get_mut(&s.device) else {
            return self.send_to_worker(c.worker, close(CloseReason::DeviceOffline(s.device.clone())));
        };
        // Not linked: asked for when the agent is back.
        let Some(link) = &agent.link else { return };
        let request = connect_request(&s.id, &s.service, &s.device_token, c.conn);
        // A parked spare first: the agent dials nothing, the connection is there.
        if !agent.spares.is_empty() {
            let message = serde_json::to_string(&request).expect("agent messages serialize");
            while let Some(spare) = agent.spares.pop() {
                let order = SpareOrder { conn: c.conn, worker: c.worker, message: message.clone() };
                if spare.send(order).is_ok() {
                    meta.announced = true;
                    self.metrics.spares_used.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
        match link.tx.try_send(request) {
            Ok(()) => meta.announced = true,
            Err(_) => self.send_to_worker(c.worker, close(CloseReason::AgentNotReading(s.device.clone()))),
        }
    }

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

    pub fn connect_failed(&self, device: &str, session: &str, conn: u64, reason: &str) {
        let t = self.tables();
        let Some(s) = t.sessions.get(session).filter(|s| s.device == device) else {
            return;
        };
        if let Some(worker) = s.conns.get(&conn).map(|m| m.worker) {
            // The agent's words, escaped and bounded: they go into a close reason and the logs.
            let why = crate::proto::printable(reason, 80);
            let reason =
                CloseReason::ServiceUnreachable { device: device.to_string(), service: s.service.clone(), why };
            self.send_to_worker(worker, Cmd::Close { conn, reason });
        }
    }

    pub fn agent_claim(&self, device: &str, services: &[String], link: &AgentLink) -> Claim {
        let mut t = self.tables();
        if let Some(Agent { link: Some(held), generation, .. }) = t.agents.get(device) {
            return Claim::Held { generation: *generation, addr: held.addr, probe: held.probe.clone() };
        }
        Claim::Granted(self.link_agent(&mut t, device, services, link))
    }

    pub fn agent_take_over(&self, device: &str, stale: u64, services: &[String], link: &AgentLink) -> Option<u64> {
        let (old, generation) = {
            let mut t = self.tables();
            let old = t.agents.get(device).filter(|a| a.generation == stale)?.link.as_ref()?.addr;
            (old, self.link_agent(&mut t, device, services, link))
        };
        self.metrics.agent_takeovers.fetch_add(1, Relaxed);
        tracing::warn!(device, %old, new = %link.addr, "agent takeover: the connected agent did not answer a probe; the new one replaces it");
        self.audit.write(Record::AgentTakeover { device, addr: &link.addr.to_string(), replaced: &old.to_string() });
        Some(generation)
    }

    pub fn agent_down(&self, device: &str, generation: u64) {
        let mut t = self.tables();
        let Some(agent) = t.agents.get_mut(device).filter(|a| a.generation == generation && a.link.is_some()) else {
            return;
        };
        agent.link = None;
        agent.down_since = Some(self.clock.now());
        // Its parked spares go with it (their waiting tasks see the order can never come).
        agent.spares.clear();
        let now = self.clock.unix();
        if let Some(seen) = t.seen.get_mut(device) {
            seen.at = now;
        }
        let grace = self.config.limits.agent_grace_secs;
        tracing::info!(device, "agent disconnected; the device is lost unless it reconnects within {grace} s");
        for s in t.sessions.values().filter(|s| s.device == device) {
            for (&conn, meta) in &s.conns {
                self.send_to_worker(meta.worker, Cmd::AgentLink { conn, down: Some(device.to_string()) });
            }
        }
    }

    pub fn park_spare(&self, device: &str, spare: Spare) -> bool {
        let mut t = self.tables();
        let Some(agent) = t.agents.get_mut(device).filter(|a| a.link.is_some()) else { return false };
        agent.spares.retain(|s| !s.is_closed());
        if agent.spares.len() >= crate::proto::MAX_SPARES {
            return false;
        }
        agent.spares.push(spare);
        true
    }

    pub fn disconnect_agent(&self, device: &str, reason: CloseReason) -> bool {
        let t = self.tables();
        t.agents.get(device).and_then(|a| a.link.as_ref()).is_some_and(|link| link.close.try_send(reason).is_ok())
    }

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
            let replaced = CloseReason::ControlReplaced;
            let _ = old.try_send(SessionEvent::Closing { code: replaced.code().0, reason: replaced.to_string() });
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
                s.control_lost = Some(self.clock.now());
            }
        }
    }

    pub fn reap(&self) {
        let now = self.clock.now();
        let limits = &self.config.limits;
        let grace = Duration::from_secs(limits.client_grace_secs);
        let attach = Duration::from_secs(limits.attach_timeout_secs);
        let agent_grace = Duration::from_secs(limits.agent_grace_secs);
        let mut ends: Vec<(Arc<str>, CloseReason)> = Vec::new();
        {
            let mut t = self.tables();
            for s in t.sessions.values() {
                if s.expires <= now {
                    ends.push((s.id.clone(), CloseReason::Expired));
                } else if s.control_lost.is_some_and(|at| now.duration_since(at) >= grace) {
                    ends.push((s.id.clone(), CloseReason::ClientGone));
                } else if !s.attached && now.duration_since(s.started) >= attach {
                    ends.push((s.id.clone(), CloseReason::NotAttached));
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
        for (id, reason) in ends {
            self.close_session(&id, reason);
        }
    }

    /// The live local connection holding `device`, if any: its generation, address and probe.
    pub fn holder(&self, device: &str) -> Option<(u64, SocketAddr, mpsc::Sender<tokio::sync::oneshot::Sender<()>>)> {
        let t = self.tables();
        let a = t.agents.get(device)?;
        let link = a.link.as_ref()?;
        Some((a.generation, link.addr, link.probe.clone()))
    }

    /// Forgets `device`'s agent without declaring the device lost: its control connection (if
    /// up) is closed with `reason`, its tunnels keep running. For a cluster node that no
    /// longer holds the device, or that sends its agents elsewhere.
    pub fn evict_agent(&self, device: &str, reason: CloseReason) -> bool {
        let Some(agent) = self.tables().agents.remove(device) else { return false };
        if let Some(link) = agent.link {
            let _ = link.close.try_send(reason);
        }
        true
    }

    /// Every agent this node knows, linked or within its grace period.
    pub fn agents(&self) -> Vec<AgentState> {
        let t = self.tables();
        t.agents
            .iter()
            .map(|(device, a)| AgentState {
                device: device.clone(),
                linked: a.link.is_some(),
                services: a.services.clone(),
                since: a.since,
                addr: a.link.as_ref().map(|l| l.addr),
            })
            .collect()
    }

    /// Every session's live figures.
    pub fn session_stats(&self) -> Vec<SessionStats> {
        let t = self.tables();
        t.sessions
            .values()
            .map(|s| SessionStats {
                id: s.id.clone(),
                connections: s.conns.len(),
                bytes_to_device: s.bytes_to_device,
                bytes_to_client: s.bytes_to_client,
                client_connected: s.control.is_some(),
                client_addrs: s.client_addrs.clone(),
            })
            .collect()
    }

    pub fn has_session(&self, id: &str) -> bool {
        self.tables().sessions.contains_key(id)
    }

    /// The sessions that ended since the last call (not those closed by a shutdown).
    pub fn take_ended(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.tables().ended)
    }

    /// Lets go of a session another node took over: its running connections keep running
    /// (their ends are counted, not attributed); its control connection is dropped without a
    /// `closing` event, so the client re-attaches where the session lives now.
    pub fn release_session(&self, id: &str) {
        let released = {
            let mut t = self.tables();
            let s = t.sessions.remove(id);
            if let Some(s) = &s {
                let adrift: Vec<(u64, usize)> = s.conns.iter().map(|(&c, m)| (c, m.worker)).collect();
                t.adrift.extend(adrift);
            }
            s
        };
        if let Some(s) = released {
            tracing::info!(session = %s.id, device = %s.device, "session moved to another node");
        }
    }
}

impl Registry for MemoryRegistry {
    fn start_session<'a>(
        &'a self,
        operator: &'a str,
        operator_addr: &'a str,
        req: StartSession,
        host: &'a str,
    ) -> Pending<'a, Result<SessionStarted, Refusal>> {
        Box::pin(std::future::ready(self.start_session(operator, operator_addr, req, host)))
    }

    fn sessions(&self, caller: Caller<'_>) -> Vec<SessionInfo> {
        self.sessions(caller)
    }

    fn ended_sessions(&self, caller: Caller<'_>) -> Vec<SessionInfo> {
        self.ended_sessions(caller)
    }

    fn session(&self, caller: Caller<'_>, id: &str) -> Option<SessionInfo> {
        self.session(caller, id)
    }

    fn close_session_as<'a>(&'a self, caller: Caller<'a>, id: &'a str) -> Pending<'a, Result<bool, Refusal>> {
        Box::pin(std::future::ready(Ok(self.close_session_as(caller, id))))
    }

    fn close_session(&self, id: &str, reason: CloseReason) -> bool {
        self.close_session(id, reason)
    }

    fn close_all(&self, reason: CloseReason) {
        self.close_all(reason)
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        self.devices()
    }

    fn counts(&self) -> (usize, usize) {
        self.counts()
    }

    fn client_conn(&self, session: &str, token: &str, client_addr: SocketAddr) -> Result<ClientConn, Refusal> {
        self.client_conn(session, token, client_addr)
    }

    fn announce_conn(&self, c: &ClientConn) {
        self.announce_conn(c)
    }

    fn ready_begin(&self, session: &str, token: &str) -> Result<(), Refusal> {
        self.ready_begin(session, token)
    }

    fn ready_end(&self, session: &str) {
        self.ready_end(session)
    }

    fn device_conn(&self, session: &str, conn: u64, token: &str) -> Result<usize, Refusal> {
        self.device_conn(session, conn, token)
    }

    fn connect_failed(&self, device: &str, session: &str, conn: u64, reason: &str) {
        self.connect_failed(device, session, conn, reason)
    }

    fn agent_claim<'a>(&'a self, device: &'a str, services: &'a [String], link: &'a AgentLink) -> Pending<'a, Claim> {
        Box::pin(std::future::ready(self.agent_claim(device, services, link)))
    }

    fn agent_take_over<'a>(
        &'a self,
        device: &'a str,
        stale: u64,
        services: &'a [String],
        link: &'a AgentLink,
    ) -> Pending<'a, Option<u64>> {
        Box::pin(std::future::ready(self.agent_take_over(device, stale, services, link)))
    }

    fn agent_down(&self, device: &str, generation: u64) {
        self.agent_down(device, generation)
    }

    fn disconnect_agent(&self, device: &str, reason: CloseReason) -> bool {
        self.disconnect_agent(device, reason)
    }

    fn park_spare(&self, device: &str, spare: Spare) -> bool {
        self.park_spare(device, spare)
    }

    fn attach_control(
        &self,
        session: &str,
        token: &str,
        tx: mpsc::Sender<SessionEvent>,
    ) -> Result<(u64, SessionEvent), Refusal> {
        self.attach_control(session, token, tx)
    }

    fn detach_control(&self, session: &str, id: u64) {
        self.detach_control(session, id)
    }

    fn reap(&self) {
        self.reap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use tokio::sync::mpsc::error::TryRecvError;

    /// Time that moves only when a test says so.
    struct FakeClock {
        base: Instant,
        offset: Mutex<Duration>,
    }

    impl FakeClock {
        fn advance(&self, secs: u64) {
            *self.offset.lock().unwrap() += Duration::from_secs(secs);
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.base + *self.offset.lock().unwrap()
        }

        fn unix(&self) -> u64 {
            1_700_000_000 + self.offset.lock().unwrap().as_secs()
        }
    }

    const CONFIG: &str = r#"
[[operator]]
name = "alice"
token = "alice-token"
[[operator]]
name = "bob"
token = "bob-token"
[[operator]]
name = "root"
token = "root-token"
role = "admin"
[[device]]
id = "dev-1"
key = "dev-1-key"
[[device]]
id = "dev-2"
key = "dev-2-key"
[limits]
max_sessions = 4
max_sessions_per_operator = 2
session_ttl_secs = 60
max_session_ttl_secs = 120
attach_timeout_secs = 30
client_grace_secs = 10
agent_grace_secs = 10
"#;

    struct World {
        reg: MemoryRegistry,
        clock: Arc<FakeClock>,
        /// The only worker's inbox.
        inbox: mpsc::UnboundedReceiver<Cmd>,
    }

    fn world() -> World {
        let clock = Arc::new(FakeClock { base: Instant::now(), offset: Mutex::new(Duration::ZERO) });
        let (workers, mut inboxes) = Workers::new(1);
        let config = Arc::new(Config::parse(CONFIG).unwrap());
        let keys = Arc::new(crate::relay::keys::Keys::new(&config).unwrap());
        let reg = MemoryRegistry::new(
            config,
            keys,
            Arc::new(Metrics::default()),
            Arc::new(Audit::open(None).unwrap()),
            workers,
            clock.clone(),
        );
        World { reg, clock, inbox: inboxes.remove(0) }
    }

    const ALICE: Caller<'static> = Caller { name: "alice", role: Role::Operator };
    const BOB: Caller<'static> = Caller { name: "bob", role: Role::Operator };
    const ROOT: Caller<'static> = Caller { name: "root", role: Role::Admin };
    const ADDR: &str = "127.0.0.1:5000";

    fn request(device: &str, service: &str, ttl: Option<u64>) -> StartSession {
        StartSession { device: device.into(), service: service.into(), ttl_secs: ttl }
    }

    fn start(w: &World, who: Caller<'_>, device: &str) -> SessionStarted {
        w.reg.start_session(who.name, ADDR, request(device, "ssh", None), "relay.test").unwrap()
    }

    /// An agent's control connection as the registry sees it, with the ends a test reads.
    struct FakeAgent {
        link: AgentLink,
        to_agent: mpsc::Receiver<ToAgent>,
        _probes: mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
        _closes: mpsc::Receiver<CloseReason>,
    }

    fn agent() -> FakeAgent {
        let (tx, to_agent) = mpsc::channel(16);
        let (probe, _probes) = mpsc::channel(1);
        let (close, _closes) = mpsc::channel(1);
        let link = AgentLink { tx, probe, close, addr: ADDR.parse().unwrap(), version: "test".into() };
        FakeAgent { link, to_agent, _probes, _closes }
    }

    fn claim(w: &World, device: &str, a: &FakeAgent) -> u64 {
        match w.reg.agent_claim(device, &["ssh".to_string()], &a.link) {
            Claim::Granted(g) => g,
            Claim::Held { .. } | Claim::Unavailable(_) => panic!("{device} is held"),
        }
    }

    fn closes(w: &mut World) -> Vec<(u64, CloseReason)> {
        let mut out = Vec::new();
        loop {
            match w.inbox.try_recv() {
                Ok(Cmd::Close { conn, reason }) => out.push((conn, reason)),
                Ok(_) => {}
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return out,
            }
        }
    }

    fn refusal<T>(r: Result<T, Refusal>) -> u16 {
        match r {
            Ok(_) => panic!("admitted"),
            Err(r) => r.status.as_u16(),
        }
    }

    #[test]
    fn a_session_starts_within_its_limits() {
        let w = world();
        let s = start(&w, ALICE, "dev-1");
        assert_eq!(s.expires_at, 1_700_000_000 + 60, "the default ttl");
        assert_eq!(s.client_url, format!("ws://relay.test/api/v1/sessions/{}/client", s.id));
        assert_eq!(refusal(w.reg.start_session("alice", ADDR, request("nope", "ssh", None), "h")), 404);
        assert_eq!(refusal(w.reg.start_session("alice", ADDR, request("dev-1", "ssh", Some(0)), "h")), 400);
        assert_eq!(refusal(w.reg.start_session("alice", ADDR, request("dev-1", "ssh", Some(121)), "h")), 400);
        // A connected agent says which services exist.
        let a = agent();
        claim(&w, "dev-2", &a);
        assert_eq!(refusal(w.reg.start_session("alice", ADDR, request("dev-2", "vnc", None), "h")), 404);
        // Two per operator, four in all.
        start(&w, ALICE, "dev-2");
        assert_eq!(refusal(w.reg.start_session("alice", ADDR, request("dev-1", "ssh", None), "h")), 429);
        start(&w, BOB, "dev-1");
        start(&w, ROOT, "dev-1");
        assert_eq!(refusal(w.reg.start_session("bob", ADDR, request("dev-1", "ssh", None), "h")), 429);
        assert_eq!(w.reg.counts(), (4, 1));
    }

    #[test]
    fn each_side_has_its_own_token() {
        let w = world();
        let s = start(&w, ALICE, "dev-1");
        let mut a = agent();
        claim(&w, "dev-1", &a);
        let client: SocketAddr = ADDR.parse().unwrap();
        assert_eq!(refusal(w.reg.client_conn(&s.id, "wrong", client)), 401);
        assert_eq!(refusal(w.reg.client_conn("0000", &s.client_token, client)), 401);
        let c = w.reg.client_conn(&s.id, &s.client_token, client).unwrap();
        w.reg.announce_conn(&c);
        let ToAgent::Connect { conn, token, service, .. } = a.to_agent.try_recv().expect("the agent is asked to dial");
        assert_eq!((conn, service.as_str()), (c.conn, "ssh"));
        // The device token opens the device side only, and the client token does not.
        assert_eq!(w.reg.device_conn(&s.id, conn, &token).unwrap(), c.worker);
        assert_eq!(refusal(w.reg.device_conn(&s.id, conn, &s.client_token)), 401);
        assert_eq!(refusal(w.reg.client_conn(&s.id, &token, client)), 401);
        // A connection that ended is gone, not a failed login.
        w.reg.conn_ended(&s.id, conn, ConnEnd::before_forwarding(CloseReason::PairTimeout));
        assert_eq!(refusal(w.reg.device_conn(&s.id, conn, &token)), 410);
    }

    #[test]
    fn a_session_expires_and_its_connections_hear_4002() {
        let mut w = world();
        let s = start(&w, ALICE, "dev-1");
        let c = w.reg.client_conn(&s.id, &s.client_token, ADDR.parse().unwrap()).unwrap();
        let (tx, mut events) = mpsc::channel(4);
        w.reg.attach_control(&s.id, &s.client_token, tx).unwrap();
        w.clock.advance(59);
        w.reg.reap();
        assert!(closes(&mut w).is_empty(), "closed before its time");
        w.clock.advance(1);
        w.reg.reap();
        assert_eq!(closes(&mut w), vec![(c.conn, CloseReason::Expired)]);
        assert!(matches!(events.try_recv(), Ok(SessionEvent::Closing { code: 4002, .. })));
        assert!(w.reg.session(ALICE, &s.id).is_none());
        assert_eq!(refusal(w.reg.client_conn(&s.id, &s.client_token, ADDR.parse().unwrap())), 401);
    }

    #[test]
    fn a_session_nobody_attaches_to_is_reaped() {
        let mut w = world();
        let s = start(&w, ALICE, "dev-1");
        w.clock.advance(29);
        w.reg.reap();
        assert!(w.reg.session(ALICE, &s.id).is_some());
        w.clock.advance(1);
        w.reg.reap();
        assert!(w.reg.session(ALICE, &s.id).is_none());
        assert!(closes(&mut w).is_empty());
    }

    #[test]
    fn a_client_gone_past_its_grace_ends_the_session_and_one_back_in_time_keeps_it() {
        let mut w = world();
        let s = start(&w, ALICE, "dev-1");
        let c = w.reg.client_conn(&s.id, &s.client_token, ADDR.parse().unwrap()).unwrap();
        let (tx, _events) = mpsc::channel(4);
        let (id, _) = w.reg.attach_control(&s.id, &s.client_token, tx).unwrap();
        w.reg.detach_control(&s.id, id);
        w.clock.advance(9);
        w.reg.reap();
        let (tx, _events) = mpsc::channel(4);
        let (id, _) = w.reg.attach_control(&s.id, &s.client_token, tx).unwrap();
        w.clock.advance(20);
        w.reg.reap();
        assert!(closes(&mut w).is_empty(), "re-attached within the grace period");
        w.reg.detach_control(&s.id, id);
        w.clock.advance(10);
        w.reg.reap();
        assert_eq!(closes(&mut w), vec![(c.conn, CloseReason::ClientGone)]);
    }

    #[test]
    fn an_operator_closes_its_own_sessions_and_an_admin_any() {
        let mut w = world();
        let s = start(&w, ALICE, "dev-1");
        let c = w.reg.client_conn(&s.id, &s.client_token, ADDR.parse().unwrap()).unwrap();
        assert!(w.reg.session(BOB, &s.id).is_none(), "bob sees alice's session");
        assert!(w.reg.sessions(BOB).is_empty());
        assert!(!w.reg.close_session_as(BOB, &s.id), "bob closed alice's session");
        assert!(closes(&mut w).is_empty());
        assert_eq!(w.reg.sessions(ROOT).len(), 1);
        assert!(w.reg.close_session_as(ALICE, &s.id));
        assert_eq!(closes(&mut w), vec![(c.conn, CloseReason::OperatorClosed("alice".into()))]);
        assert!(!w.reg.close_session_as(ALICE, &s.id), "closed twice");

        let s = start(&w, BOB, "dev-1");
        let c = w.reg.client_conn(&s.id, &s.client_token, ADDR.parse().unwrap()).unwrap();
        assert!(w.reg.close_session_as(ROOT, &s.id));
        assert_eq!(closes(&mut w), vec![(c.conn, CloseReason::OperatorClosed("root".into()))]);
    }

    #[test]
    fn an_agent_that_leaves_has_its_grace_then_its_device_is_lost() {
        let mut w = world();
        let s = start(&w, ALICE, "dev-1");
        let a = agent();
        let generation = claim(&w, "dev-1", &a);
        let c = w.reg.client_conn(&s.id, &s.client_token, ADDR.parse().unwrap()).unwrap();
        w.reg.announce_conn(&c);
        let (tx, mut events) = mpsc::channel(8);
        w.reg.attach_control(&s.id, &s.client_token, tx).unwrap();

        // Leaves, and comes back within its grace: the tunnel is told both, and nothing closes.
        w.reg.agent_down("dev-1", generation);
        assert!(
            matches!(w.inbox.try_recv(), Ok(Cmd::AgentLink { conn, down: Some(d) }) if conn == c.conn && d == "dev-1")
        );
        w.clock.advance(9);
        w.reg.reap();
        let back = agent();
        let generation = claim(&w, "dev-1", &back);
        assert!(matches!(w.inbox.try_recv(), Ok(Cmd::AgentLink { down: None, .. })));
        assert!(closes(&mut w).is_empty());

        // A stale connection's end does not count once a newer one holds the device.
        w.reg.agent_down("dev-1", generation - 1);
        assert_eq!(w.reg.counts().1, 1);

        // Leaves for longer than its grace: 4004 for its connections, an event for the client.
        w.reg.agent_down("dev-1", generation);
        w.clock.advance(10);
        w.reg.reap();
        assert_eq!(closes(&mut w), vec![(c.conn, CloseReason::DeviceLost("dev-1".into()))]);
        assert!(std::iter::from_fn(|| events.try_recv().ok()).any(|e| matches!(e, SessionEvent::DeviceOffline)));
        assert_eq!(w.reg.counts().1, 0);
        // A new connection to the lost device is closed at once.
        let c = w.reg.client_conn(&s.id, &s.client_token, ADDR.parse().unwrap()).unwrap();
        w.reg.announce_conn(&c);
        assert_eq!(closes(&mut w), vec![(c.conn, CloseReason::DeviceOffline("dev-1".into()))]);
    }

    #[test]
    fn the_agent_s_report_of_an_unreachable_service_closes_that_connection_only() {
        let mut w = world();
        let s = start(&w, ALICE, "dev-1");
        let one = w.reg.client_conn(&s.id, &s.client_token, ADDR.parse().unwrap()).unwrap();
        let _two = w.reg.client_conn(&s.id, &s.client_token, ADDR.parse().unwrap()).unwrap();
        // Another device cannot speak for this one's sessions.
        w.reg.connect_failed("dev-2", &s.id, one.conn, "refused");
        assert!(closes(&mut w).is_empty());
        w.reg.connect_failed("dev-1", &s.id, one.conn, "refused\n\x1b[31m");
        let got = closes(&mut w);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, one.conn);
        assert_eq!(got[0].1.to_string(), "device dev-1 could not reach service ssh: refused\\n\\u{1b}[31m");
    }
}
