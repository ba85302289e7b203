//! Credentials, limits, bad input, faults, audit log and shutdown, against the real binary.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::util::*;

fn sha256_hex(s: &str) -> String {
    let out = std::process::Command::new("sh").arg("-c").arg(format!("printf %s '{s}' | sha256sum")).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// The status line's code for a raw request.
fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn ws_status(url: &str, token: &str) -> u16 {
    use tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let tcp = TcpStream::connect(req.uri().authority().unwrap().as_str()).unwrap();
    match tungstenite::client(req, tcp) {
        Ok(_) => 101,
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => resp.status().as_u16(),
        Err(e) => panic!("{url}: {e}"),
    }
}

#[test]
fn hashed_credentials_work_and_wrong_ones_get_401_without_a_hint() {
    let extra = format!(
        "[[operator]]\nname = \"hashed-op\"\ntoken_sha256 = \"{}\"\n[[device]]\nid = \"dev-3\"\nkey_sha256 = \"{}\"\n",
        sha256_hex("hashed-operator-token"),
        sha256_hex("hashed-device-key"),
    );
    let relay = Relay::start("uring", &extra);
    assert_eq!(http(relay.addr, "GET", "/api/v1/devices", Some("hashed-operator-token"), None).0, 200);
    assert_eq!(http(relay.addr, "GET", "/api/v1/devices", Some(&sha256_hex("hashed-operator-token")), None).0, 401);
    // A hashed device key opens its own device, and no other.
    let agent = format!("ws://{}/api/v1/agent?device=dev-3", relay.addr);
    assert_eq!(ws_status(&agent, "hashed-device-key"), 101);
    assert_eq!(ws_status(&format!("ws://{}/api/v1/agent?device={DEVICE_ID}", relay.addr), "hashed-device-key"), 401);
    assert_eq!(ws_status(&format!("ws://{}/api/v1/agent?device=no-such-device", relay.addr), DEVICE_KEY), 401);
}

#[test]
fn session_tokens_are_bound_to_their_session_and_side_and_die_with_it() {
    let relay = Relay::start("epoll", "");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let (id_a, url_a, token_a) = relay.start_session("echo", None);
    let (_, url_b, token_b) = relay.start_session("echo", None);
    assert_eq!(ws_status(&url_a, &token_a), 101);
    assert_eq!(ws_status(&url_a, &token_b), 401, "another session's token");
    assert_eq!(ws_status(&url_b, "x"), 401, "garbage token");
    let unknown = url_a.replace(&id_a, "0123456789abcdef");
    assert_eq!(ws_status(&unknown, &token_a), 401, "an unknown session looks like a wrong token");
    // The client token does not open the device side, nor the session's control for another.
    let device_side = url_a.replace("/client", "/device?conn=1");
    assert_eq!(ws_status(&device_side, &token_a), 401);
    // Closed: the token is dead.
    assert_eq!(http(relay.addr, "DELETE", &format!("/api/v1/sessions/{id_a}"), Some(OPERATOR_TOKEN), None).0, 204);
    assert_eq!(ws_status(&url_a, &token_a), 401);
    assert_eq!(ws_status(&url_a.replace("/client", "/control"), &token_a), 401);
    // Expired: the token is dead.
    let (_, url_c, token_c) = relay.start_session("echo", Some(1));
    thread::sleep(Duration::from_millis(1600));
    assert_eq!(ws_status(&url_c, &token_c), 401);
}

#[test]
fn repeated_login_failures_from_one_address_are_slowed_down() {
    let relay = Relay::start("epoll", "[limits]\nauth_failure_delay_ms = 1500\n");
    let mut slow = 0;
    for i in 0..8 {
        let began = Instant::now();
        assert_eq!(http(relay.addr, "GET", "/api/v1/sessions", Some("wrong"), None).0, 401);
        let took = began.elapsed();
        if i < 5 {
            assert!(took < Duration::from_millis(1500), "failure {i} took {took:?}");
        } else if took >= Duration::from_millis(1500) {
            slow += 1;
        }
    }
    assert_eq!(slow, 3, "failures after the fifth are held back");
    // The right token still works at once.
    assert_eq!(http(relay.addr, "GET", "/api/v1/sessions", Some(OPERATOR_TOKEN), None).0, 200);
}

#[test]
fn a_connection_that_never_finishes_its_request_is_closed_at_the_deadline() {
    let relay = Relay::start("uring", "[limits]\nhandshake_timeout_secs = 1\n");
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.write_all(b"GET /api/v1/sessions HTTP/1.1\r\nHost: x\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let began = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(began.elapsed() < Duration::from_secs(8), "closed only after {:?}", began.elapsed());
}

#[test]
fn an_idle_tunnel_is_closed_with_1001() {
    let relay = Relay::start("uring", "[limits]\nidle_timeout_secs = 1\n");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let (_, url, token) = relay.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    ws.send(Message::binary(b"x".to_vec())).unwrap();
    let (code, reason) = ws_wait_close(&mut ws, Duration::from_secs(10));
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains("idle"), "{reason}");
}

#[test]
fn connection_and_session_limits_answer_429() {
    let relay = Relay::start("epoll", "[limits]\nmax_connections_per_session = 2\nmax_sessions = 2\n");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let (_, url, token) = relay.start_session("echo", None);
    let _a = ws_connect(&url, &token);
    let _b = ws_connect(&url, &token);
    assert_eq!(ws_status(&url, &token), 429);
    relay.start_session("echo", None);
    let body = r#"{"device":"dev-1","service":"echo"}"#;
    assert_eq!(http(relay.addr, "POST", "/api/v1/sessions", Some(OPERATOR_TOKEN), Some(body)).0, 429);
}

#[test]
fn handshakes_beyond_the_limit_are_turned_away_and_the_relay_recovers() {
    let relay = Relay::start(
        "uring",
        "[limits]\nmax_handshakes = 4\nmax_handshakes_per_address = 2\nhandshake_timeout_secs = 30\n",
    );
    // Two idle connections from each of two other hosts fill the relay-wide limit.
    let idle: Vec<TcpStream> = [[127, 0, 0, 2], [127, 0, 0, 3]]
        .iter()
        .flat_map(|ip| (0..2).map(|_| connect_from(std::net::IpAddr::from(*ip), relay.addr).unwrap()))
        .collect();
    thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(relay.addr).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        read_to_close(&mut extra, Duration::from_secs(5)),
        Ok(Vec::new()),
        "the fifth connection is closed unanswered"
    );
    drop(idle);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(http(relay.addr, "GET", "/healthz", None, None).0, 200);
    assert!(relay.metric("ringway_handshake_failures_total{reason=\"limit\"}") >= 1);
}

