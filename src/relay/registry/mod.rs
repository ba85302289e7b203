//! The session registry: which agents hold which devices, which sessions exist with which
//! tokens, which data connections are open on which worker. The control API and the control
//! channels ask it; the data plane reports connection ends to it (through
//! [`crate::relay::handoff::ConnEnds`]) and receives its close orders.
//!
//! [`Registry`] is the seam: [`memory::MemoryRegistry`] is the embedded default, one process and
//! one mutex; a cluster implements the same trait on a shared store without touching the data
//! plane or the API handlers. Time comes from a [`Clock`], so the registry's rules are tested
//! with a fake one.

pub mod memory;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Instant;

use hyper::StatusCode;
use tokio::sync::{mpsc, oneshot};

use super::ending::CloseReason;
use super::handoff::ConnEnds;
use super::metrics::HandshakeFailure;
use crate::config::Role;
use crate::proto::{DeviceInfo, SessionEvent, SessionInfo, SessionStarted, StartSession, ToAgent};

/// A refusal: the HTTP status, a message for the caller, and the counter it bumps.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
    pub why: Option<HandshakeFailure>,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>, why: Option<HandshakeFailure>) -> Refusal {
        Refusal { status, message: message.into(), why }
    }

    pub fn bad_token() -> Refusal {
        Refusal::new(StatusCode::UNAUTHORIZED, "invalid credentials", Some(HandshakeFailure::BadToken))
    }

    /// An unknown session looks exactly like a wrong token: no hint which part was wrong.
    pub fn no_session() -> Refusal {
        Refusal::new(StatusCode::UNAUTHORIZED, "invalid credentials", Some(HandshakeFailure::UnknownSession))
    }
}

/// Who is calling the control API.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub name: &'a str,
    pub role: Role,
}

impl Caller<'_> {
    /// An admin sees every session; an operator its own.
    pub fn may_see(&self, operator: &str) -> bool {
        self.role == Role::Admin || operator == self.name
    }
}

/// What the relay holds of an agent's live control connection.
#[derive(Clone)]
pub struct AgentLink {
    /// Messages to the agent (bounded: an agent that does not read is dropped).
    pub tx: mpsc::Sender<ToAgent>,
    /// Asks the connection to prove it is alive: it pings the agent and answers on the
    /// oneshot when the pong comes.
    pub probe: mpsc::Sender<oneshot::Sender<()>>,
    /// Ends the connection with this reason (a cluster node that no longer holds the device,
    /// or drains).
    pub close: mpsc::Sender<CloseReason>,
    pub addr: SocketAddr,
    /// The version its hello named.
    pub version: String,
}

/// The answer to an agent that wants its device.
pub enum Claim {
    /// It holds the device now (this generation).
    Granted(u64),
    /// Another connection holds it (on this node or another); probe that one before deciding.
    Held { generation: u64, addr: SocketAddr, probe: mpsc::Sender<oneshot::Sender<()>> },
    /// Ownership cannot be decided now (a cluster node without its registry); the agent should
    /// try again or try another node.
    Unavailable(String),
}

/// Where a connection for a session living on another cluster node goes: that node's address
/// and this node's proof of membership for it.
#[derive(Debug, Clone)]
pub struct Forward {
    pub node: String,
    pub advertise: String,
    pub proof: String,
}

/// What a registry call that may wait on a shared store returns.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A client data connection admitted by the registry.
/// What a parked spare device connection is told when a client connection takes it: the
/// connection it now serves, that connection's worker, and the message for the agent (the same
/// JSON `connect` the control channel would carry).
#[derive(Debug)]
pub struct SpareOrder {
    pub conn: u64,
    pub worker: usize,
    pub message: String,
}

/// A spare device connection waiting for its order.
pub type Spare = tokio::sync::oneshot::Sender<SpareOrder>;

pub struct ClientConn {
    pub conn: u64,
    pub worker: usize,
    pub session: std::sync::Arc<str>,
}

/// The relay's notion of now: a monotonic instant for deadlines and Unix seconds for what is
/// shown to people.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    fn unix(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix(&self) -> u64 {
        crate::proto::unix_now()
    }
}

