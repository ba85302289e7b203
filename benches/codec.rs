//! Micro-benchmarks of the frame codec, each beside a baseline in the same group.
//!
//! - `unmask/N`: ringway's unmask (in place, and moving 4 bytes down as the forwarder does)
//!   against `fastwebsockets::unmask` on the same N bytes.
//! - `forward/N`: the forwarder rewriting a 1 MiB stream of N-byte masked frames in place, in
//!   64 KiB reads (the data plane's read size), against the equivalent step done with
//!   fastwebsockets: its `unmask` over every frame's payload, no header work and no move.
//!
//! Run: `cargo bench --bench codec`. Figures are only comparable within one run.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ringway::ws::{encode, unmask, Forwarder, OpCode, HEADROOM, MAX_HEADER};
use std::hint::black_box;

const MASK: [u8; 4] = [0x9e, 0x11, 0x5a, 0xc3];
const STREAM: usize = 1 << 20;
const READ: usize = 64 << 10;

fn bench_unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for size in [20usize, 1 << 10, 16 << 10, 1 << 20] {
        let mut buf = vec![0x5au8; size + 4];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("fastwebsockets", size), &size, |b, &n| {
            b.iter(|| fastwebsockets::unmask(black_box(&mut buf[..n]), MASK))
        });
        g.bench_with_input(BenchmarkId::new("ringway_in_place", size), &size, |b, &n| {
            b.iter(|| unmask::unmask(black_box(&mut buf[..n]), MASK, 1))
        });
        g.bench_with_input(BenchmarkId::new("ringway_move4", size), &size, |b, &n| {
            b.iter(|| unmask::unmask_move(black_box(&mut buf), 4, 0, n, MASK, 1))
        });
        g.bench_with_input(BenchmarkId::new("ringway_words_move4", size), &size, |b, &n| {
            b.iter(|| unmask::words(black_box(&mut buf), 4, 0, n, MASK, 1))
        });
    }
    g.finish();
}

/// A stream of about `STREAM` bytes of masked binary frames of `size` bytes each, and the
/// payload ranges inside it.
fn masked_stream(size: usize) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
    let payload = vec![0xa5u8; size];
    let mut out = Vec::with_capacity(STREAM + MAX_HEADER * (STREAM / size + 1));
    let mut payloads = Vec::new();
    while out.len() < STREAM {
        encode::frame(&mut out, true, OpCode::Binary, &payload, Some(MASK));
        payloads.push(out.len() - size..out.len());
    }
    (out, payloads)
}

fn bench_forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward");
    g.sample_size(30);
    for size in [20usize, 1 << 10, 16 << 10, 1 << 20] {
        let (stream, payloads) = masked_stream(size);
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function(BenchmarkId::new("fastwebsockets_unmask", size), |b| {
            b.iter_batched_ref(
                || stream.clone(),
                |s| {
                    for p in &payloads {
                        fastwebsockets::unmask(&mut s[p.clone()], MASK);
                    }
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_function(BenchmarkId::new("ringway_forwarder", size), |b| {
            b.iter_batched_ref(
                || {
                    let mut v = vec![0u8; HEADROOM];
                    v.extend_from_slice(&stream);
                    v
                },
                |s| {
                    // Each 64 KiB window is one "read"; the carried header goes in front of it,
                    // over bytes of the window before, which were already "sent".
                    let mut f = Forwarder::new(1 << 30);
                    let mut sent = 0;
                    let mut at = HEADROOM;
                    while at < s.len() {
                        let end = (at + READ).min(s.len());
                        sent += f.forward(s, at..end, |_| {}).unwrap().len();
                        at = end;
                    }
                    black_box(sent)
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench_unmask, bench_forward);
criterion_main!(benches);