#[test]
fn malformed_and_oversized_http_get_a_precise_status() {
    let relay = Relay::start("uring", "");
    assert_eq!(raw_status(relay.addr, b"GARBAGE\r\n\r\n"), 400);
    let big = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(40_000));
    assert_eq!(raw_status(relay.addr, big.as_bytes()), 431);
    let (id, url, token) = {
        let echo = echo_server();
        let _agent = relay.agent(&[format!("echo={echo}")]);
        relay.start_session("echo", None)
    };
    let _ = url;
    let path = format!("/api/v1/sessions/{id}/client");
    // Not an upgrade at all.
    let plain = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    assert_eq!(raw_status(relay.addr, plain.as_bytes()), 426);
    // An upgrade without a key, and with the wrong version.
    let no_key = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    assert_eq!(raw_status(relay.addr, no_key.as_bytes()), 400);
    let old = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
    );
    assert_eq!(raw_status(relay.addr, old.as_bytes()), 400);
    // The relay still serves.
    assert_eq!(http(relay.addr, "GET", "/healthz", None, None).0, 200);
}

/// Bad frames from a client: each gets its close code; a good tunnel beside them is untouched.
#[test]
fn bad_frames_get_their_close_code_and_harm_no_other_tunnel() {
    let relay = Relay::start("uring", "[limits]\nmax_frame_bytes = 4096\n");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let (_, url, token) = relay.start_session("echo", None);
    let mut good = ws_connect(&url, &token);
    good.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    let masked = |b0: u8, payload: &[u8]| {
        let mut f = vec![b0, 0x80 | payload.len() as u8, 1, 2, 3, 4];
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]));
        f
    };
    let mut too_big = vec![0x82, 0xfe, 0x13, 0x88, 1, 2, 3, 4];
    too_big.extend(vec![0u8; 5000]);
    let mut big_ping = vec![0x89, 0xfe, 0, 200, 1, 2, 3, 4];
    big_ping.extend(vec![0u8; 200]);
    let mut fragmented_then_new = masked(0x02, b"part");
    fragmented_then_new.extend(masked(0x82, b"new"));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", vec![0x82, 3, b'a', b'b', b'c'], 1002),
        ("reserved bit", masked(0xc2, b"x"), 1002),
        ("reserved opcode", masked(0x83, b"x"), 1002),
        ("control frame over 125 bytes", big_ping, 1002),
        ("fragmented ping", masked(0x09, b"x"), 1002),
        ("continuation without a start", masked(0x80, b"x"), 1002),
        ("new message inside a fragmented one", fragmented_then_new, 1002),
        ("frame over max_frame_bytes", too_big, 1009),
        ("close with a reserved code", masked(0x88, &1005u16.to_be_bytes()), 1002),
    ];
    for (what, bytes, want) in cases {
        let mut bad = ws_connect(&url, &token);
        bad.get_mut().write_all(&bytes).unwrap();
        let (code, reason) = ws_wait_close(&mut bad, Duration::from_secs(10));
        assert_eq!(code, want, "{what}: {reason}");
        // The good tunnel still echoes, byte for byte.
        let msg = format!("still fine after {what}");
        good.send(Message::binary(msg.clone().into_bytes())).unwrap();
        assert_eq!(good.read().unwrap(), Message::binary(msg.into_bytes()), "{what}");
    }
    assert!(relay.metric("ringway_frame_errors_total") >= 9);
}

