//! ringway: remote access to services on devices behind NAT, through a WebSocket relay.
//!
//! # Layout
//!
//! - [`ws`]: the sans-IO WebSocket frame codec — validation, in-place unmasking forwarder,
//!   frame encoding. No IO; fuzzed and benchmarked on its own.
//! - [`relay`]: the public server — control API, control channels, the session registry (a
//!   trait; in memory by default), and the data plane (io_uring or epoll workers forwarding
//!   frames in place). Its own module doc gives the one-way order of its parts.
//! - [`agent`]: runs on the device; one control connection to the relay, dials only the
//!   services its own configuration names.
//! - [`client`]: `ringway connect` — starts a session and serves a local port.
//! - [`peer`]: WebSocket/HTTP plumbing of the edge roles: dialing, handshakes, API calls.
//! - [`splice`]: the edges' data path, one local stream over one data WebSocket, framed in
//!   place with buffers held only while bytes are in hand.
//! - [`channel`]: JSON control channels over WebSocket, bounded in every direction.
//! - [`proto`]: the JSON messages and API bodies.
//! - [`config`]: the relay's TOML configuration and the [`config::Secret`] type.
//! - [`tls`]: rustls configurations for the relay and the edge roles.
//! - [`demo`]: everything on loopback in one process, with a self-check.

pub mod agent;
pub mod channel;
pub mod client;
pub mod config;
pub mod demo;
pub mod peer;
pub mod proto;
pub mod relay;
pub mod splice;
pub mod tls;
pub mod ws;

/// What the fuzz targets drive beyond the public API: the relay's per-connection HTTP path and
/// its handling of agent messages. Only in fuzzing builds (`cargo fuzz` sets `--cfg fuzzing`).
#[cfg(fuzzing)]
pub mod fuzzing {
    pub use crate::relay::api::serve_connection;
    pub use crate::relay::channels::agent_message;
}
