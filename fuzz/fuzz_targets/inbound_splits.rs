//! The edges' decoder of the relay's frames, on arbitrary bytes in arbitrary read splits: it
//! must reach the same verdict as on the bytes in one piece (the same data bytes in order, the
//! same control frames, the same error), never read past what it was given, and never panic.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ringway::ws::inbound::{Inbound, Item};
use ringway::ws::FrameError;

#[derive(Arbitrary, Debug)]
struct Input {
    splits: Vec<u16>,
    data: Vec<u8>,
}

#[derive(Debug, PartialEq)]
struct Run {
    data: Vec<u8>,
    items: Vec<Item>,
    error: Option<FrameError>,
}

fn run(data: &[u8], reads: &[usize]) -> Run {
    let mut d = Inbound::default();
    let mut r = Run { data: Vec::new(), items: Vec::new(), error: None };
    let mut at = 0;
    for &n in reads {
        let piece = &data[at..at + n];
        at += n;
        let mut used = 0;
        while used < piece.len() {
            match d.next(&piece[used..]) {
                Ok((k, item)) => {
                    assert!(k > 0 && used + k <= piece.len(), "no progress, or past the input");
                    match item {
                        Some(Item::Data(range)) => {
                            assert!(range.end <= k, "data outside what was used");
                            r.data.extend_from_slice(&piece[used..][range]);
                        }
                        Some(other) => r.items.push(other),
                        None => {}
                    }
                    used += k;
                }
                Err(e) => {
                    r.error = Some(e);
                    return r;
                }
            }
        }
    }
    r
}

fuzz_target!(|input: Input| {
    let data = &input.data;
    let whole = run(data, &[data.len()]);
    let mut reads = Vec::new();
    let mut left = data.len();
    for s in &input.splits {
        if left == 0 {
            break;
        }
        let n = (*s as usize % left).max(1);
        reads.push(n);
        left -= n;
    }
    if left > 0 {
        reads.push(left);
    }
    let split = run(data, &reads);
    // Split reads may stop at an error only where the whole run does; data before it matches.
    assert_eq!(whole, split, "splits {reads:?}");
});
