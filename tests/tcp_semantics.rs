//! TCP's own semantics across the whole path (`connect` → relay → agent → service), plain and
//! TLS: a half-close in either direction leaves the other direction open, and a reset on either
//! side resets the other (a program must never mistake a cut stream for a complete one), while
//! another connection of the same session carries on.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use crate::util::*;

const LEN: usize = 1 << 20;

/// What the test service saw, reported per connection.
#[derive(Debug, PartialEq)]
enum Saw {
    /// Bytes read after it half-closed its own side.
    ReadAfterItsFin(usize),
    /// A read ended with a reset.
    Reset,
    /// A read ended with EOF instead.
    Eof,
    /// A read ended otherwise (or timed out).
    Other(String),
}

/// The device's service, driven by the client's first byte:
/// - `A`: read to EOF, then answer how many bytes came (the client half-closed first);
/// - `B`: send `LEN` bytes and half-close, then read to EOF and report the count;
/// - `W`: say ready (one byte), then wait for the client's reset and report how the read ended;
/// - `R`: reset the connection at once;
/// - `E`: echo.
fn scripted_service() -> (SocketAddr, mpsc::Receiver<Saw>) {
    let (tx, rx) = mpsc::channel();
    let addr = tcp_service(move |mut s| {
        let tx = tx.clone();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut cmd = [0u8; 1];
        if s.read_exact(&mut cmd).is_err() {
            return;
        }
        match cmd[0] {
            b'A' => {
                let n = std::io::copy(&mut s, &mut std::io::sink()).unwrap();
                s.write_all(format!("got {n}").as_bytes()).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
            }
            b'B' => {
                s.write_all(&pattern(LEN)).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                let saw = match std::io::copy(&mut s, &mut std::io::sink()) {
                    Ok(n) => Saw::ReadAfterItsFin(n as usize),
                    Err(e) => Saw::Other(e.to_string()),
                };
                let _ = tx.send(saw);
            }
            b'W' => {
                s.write_all(b"k").unwrap();
                let mut buf = [0u8; 4096];
                let saw = loop {
                    match s.read(&mut buf) {
                        Ok(0) => break Saw::Eof,
                        Ok(_) => continue,
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => break Saw::Reset,
                        Err(e) => break Saw::Other(e.to_string()),
                    }
                };
                let _ = tx.send(saw);
            }
            b'R' => reset(s),
            _ => {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            }
        }
    });
    (addr, rx)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Closes `s` with an RST (SO_LINGER 0).
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
}

/// relay (plain or TLS), agent and `connect` for the scripted service.
struct World {
    _relay: Relay,
    _agent: Proc,
    _connect: Proc,
    local: SocketAddr,
    saw: mpsc::Receiver<Saw>,
    _pki: tempfile::TempDir,
}

fn world(tls: bool) -> World {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(pki.path(), "relay");
    let extra = if tls { tls_config(&cert, &key) } else { String::new() };
    let relay = Relay::start("epoll", &extra);
    let url = format!("{}://127.0.0.1:{}", if tls { "https" } else { "http" }, relay.addr.port());
    let ca = ca.to_str().unwrap().to_string();
    let (service, saw) = scripted_service();
    let svc = format!("s={service}");
    let args = ["agent", "--relay", &url, "--ca", &ca, "--device", DEVICE_ID, "--key", DEVICE_KEY, "--service", &svc];
    let (agent, _) = Proc::spawn("agent", &args, false);
    let args =
        ["connect", "--relay", &url, "--ca", &ca, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "s"];
    let (connect, local) = connect_when_online(&args);
    World { _relay: relay, _agent: agent, _connect: connect, local, saw, _pki: pki }
}

fn dial(w: &World, cmd: u8) -> TcpStream {
    let mut s = TcpStream::connect(w.local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[cmd]).unwrap();
    s
}

fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap_or_else(|e| panic!("reading to EOF: {e} after {} bytes", out.len()));
    out
}

fn half_close_either_way(tls: bool) {
    let w = world(tls);
    // The client half-closes first: its FIN reaches the service, whose answer still comes back.
    let mut s = dial(&w, b'A');
    s.write_all(&pattern(LEN)).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(String::from_utf8(read_to_end(&mut s)).unwrap(), format!("got {LEN}"));

    // The service half-closes first: the client reads its EOF, then still sends.
    let mut s = dial(&w, b'B');
    assert!(read_to_end(&mut s) == pattern(LEN), "the service's bytes arrived altered");
    s.write_all(&pattern(64 << 10)).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(w.saw.recv_timeout(Duration::from_secs(20)).unwrap(), Saw::ReadAfterItsFin(64 << 10));
    read_to_end(&mut s);
}

#[test]
fn a_half_close_in_either_direction_keeps_the_other_open() {
    half_close_either_way(false);
}

#[test]
fn a_half_close_in_either_direction_keeps_the_other_open_over_tls() {
    half_close_either_way(true);
}

fn resets_cross(tls: bool) {
    let w = world(tls);
    let mut bystander = dial(&w, b'E');
    let echo = |s: &mut TcpStream, what: &[u8]| {
        s.write_all(what).unwrap();
        let mut back = vec![0u8; what.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, what);
    };
    echo(&mut bystander, b"before");

    // The client resets: the service's read ends in a reset, not an EOF.
    let mut s = dial(&w, b'W');
    let mut ready = [0u8; 1];
    s.read_exact(&mut ready).unwrap();
    reset(s);
    assert_eq!(w.saw.recv_timeout(Duration::from_secs(20)).unwrap(), Saw::Reset);

    // The service resets: the client's read ends in a reset, not an EOF.
    let mut s = dial(&w, b'R');
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the client should see the service's reset, got {other:?}"),
    }

    // The other connection of the session never noticed.
    echo(&mut bystander, b"after");
}

#[test]
fn a_reset_on_either_side_resets_the_other() {
    resets_cross(false);
}

#[test]
fn a_reset_on_either_side_resets_the_other_over_tls() {
    resets_cross(true);
}
