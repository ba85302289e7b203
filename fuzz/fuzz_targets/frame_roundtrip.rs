//! Arbitrary message sequences, encoded as masked client frames (fragmented as the input
//! says), forwarded in arbitrary read splits, must decode — with tungstenite, an independent
//! implementation — to exactly the original messages.
#![no_main]

use std::io::{Cursor, Read, Write};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ringway::ws::{encode, CloseCode, Forwarder, OpCode, HEADROOM};
use tungstenite::protocol::{Role, WebSocket};
use tungstenite::Message;

#[derive(Arbitrary, Debug)]
enum In {
    Text { text: String, cuts: Vec<u16>, mask: [u8; 4] },
    Binary { data: Vec<u8>, cuts: Vec<u16>, mask: [u8; 4] },
    Ping { data: Vec<u8>, mask: [u8; 4] },
    Pong { data: Vec<u8>, mask: [u8; 4] },
    Close { code: u16, reason: String, mask: [u8; 4] },
}

#[derive(Arbitrary, Debug)]
struct Input {
    msgs: Vec<In>,
    reads: Vec<u16>,
}

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

/// Encodes `payload` as a message of `opcode` cut into fragments where `cuts` say.
fn fragments(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], cuts: &[u16], mask: [u8; 4]) {
    let mut at = 0;
    let mut op = opcode;
    for &c in cuts.iter().take(8) {
        let n = (c as usize) % (payload.len() - at + 1);
        encode::frame(out, false, op, &payload[at..at + n], Some(mask));
        at += n;
        op = OpCode::Continuation;
    }
    encode::frame(out, true, op, &payload[at..], Some(mask));
}

fn cut_str(s: &str, max: usize) -> &str {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

fuzz_target!(|input: Input| {
    let mut wire = Vec::new();
    let mut want = Vec::new();
    for m in &input.msgs {
        match m {
            In::Text { text, cuts, mask } => {
                fragments(&mut wire, OpCode::Text, text.as_bytes(), cuts, *mask);
                want.push(Message::text(text.clone()));
            }
            In::Binary { data, cuts, mask } => {
                fragments(&mut wire, OpCode::Binary, data, cuts, *mask);
                want.push(Message::binary(data.clone()));
            }
            In::Ping { data, mask } => {
                let d = &data[..data.len().min(125)];
                encode::frame(&mut wire, true, OpCode::Ping, d, Some(*mask));
                want.push(Message::Ping(d.to_vec().into()));
            }
            In::Pong { data, mask } => {
                let d = &data[..data.len().min(125)];
                encode::frame(&mut wire, true, OpCode::Pong, d, Some(*mask));
                want.push(Message::Pong(d.to_vec().into()));
            }
            In::Close { code, reason, mask } => {
                let code = if CloseCode(*code).is_sendable() { *code } else { 1000 };
                let reason = cut_str(reason, 123);
                let mut p = code.to_be_bytes().to_vec();
                p.extend_from_slice(reason.as_bytes());
                encode::frame(&mut wire, true, OpCode::Close, &p, Some(*mask));
                want.push(Message::Close(Some(tungstenite::protocol::CloseFrame {
                    code: code.into(),
                    reason: reason.to_string().into(),
                })));
                break;
            }
        }
    }

    let mut f = Forwarder::new(u64::MAX >> 1);
    let mut buf = vec![0u8; HEADROOM + wire.len()];
    let mut out = Vec::new();
    let mut at = 0;
    let mut reads = input.reads.iter().map(|&r| r as usize).chain(std::iter::repeat(usize::MAX));
    while at < wire.len() {
        let n = (reads.next().unwrap() % (wire.len() - at)) + 1;
        buf[HEADROOM..HEADROOM + n].copy_from_slice(&wire[at..at + n]);
        at += n;
        let range = f.forward(&mut buf, HEADROOM..HEADROOM + n, |_| {}).expect("a valid stream is accepted");
        out.extend_from_slice(&buf[range]);
    }
    assert!(f.at_frame_boundary());

    let mut ws = WebSocket::from_raw_socket(Replay(Cursor::new(out)), Role::Client, None);
    for m in want {
        assert_eq!(ws.read().expect("tungstenite decodes the forwarded stream"), m);
    }
});