#[test]
fn bad_messages_on_the_agent_channel_close_it_with_a_code() {
    let relay = Relay::start("epoll", "[limits]\nmax_control_message_bytes = 1024\n");
    let url = format!("ws://{}/api/v1/agent?device={DEVICE_ID}", relay.addr);
    let cases: Vec<(&str, String, u16)> =
        vec![("not JSON first", "hello?".into(), 1002), ("unknown type first", r#"{"type":"launch"}"#.into(), 1002)];
    for (what, msg, want) in cases {
        let mut ws = ws_connect(&url, DEVICE_KEY);
        ws.send(Message::text(msg)).unwrap();
        assert_eq!(ws_wait_close(&mut ws, Duration::from_secs(10)).0, want, "{what}");
    }
    // After a proper hello: invalid JSON, an unknown type and an oversized message.
    let hello = r#"{"type":"hello","services":["x"],"version":"test"}"#;
    for (what, msg, want) in [
        ("invalid JSON", "{".to_string(), 1002),
        ("unknown type", r#"{"type":"reboot"}"#.to_string(), 1002),
        ("oversized", format!(r#"{{"type":"hello","services":["{}"],"version":"x"}}"#, "a".repeat(4000)), 1009),
    ] {
        let mut ws = ws_connect(&url, DEVICE_KEY);
        ws.send(Message::text(hello)).unwrap();
        ws.send(Message::text(msg)).unwrap();
        assert_eq!(ws_wait_close(&mut ws, Duration::from_secs(10)).0, want, "{what}");
    }
    assert_eq!(http(relay.addr, "GET", "/healthz", None, None).0, 200);
}

#[test]
fn agents_reconnect_after_a_relay_restart_and_new_sessions_work() {
    let first = Relay::start("uring", "");
    let addr = first.addr;
    let echo = echo_server();
    let _agent = first.agent(&[format!("echo={echo}")]);
    let config = first.dir.path().join("relay.toml");
    let keep = first.dir.path().to_path_buf();
    let mut first = first;
    first.proc.kill();
    let dir = std::mem::replace(&mut first.dir, tempfile::tempdir().unwrap());
    // Same port, same config: the agent finds the new relay by itself.
    let (proc, got) = Proc::spawn(
        "relay",
        &["relay", "--listen", &addr.to_string(), "--config", config.to_str().unwrap(), "--backend", "uring"],
        true,
    );
    assert_eq!(got, Some(addr));
    let second = Relay { proc, addr, dir };
    let _ = keep;
    second.wait_device_online(DEVICE_ID, true);
    let (_, url, token) = second.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    ws.send(Message::binary(b"after restart".to_vec())).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(b"after restart".to_vec()));
}

#[test]
fn stalled_readers_hold_memory_flat_and_other_tunnels_keep_moving_on_io_uring() {
    stalled_readers("uring");
}

#[test]
fn stalled_readers_hold_memory_flat_and_other_tunnels_keep_moving_on_epoll() {
    stalled_readers("epoll");
}

/// More readers that never read than the worker has buffers: each keeps only its own unsent
/// bytes, none keeps a pool buffer, so the healthy tunnel beside them still moves every byte.
fn stalled_readers(backend: &str) {
    let relay = Relay::start(backend, "[dataplane]\nbuffers = 4\nbuffer_size = 16384\n");
    // A device service that writes as fast as it can, forever.
    let fire_addr = firehose_server(64 << 10);
    let echo = echo_server();
    let _agent = relay.agent(&[format!("fire={fire_addr}"), format!("echo={echo}")]);
    let (_, fire_url, fire_token) = relay.start_session("fire", None);
    let stalled: Vec<_> = (0..8).map(|_| ws_connect(&fire_url, &fire_token)).collect(); // never read
    thread::sleep(Duration::from_millis(500));
    let rss_before = relay.rss_kib();

    let (_connect, local) = relay.connect("echo", &[]);
    let tcp = TcpStream::connect(local).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let sum = send_noise(&mut w, 5, 64 << 20);
        w.shutdown(Shutdown::Write).unwrap();
        sum
    });
    let mut r = tcp;
    let got = read_all_sum(&mut r);
    assert_eq!(got, sender.join().unwrap(), "the healthy tunnel is byte-exact");
    let rss_after = relay.rss_kib();
    eprintln!(
        "{} stalled readers: relay RSS {rss_before} -> {rss_after} KiB while 64 MiB moved beside them",
        stalled.len()
    );
    assert!(rss_after < rss_before + 16 * 1024, "RSS grew from {rss_before} to {rss_after} KiB");
    drop(stalled);
}

#[test]
fn the_audit_log_records_sessions_and_connections_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let relay = Relay::start("epoll", &format!("[audit]\npath = \"{}\"\n", log.display()));
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let (id, url, token) = relay.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    ws.send(Message::binary(vec![1u8; 1000])).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(ws.read().unwrap().len(), 1000);
    ws.close(None).unwrap();
    let _ = ws_wait_close(&mut ws, Duration::from_secs(5));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(http(relay.addr, "DELETE", &format!("/api/v1/sessions/{id}"), Some(OPERATOR_TOKEN), None).0, 204);
    thread::sleep(Duration::from_millis(300));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["session_start", "connection_end", "session_end"], "{text}");
    let conn = &lines[1];
    assert_eq!(conn["operator"], "ops");
    assert_eq!(conn["device"], DEVICE_ID);
    assert_eq!(conn["service"], "echo");
    // Bytes the relay wrote to the device: the 1000-byte frame unmasked (4-byte header) and the
    // client's empty Close (2 bytes).
    assert_eq!(conn["bytes_to_device"].as_u64().unwrap(), 1004 + 2, "{conn}");
    assert!(conn["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(conn["reason"].as_str().unwrap().contains("client closed"), "{conn}");
    assert_eq!(lines[2]["code"], 4003);
    for secret in [OPERATOR_TOKEN, DEVICE_KEY, token.as_str()] {
        assert!(!text.contains(secret), "a secret leaked into the audit log");
    }
}

#[test]
fn sigterm_drains_then_closes_tunnels_with_1001() {
    let mut relay = Relay::start("uring", "[limits]\ndrain_timeout_secs = 1\n");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let (_, url, token) = relay.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    ws.send(Message::binary(b"x".to_vec())).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(b"x".to_vec()));
    // SAFETY-free: kill(1) sends SIGTERM.
    std::process::Command::new("kill").arg(relay.proc.pid().to_string()).status().unwrap();
    let (code, reason) = ws_wait_close(&mut ws, Duration::from_secs(10));
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains("shutting down"), "{reason}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = relay.proc.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the relay did not exit after SIGTERM");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn a_device_side_that_never_arrives_closes_the_client_with_4001_and_paired_tunnels_are_untouched() {
    let relay = Relay::start("uring", "[limits]\npair_timeout_secs = 1\n");
    // An agent that takes the relay's requests but never dials back.
    let mut mute = ws_connect(&format!("ws://{}/api/v1/agent?device={DEVICE_ID}", relay.addr), DEVICE_KEY);
    mute.send(Message::text(r#"{"type":"hello","services":["echo"],"version":"mute"}"#)).unwrap();
    relay.wait_device_online(DEVICE_ID, true);
    let (_, url, token) = relay.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    let (code, reason) = ws_wait_close(&mut ws, Duration::from_secs(10));
    assert_eq!(code, 4001, "{reason}");
    assert!(reason.contains("in time"), "{reason}");
    drop(mute);
    relay.wait_device_online(DEVICE_ID, false);

    // A real agent: the tunnel outlives the pairing deadline and can still be closed by the API.
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let (id, url, token) = relay.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    ws.send(Message::binary(b"hi".to_vec())).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(b"hi".to_vec()));
    thread::sleep(Duration::from_millis(2000));
    ws.send(Message::binary(b"still".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(b"still".to_vec()));
    assert_eq!(http(relay.addr, "DELETE", &format!("/api/v1/sessions/{id}"), Some(OPERATOR_TOKEN), None).0, 204);
    assert_eq!(ws_wait_close(&mut ws, Duration::from_secs(10)).0, 4003);
}

#[test]
fn a_stalled_audit_log_stalls_no_api_call_or_tunnel_and_says_what_it_dropped() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.pipe");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // A reader that never reads: the pipe (64 KiB) fills, and the relay's writes to it block.
    let mut reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
    let relay = Relay::start("epoll", &format!("[audit]\npath = \"{}\"\n", fifo.display()));
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    // Two audit lines per session: past the pipe and the writer's queue of 4,096 lines.
    for i in 0..2300 {
        let (id, _, _) = relay.start_session("echo", None);
        let path = format!("/api/v1/sessions/{id}");
        assert_eq!(http(relay.addr, "DELETE", &path, Some(OPERATOR_TOKEN), None).0, 204, "session {i}");
    }
    let (_, url, token) = relay.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    ws.send(Message::binary(b"still moving".to_vec())).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(b"still moving".to_vec()));
    // The disk comes back: the audit log says how many lines it lost.
    let mut text = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !String::from_utf8_lossy(&text).contains("audit_lines_dropped") {
        assert!(Instant::now() < deadline, "the audit log never said it dropped lines");
        let mut buf = [0u8; 65536];
        match reader.read(&mut buf) {
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    // The relay's log says so too (its stderr is read by a thread of the test: give it a moment).
    while !relay.proc.stderr().contains("lines dropped") {
        assert!(Instant::now() < deadline, "the relay's log never said it dropped audit lines");
        thread::sleep(Duration::from_millis(20));
    }
}
