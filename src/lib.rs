//! ringway: remote access to services on devices behind NAT, through a WebSocket relay.
//!
//! # Layout
//!
//! - [`ws`]: the sans-IO WebSocket frame codec — validation, in-place unmasking forwarder,
//!   frame encoding. No IO; fuzzed and benchmarked on its own.

pub mod ws;
