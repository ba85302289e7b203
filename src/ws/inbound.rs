//! The edges' decoder: the frames a relay (a WebSocket *server*) sends, read where they lie.
//!
//! The agent and `ringway connect` read their data connections into a pooled buffer and call
//! [`Inbound::next`] on what arrived: it walks the bytes without copying them and answers one
//! step at a time, so the caller can write a payload piece to its local socket (and wait for it)
//! before asking for the next step. Payloads stream: a frame may be split anywhere, may be
//! larger than any buffer, and its data is handed out piece by piece as it arrives. Only a
//! header cut off at the end of a read (at most 9 bytes) and a control frame's payload (at most
//! 125) are held in the decoder between reads.
//!
//! A server's frames must not be masked; everything else is checked as the relay's own
//! [`Forwarder`](super::Forwarder) checks a client: reserved bits and opcodes, control frames
//! whole and short, continuations only inside a fragmented message, a Close's code and reason,
//! and nothing after a Close.

use std::ops::Range;

use super::error::{CloseCode, FrameError};
use super::{OpCode, MAX_CONTROL_PAYLOAD};

/// The longest header of an unmasked frame: 2 bytes and a 64-bit length.
const MAX_SERVER_HEADER: usize = 10;

/// One step of decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Payload bytes of a data frame (Binary, Text or a continuation), as a range of the input
    /// given to [`Inbound::next`].
    Data(Range<usize>),
    /// A whole Ping, whose payload the caller should echo in a Pong.
    Ping(Vec<u8>),
    /// A whole Pong.
    Pong,
    /// A whole, valid Close: the code (1005 when the frame carried none) and its reason.
    Close(u16, String),
}

/// Decoder state for the frames of one server-to-client stream.
#[derive(Debug, Clone)]
pub struct Inbound {
    carry: [u8; MAX_SERVER_HEADER],
    carry_len: u8,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    opcode: OpCode,
    /// The current control frame's payload so far.
    control: [u8; MAX_CONTROL_PAYLOAD],
    control_len: u8,
    fragmented: bool,
    closed: bool,
    failed: Option<FrameError>,
}

impl Default for Inbound {
    fn default() -> Self {
        Inbound {
            carry: [0; MAX_SERVER_HEADER],
            carry_len: 0,
            remaining: 0,
            opcode: OpCode::Binary,
            control: [0; MAX_CONTROL_PAYLOAD],
            control_len: 0,
            fragmented: false,
            closed: false,
            failed: None,
        }
    }
}

/// A parsed header: opcode, length and its size on the wire.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub opcode: OpCode,
    pub fin: bool,
    pub len: u64,
    pub size: usize,
}

impl Inbound {
    /// Decodes from the start of `input`. Returns how many bytes of it were used and what they
    /// held: `None` when they only advanced the decoder (a header, part of a control frame, an
    /// empty data frame). Call again with the rest until all of `input` is used. After an error
    /// every later call fails with the same error.
    pub fn next(&mut self, input: &[u8]) -> Result<(usize, Option<Item>), FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if input.is_empty() {
            return Ok((0, None));
        }
        if self.remaining > 0 {
            return self.payload(input);
        }
        if self.closed {
            return Err(self.fail(FrameError::FrameAfterClose));
        }
        // The header: what was carried over, then as much of `input` as a header can take.
        let carried = self.carry_len as usize;
        let mut head = [0u8; MAX_SERVER_HEADER];
        head[..carried].copy_from_slice(&self.carry[..carried]);
        let take = (MAX_SERVER_HEADER - carried).min(input.len());
        head[carried..carried + take].copy_from_slice(&input[..take]);
        let header = match parse(&head[..carried + take]) {
            Ok(Some(h)) => h,
            Ok(None) => {
                // Cut off: keep it all for the next read (`take` is all of `input` here).
                self.carry[carried..carried + take].copy_from_slice(&input[..take]);
                self.carry_len = (carried + take) as u8;
                return Ok((take, None));
            }
            Err(e) => return Err(self.fail(e)),
        };
        self.carry_len = 0;
        let used = header.size - carried;
        if let Err(e) = self.begin(&header) {
            return Err(self.fail(e));
        }
        if header.len == 0 {
            return self.finish().map(|item| (used, item));
        }
        Ok((used, None))
    }

    /// A Close has arrived: nothing may follow it.
    pub fn closed(&self) -> bool {
        self.closed
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.failed = Some(e);
        e
    }

    /// Checks a header against the stream's state and starts its frame.
    fn begin(&mut self, h: &Header) -> Result<(), FrameError> {
        if h.opcode.is_control() {
            if !h.fin {
                return Err(FrameError::ControlFrameFragmented);
            }
            if h.len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(FrameError::ControlFrameTooLarge);
            }
            self.control_len = 0;
        } else {
            match (h.opcode, self.fragmented) {
                (OpCode::Continuation, false) => return Err(FrameError::UnexpectedContinuation),
                (OpCode::Text | OpCode::Binary, true) => return Err(FrameError::ExpectedContinuation),
                _ => {}
            }
            self.fragmented = !h.fin;
        }
        self.opcode = h.opcode;
        self.remaining = h.len;
        Ok(())
    }

    /// Payload bytes of the frame in flight.
    fn payload(&mut self, input: &[u8]) -> Result<(usize, Option<Item>), FrameError> {
        let n = self.remaining.min(input.len() as u64) as usize;
        self.remaining -= n as u64;
        if !self.opcode.is_control() {
            return Ok((n, Some(Item::Data(0..n))));
        }
        let at = self.control_len as usize;
        self.control[at..at + n].copy_from_slice(&input[..n]);
        self.control_len += n as u8;
        if self.remaining > 0 {
            return Ok((n, None));
        }
        self.finish().map(|item| (n, item))
    }

    /// The frame in flight is complete: a control frame becomes its item.
    fn finish(&mut self) -> Result<Option<Item>, FrameError> {
        let payload = &self.control[..self.control_len as usize];
        let item = match self.opcode {
            OpCode::Ping => Item::Ping(payload.to_vec()),
            OpCode::Pong => Item::Pong,
            OpCode::Close => {
                let item = close(payload).map_err(|e| self.fail(e))?;
                self.closed = true;
                item
            }
            _ => return Ok(None),
        };
        Ok(Some(item))
    }
}

