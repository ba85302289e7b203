//! The agent and session control channels under abuse: messages bounded whole, pings from a
//! peer that never reads, RFC 6455 held to, the relay's own Close not lost, peer text that
//! cannot forge log lines, and one agent per device.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::util::*;

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const PING: u8 = 0x9;

fn agent_path() -> String {
    format!("/api/v1/agent?device={DEVICE_ID}")
}

fn hello_padded_to(len: usize) -> String {
    let base = r#"{"type":"hello","services":["echo"],"version":""}"#;
    assert!(len >= base.len());
    base.replace(r#""version":"""#, &format!(r#""version":"{}""#, "v".repeat(len - base.len())))
}

/// Samples a process's RSS until `done`, keeping the peak.
fn peak_rss(pid: u32, done: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut peak = 0;
        while !done.load(Relaxed) {
            peak = peak.max(proc_rss_kib(pid));
            thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

#[test]
fn a_control_message_is_bounded_whole_fragments_included() {
    let relay = Relay::start("epoll", "[limits]\nmax_control_message_bytes = 1024\n");
    // Exactly the limit is a message the relay takes; one byte more closes with 1009.
    let mut at_limit = raw_ws(relay.addr, &agent_path(), DEVICE_KEY).unwrap();
    at_limit.write_all(&masked(true, TEXT, hello_padded_to(1024).as_bytes())).unwrap();
    relay.wait_device_online(DEVICE_ID, true);
    let mut over = raw_ws(relay.addr, "/api/v1/agent?device=dev-2", "dev-2-secret-key").unwrap();
    over.write_all(&masked(true, TEXT, hello_padded_to(1025).as_bytes())).unwrap();
    assert_eq!(read_raw_close(&mut over).unwrap().0, 1009);
    // The same limit holds across fragments: 1024 in three pieces passes, 1025 does not.
    let hello = hello_padded_to(1024);
    let (a, rest) = hello.as_bytes().split_at(400);
    let (b, c) = rest.split_at(400);
    let mut pieces = masked(false, TEXT, a);
    pieces.extend(masked(false, CONTINUATION, b));
    pieces.extend(masked(true, CONTINUATION, c));
    drop(at_limit);
    relay.wait_device_online(DEVICE_ID, false);
    let mut fragmented = raw_ws(relay.addr, &agent_path(), DEVICE_KEY).unwrap();
    fragmented.write_all(&pieces).unwrap();
    relay.wait_device_online(DEVICE_ID, true);

    // A message that never ends, on a session control connection (client token) and on an
    // agent connection (device key): closed with 1009 once past the limit, memory flat.
    let (id, _, token) = relay.start_session("echo", None);
    let rss_before = relay.rss_kib();
    let done = Arc::new(AtomicBool::new(false));
    let peak = peak_rss(relay.proc.pid(), done.clone());
    for (path, credential) in [(format!("/api/v1/sessions/{id}/control"), token.as_str()), (agent_path(), DEVICE_KEY)] {
        let mut s = raw_ws(relay.addr, &path, credential).unwrap();
        s.write_all(&masked(false, TEXT, b"{")).unwrap();
        let fragment = masked(false, CONTINUATION, &[b' '; 16 << 10]);
        let mut sent = 0u64;
        // Up to 256 MiB of continuation frames; the relay must close long before.
        while sent < 256 << 20 {
            if s.write_all(&fragment).is_err() {
                break;
            }
            sent += fragment.len() as u64;
        }
        // (The relay reads on for a moment after its Close, so that closing sends no RST over
        // unread bytes: how much was sent says nothing; the relay's memory does.)
        let close = read_raw_close(&mut s);
        assert_eq!(close.as_ref().map(|c| c.0), Ok(1009), "{path}: {close:?} after {sent} bytes sent");
    }
    done.store(true, Relaxed);
    let peak = peak.join().unwrap();
    eprintln!("unfinished control messages: relay RSS {rss_before} KiB -> peak {peak} KiB");
    // Before the fix the relay buffered the whole message: 256 MiB sent grew it by ~740 MiB.
    assert!(peak < rss_before + 32 * 1024, "relay RSS grew from {rss_before} to {peak} KiB");
    assert!(relay.metric("ringway_control_dropped_total") >= 3);
}

#[test]
fn pings_from_a_peer_that_never_reads_neither_grow_the_relay_nor_keep_the_connection() {
    let relay = Relay::start("epoll", "[limits]\nkeepalive_secs = 1\n");
    let (id, _, token) = relay.start_session("echo", None);
    let fds_before = relay.open_fds();
    let mut s = raw_ws(relay.addr, &format!("/api/v1/sessions/{id}/control"), &token).unwrap();
    // Never read: a small receive buffer fills at once with the relay's pongs.
    socket2::SockRef::from(&s).set_recv_buffer_size(4096).unwrap();
    // The relay's close may never reach a peer that does not read (its FIN waits behind the
    // unread pongs): a write that blocks this long counts as the end of the flood.
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let rss_before = relay.rss_kib();
    let done = Arc::new(AtomicBool::new(false));
    let peak = peak_rss(relay.proc.pid(), done.clone());
    let ping = masked(true, PING, &[b'p'; 125]);
    let batch: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 512).collect();
    let mut sent = 0u64;
    let began = Instant::now();
    // 45 MiB of pings, then one every 100 ms, until writes stop going through.
    while began.elapsed() < Duration::from_secs(30) {
        let chunk = if sent < 45 << 20 { &batch[..] } else { &ping[..] };
        if s.write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len() as u64;
        if sent >= 45 << 20 {
            thread::sleep(Duration::from_millis(100));
        }
    }
    // The relay dropped the connection: counted, and its descriptor closed. (Two loops: the
    // metric is read over an API connection, which holds a descriptor of its own for a moment.)
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.metric("ringway_control_dropped_total") == 0 {
        assert!(Instant::now() < deadline, "the relay kept a peer that never reads");
        thread::sleep(Duration::from_millis(100));
    }
    // Its writer gives up on the stalled write three keepalive periods after it began.
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.open_fds() > fds_before {
        assert!(
            Instant::now() < deadline,
            "the relay holds {} fds, {fds_before} before: {}",
            relay.open_fds(),
            relay.fd_report()
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Nor does its kernel keep the socket (an orphan in FIN-WAIT-1 behind the zero window would
    // hold up to a send buffer for minutes): the user timeout aborts it.
    let (ours, theirs) = (s.local_addr().unwrap(), relay.addr);
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Some(state) = tcp_state(theirs, ours) {
        assert!(Instant::now() < deadline, "the relay's socket to the peer lingers in TCP state {state}");
        thread::sleep(Duration::from_millis(100));
    }
    done.store(true, Relaxed);
    let peak = peak.join().unwrap();
    eprintln!(
        "{sent} bytes of pings from a peer that never reads: relay RSS {rss_before} KiB -> peak {peak} KiB, dropped within {:?}",
        began.elapsed()
    );
    // Bounded, not proportional: 16-256 MiB of pings measured +4-14 MiB (allocator noise); the
    // unbounded pong queue this replaced grew ~7 bytes per byte of pings.
    assert!(peak < rss_before + 32 * 1024, "relay RSS grew from {rss_before} to {peak} KiB");
}

#[test]
fn control_channels_hold_clients_to_rfc_6455_and_their_close_is_not_lost() {
    let relay = Relay::start("uring", "");
    let hello = r#"{"type":"hello","services":["echo"],"version":"t"}"#;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "an unmasked frame",
            {
                let mut f = vec![0x81, hello.len() as u8];
                f.extend_from_slice(hello.as_bytes());
                f
            },
            1002,
        ),
        ("invalid UTF-8 text", masked(true, TEXT, b"{\"type\":\"hello\xff\xfe\"}"), 1007),
        (
            "invalid UTF-8 across fragments",
            {
                let mut f = masked(false, TEXT, b"{\"a\":\"\xe2\x82");
                f.extend(masked(true, CONTINUATION, b"\xff\"}"));
                f
            },
            1007,
        ),
        ("a binary message", masked(true, BINARY, b"{}"), 1003),
        ("a continuation with no message", masked(true, CONTINUATION, b"x"), 1002),
        ("a close with a reserved code", masked(true, 0x8, &1005u16.to_be_bytes()), 1002),
    ];
    for (what, bytes, want) in cases {
        let mut s = raw_ws(relay.addr, &agent_path(), DEVICE_KEY).unwrap();
        s.write_all(&bytes).unwrap();
        assert_eq!(read_raw_close(&mut s).map(|c| c.0), Ok(want), "{what}");
    }
    // An invalid message followed at once by plenty more: the relay's Close must still arrive
    // (before the fix the socket was dropped with those bytes unread, and the RST lost it).
    for _ in 0..5 {
        let mut s = raw_ws(relay.addr, &agent_path(), DEVICE_KEY).unwrap();
        let mut burst = masked(true, TEXT, hello.as_bytes());
        burst.extend(masked(true, TEXT, b"not json"));
        for _ in 0..2000 {
            burst.extend(masked(true, TEXT, br#"{"type":"hello","services":[],"version":"more"}"#));
        }
        s.write_all(&burst).unwrap();
        thread::sleep(Duration::from_millis(200));
        assert_eq!(read_raw_close(&mut s).map(|c| c.0), Ok(1002));
    }
    assert_eq!(http(relay.addr, "GET", "/healthz", None, None).0, 200);
}

#[test]
fn text_a_peer_chooses_cannot_forge_log_lines_or_close_reasons() {
    let relay = Relay::start("epoll", "");
    let mut agent = raw_ws(relay.addr, &agent_path(), DEVICE_KEY).unwrap();
    agent.write_all(&masked(true, TEXT, br#"{"type":"hello","services":["echo"],"version":"t"}"#)).unwrap();
    relay.wait_device_online(DEVICE_ID, true);
    let (id, url, token) = relay.start_session("echo", None);
    let mut client = ws_connect(&url, &token);
    // The relay asks the agent to dial in; the agent answers with a forged reason.
    let connect = loop {
        let (b0, payload) = read_raw_frame(&mut agent).unwrap();
        if b0 & 0x0f == TEXT {
            break payload;
        }
    };
    let connect: serde_json::Value = serde_json::from_slice(&connect).unwrap();
    let forged = format!("refused\nFORGED-LINE relay started{}", "x".repeat(2000));
    let failed = serde_json::json!({"type":"connect_failed","session":id,"conn":connect["conn"],"reason":forged});
    agent.write_all(&masked(true, TEXT, failed.to_string().as_bytes())).unwrap();
    let (code, reason) = ws_wait_close(&mut client, Duration::from_secs(10));
    assert_eq!(code, 4001);
    assert!(reason.contains("refused\\nFORGED-LINE"), "the newline arrives escaped: {reason}");
    // An unknown message type with a newline in it.
    agent.write_all(&masked(true, TEXT, b"{\"type\":\"reboot\\nFORGED-LINE agent connected\"}")).unwrap();
    assert_eq!(read_raw_close(&mut agent).map(|c| c.0), Ok(1002));
    thread::sleep(Duration::from_millis(300));
    let log = relay.proc.stderr();
    assert!(log.contains("FORGED-LINE"), "the relay logged the messages: {log}");
    assert!(!log.lines().any(|l| l.starts_with("FORGED-LINE")), "a peer forged a log line:\n{log}");
    assert!(!log.contains(&"x".repeat(500)), "a peer's text is bounded in the log");
}

/// A raw agent (tungstenite) that answers pings while `answering` is set.
fn raw_agent(relay: &Relay, answering: Arc<AtomicBool>) -> (thread::JoinHandle<Option<(u16, String)>>, Arc<AtomicU64>) {
    let mut ws = ws_connect(&format!("ws://{}{}", relay.addr, agent_path()), DEVICE_KEY);
    ws.send(Message::text(r#"{"type":"hello","services":["echo"],"version":"raw"}"#)).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let connects = Arc::new(AtomicU64::new(0));
    let seen = connects.clone();
    let reader = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if !answering.load(Relaxed) {
                thread::sleep(Duration::from_millis(20));
                continue;
            }
            match ws.read() {
                Ok(Message::Close(c)) => return c.map(|c| (c.code.into(), c.reason.to_string())),
                Ok(Message::Text(t)) if t.contains("\"connect\"") => {
                    seen.fetch_add(1, Relaxed);
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return None,
            }
        }
        None
    });
    (reader, connects)
}

#[test]
fn a_second_agent_for_a_device_is_refused_while_the_first_answers_and_takes_over_when_it_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let relay = Relay::start("epoll", &format!("[audit]\npath = \"{}\"\n", audit.display()));
    let echo = echo_server();
    // Two real agents with the same id and key: the first keeps the device, the second is refused.
    let first = relay.agent(&[format!("echo={echo}")]);
    let second = spawn_agent(&relay.url(), &[format!("echo={echo}")]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.metric("ringway_agent_refusals_total") == 0 {
        assert!(Instant::now() < deadline, "the second agent was never refused: {}", relay.proc.stderr());
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(300));
    assert!(second.stderr().contains("another agent"), "the refused agent says why: {}", second.stderr());
    assert!(relay.proc.stderr().contains("agent refused"), "{}", relay.proc.stderr());
    assert_eq!(relay.metric("ringway_agent_takeovers_total"), 0, "the live agent kept its device");
    // Sessions still reach the first agent.
    let (_connect, local) = relay.connect("echo", &[]);
    let mut tcp = TcpStream::connect(local).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"still the first").unwrap();
    let mut buf = [0u8; 15];
    tcp.read_exact(&mut buf).unwrap();
    drop((first, second, tcp));
    relay.wait_device_online(DEVICE_ID, false);

    // A raw agent that goes silent (its TCP connection stays up): a newcomer probes it, gets no
    // answer within 5 s (min(keepalive_secs, 5)), and takes over; the silent one is told it was
    // replaced.
    let answering = Arc::new(AtomicBool::new(true));
    let (silent, _) = raw_agent(&relay, answering.clone());
    relay.wait_device_online(DEVICE_ID, true);
    answering.store(false, Relaxed);
    thread::sleep(Duration::from_millis(200));
    let (newcomer, connects) = raw_agent(&relay, Arc::new(AtomicBool::new(true)));
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.metric("ringway_agent_takeovers_total") == 0 {
        assert!(Instant::now() < deadline, "no takeover: {}", relay.proc.stderr());
        thread::sleep(Duration::from_millis(100));
    }
    let (_, url, token) = relay.start_session("echo", None);
    let _client = ws_connect(&url, &token);
    let deadline = Instant::now() + Duration::from_secs(10);
    while connects.load(Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the newcomer never got the device's connections");
        thread::sleep(Duration::from_millis(50));
    }
    answering.store(true, Relaxed);
    let replaced = silent.join().unwrap();
    assert_eq!(replaced.as_ref().map(|c| c.0), Some(4005), "{replaced:?}");
    drop(newcomer);
    let audit = std::fs::read_to_string(&audit).unwrap();
    assert!(audit.contains(r#""event":"agent_refused""#), "{audit}");
    assert!(audit.contains(r#""event":"agent_takeover""#), "{audit}");
    assert!(!audit.contains(DEVICE_KEY));
}
