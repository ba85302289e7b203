//! Frames built from scratch: the relay's own (unmasked, server role) and masked client-role
//! frames for the peers that tests, fuzzers and the load benchmark play.

use super::error::CloseCode;
use super::forward::MAX_HEADER;
use super::unmask::unmask;
use super::{OpCode, MAX_CONTROL_PAYLOAD};

/// Writes a frame header into `out` and returns its length (2 to 14 bytes).
pub fn header(out: &mut [u8; MAX_HEADER], fin: bool, opcode: OpCode, len: u64, mask: Option<[u8; 4]>) -> usize {
    out[0] = ((fin as u8) << 7) | opcode as u8;
    let mut n = if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as u64 {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&len.to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[1] |= 0x80;
        out[n..n + 4].copy_from_slice(&key);
        n += 4;
    }
    n
}

/// Appends a complete frame to `out`, masked with `mask` when it is given (client role).
pub fn frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
    let mut head = [0; MAX_HEADER];
    let n = header(&mut head, fin, opcode, payload.len() as u64, mask);
    out.extend_from_slice(&head[..n]);
    let at = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        unmask(&mut out[at..], key, 0);
    }
}

/// A control frame the relay sends for itself, built on the stack.
#[derive(Clone, Copy)]
pub struct ControlFrame {
    bytes: [u8; 2 + MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlFrame {
    fn new(opcode: OpCode, parts: &[&[u8]]) -> ControlFrame {
        let mut bytes = [0; 2 + MAX_CONTROL_PAYLOAD];
        let mut len = 2;
        for part in parts {
            bytes[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        bytes[0] = 0x80 | opcode as u8;
        bytes[1] = (len - 2) as u8;
        ControlFrame { bytes, len: len as u8 }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// An unmasked Close frame. The reason is cut to fit the 125-byte control payload, at a
/// character boundary so it stays valid UTF-8.
pub fn close(code: CloseCode, reason: &str) -> ControlFrame {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    ControlFrame::new(OpCode::Close, &[&code.0.to_be_bytes(), &reason.as_bytes()[..cut]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_uses_the_shortest_length_form() {
        let mut h = [0; MAX_HEADER];
        assert_eq!(header(&mut h, true, OpCode::Binary, 125, None), 2);
        assert_eq!(&h[..2], &[0x82, 125]);
        assert_eq!(header(&mut h, false, OpCode::Text, 126, Some([1, 2, 3, 4])), 8);
        assert_eq!(&h[..8], &[0x01, 0xfe, 0, 126, 1, 2, 3, 4]);
        assert_eq!(header(&mut h, true, OpCode::Binary, 65_536, None), 10);
        assert_eq!(&h[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn close_carries_code_and_reason() {
        let f = close(CloseCode::SESSION_EXPIRED, "session expired");
        let b = f.as_bytes();
        assert_eq!(b[0], 0x88);
        assert_eq!(b[1] as usize, 2 + "session expired".len());
        assert_eq!(&b[2..4], &4002u16.to_be_bytes());
        assert_eq!(&b[4..], b"session expired");
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(100);
        let b = close(CloseCode::NORMAL, &reason).as_bytes().to_vec();
        assert_eq!(b[1] as usize, b.len() - 2);
        assert!(b.len() - 2 <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&b[4..]).is_ok());
        assert_eq!(b.len() - 4, 122);
    }
}
