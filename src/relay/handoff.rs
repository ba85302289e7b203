//! What the control plane hands the data plane, and what comes back: a leaf module both
//! import, so that neither imports the other.
//!
//! - [`Cmd`]: orders to a worker — an upgraded socket (with the bytes hyper read past the
//!   request), a close order, an agent's coming and going.
//! - [`Workers`]: one sender per worker thread; a connection's id picks its worker.
//! - [`ConnEnds`]: where a worker reports a connection's end ([`ConnEnd`]).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::ending::CloseReason;

/// A TLS data connection as the relay's acceptor leaves it.
pub type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// An upgraded data connection as it leaves hyper.
pub enum DataSocket {
    /// Plain TCP, taken off the accepting runtime's reactor.
    Plain(std::net::TcpStream),
    /// TLS terminated by the relay; stays on the reactor that accepted it.
    Tls(Box<TlsStream>),
}

/// What the control plane tells a worker.
pub enum Cmd {
    /// A client data connection upgraded; park it until its device side arrives.
    Client { conn: u64, session: Arc<str>, stream: DataSocket, leftover: Bytes },
    /// The device side of `conn` upgraded; pair it and start forwarding.
    Device { conn: u64, stream: DataSocket, leftover: Bytes },
    /// End `conn`: both sides hear `reason`. Kept for a while if `conn` has not arrived yet.
    Close { conn: u64, reason: CloseReason },
    /// The agent of `conn`'s device left its control connection (`Some(device)`: if the device
    /// side drops now, the client hears 4004) or came back (`None`).
    AgentLink { conn: u64, down: Option<String> },
    /// Report the bytes each session's running tunnels have forwarded so far (the API's live
    /// figures; asked on demand, never per frame).
    Tally(tokio::sync::oneshot::Sender<Tally>),
}

/// Per session: bytes its running tunnels forwarded so far (to the device, to the client).
pub type Tally = Vec<(Arc<str>, u64, u64)>;

/// The workers' inboxes. Unbounded: the control plane sends at most a few orders per
/// connection it admitted, and a worker never waits on the control plane.
#[derive(Clone)]
pub struct Workers(Arc<[mpsc::UnboundedSender<Cmd>]>);

impl Workers {
    /// `n` workers (at least one) and their receiving ends.
    pub fn new(n: usize) -> (Workers, Vec<mpsc::UnboundedReceiver<Cmd>>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n.max(1)).map(|_| mpsc::unbounded_channel()).unzip();
        (Workers(txs.into()), rxs)
    }

    /// The worker that owns connection `conn` (both of its sockets).
    pub fn of(&self, conn: u64) -> usize {
        (conn % self.0.len() as u64) as usize
    }

    pub fn count(&self) -> usize {
        self.0.len()
    }

    pub fn send(&self, worker: usize, cmd: Cmd) {
        // A worker that is gone took the process down with it (see `server`).
        let _ = self.0[worker].send(cmd);
    }
}

/// How a data connection ended, as its worker reports it.
#[derive(Debug)]
pub struct ConnEnd {
    pub to_device: u64,
    pub to_client: u64,
    pub reason: CloseReason,
}

impl ConnEnd {
    /// A connection that ended before any byte moved.
    pub fn before_forwarding(reason: CloseReason) -> ConnEnd {
        ConnEnd { to_device: 0, to_client: 0, reason }
    }
}

/// Where a worker reports that a connection ended (the session registry).
pub trait ConnEnds: Send + Sync {
    fn conn_ended(&self, session: &str, conn: u64, end: ConnEnd);
}