fn close(payload: &[u8]) -> Result<Item, FrameError> {
    match payload {
        [] => Ok(Item::Close(1005, String::new())),
        [_] => Err(FrameError::CloseFrameTruncated),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !CloseCode(code).is_sendable() {
                return Err(FrameError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::InvalidCloseReason)?;
            Ok(Item::Close(code, reason.to_string()))
        }
    }
}

/// Parses an unmasked frame header from the start of `b`; `None` if `b` ends before the
/// header does.
pub fn parse(b: &[u8]) -> Result<Option<Header>, FrameError> {
    let [b0, b1, ..] = *b else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(FrameError::ReservedOpcode(b0 & 0x0f))?;
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let (len, size) = match b1 & 0x7f {
        126 => match b.get(2..4) {
            Some(l) => (u16::from_be_bytes([l[0], l[1]]) as u64, 4),
            None => return Ok(None),
        },
        127 => match b.get(2..10) {
            Some(l) => {
                let len = u64::from_be_bytes(l.try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(FrameError::LengthOverflow);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (n as u64, 2),
    };
    Ok(Some(Header { opcode, fin: b0 & 0x80 != 0, len, size }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::encode;

    /// Decodes `stream` fed in pieces of `step` bytes: the data bytes, the other items, the error.
    fn decode(stream: &[u8], step: usize) -> (Vec<u8>, Vec<Item>, Option<FrameError>) {
        let mut d = Inbound::default();
        let (mut data, mut items) = (Vec::new(), Vec::new());
        for piece in stream.chunks(step) {
            let mut at = 0;
            while at < piece.len() {
                match d.next(&piece[at..]) {
                    Ok((used, item)) => {
                        match item {
                            Some(Item::Data(r)) => data.extend_from_slice(&piece[at..][r]),
                            Some(other) => items.push(other),
                            None => {}
                        }
                        at += used;
                    }
                    Err(e) => return (data, items, Some(e)),
                }
            }
        }
        (data, items, None)
    }

    fn frames(parts: &[(bool, OpCode, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (fin, op, payload) in parts {
            encode::frame(&mut out, *fin, *op, payload, None);
        }
        out
    }

    #[test]
    fn data_streams_across_any_split() {
        let big = (0..70_000u32).map(|i| i as u8).collect::<Vec<_>>();
        let stream = frames(&[
            (true, OpCode::Binary, b"hello"),
            (false, OpCode::Binary, &big[..300]),
            (true, OpCode::Ping, b"p"),
            (true, OpCode::Continuation, &big[300..]),
            (true, OpCode::Binary, b""),
            (true, OpCode::Close, &[0x03, 0xe8, b'o', b'k']),
        ]);
        let mut want = b"hello".to_vec();
        want.extend_from_slice(&big);
        for step in [1, 2, 3, 7, 9, 10, 11, 4096, stream.len()] {
            let (data, items, err) = decode(&stream, step);
            assert_eq!(err, None, "step {step}");
            assert_eq!(data, want, "step {step}");
            assert_eq!(items, vec![Item::Ping(b"p".to_vec()), Item::Close(1000, "ok".into())], "step {step}");
        }
    }

    #[test]
    fn violations_are_refused() {
        let masked = {
            let mut v = Vec::new();
            encode::frame(&mut v, true, OpCode::Binary, b"x", Some([1, 2, 3, 4]));
            v
        };
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (masked, FrameError::Masked),
            (vec![0xc2, 0], FrameError::ReservedBits),
            (vec![0x83, 0], FrameError::ReservedOpcode(3)),
            (vec![0x09, 0], FrameError::ControlFrameFragmented),
            (frames(&[(true, OpCode::Ping, &[0; 126])]), FrameError::ControlFrameTooLarge),
            (vec![0x80, 1, b'x'], FrameError::UnexpectedContinuation),
            (frames(&[(false, OpCode::Binary, b"a"), (true, OpCode::Binary, b"b")]), FrameError::ExpectedContinuation),
            (vec![0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0], FrameError::LengthOverflow),
            (vec![0x88, 1, 3], FrameError::CloseFrameTruncated),
            (vec![0x88, 2, 0x03, 0xee], FrameError::InvalidCloseCode(1006)),
            (vec![0x88, 3, 0x03, 0xe8, 0xff], FrameError::InvalidCloseReason),
            (frames(&[(true, OpCode::Close, &[]), (true, OpCode::Binary, b"late")]), FrameError::FrameAfterClose),
        ];
        for (stream, want) in cases {
            for step in [1, stream.len()] {
                assert_eq!(decode(&stream, step).2, Some(want), "{stream:?} in steps of {step}");
            }
        }
    }

    #[test]
    fn an_empty_close_reads_as_1005_and_ends_the_stream() {
        let (_, items, err) = decode(&frames(&[(true, OpCode::Close, &[])]), 1);
        assert_eq!((items, err), (vec![Item::Close(1005, String::new())], None));
    }
}