/// Agents, sessions and connections. See the module doc.
pub trait Registry: ConnEnds {
    /// Starts a session for `operator` (calling from `operator_addr`); `host` is how the caller
    /// reached the relay (the client URL is built on it).
    fn start_session<'a>(
        &'a self,
        operator: &'a str,
        operator_addr: &'a str,
        req: StartSession,
        host: &'a str,
    ) -> Pending<'a, Result<SessionStarted, Refusal>>;
    /// The sessions `caller` may see, oldest first.
    fn sessions(&self, caller: Caller<'_>) -> Vec<SessionInfo>;
    /// The sessions that ended on this node that `caller` may see, newest first (the last
    /// `limits.recent_sessions`; older ones are in the audit log).
    fn ended_sessions(&self, caller: Caller<'_>) -> Vec<SessionInfo>;
    /// One session, if `caller` may see it (another operator's looks like no session at all).
    fn session(&self, caller: Caller<'_>, id: &str) -> Option<SessionInfo>;
    /// Ends a session on an operator's request (4003): only its own, unless it is an admin.
    fn close_session_as<'a>(&'a self, caller: Caller<'a>, id: &'a str) -> Pending<'a, Result<bool, Refusal>>;
    /// Ends a session: its client hears `reason` on the control connection and every data
    /// connection, and its tokens die with it.
    fn close_session(&self, id: &str, reason: CloseReason) -> bool;
    /// Ends every session with `reason` (shutdown).
    fn close_all(&self, reason: CloseReason);
    /// Every configured device and whether its agent is connected.
    fn devices(&self) -> Vec<DeviceInfo>;
    /// Sessions open, agents connected.
    fn counts(&self) -> (usize, usize);

    /// Admits a client data connection for `session` presenting `token`.
    fn client_conn(&self, session: &str, token: &str, client_addr: SocketAddr) -> Result<ClientConn, Refusal>;
    /// After the client side of `conn` reached its worker: asks the device's agent to dial in,
    /// or closes the connection at once if the device is offline. If the agent is reconnecting,
    /// the connection waits for it (within its pairing deadline).
    fn announce_conn(&self, c: &ClientConn);

    /// A ready client connection for `session` begins to wait: checks its token and the
    /// session's bound on waiting ones ([`memory::MAX_READY`]), without opening a connection
    /// (that happens when it is first used). Each success is followed by one `ready_end`.
    fn ready_begin(&self, session: &str, token: &str) -> Result<(), Refusal>;

    /// A ready client connection stopped waiting (used, closed or timed out).
    fn ready_end(&self, session: &str);
    /// Admits the device side of `conn`; returns the worker that owns the connection.
    fn device_conn(&self, session: &str, conn: u64, token: &str) -> Result<usize, Refusal>;
    /// The agent of `device` says it cannot reach the service for `conn`.
    fn connect_failed(&self, device: &str, session: &str, conn: u64, reason: &str);

    /// An agent (connected from `link.addr`) wants its device. It gets it unless another live
    /// connection holds it: then the caller probes that one and either refuses the newcomer or
    /// takes over ([`Registry::agent_take_over`]).
    fn agent_claim<'a>(&'a self, device: &'a str, services: &'a [String], link: &'a AgentLink) -> Pending<'a, Claim>;
    /// Replaces the connection of generation `stale` (it did not answer a probe) with `link`.
    /// `None` if that connection is gone or replaced already: claim again.
    fn agent_take_over<'a>(
        &'a self,
        device: &'a str,
        stale: u64,
        services: &'a [String],
        link: &'a AgentLink,
    ) -> Pending<'a, Option<u64>>;
    /// An agent's control connection went away. Its device's tunnels keep running: the agent
    /// has `limits.agent_grace_secs` to come back before the device is declared lost (4004).
    fn agent_down(&self, device: &str, generation: u64);

    /// Parks a spare device connection of `device`'s agent, for the next client connection to
    /// take instead of asking the agent to dial. Refused (false) when the agent is not linked
    /// here or already has its maximum of spares parked.
    fn park_spare(&self, device: &str, spare: Spare) -> bool;

    /// Closes `device`'s agent control connection with `reason` (its credentials were revoked);
    /// it then goes through its grace period like any agent that left. Whether one was linked.
    fn disconnect_agent(&self, device: &str, reason: CloseReason) -> bool;

    /// Attaches the client's session control connection; returns its id and the first event.
    fn attach_control(
        &self,
        session: &str,
        token: &str,
        tx: mpsc::Sender<SessionEvent>,
    ) -> Result<(u64, SessionEvent), Refusal>;
    fn detach_control(&self, session: &str, id: u64);

    /// Ends sessions whose time is up, whose client vanished longer than its grace period, or
    /// that no client attached to in time; declares lost the devices whose agents did not come
    /// back within theirs. Called a few times a second.
    fn reap(&self);

    /// The relay is draining (SIGTERM): in a cluster, its agents are sent to another node
    /// while its tunnels finish. A single node keeps them: there is nowhere else to go.
    fn drain(&self) {}

    /// The relay has stopped serving (after its drain): a cluster node leaves the cluster.
    fn stopped(&self) {}

    /// A cluster node: the session lives on another node, where a client connection presenting
    /// `token` is forwarded. `None`: it lives here (or nowhere: the local checks refuse it).
    fn elsewhere(&self, _session: &str, _token: &str) -> Option<Result<Forward, Refusal>> {
        None
    }

    /// A cluster node: whether `proof` shows that another node of the cluster forwarded this
    /// connection for `session` (then its claimed client address is believed).
    fn forwarded_by_peer(&self, _session: &str, _proof: &str) -> bool {
        false
    }

    /// A cluster node's own gauges (Prometheus text), appended to `/metrics`.
    fn cluster_metrics(&self) -> Option<String> {
        None
    }
}
