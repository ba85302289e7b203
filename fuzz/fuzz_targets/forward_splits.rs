//! Arbitrary bytes in arbitrary read splits: the forwarder must either reject them with the
//! same error it gives the bytes in one piece, or produce output identical to the one-piece
//! run — and everything read is accounted for (output + 4 bytes per header + carried == input).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ringway::ws::{Event, FrameError, Forwarder, OpCode, HEADROOM};

#[derive(Arbitrary, Debug)]
struct Input {
    small_limit: bool,
    splits: Vec<u16>,
    data: Vec<u8>,
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
    error: Option<FrameError>,
    carried: usize,
}

fn run(limit: u64, data: &[u8], reads: &[usize]) -> Run {
    let mut f = Forwarder::new(limit);
    let mut r = Run { out: Vec::new(), events: Vec::new(), error: None, carried: 0 };
    let mut buf = vec![0u8; HEADROOM + data.len()];
    let mut at = 0;
    for &n in reads {
        buf[HEADROOM..HEADROOM + n].copy_from_slice(&data[at..at + n]);
        at += n;
        let res = f.forward(&mut buf, HEADROOM..HEADROOM + n, |e| {
            r.events.push(match e {
                Event::DataFrame { opcode, fin, len } => Seen::Data(opcode, fin, len),
                Event::MessageEnd => Seen::End,
                Event::Control { opcode, payload } => Seen::Control(opcode, payload.to_vec()),
            })
        });
        match res {
            Ok(out) => {
                assert!(out.start >= HEADROOM - 13 && out.end <= HEADROOM + n);
                r.out.extend_from_slice(&buf[out]);
            }
            Err(e) => {
                r.out.extend_from_slice(&buf[e.out.clone()]);
                r.error = Some(e.error);
                return r;
            }
        }
        assert!(f.carried() <= 13, "a partial header is at most 13 bytes");
    }
    r.carried = f.carried();
    r
}

fuzz_target!(|input: Input| {
    let limit = if input.small_limit { 300 } else { 1 << 20 };
    let data = &input.data;
    let whole = run(limit, data, &[data.len()]);

    let mut reads = Vec::new();
    let mut left = data.len();
    for s in input.splits.iter().map(|&s| s as usize) {
        if left == 0 {
            break;
        }
        let n = s % (left + 1);
        reads.push(n);
        left -= n;
    }
    reads.push(left);
    let split = run(limit, data, &reads);

    assert_eq!(whole.error, split.error, "same verdict in any split");
    if whole.error.is_none() {
        assert!(whole.out == split.out, "same output in any split");
    } else {
        // The offending frame is never output; a split run may have output the start of an
        // offending control frame (at most its header and 125 bytes) before it was complete.
        assert!(split.out.starts_with(&whole.out), "same output before the violation");
        assert!(split.out.len() - whole.out.len() <= 2 + 125, "at most a control frame's start");
    }
    assert_eq!(whole.events, split.events, "same events in any split");
    if whole.error.is_none() {
        assert_eq!(whole.carried, split.carried);
        let removed = data.len() - whole.out.len() - whole.carried;
        assert_eq!(removed % 4, 0, "only masking keys are dropped");
    }
});
