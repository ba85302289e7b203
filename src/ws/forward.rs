//! The in-place forwarder: masked client frames in, validated unmasked frames out, same buffer.
//!
//! The caller reads from a peer into `buf[data]`, leaving at least [`HEADROOM`] bytes free in
//! front of `data.start`, and calls [`Forwarder::forward`]. The forwarder puts the partial header
//! it carried from the previous read into that headroom, then walks the bytes: each header is
//! validated and rewritten 4 bytes shorter (mask bit cleared, key dropped), each payload byte is
//! unmasked and moved down over the gap. Output never overtakes input, so one buffer serves
//! both. What comes back is the range of `buf` to write to the other peer; a header cut off at
//! the end of the read (at most 13 bytes) is kept inside the forwarder for the next call.
//!
//! Payloads stream: a frame may be split anywhere and may be larger than any buffer, so the
//! maximum frame size is a policy, never a memory bound. Control frames (≤ 125 bytes) are also
//! collected into a small array so the caller sees each one whole ([`Event::Control`]).

use std::ops::Range;

use super::error::{CloseCode, FrameError};
use super::unmask::unmask_move;
use super::{OpCode, MAX_CONTROL_PAYLOAD};

/// The longest frame header: 2 bytes, a 64-bit length and the masking key.
pub const MAX_HEADER: usize = 14;

/// Bytes the caller keeps free in front of each read for the carried partial header (at most
/// `MAX_HEADER - 1`, rounded up to keep the payload 8-byte aligned in aligned buffers).
pub const HEADROOM: usize = 16;

/// What the forwarder saw pass, reported in stream order while it works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A data frame's header passed. `opcode` is Text or Binary on a message's first frame and
    /// Continuation on the frames after it.
    DataFrame { opcode: OpCode, fin: bool, len: u64 },
    /// The last byte of a message's final frame passed: a message boundary.
    MessageEnd,
    /// A whole control frame passed; `payload` is unmasked. A Close has been validated (code
    /// allowed on the wire, reason UTF-8) and nothing may follow it from this peer.
    Control { opcode: OpCode, payload: &'a [u8] },
}

/// A framing violation, with the output produced before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct ForwardError {
    pub error: FrameError,
    /// Bytes of `buf` rewritten before the violation was found: whole frames, ending where the
    /// offending frame starts (a relay forwards them, so that e.g. a valid Close before garbage
    /// still arrives). If the offending frame began in an earlier call, part of it was output
    /// then: [`Forwarder::at_frame_boundary`] says so.
    pub out: Range<usize>,
}

impl ForwardError {
    pub fn close_code(&self) -> CloseCode {
        self.error.close_code()
    }
}

/// A validated, parsed frame header.
struct Header {
    opcode: OpCode,
    fin: bool,
    len: u64,
    /// Bytes the header takes on the wire (with the 4-byte key).
    size: usize,
    mask: [u8; 4],
}

/// Validating, unmasking forwarder for one direction of one tunnel: the frames one client-role
/// peer sends. Holds no buffer of its own beyond the 13-byte carry and a control frame.
#[derive(Clone)]
pub struct Forwarder {
    max_frame: u64,
    /// Start of a header cut off by the end of the last read.
    carry: [u8; MAX_HEADER],
    carry_len: u8,
    /// Payload bytes of the current frame still to come; 0 between frames.
    remaining: u64,
    mask: [u8; 4],
    /// Payload bytes of the current frame already passed, mod 4: where the mask resumes.
    phase: u8,
    opcode: OpCode,
    fin: bool,
    /// The current control frame's payload, unmasked, so it can be reported whole. Allocated
    /// on the first control frame only: an idle tunnel's two forwarders stay small.
    control: Vec<u8>,
    /// Inside a fragmented message: only Continuation (or control) frames may come next.
    fragmented: bool,
    /// The peer sent Close: nothing may follow.
    closed: bool,
    /// The output stops inside a frame for good: a control frame failed its check after part of
    /// it was output by an earlier call.
    cut: bool,
    /// The first violation; the stream cannot be resynchronised after one.
    failed: Option<FrameError>,
}

impl Forwarder {
    /// A forwarder that rejects frames whose payload is over `max_frame` bytes with 1009.
    pub fn new(max_frame: u64) -> Forwarder {
        Forwarder {
            max_frame,
            carry: [0; MAX_HEADER],
            carry_len: 0,
            remaining: 0,
            mask: [0; 4],
            phase: 0,
            opcode: OpCode::Binary,
            fin: true,
            control: Vec::new(),
            fragmented: false,
            closed: false,
            cut: false,
            failed: None,
        }
    }

