//! The relay role: configuration in, a listening socket, worker threads each running the
//! control plane (hyper) and the data plane (tunnels) for the connections it owns.
//!
//! Dependencies run one way, top to bottom:
//!
//! - `server`: bootstrap — listener, threads, runtimes, shutdown; [`run`] and [`start`].
//! - `api`: hyper routes — control API, health, metrics, WebSocket upgrades, and the hand-off of
//!   data sockets to the data plane. `channels`: the agent and session JSON control channels.
//! - `context`: what the control plane shares ([`Relay`]): config, metrics, audit, TLS, the
//!   shutdown signal, and the session registry.
//! - `cluster`: the registry shared by several nodes on NATS JetStream (with `[cluster]`); it
//!   keeps this node's share in the in-memory registry.
//! - `registry`: agents, sessions and connections behind the [`registry::Registry`] trait; the
//!   in-memory implementation is the default.
//! - `console`: the operator console's embedded page and its live view (a WebSocket fed by
//!   one refresh a second while someone watches). `launch` (one-time launch codes) and `logins`
//!   (console logins behind a cookie, with their CSRF proofs): leaves the API uses.
//! - `admission` (handshake shares, failed-login gate), `audit` (the JSON-lines log),
//!   `metrics` (counters, Prometheus text), `keys` (credentials and certificate, reloadable).
//! - `dataplane`: workers, tunnel tables, buffer pools, forwarding (io_uring or epoll). Knows
//!   only the leaves below and the codec.
//! - `handoff` (sockets and orders to the workers, connection ends back) and `ending` (how a
//!   connection ends: [`ending::CloseReason`] and its state machine): leaves.

mod admission;
pub(crate) mod api;
mod audit;
pub(crate) mod channels;
pub mod cluster;
pub(crate) mod console;
pub mod context;
pub mod dataplane;
pub mod ending;
pub mod handoff;
pub mod keys;
mod launch;
mod logins;
pub mod metrics;
mod openapi;
pub mod registry;
pub mod server;

pub use context::Relay;
pub use dataplane::BackendKind;
pub use server::{choose_backend, run, serve, start, Running};
