//! The forwarder against two independent WebSocket implementations, frame for frame.
//!
//! Random frame streams (random opcodes, sizes from 0 to over 1 MiB, random fragmentation,
//! control frames interleaved) are masked by fastwebsockets and by tungstenite, fed to the
//! forwarder in random read sizes, and must come out byte-identical to what both libraries emit
//! for the same frames unmasked — and decode back, with both libraries, to the same messages.

use std::io::{Cursor, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringway::ws::{Forwarder, OpCode, HEADROOM};

/// One frame as generated: what every implementation is asked to encode.
#[derive(Clone, Debug)]
struct TestFrame {
    fin: bool,
    opcode: OpCode,
    payload: Vec<u8>,
    mask: [u8; 4],
}

/// One message as an application sees it after reassembly.
#[derive(Clone, Debug, PartialEq)]
enum Msg {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

fn payload_size(rng: &mut StdRng) -> usize {
    match rng.random_range(0..10) {
        0 => 0,
        1..=4 => rng.random_range(1..=125),
        5..=6 => rng.random_range(126..=65_536),
        7..=8 => rng.random_range(65_537..=300_000),
        _ => rng.random_range((1 << 20)..=(1 << 20) + 70_000),
    }
}

fn control(rng: &mut StdRng) -> (TestFrame, Msg) {
    let payload: Vec<u8> = (0..rng.random_range(0..=125)).map(|_| rng.random()).collect();
    let (opcode, msg) = if rng.random_bool(0.5) {
        (OpCode::Ping, Msg::Ping(payload.clone()))
    } else {
        (OpCode::Pong, Msg::Pong(payload.clone()))
    };
    (TestFrame { fin: true, opcode, payload, mask: rng.random() }, msg)
}

/// A random stream: data messages (some fragmented) with control frames between and inside
/// them, sometimes ending in a Close.
fn random_stream(rng: &mut StdRng) -> (Vec<TestFrame>, Vec<Msg>) {
    let mut frames = Vec::new();
    let mut msgs = Vec::new();
    for _ in 0..rng.random_range(1..8) {
        let text = rng.random_bool(0.3);
        let size = payload_size(rng);
        let payload: Vec<u8> = if text {
            (0..size).map(|_| rng.random_range(b' '..=b'~')).collect()
        } else {
            (0..size).map(|_| rng.random()).collect()
        };
        let pieces = if rng.random_bool(0.4) { rng.random_range(2..6) } else { 1 };
        let mut cuts: Vec<usize> = (1..pieces).map(|_| rng.random_range(0..=size)).collect();
        cuts.sort_unstable();
        cuts.insert(0, 0);
        cuts.push(size);
        for i in 0..pieces {
            let opcode = match (i, text) {
                (0, true) => OpCode::Text,
                (0, false) => OpCode::Binary,
                _ => OpCode::Continuation,
            };
            frames.push(TestFrame {
                fin: i + 1 == pieces,
                opcode,
                payload: payload[cuts[i]..cuts[i + 1]].to_vec(),
                mask: rng.random(),
            });
            if i + 1 < pieces && rng.random_bool(0.3) {
                let (f, m) = control(rng);
                frames.push(f);
                msgs.push(m);
            }
        }
        msgs.push(if text { Msg::Text(payload) } else { Msg::Binary(payload) });
        if rng.random_bool(0.2) {
            let (f, m) = control(rng);
            frames.push(f);
            msgs.push(m);
        }
    }
    if rng.random_bool(0.5) {
        let reason = "closing".repeat(rng.random_range(0..10));
        let code = [1000u16, 1001, 4001, 4003][rng.random_range(0..4)];
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        frames.push(TestFrame { fin: true, opcode: OpCode::Close, payload, mask: rng.random() });
        msgs.push(Msg::Close(Some((code, reason))));
    }
    (frames, msgs)
}

fn fws_opcode(op: OpCode) -> fastwebsockets::OpCode {
    match op {
        OpCode::Continuation => fastwebsockets::OpCode::Continuation,
        OpCode::Text => fastwebsockets::OpCode::Text,
        OpCode::Binary => fastwebsockets::OpCode::Binary,
        OpCode::Close => fastwebsockets::OpCode::Close,
        OpCode::Ping => fastwebsockets::OpCode::Ping,
        OpCode::Pong => fastwebsockets::OpCode::Pong,
    }
}

fn fws_encode(frames: &[TestFrame], masked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    for f in frames {
        let mask = masked.then_some(f.mask);
        let mut frame = fastwebsockets::Frame::new(f.fin, fws_opcode(f.opcode), mask, f.payload.clone().into());
        if masked {
            frame.mask();
        }
        out.extend_from_slice(frame.write(&mut scratch));
    }
    out
}

fn tung_encode(frames: &[TestFrame], masked: bool) -> Vec<u8> {
    use tungstenite::protocol::frame::coding::{Control, Data, OpCode as TOp};
    use tungstenite::protocol::frame::{Frame, FrameHeader};
    let mut out = Vec::new();
    for f in frames {
        let opcode = match f.opcode {
            OpCode::Continuation => TOp::Data(Data::Continue),
            OpCode::Text => TOp::Data(Data::Text),
            OpCode::Binary => TOp::Data(Data::Binary),
            OpCode::Close => TOp::Control(Control::Close),
            OpCode::Ping => TOp::Control(Control::Ping),
            OpCode::Pong => TOp::Control(Control::Pong),
        };
        let header = FrameHeader { is_final: f.fin, opcode, mask: masked.then_some(f.mask), ..Default::default() };
        Frame::from_payload(header, f.payload.clone().into()).format(&mut out).expect("format into a Vec");
    }
    out
}

/// Runs the forwarder over `input` in random read sizes, like the data plane does.
fn forward_in_random_reads(input: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut f = Forwarder::new(16 << 20);
    let mut out = Vec::with_capacity(input.len());
    let max_read = [7, 1 << 10, 16 << 10, 64 << 10][rng.random_range(0..4)];
    let mut buf = vec![0u8; HEADROOM + max_read];
    let mut at = 0;
    while at < input.len() {
        let n = rng.random_range(1..=max_read).min(input.len() - at);
        buf[HEADROOM..HEADROOM + n].copy_from_slice(&input[at..at + n]);
        let range = f.forward(&mut buf, HEADROOM..HEADROOM + n, |_| {}).expect("valid stream is accepted");
        out.extend_from_slice(&buf[range]);
        at += n;
    }
    assert_eq!(f.carried(), 0, "stream ended inside a header");
    assert!(f.at_frame_boundary());
    out
}

/// A stream for a decoder: reads come from the bytes under test, writes (pongs) are discarded.
struct Replay(Cursor<Vec<u8>>);

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl tokio::io::AsyncRead for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = this.0.read(buf.initialize_unfilled())?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Replay {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn tung_decode(bytes: Vec<u8>, count: usize) -> Vec<Msg> {
    use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
    use tungstenite::Message;
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20)).max_frame_size(Some(16 << 20));
    let mut ws = WebSocket::from_raw_socket(Replay(Cursor::new(bytes)), Role::Client, Some(config));
    (0..count)
        .map(|_| match ws.read().expect("tungstenite decodes the output") {
            Message::Text(t) => Msg::Text(t.as_bytes().to_vec()),
            Message::Binary(b) => Msg::Binary(b.to_vec()),
            Message::Ping(b) => Msg::Ping(b.to_vec()),
            Message::Pong(b) => Msg::Pong(b.to_vec()),
            Message::Close(c) => Msg::Close(c.map(|c| (u16::from(c.code), c.reason.to_string()))),
            Message::Frame(_) => unreachable!("read() never yields raw frames"),
        })
        .collect()
}

fn fws_decode(bytes: Vec<u8>, count: usize) -> Vec<Msg> {
    use fastwebsockets::{FragmentCollector, OpCode as F, Role, WebSocket};
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async move {
        let mut ws = WebSocket::after_handshake(Replay(Cursor::new(bytes)), Role::Client);
        ws.set_auto_pong(false);
        ws.set_auto_close(false);
        ws.set_max_message_size(64 << 20);
        let mut ws = FragmentCollector::new(ws);
        let mut msgs = Vec::new();
        for _ in 0..count {
            let f = ws.read_frame().await.expect("fastwebsockets decodes the output");
            let p = f.payload.to_vec();
            msgs.push(match f.opcode {
                F::Text => Msg::Text(p),
                F::Binary => Msg::Binary(p),
                F::Ping => Msg::Ping(p),
                F::Pong => Msg::Pong(p),
                F::Close if p.is_empty() => Msg::Close(None),
                F::Close => {
                    Msg::Close(Some((u16::from_be_bytes([p[0], p[1]]), String::from_utf8(p[2..].to_vec()).unwrap())))
                }
                F::Continuation => unreachable!("the collector reassembles continuations"),
            });
        }
        msgs
    })
}

#[test]
fn forwarder_output_matches_fastwebsockets_and_tungstenite_frame_for_frame() {
    let (mut total, mut over_1mib) = (0usize, 0usize);
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (frames, msgs) = random_stream(&mut rng);
        let masked = fws_encode(&frames, true);
        assert!(masked == tung_encode(&frames, true), "seed {seed}: the two libraries mask differently");
        let want = fws_encode(&frames, false);
        assert!(want == tung_encode(&frames, false), "seed {seed}: the two libraries frame differently");

        let out = forward_in_random_reads(&masked, &mut rng);
        assert_eq!(out.len(), masked.len() - 4 * frames.len(), "seed {seed}");
        assert!(out == want, "seed {seed}: forwarder output differs from the libraries' unmasked frames");

        assert_eq!(tung_decode(out.clone(), msgs.len()), msgs, "seed {seed}: tungstenite");
        assert_eq!(fws_decode(out, msgs.len()), msgs, "seed {seed}: fastwebsockets");
        total += masked.len();
        over_1mib += frames.iter().filter(|f| f.payload.len() > 1 << 20).count();
    }
    assert!(over_1mib >= 2, "frames over 1 MiB must be covered; {over_1mib} in {total} bytes");
}
