//! Framing violations and the close codes they imply.

use std::fmt;

/// A WebSocket close code (RFC 6455 §7.4) including ringway's own 4000-range codes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// Never sent: what the audit log records for a connection that got no Close at all.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// Agent control connection only: the relay cannot decide now (a cluster node without its
    /// registry); try again, or another node.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    /// The device's agent could not reach the requested service.
    pub const SERVICE_UNREACHABLE: CloseCode = CloseCode(4001);
    /// The session's lifetime ran out.
    pub const SESSION_EXPIRED: CloseCode = CloseCode(4002);
    /// An operator closed the session through the control API.
    pub const SESSION_CLOSED: CloseCode = CloseCode(4003);
    /// The device's agent is not connected to the relay.
    pub const DEVICE_OFFLINE: CloseCode = CloseCode(4004);
    /// Agent control connection only: another agent holds this device id (a second one is
    /// refused while the first answers; a first that stops answering is replaced).
    pub const DEVICE_CONFLICT: CloseCode = CloseCode(4005);
    /// Data connections, between the edges: the TCP connection on the sender's side was reset
    /// (or failed); the receiver resets its own, so an RST crosses the tunnel.
    pub const CONNECTION_RESET: CloseCode = CloseCode(4006);

    /// Whether a peer may put this code on the wire (RFC 6455 §7.4.1–2: 1005, 1006 and 1015
    /// are reserved for reporting, 1016–2999 are unassigned, 5000 and up do not exist). 1014
    /// is refused too, as fastwebsockets and tungstenite refuse it: a code the relay forwards
    /// must be one its peers accept (found by the frame_roundtrip fuzz target).
    pub fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1013 | 3000..=4999)
    }
}

impl fmt::Debug for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CloseCode({})", self.0)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A violation of RFC 6455 framing (or of the relay's frame-size policy) by the sending peer.
///
/// Each variant maps to the close code the relay answers it with ([`FrameError::close_code`]).
/// Values are `Copy` and allocation-free: they are produced on the forwarding path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame from a client is not masked")]
    Unmasked,
    #[error("frame from the relay is masked")]
    Masked,
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("control frame payload over 125 bytes")]
    ControlFrameTooLarge,
    #[error("control frame is fragmented")]
    ControlFrameFragmented,
    #[error("continuation frame without a fragmented message to continue")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is unfinished")]
    ExpectedContinuation,
    #[error("64-bit payload length has its most significant bit set")]
    LengthOverflow,
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    FrameTooLarge { len: u64, max: u64 },
    #[error("close frame with a 1-byte payload")]
    CloseFrameTruncated,
    #[error("close code {0} may not be sent on the wire")]
    InvalidCloseCode(u16),
    #[error("close reason is not valid UTF-8")]
    InvalidCloseReason,
    #[error("frame after the peer's close frame")]
    FrameAfterClose,
}

impl FrameError {
    /// The close code this violation is answered with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            FrameError::FrameTooLarge { .. } => CloseCode::MESSAGE_TOO_BIG,
            FrameError::InvalidCloseReason => CloseCode::INVALID_PAYLOAD,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}
