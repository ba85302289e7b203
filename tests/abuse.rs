//! The relay tried as an attacker and a flaky network would: close codes on busy tunnels,
//! lockouts (one address, parallel guessing, sessions nobody uses), blips on control
//! connections, tunnels whose client left a service that never reads, config typos, and
//! messages a newcomer can act on.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::util::*;

const OTHER_HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// An agent played by the test: it says hello for `services` and hands back the relay's
/// connect requests; the test opens the device sides itself.
struct MuteAgent {
    ws: TcpStream,
}

impl MuteAgent {
    fn start(relay: &Relay, services: &str) -> MuteAgent {
        let mut ws = raw_ws(relay.addr, &format!("/api/v1/agent?device={DEVICE_ID}"), DEVICE_KEY).unwrap();
        let hello = format!(r#"{{"type":"hello","services":["{services}"],"version":"mute"}}"#);
        ws.write_all(&masked(true, 0x1, hello.as_bytes())).unwrap();
        relay.wait_device_online(DEVICE_ID, true);
        MuteAgent { ws }
    }

    /// The next connect request: (device path, device token).
    fn next_connect(&mut self) -> (String, String) {
        loop {
            let (b0, payload) = read_raw_frame(&mut self.ws).expect("the relay's connect request");
            if b0 & 0x0f != 0x1 {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            let path = format!("/api/v1/sessions/{}/device?conn={}", v["session"].as_str().unwrap(), v["conn"]);
            return (path, v["token"].as_str().unwrap().to_string());
        }
    }
}

/// A client connection paired with a device side the test writes by hand.
fn hand_made_tunnel(relay: &Relay, agent: &mut MuteAgent) -> (String, tungstenite::WebSocket<TcpStream>, TcpStream) {
    let (id, url, token) = relay.start_session("svc", None);
    let client = ws_connect(&url, &token);
    let (path, device_token) = agent.next_connect();
    let device = raw_ws(relay.addr, &path, &device_token).unwrap();
    (id, client, device)
}

/// The device side starts a 100,000-byte frame and sends 1,000 bytes of it; `end` ends the
/// session; then the rest of the frame follows. The client must get the whole frame, then the
/// session's close code.
fn close_mid_frame(relay: &Relay, agent: &mut MuteAgent, end: impl FnOnce(&str), want: u16) {
    let (id, mut client, mut device) = hand_made_tunnel(relay, agent);
    let frame = masked(true, 0x2, &[0xab; 100_000]);
    let head = 8 + 4; // 127-length form: 2 + 8, and the mask
    device.write_all(&frame[..head + 1000]).unwrap();
    thread::sleep(Duration::from_millis(200));
    end(&id);
    // The rest of the frame comes after the relay decided to end the tunnel (and, on shutdown,
    // after its drain period).
    thread::sleep(Duration::from_millis(1500));
    let _ = device.write_all(&frame[head + 1000..]);
    client.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match client.read() {
        Ok(Message::Binary(b)) => assert_eq!(b.len(), 100_000, "the frame in flight arrives whole"),
        other => panic!("expected the frame in flight, got {other:?}"),
    }
    let (code, reason) = ws_wait_close(&mut client, Duration::from_secs(10));
    assert_eq!(code, want, "{reason}");
}

#[test]
fn a_tunnel_stopped_in_the_middle_of_a_frame_finishes_it_then_sends_the_close_code() {
    let mut relay = Relay::start("uring", "[limits]\ndrain_timeout_secs = 1\n");
    let mut agent = MuteAgent::start(&relay, "svc");
    let addr = relay.addr;
    // An operator closes the session.
    close_mid_frame(
        &relay,
        &mut agent,
        |id| assert_eq!(http(addr, "DELETE", &format!("/api/v1/sessions/{id}"), Some(OPERATOR_TOKEN), None).0, 204),
        4003,
    );
    // The relay shuts down: 1001, after the frame in flight.
    let pid = relay.proc.pid();
    close_mid_frame(
        &relay,
        &mut agent,
        |_| assert!(std::process::Command::new("kill").arg(pid.to_string()).status().unwrap().success()),
        1001,
    );
    let status = relay.proc.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_tunnel_whose_device_is_lost_in_the_middle_of_a_frame_finishes_it_then_sends_4004() {
    let relay = Relay::start("epoll", "[limits]\nagent_grace_secs = 1\n");
    let mut agent = MuteAgent::start(&relay, "svc");
    let (_, mut client, mut device) = hand_made_tunnel(&relay, &mut agent);
    let frame = masked(true, 0x2, &[0xcd; 100_000]);
    device.write_all(&frame[..12 + 1000]).unwrap();
    thread::sleep(Duration::from_millis(200));
    // The agent's control connection goes (its data connection stays); the device is declared
    // lost a second later, while its frame is still in flight.
    drop(agent);
    thread::sleep(Duration::from_millis(1800));
    device.write_all(&frame[12 + 1000..]).unwrap();
    client.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match client.read() {
        Ok(Message::Binary(b)) => assert_eq!(b.len(), 100_000, "the frame in flight arrives whole"),
        other => panic!("expected the frame in flight, got {other:?}"),
    }
    assert_eq!(ws_wait_close(&mut client, Duration::from_secs(10)).0, 4004);
}

#[test]
fn every_busy_tunnel_hears_its_close_code() {
    let relay = Relay::start("epoll", "[limits]\nmax_connections_per_session = 64\n");
    // A device service that writes as fast as it can until the connection ends.
    let fire = firehose_server(48 << 10);
    // The agent's connections go through a proxy that passes them on in 16 KiB pieces a
    // millisecond apart, as a slow device uplink would: the relay mostly holds part of a frame
    // when the session ends.
    let proxy = BlipProxy::throttled(relay.addr, 16 << 10, Duration::from_millis(1));
    let _agent = spawn_agent(&proxy.url(), &[format!("fire={fire}")]);
    relay.wait_device_online(DEVICE_ID, true);
    for (end, want) in [("delete", 4003), ("expire", 4002)] {
        let ttl = if end == "expire" { Some(3) } else { None };
        let (id, url, token) = relay.start_session("fire", ttl);
        let readers: Vec<_> = (0..10)
            .map(|_| {
                let mut ws = ws_connect(&url, &token);
                ws.get_mut().set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                thread::spawn(move || loop {
                    match ws.read() {
                        Ok(Message::Close(Some(c))) => return Ok(u16::from(c.code)),
                        Ok(Message::Close(None)) => return Ok(1005),
                        Ok(_) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(1500));
        if end == "delete" {
            assert_eq!(
                http(relay.addr, "DELETE", &format!("/api/v1/sessions/{id}"), Some(OPERATOR_TOKEN), None).0,
                204
            );
        }
        let codes: Vec<Result<u16, String>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        let heard = codes.iter().filter(|c| **c == Ok(want)).count();
        eprintln!("{end}: {heard} of 10 busy tunnels heard {want}: {codes:?}");
        assert_eq!(heard, 10, "{codes:?}");
    }
}

#[test]
fn a_close_followed_by_a_bad_frame_still_reaches_the_other_side() {
    let relay = Relay::start("uring", "");
    let mut agent = MuteAgent::start(&relay, "svc");
    let (_, mut client, mut device) = hand_made_tunnel(&relay, &mut agent);
    let mut segment = masked(true, 0x8, &1000u16.to_be_bytes());
    segment.extend([0x82, 3, b'b', b'a', b'd']); // unmasked: a protocol error
    client.get_mut().write_all(&segment).unwrap();
    assert_eq!(read_raw_close(&mut device).map(|c| c.0), Ok(1000), "the client's Close reached the device");
}

#[test]
fn one_address_flooding_handshakes_locks_out_nobody_else() {
    // 256 slots; the default share is 64, so past half (128 in use) the flooding host gets no more.
    let relay = Relay::start("epoll", "[limits]\nmax_handshakes = 256\nhandshake_timeout_secs = 30\n");
    let held: Vec<TcpStream> = (0..300).filter_map(|_| connect_from(OTHER_HOST, relay.addr).ok()).collect();
    assert_eq!(held.len(), 300);
    thread::sleep(Duration::from_millis(500));
    // Everyone else is served: health, the API, an agent, tunnels.
    assert_eq!(http(relay.addr, "GET", "/healthz", None, None).0, 200);
    assert_eq!(http(relay.addr, "GET", "/api/v1/sessions", Some(OPERATOR_TOKEN), None).0, 200);
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let (_, url, token) = relay.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    ws.send(Message::binary(b"served".to_vec())).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(b"served".to_vec()));
    // The flooding address got half the slots and no more: the relay closed the rest at once.
    let turned_away = relay.metric("ringway_handshake_failures_total{reason=\"address_limit\"}");
    assert!(turned_away >= 172, "turned away {turned_away}");
    let closed = held
        .iter()
        .filter(|s| {
            let mut s = *s;
            s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            match s.read(&mut [0u8; 16]) {
                Ok(0) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        })
        .count();
    assert!(closed >= 172, "the relay closed {closed} of the flooding host's 300 connections");
}

#[test]
fn an_api_request_whose_body_never_arrives_gets_408() {
    let relay = Relay::start("epoll", "[limits]\nhandshake_timeout_secs = 1\n");
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"device\":"
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp:?}");
}

#[test]
fn parallel_wrong_tokens_from_one_address_are_checked_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let relay = Relay::start(
        "epoll",
        &format!("[limits]\nauth_failure_delay_ms = 200\n[audit]\npath = \"{}\"\n", audit.display()),
    );
    let addr = relay.addr;
    let start = Arc::new(Barrier::new(40));
    let attempts: Vec<_> = (0..40)
        .map(|i| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                http_from(OTHER_HOST, addr, "GET", "/api/v1/sessions", Some(&format!("guess-{i:04}"))).0
            })
        })
        .collect();
    let statuses: Vec<u16> = attempts.into_iter().map(|a| a.join().unwrap()).collect();
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    eprintln!("40 parallel guesses: {checked} checked (401), {refused} refused unchecked (429)");
    assert_eq!(checked + refused, 40, "{statuses:?}");
    // 5 free, 8 queued one per 200 ms, and at most a couple racing in across the two workers.
    assert!(checked <= 5 + 8 + 2, "the relay checked {checked} guesses from one address at once");
    assert_eq!(relay.metric("ringway_handshake_failures_total{reason=\"throttled\"}"), refused as u64);
    // Another address is not slowed down.
    let began = Instant::now();
    assert_eq!(http(relay.addr, "GET", "/api/v1/sessions", Some(OPERATOR_TOKEN), None).0, 200);
    assert!(began.elapsed() < Duration::from_secs(2));
    // Every failed login is audited with its address and kind of credential, never the value.
    let text = std::fs::read_to_string(&audit).unwrap();
    let failed: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["event"] == "auth_failed")
        .collect();
    assert_eq!(failed.len(), checked, "{text}");
    assert!(failed
        .iter()
        .all(|l| l["addr"].as_str().unwrap().starts_with("127.0.0.2:") && l["credential"] == "operator_token"));
    assert!(!text.contains("guess-"), "a presented credential leaked into the audit log");
    assert!(relay.proc.stderr().contains("login failed"));
    assert!(!relay.proc.stderr().contains("guess-"));
}

#[test]
fn an_operator_sees_and_ends_only_its_own_sessions() {
    let relay = Relay::start("epoll", "[[operator]]\nname = \"ops2\"\ntoken = \"ops2-secret-token\"\n");
    let (mine, _, _) = relay.start_session("echo", None);
    let body = format!(r#"{{"device":"{DEVICE_ID}","service":"echo"}}"#);
    let (status, theirs) = http(relay.addr, "POST", "/api/v1/sessions", Some("ops2-secret-token"), Some(&body));
    assert_eq!(status, 201);
    let theirs = serde_json::from_str::<serde_json::Value>(&theirs).unwrap()["id"].as_str().unwrap().to_string();
    let (_, list) = http(relay.addr, "GET", "/api/v1/sessions", Some("ops2-secret-token"), None);
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(list.iter().map(|s| s["id"].as_str().unwrap()).collect::<Vec<_>>(), [theirs.as_str()]);
    let path = format!("/api/v1/sessions/{mine}");
    assert_eq!(http(relay.addr, "GET", &path, Some("ops2-secret-token"), None).0, 404);
    assert_eq!(http(relay.addr, "DELETE", &path, Some("ops2-secret-token"), None).0, 404);
    assert_eq!(http(relay.addr, "GET", &path, Some(OPERATOR_TOKEN), None).0, 200, "the session lives on");
}

#[test]
fn admins_see_all_sessions_operators_are_capped_and_unattached_sessions_are_reaped() {
    let extra = "[[operator]]\nname = \"ops2\"\ntoken = \"ops2-secret-token\"\n\
                 [[operator]]\nname = \"boss\"\ntoken = \"boss-secret-token\"\nrole = \"admin\"\n\
                 [limits]\nmax_sessions_per_operator = 2\nattach_timeout_secs = 2\n";
    let relay = Relay::start("epoll", extra);
    let start = |token: &str| {
        let body = format!(r#"{{"device":"{DEVICE_ID}","service":"echo"}}"#);
        http(relay.addr, "POST", "/api/v1/sessions", Some(token), Some(&body))
    };
    let id_of =
        |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["id"].as_str().unwrap().to_string();
    let (s1, b1) = start(OPERATOR_TOKEN);
    let (s2, _) = start(OPERATOR_TOKEN);
    assert_eq!((s1, s2), (201, 201));
    let (s3, b3) = start(OPERATOR_TOKEN);
    assert_eq!(s3, 429, "{b3}");
    assert!(b3.contains("max_sessions_per_operator"), "{b3}");
    let (s4, b4) = start("ops2-secret-token");
    assert_eq!(s4, 201, "another operator is not held to the first one's cap: {b4}");
    let (mine, theirs) = (id_of(&b1), id_of(&b4));
    // ops2 sees only its own session, and cannot see or end one of ops's.
    let (_, list) = http(relay.addr, "GET", "/api/v1/sessions", Some("ops2-secret-token"), None);
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], theirs.as_str());
    let path = format!("/api/v1/sessions/{mine}");
    assert_eq!(http(relay.addr, "GET", &path, Some("ops2-secret-token"), None).0, 404);
    assert_eq!(http(relay.addr, "DELETE", &path, Some("ops2-secret-token"), None).0, 404);
    // The admin sees every session and may end any.
    let (_, all) = http(relay.addr, "GET", "/api/v1/sessions", Some("boss-secret-token"), None);
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&all).unwrap().len(), 3);
    assert_eq!(http(relay.addr, "DELETE", &path, Some("boss-secret-token"), None).0, 204);
    // A session someone attached to lives on; the ones nobody attached to are reaped.
    let (kept, _, token) = relay.start_session("echo", None);
    let _control = ws_connect(&format!("ws://{}/api/v1/sessions/{kept}/control", relay.addr), &token);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, all) = http(relay.addr, "GET", "/api/v1/sessions", Some("boss-secret-token"), None);
        let ids: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&all)
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        if ids == [kept.clone()] {
            break;
        }
        assert!(Instant::now() < deadline, "unattached sessions were not reaped: {ids:?}");
        thread::sleep(Duration::from_millis(200));
    }
    // With its sessions reaped, ops may start new ones again.
    assert_eq!(start(OPERATOR_TOKEN).0, 201);
}

