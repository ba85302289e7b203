//! The sans-IO WebSocket frame codec the relay's data plane forwards with.
//!
//! It owns RFC 6455 framing as the relay sees it: frames arrive from WebSocket *clients* (both
//! the operator's client and the device's agent dial the relay), so every frame must be masked
//! and leaves the relay unmasked. [`Forwarder`] validates that stream and rewrites it in place,
//! [`encode`] builds the frames the relay sends for itself (Close) and the masked frames
//! test peers and benchmarks need, and [`unmask`] is the word-wise XOR under all of it.
//!
//! This module must not do IO: no tokio, no sockets, no clocks, no allocation on the forwarding
//! path. Bytes go in, decisions and rewritten bytes come out. That is what lets the fuzzer and
//! the micro-benchmarks drive it directly.
//!
//! The edges (agent, `ringway connect`) are WebSocket clients: they send masked frames built
//! in place with [`encode::header`] and [`unmask`], and read the relay's unmasked frames with
//! [`inbound::Inbound`].

pub mod encode;
mod error;
mod forward;
pub mod inbound;
pub mod unmask;

pub use error::{CloseCode, FrameError};
pub use forward::{Event, ForwardError, Forwarder, HEADROOM, MAX_HEADER};

/// A frame's opcode (RFC 6455 §5.2). Reserved opcodes are rejected before one of these exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    /// Decodes the low nibble of a frame's first byte; `None` for the reserved opcodes.
    pub fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Close, Ping and Pong: at most 125 bytes, never fragmented, may sit between fragments.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// The largest payload a control frame may carry.
pub const MAX_CONTROL_PAYLOAD: usize = 125;