    /// Bytes of a partial header held over from the last read; `forward` puts them back in front
    /// of the next read, so the caller must leave at least this much room (always ≤ 13).
    pub fn carried(&self) -> usize {
        self.carry_len as usize
    }

    /// The output so far ends between frames (a header carried for the next read is not output
    /// yet): a frame of the relay's own may be sent here.
    pub fn at_frame_boundary(&self) -> bool {
        self.remaining == 0 && !self.cut
    }

    /// Payload bytes of the frame in flight still to come (0 between frames): what a relay that
    /// stops the stream must still forward to finish that frame.
    pub fn frame_remaining(&self) -> u64 {
        self.remaining
    }

    /// The peer's Close frame has passed.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Validates and rewrites the bytes a peer sent, `buf[data]`, in place.
    ///
    /// Returns the range of `buf` holding the unmasked frames to send on; it starts at most
    /// [`HEADROOM`] bytes before `data.start` and ends at or before `data.end`. Events are
    /// reported through `on_event` as frames pass. After an error every later call fails with
    /// the same error.
    ///
    /// # Panics
    ///
    /// If `data` is not inside `buf` or leaves fewer than [`Forwarder::carried`] bytes in front
    /// of it: a bug in the caller, never a consequence of what the peer sent.
    pub fn forward(
        &mut self,
        buf: &mut [u8],
        data: Range<usize>,
        mut on_event: impl FnMut(Event<'_>),
    ) -> Result<Range<usize>, ForwardError> {
        let carried = self.carry_len as usize;
        assert!(
            data.start >= carried && data.start <= data.end && data.end <= buf.len(),
            "forward: {data:?} in a buffer of {} with {carried} bytes carried",
            buf.len()
        );
        let start = data.start - carried;
        if let Some(error) = self.failed {
            return Err(ForwardError { error, out: start..start });
        }
        buf[start..data.start].copy_from_slice(&self.carry[..carried]);
        self.carry_len = 0;

        let end = data.end;
        let (mut r, mut w) = (start, start);
        // Where this call output the current frame's header, if it did.
        let mut frame_w: Option<usize> = None;
        let result = loop {
            if self.remaining > 0 {
                let n = self.remaining.min((end - r) as u64) as usize;
                unmask_move(buf, r, w, n, self.mask, self.phase as usize);
                if self.opcode.is_control() {
                    if self.control.capacity() == 0 {
                        // At most 125 bytes: the header was checked.
                        self.control.reserve_exact(MAX_CONTROL_PAYLOAD);
                    }
                    self.control.extend_from_slice(&buf[w..w + n]);
                }
                r += n;
                w += n;
                self.remaining -= n as u64;
                self.phase = ((self.phase as usize + n) & 3) as u8;
                if self.remaining == 0 {
                    if let Err(e) = self.finish_frame(&mut on_event) {
                        break Err((e, frame_w));
                    }
                }
            }
            if r == end {
                break Ok(());
            }
            let header = match self.parse_header(&buf[r..end]) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    let n = end - r;
                    self.carry[..n].copy_from_slice(&buf[r..end]);
                    self.carry_len = n as u8;
                    break Ok(());
                }
                Err(e) => break Err((e, Some(w))),
            };
            let out_size = header.size - 4;
            frame_w = Some(w);
            buf.copy_within(r..r + out_size, w);
            buf[w + 1] &= 0x7f;
            r += header.size;
            w += out_size;
            self.start_frame(header, &mut on_event);
            if self.remaining == 0 {
                if let Err(e) = self.finish_frame(&mut on_event) {
                    break Err((e, frame_w));
                }
            }
        };
        match result {
            Ok(()) => Ok(start..w),
            Err((error, offending_at)) => {
                self.failed = Some(error);
                // The offending frame is not output; if it began in an earlier call, the output
                // already holds its start and can never end at a frame boundary again.
                let end = offending_at.unwrap_or_else(|| {
                    self.cut = true;
                    start
                });
                Err(ForwardError { error, out: start..end })
            }
        }
    }

    /// Parses and validates the header at the start of `b`; `None` if `b` holds only part of it.
    fn parse_header(&self, b: &[u8]) -> Result<Option<Header>, FrameError> {
        if self.closed {
            return Err(FrameError::FrameAfterClose);
        }
        if b.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (b[0], b[1]);
        if b0 & 0x70 != 0 {
            return Err(FrameError::ReservedBits);
        }
        let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(FrameError::ReservedOpcode(b0 & 0x0f))?;
        let fin = b0 & 0x80 != 0;
        if b1 & 0x80 == 0 {
            return Err(FrameError::Unmasked);
        }
        let len7 = b1 & 0x7f;
        if opcode.is_control() {
            if !fin {
                return Err(FrameError::ControlFrameFragmented);
            }
            if len7 as usize > MAX_CONTROL_PAYLOAD {
                return Err(FrameError::ControlFrameTooLarge);
            }
        } else if opcode == OpCode::Continuation && !self.fragmented {
            return Err(FrameError::UnexpectedContinuation);
        } else if opcode != OpCode::Continuation && self.fragmented {
            return Err(FrameError::ExpectedContinuation);
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let size = 2 + ext + 4;
        if b.len() < size {
            return Ok(None);
        }
        let len = match ext {
            2 => u16::from_be_bytes([b[2], b[3]]) as u64,
            8 => u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
            _ => len7 as u64,
        };
        if len >> 63 != 0 {
            return Err(FrameError::LengthOverflow);
        }
        if len > self.max_frame {
            return Err(FrameError::FrameTooLarge { len, max: self.max_frame });
        }
        let mask = b[size - 4..size].try_into().expect("4 bytes");
        Ok(Some(Header { opcode, fin, len, size, mask }))
    }

    fn start_frame(&mut self, h: Header, on_event: &mut impl FnMut(Event<'_>)) {
        self.opcode = h.opcode;
        self.fin = h.fin;
        self.remaining = h.len;
        self.mask = h.mask;
        self.phase = 0;
        if !h.opcode.is_control() {
            self.fragmented = !h.fin;
            on_event(Event::DataFrame { opcode: h.opcode, fin: h.fin, len: h.len });
        }
    }

    fn finish_frame(&mut self, on_event: &mut impl FnMut(Event<'_>)) -> Result<(), FrameError> {
        if !self.opcode.is_control() {
            if self.fin {
                on_event(Event::MessageEnd);
            }
            return Ok(());
        }
        let result = if self.opcode == OpCode::Close { validate_close(&self.control) } else { Ok(()) };
        if result.is_ok() {
            self.closed |= self.opcode == OpCode::Close;
            on_event(Event::Control { opcode: self.opcode, payload: &self.control });
        }
        // Cleared, not freed: the allocation serves the next control frame.
        self.control.clear();
        result
    }
}

/// A Close payload is empty, or a sendable code followed by a UTF-8 reason.
fn validate_close(payload: &[u8]) -> Result<(), FrameError> {
    match payload {
        [] => Ok(()),
        [_] => Err(FrameError::CloseFrameTruncated),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !CloseCode(code).is_sendable() {
                return Err(FrameError::InvalidCloseCode(code));
            }
            std::str::from_utf8(reason).map_err(|_| FrameError::InvalidCloseReason)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::encode;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    const BIG: u64 = 1 << 24;

    fn masked(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode::frame(&mut v, fin, opcode, payload, Some(KEY));
        v
    }

    fn plain(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode::frame(&mut v, fin, opcode, payload, None);
        v
    }

    #[derive(Debug, PartialEq)]
    enum Seen {
        Data(OpCode, bool, u64),
        End,
        Control(OpCode, Vec<u8>),
    }

    struct Run {
        out: Vec<u8>,
        events: Vec<Seen>,
        result: Result<(), FrameError>,
    }

    /// Feeds `input` in reads of `read` bytes, each placed after HEADROOM like the data plane.
    fn run_split(max: u64, input: &[u8], read: usize) -> Run {
        let mut f = Forwarder::new(max);
        let mut run = Run { out: Vec::new(), events: Vec::new(), result: Ok(()) };
        let mut buf = vec![0u8; HEADROOM + read];
        for chunk in input.chunks(read) {
            buf[HEADROOM..HEADROOM + chunk.len()].copy_from_slice(chunk);
            let res = f.forward(&mut buf, HEADROOM..HEADROOM + chunk.len(), |e| {
                run.events.push(match e {
                    Event::DataFrame { opcode, fin, len } => Seen::Data(opcode, fin, len),
                    Event::MessageEnd => Seen::End,
                    Event::Control { opcode, payload } => Seen::Control(opcode, payload.to_vec()),
                })
            });
            match res {
                Ok(out) => run.out.extend_from_slice(&buf[out]),
                Err(e) => {
                    run.out.extend_from_slice(&buf[e.out.clone()]);
                    run.result = Err(e.error);
                    return run;
                }
            }
        }
        run
    }

    fn run(input: &[u8]) -> Run {
        run_split(BIG, input, input.len().max(1))
    }

    fn error_of(input: &[u8]) -> FrameError {
        run(input).result.expect_err("the input must be rejected")
    }

    #[test]
    fn a_masked_frame_leaves_unmasked() {
        let r = run(&masked(true, OpCode::Binary, b"hello"));
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.out, plain(true, OpCode::Binary, b"hello"));
        assert_eq!(r.events, vec![Seen::Data(OpCode::Binary, true, 5), Seen::End]);
    }

    #[test]
    fn every_length_form_passes_in_every_read_size() {
        let payloads: Vec<Vec<u8>> =
            [0, 1, 125, 126, 127, 65_535, 65_536, 100_000].iter().map(|&n| (0..n).map(|i| i as u8).collect()).collect();
        let mut input = Vec::new();
        let mut want = Vec::new();
        for p in &payloads {
            input.extend(masked(true, OpCode::Binary, p));
            want.extend(plain(true, OpCode::Binary, p));
        }
        for read in [1, 2, 3, 7, 13, 14, 15, 4096, 65_536, input.len()] {
            let r = run_split(BIG, &input, read);
            assert_eq!(r.result, Ok(()), "read {read}");
            assert!(r.out == want, "read {read}: output differs");
            assert_eq!(r.events.len(), 2 * payloads.len());
        }
    }

    #[test]
    fn a_frame_larger_than_the_buffer_streams_through() {
        let payload: Vec<u8> = (0..(1 << 20) + 3).map(|i| (i * 7) as u8).collect();
        let r = run_split(BIG, &masked(true, OpCode::Binary, &payload), 4096);
        assert_eq!(r.result, Ok(()));
        assert!(r.out == plain(true, OpCode::Binary, &payload));
    }

    #[test]
    fn control_frames_may_sit_between_fragments_and_arrive_whole() {
        let mut input = masked(false, OpCode::Text, b"he");
        input.extend(masked(true, OpCode::Ping, b"are you there"));
        input.extend(masked(false, OpCode::Continuation, b"ll"));
        input.extend(masked(true, OpCode::Pong, b""));
        input.extend(masked(true, OpCode::Continuation, b"o"));
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        input.extend(masked(true, OpCode::Close, &close));
        let want = vec![
            Seen::Data(OpCode::Text, false, 2),
            Seen::Control(OpCode::Ping, b"are you there".to_vec()),
            Seen::Data(OpCode::Continuation, false, 2),
            Seen::Control(OpCode::Pong, vec![]),
            Seen::Data(OpCode::Continuation, true, 1),
            Seen::End,
            Seen::Control(OpCode::Close, close.clone()),
        ];
        for read in [1, 5, input.len()] {
            let r = run_split(BIG, &input, read);
            assert_eq!(r.result, Ok(()));
            assert_eq!(r.events, want, "read {read}");
        }
    }

    #[test]
    fn an_empty_close_is_accepted() {
        assert_eq!(run(&masked(true, OpCode::Close, b"")).result, Ok(()));
    }

    #[test]
    fn an_unmasked_frame_is_a_protocol_error() {
        let e = error_of(&plain(true, OpCode::Binary, b"x"));
        assert_eq!(e, FrameError::Unmasked);
        assert_eq!(e.close_code(), CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn each_reserved_bit_is_a_protocol_error() {
        for bit in [0x40, 0x20, 0x10] {
            let mut f = masked(true, OpCode::Binary, b"x");
            f[0] |= bit;
            let e = error_of(&f);
            assert_eq!(e, FrameError::ReservedBits);
            assert_eq!(e.close_code().0, 1002);
        }
    }

    #[test]
    fn each_reserved_opcode_is_a_protocol_error() {
        for op in [3u8, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf] {
            let mut f = masked(true, OpCode::Binary, b"x");
            f[0] = 0x80 | op;
            assert_eq!(error_of(&f), FrameError::ReservedOpcode(op));
            assert_eq!(error_of(&f).close_code().0, 1002);
        }
    }

    #[test]
    fn a_control_frame_over_125_bytes_is_a_protocol_error() {
        for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
            let e = error_of(&masked(true, op, &[b'a'; 126]));
            assert_eq!(e, FrameError::ControlFrameTooLarge);
            assert_eq!(e.close_code().0, 1002);
        }
        assert_eq!(run(&masked(true, OpCode::Ping, &[b'a'; 125])).result, Ok(()));
    }

    #[test]
    fn a_fragmented_control_frame_is_a_protocol_error() {
        let e = error_of(&masked(false, OpCode::Ping, b"x"));
        assert_eq!(e, FrameError::ControlFrameFragmented);
        assert_eq!(e.close_code().0, 1002);
    }

    #[test]
    fn a_continuation_without_a_message_is_a_protocol_error() {
        assert_eq!(error_of(&masked(true, OpCode::Continuation, b"x")), FrameError::UnexpectedContinuation);
        let mut after_end = masked(true, OpCode::Binary, b"a");
        after_end.extend(masked(true, OpCode::Continuation, b"b"));
        assert_eq!(error_of(&after_end), FrameError::UnexpectedContinuation);
        assert_eq!(FrameError::UnexpectedContinuation.close_code().0, 1002);
    }

    #[test]
    fn a_new_message_inside_a_fragmented_one_is_a_protocol_error() {
        for op in [OpCode::Text, OpCode::Binary] {
            let mut input = masked(false, OpCode::Binary, b"a");
            input.extend(masked(true, op, b"b"));
            assert_eq!(error_of(&input), FrameError::ExpectedContinuation);
        }
        assert_eq!(FrameError::ExpectedContinuation.close_code().0, 1002);
    }

    #[test]
    fn a_64_bit_length_with_the_top_bit_set_is_a_protocol_error() {
        let mut f = vec![0x82, 0xff];
        f.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
        f.extend_from_slice(&KEY);
        let e = error_of(&f);
        assert_eq!(e, FrameError::LengthOverflow);
        assert_eq!(e.close_code().0, 1002);
    }

    #[test]
    fn a_frame_over_the_limit_is_too_big() {
        let input = masked(true, OpCode::Binary, &[0; 1001]);
        let r = run_split(1000, &input, input.len());
        assert_eq!(r.result, Err(FrameError::FrameTooLarge { len: 1001, max: 1000 }));
        assert_eq!(FrameError::FrameTooLarge { len: 1001, max: 1000 }.close_code(), CloseCode::MESSAGE_TOO_BIG);
        assert_eq!(run_split(1000, &masked(true, OpCode::Binary, &[0; 1000]), 64).result, Ok(()));
    }

    #[test]
    fn the_size_limit_is_checked_before_any_payload_arrives() {
        let mut head = [0; MAX_HEADER];
        let n = encode::header(&mut head, true, OpCode::Binary, 1 << 40, Some(KEY));
        let r = run_split(1000, &head[..n], n);
        assert_eq!(r.result, Err(FrameError::FrameTooLarge { len: 1 << 40, max: 1000 }));
    }

    #[test]
    fn bad_close_payloads_are_rejected_with_their_codes() {
        assert_eq!(error_of(&masked(true, OpCode::Close, &[3])), FrameError::CloseFrameTruncated);
        for code in [0u16, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000, 65_535] {
            let e = error_of(&masked(true, OpCode::Close, &code.to_be_bytes()));
            assert_eq!(e, FrameError::InvalidCloseCode(code));
            assert_eq!(e.close_code().0, 1002);
        }
        for code in [1000u16, 1001, 1003, 1007, 1011, 1012, 1013, 3000, 4001, 4999] {
            assert_eq!(run(&masked(true, OpCode::Close, &code.to_be_bytes())).result, Ok(()), "{code}");
        }
        let e = error_of(&masked(true, OpCode::Close, &[0x03, 0xe8, 0xff, 0xfe]));
        assert_eq!(e, FrameError::InvalidCloseReason);
        assert_eq!(e.close_code(), CloseCode::INVALID_PAYLOAD);
    }

    /// Regression (fuzz/regressions/frame_roundtrip/crash-7fa4…): a Close with code 1014 passed
    /// the relay but both reference implementations reject it as a protocol error.
    #[test]
    fn close_code_1014_is_refused_like_the_reference_implementations_do() {
        let input = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xf6];
        assert_eq!(run(&input).result, Err(FrameError::InvalidCloseCode(1014)));
    }

    #[test]
    fn nothing_may_follow_a_close() {
        let mut input = masked(true, OpCode::Close, b"");
        input.extend(masked(true, OpCode::Binary, b"late"));
        let e = error_of(&input);
        assert_eq!(e, FrameError::FrameAfterClose);
        assert_eq!(e.close_code().0, 1002);
    }

    #[test]
    fn frames_before_a_violation_are_output_and_the_error_sticks() {
        let mut input = masked(true, OpCode::Binary, b"good");
        input.extend(plain(true, OpCode::Binary, b"bad"));
        let mut f = Forwarder::new(BIG);
        let mut buf = vec![0u8; HEADROOM + input.len()];
        buf[HEADROOM..].copy_from_slice(&input);
        let e = f.forward(&mut buf, HEADROOM..HEADROOM + input.len(), |_| {}).unwrap_err();
        assert_eq!(e.error, FrameError::Unmasked);
        assert_eq!(&buf[e.out.clone()], &plain(true, OpCode::Binary, b"good")[..]);
        buf[HEADROOM..HEADROOM + 6].copy_from_slice(&masked(true, OpCode::Binary, b"")[..6]);
        let again = f.forward(&mut buf, HEADROOM..HEADROOM + 6, |_| {}).unwrap_err();
        assert_eq!(again.error, FrameError::Unmasked);
        assert!(again.out.is_empty());
    }

    #[test]
    fn a_close_before_a_violation_is_output_and_a_bad_close_is_not() {
        let mut input = masked(true, OpCode::Close, &1000u16.to_be_bytes());
        input.extend(plain(true, OpCode::Binary, b"late and unmasked"));
        let r = run(&input);
        assert_eq!(r.result, Err(FrameError::FrameAfterClose));
        assert_eq!(r.out, plain(true, OpCode::Close, &1000u16.to_be_bytes()));

        let mut input = masked(true, OpCode::Binary, b"good");
        input.extend(masked(true, OpCode::Close, &1005u16.to_be_bytes()));
        for read in [input.len(), 16] {
            let mut f = Forwarder::new(BIG);
            let mut out = Vec::new();
            let mut buf = vec![0u8; HEADROOM + read];
            let mut err = None;
            for chunk in input.chunks(read) {
                buf[HEADROOM..HEADROOM + chunk.len()].copy_from_slice(chunk);
                match f.forward(&mut buf, HEADROOM..HEADROOM + chunk.len(), |_| {}) {
                    Ok(o) => out.extend_from_slice(&buf[o]),
                    Err(e) => {
                        out.extend_from_slice(&buf[e.out.clone()]);
                        err = Some(e.error);
                        break;
                    }
                }
            }
            assert_eq!(err, Some(FrameError::InvalidCloseCode(1005)));
            let good = plain(true, OpCode::Binary, b"good");
            if read == input.len() {
                assert_eq!(out, good, "the bad Close is not output");
                assert!(f.at_frame_boundary());
            } else {
                // Split: the bad Close's header went out before its code was seen.
                assert!(out.starts_with(&good) && out.len() > good.len());
                assert!(!f.at_frame_boundary(), "the output is cut inside the bad frame");
            }
        }
    }

    #[test]
    fn a_partial_header_is_carried_into_the_headroom() {
        let frame = masked(true, OpCode::Binary, &[9; 70_000]);
        let mut f = Forwarder::new(BIG);
        let mut buf = vec![0u8; HEADROOM + 100_000];
        buf[HEADROOM..HEADROOM + 11].copy_from_slice(&frame[..11]);
        let out = f.forward(&mut buf, HEADROOM..HEADROOM + 11, |_| {}).unwrap();
        assert!(out.is_empty());
        assert_eq!(f.carried(), 11);
        assert!(f.at_frame_boundary(), "nothing of the carried header is output yet");
        assert_eq!(f.frame_remaining(), 0);
        let rest = frame.len() - 11;
        buf[HEADROOM..HEADROOM + rest].copy_from_slice(&frame[11..]);
        let out = f.forward(&mut buf, HEADROOM..HEADROOM + rest, |_| {}).unwrap();
        assert_eq!(out.start, HEADROOM - 11);
        assert!(buf[out] == plain(true, OpCode::Binary, &[9; 70_000])[..]);
        assert!(f.at_frame_boundary());
    }

    #[test]
    #[should_panic(expected = "carried")]
    fn a_caller_without_headroom_is_a_bug() {
        let frame = masked(true, OpCode::Binary, b"x");
        let mut f = Forwarder::new(BIG);
        let mut buf = frame.clone();
        f.forward(&mut buf, 0..3, |_| {}).unwrap();
        f.forward(&mut buf, 0..3, |_| {}).unwrap();
    }
}