#[test]
fn a_tunnel_whose_client_left_a_service_that_never_reads_ends_within_the_close_timeout() {
    let relay = Relay::start("epoll", "[limits]\nclose_timeout_secs = 1\n");
    // A device service that accepts and never reads.
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let holder = thread::spawn(move || {
        let (_held, _) = sink.accept().unwrap();
        while !stopped.load(Relaxed) {
            thread::sleep(Duration::from_millis(50));
        }
    });
    let _agent = relay.agent(&[format!("sink={sink_addr}")]);
    let (_, url, token) = relay.start_session("sink", None);
    let mut ws = ws_connect(&url, &token);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(relay.metric("ringway_tunnels_active"), 1);
    // Write until every buffer on the way is full, then leave.
    ws.get_mut().set_nonblocking(true).unwrap();
    let frame = masked(true, 0x2, &[7u8; 60 << 10]);
    let mut at = 0; // whole frames only: a frame cut short would be a protocol error
    let mut stuck_since = Instant::now();
    while stuck_since.elapsed() < Duration::from_secs(1) {
        match ws.get_mut().write(&frame[at..]) {
            Ok(n) if n > 0 => {
                at = (at + n) % frame.len();
                stuck_since = Instant::now();
            }
            _ => thread::sleep(Duration::from_millis(10)),
        }
    }
    // The client aborts (a crash, a killed browser): RST. (A graceful FIN would wait in the
    // client's kernel behind the bytes the relay cannot take; the relay cannot see it, and the
    // idle timeout bounds that case.)
    let left = Instant::now();
    socket2::SockRef::from(ws.get_ref()).set_linger(Some(Duration::ZERO)).unwrap();
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.metric("ringway_tunnels_active") != 0 {
        assert!(Instant::now() < deadline, "the tunnel outlived its client by 15 s");
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("tunnel ended {:?} after its client left", left.elapsed());
    stop.store(true, Relaxed);
    holder.join().unwrap();
}

#[test]
fn a_reset_of_the_agents_control_connection_leaves_its_tunnels_running() {
    let relay = Relay::start("epoll", "");
    let proxy = BlipProxy::start(relay.addr);
    let echo = echo_server();
    let _agent = spawn_agent(&proxy.url(), &[format!("echo={echo}")]);
    relay.wait_device_online(DEVICE_ID, true);
    let (_, url, token) = relay.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let echo_once = |ws: &mut tungstenite::WebSocket<TcpStream>, i: u32| {
        let msg = format!("message {i}");
        ws.send(Message::binary(msg.clone().into_bytes())).unwrap();
        match ws.read() {
            Ok(m) => assert_eq!(m, Message::binary(msg.into_bytes())),
            Err(e) => panic!("the tunnel broke after the blip: {e}"),
        }
    };
    echo_once(&mut ws, 0);
    assert_eq!(proxy.reset("/api/v1/agent?"), 1, "the agent's control connection went through the proxy");
    for i in 1..=30 {
        echo_once(&mut ws, i);
        thread::sleep(Duration::from_millis(100));
    }
    relay.wait_device_online(DEVICE_ID, true);
    assert!(relay.proc.stderr().contains("reconnected within its grace period"), "{}", relay.proc.stderr());
    echo_once(&mut ws, 31);
}

#[test]
fn a_reset_of_connects_control_connection_reattaches_and_keeps_its_tunnels() {
    let relay = Relay::start("epoll", "");
    let proxy = BlipProxy::start(relay.addr);
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let url = proxy.url();
    let (mut connect, local) = {
        let args = ["connect", "--relay", &url, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "echo"];
        let (p, a) = Proc::spawn("connect", &args, true);
        (p, a.unwrap())
    };
    let mut tcp = TcpStream::connect(local).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut echo_once = |i: u32| {
        let msg = format!("message {i:04}");
        tcp.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        tcp.read_exact(&mut buf).unwrap_or_else(|e| panic!("the tunnel broke after the blip: {e}"));
        assert_eq!(buf, msg.as_bytes());
    };
    echo_once(0);
    assert_eq!(proxy.reset("/control"), 1, "connect's control connection went through the proxy");
    for i in 1..=30 {
        echo_once(i);
        thread::sleep(Duration::from_millis(100));
    }
    assert!(connect.try_wait_ref().is_none(), "connect exited after a blip: {}", connect.stderr());
    // Re-attached: the relay sees the client again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let (_, list) = http(relay.addr, "GET", "/api/v1/sessions", Some(OPERATOR_TOKEN), None);
        let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
        if list.len() == 1 && list[0]["client_connected"] == true {
            break list[0]["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "connect never re-attached: {list:?}");
        thread::sleep(Duration::from_millis(100));
    };
    assert!(connect.stderr().contains("re-attached"), "{}", connect.stderr());
    // A real end of the session: connect says why and exits non-zero.
    assert_eq!(http(relay.addr, "DELETE", &format!("/api/v1/sessions/{id}"), Some(OPERATOR_TOKEN), None).0, 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = connect.try_wait_ref() {
            break s;
        }
        assert!(Instant::now() < deadline, "connect did not exit after its session was closed");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status}");
    assert!(connect.stderr().contains("4003"), "{}", connect.stderr());
}

#[test]
fn a_config_typo_names_the_file_line_and_key_but_never_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    for (what, body) in [
        ("unterminated string", "token = \"op-secret-value-123\n"),
        ("wrong type", "token = 98765432109876\n"),
        ("bare word", "token = op-secret-value-123\n"),
    ] {
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, format!("[[operator]]\nname = \"ops\"\n{body}")).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["relay", "--listen", "127.0.0.1:0", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}");
        assert!(err.contains("relay.toml") && err.contains("line 3") && err.contains("key `token`"), "{what}: {err}");
        assert!(
            !err.contains("op-secret-value-123") && !err.contains("98765432109876"),
            "{what}: the secret leaked: {err}"
        );
    }
}

#[test]
fn connect_over_http_to_a_tls_relay_says_to_use_https_and_logs_have_no_colour_codes() {
    let pki = tempfile::tempdir().unwrap();
    let (_, cert, key) = make_pki(pki.path(), "relay");
    let relay = Relay::start("epoll", &tls_config(&cert, &key));
    let url = format!("http://127.0.0.1:{}", relay.addr.port());
    let out = std::process::Command::new(BIN)
        .args(["connect", "--relay", &url, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("speaks TLS") && err.contains("https://"), "{err}");
    // And the other way round: https:// to a plain relay.
    let plain = Relay::start("epoll", "");
    let url = format!("https://127.0.0.1:{}", plain.addr.port());
    let out = std::process::Command::new(BIN)
        .args(["session", "list", "--relay", &url, "--token", OPERATOR_TOKEN])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not speak TLS") && err.contains("http://"), "{err}");
    // Logs to a pipe carry no ANSI colour codes.
    for log in [relay.proc.stderr(), plain.proc.stderr(), err.to_string()] {
        assert!(!log.contains('\x1b'), "colour codes in a log that is not a terminal: {log:?}");
    }
}
