//! The remote-access flow end to end: relay, agent and `ringway connect` as separate processes.

use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::util::*;

fn bulk_each_way(backend: &str) {
    const LEN: u64 = 256 << 20;
    let relay = Relay::start(backend, "");
    let (service, received, service_sent) = source_sink_service(LEN, 7);
    let _agent = relay.agent(&[format!("bulk={service}")]);
    let (_connect, local) = relay.connect("bulk", &[]);

    let (got, sent) = bulk_both_ways(local, LEN, 99);
    let device_got = received.recv_timeout(Duration::from_secs(60)).expect("the service saw the stream end");
    assert_eq!(got, service_sent, "device -> client: {} of {LEN} bytes, checksum differs", got.1);
    assert_eq!(device_got, sent, "client -> device: {} of {LEN} bytes, checksum differs", device_got.1);
    assert!(relay.metric("ringway_bytes_to_device_total") >= LEN);
    assert!(relay.metric("ringway_bytes_to_client_total") >= LEN);
}

#[test]
fn bulk_256_mib_each_way_is_byte_exact_on_io_uring() {
    bulk_each_way("uring");
}

#[test]
fn bulk_256_mib_each_way_is_byte_exact_on_epoll() {
    bulk_each_way("epoll");
}

fn concurrent_connections(backend: &str, extra_config: &str) {
    let relay = Relay::start(backend, extra_config);
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let (_connect, local) = relay.connect("echo", &[]);
    let workers: Vec<_> = (0..50u64)
        .map(|i| {
            thread::spawn(move || {
                let len = 64 * 1024 + (i * 40_503) % (2 << 20);
                let tcp = TcpStream::connect(local).unwrap();
                let mut w = tcp.try_clone().unwrap();
                let sender = thread::spawn(move || {
                    let sum = send_noise(&mut w, 1000 + i, len);
                    w.shutdown(Shutdown::Write).unwrap();
                    sum
                });
                let mut r = tcp;
                let got = read_all_sum(&mut r);
                (sender.join().unwrap(), got)
            })
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        let (sent, got) = w.join().unwrap();
        assert_eq!(got, sent, "connection {i}: echo differs ({} of {} bytes)", got.1, sent.1);
    }
    assert_eq!(relay.metric("ringway_buffers_in_use"), 0);
}

#[test]
fn fifty_concurrent_connections_through_one_session_are_each_byte_exact() {
    concurrent_connections("uring", "");
}

/// 100 directions share 3 buffers: receives find the kernel's ring empty, wait in line and are
/// handed buffers coming back; every byte still arrives, in order.
#[test]
fn fifty_connections_through_three_buffers_are_each_byte_exact_on_io_uring() {
    concurrent_connections("uring", "[dataplane]\nbuffers = 3\nbuffer_size = 4096\n");
}

#[test]
fn fifty_concurrent_connections_on_epoll() {
    concurrent_connections("epoll", "");
}

#[test]
fn the_control_api_lists_shows_and_closes_sessions() {
    let relay = Relay::start("uring", "");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);

    assert_eq!(http(relay.addr, "GET", "/healthz", None, None).0, 200);
    assert_eq!(http(relay.addr, "GET", "/api/v1/sessions", Some("wrong-token"), None).0, 401);
    assert_eq!(http(relay.addr, "GET", "/api/v1/sessions", None, None).0, 401);

    let (status, body) = http(relay.addr, "GET", "/api/v1/devices", Some(OPERATOR_TOKEN), None);
    assert_eq!(status, 200);
    let devices: serde_json::Value = serde_json::from_str(&body).unwrap();
    let dev1 = devices.as_array().unwrap().iter().find(|d| d["id"] == DEVICE_ID).unwrap();
    assert_eq!(dev1["online"], true);
    assert_eq!(dev1["services"], serde_json::json!(["echo"]));

    let (id, client_url, token) = relay.start_session("echo", None);
    assert!(client_url.starts_with(&format!("ws://{}/", relay.addr)), "{client_url}");
    assert!(token.len() >= 32);
    let (status, body) = http(relay.addr, "GET", &format!("/api/v1/sessions/{id}"), Some(OPERATOR_TOKEN), None);
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["device"], DEVICE_ID);
    assert_eq!(info["service"], "echo");
    assert_eq!(info["operator"], "ops");
    let (_, body) = http(relay.addr, "GET", "/api/v1/sessions", Some(OPERATOR_TOKEN), None);
    assert!(body.contains(&id));

    // A service the device does not offer, and a device the relay does not know.
    let (status, body) = http(
        relay.addr,
        "POST",
        "/api/v1/sessions",
        Some(OPERATOR_TOKEN),
        Some(r#"{"device":"dev-1","service":"telnet"}"#),
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("offers no service"), "{body}");
    let (status, _) = http(
        relay.addr,
        "POST",
        "/api/v1/sessions",
        Some(OPERATOR_TOKEN),
        Some(r#"{"device":"nope","service":"echo"}"#),
    );
    assert_eq!(status, 404);
    let (status, _) = http(relay.addr, "POST", "/api/v1/sessions", Some(OPERATOR_TOKEN), Some("{not json"));
    assert_eq!(status, 400);

    assert_eq!(http(relay.addr, "DELETE", &format!("/api/v1/sessions/{id}"), Some(OPERATOR_TOKEN), None).0, 204);
    assert_eq!(http(relay.addr, "GET", &format!("/api/v1/sessions/{id}"), Some(OPERATOR_TOKEN), None).0, 404);
    assert_eq!(http(relay.addr, "DELETE", &format!("/api/v1/sessions/{id}"), Some(OPERATOR_TOKEN), None).0, 404);

    let (_, metrics) = http(relay.addr, "GET", "/metrics", None, None);
    for name in ["ringway_sessions_active 0", "ringway_agents_connected 1", "ringway_sessions_started_total 1"] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    assert!(metrics.contains("ringway_handshake_failures_total{reason=\"bad_token\"} 2"), "{metrics}");
}

#[test]
fn the_session_cli_prints_json() {
    let relay = Relay::start("epoll", "");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["session"])
            .args(args)
            .args(["--relay", &relay.url(), "--token", OPERATOR_TOKEN])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let started = run(&["start", "--device", DEVICE_ID, "--service", "echo"]);
    let id = started["id"].as_str().unwrap();
    assert_eq!(run(&["show", id])["id"], id);
    assert_eq!(run(&["list"]).as_array().unwrap().len(), 1);
    run(&["close", id]);
    assert_eq!(run(&["list"]).as_array().unwrap().len(), 0);
}

#[test]
fn the_demo_prints_its_self_check_line_within_20_seconds() {
    let mut child = std::process::Command::new(BIN)
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let ok = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.starts_with("self-check ok") => break true,
            Ok(line) => seen.push(line),
            Err(_) if std::time::Instant::now() > deadline => break false,
            Err(_) => {}
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "no self-check line within 20 s; printed: {seen:?}");
}

/// Whether `relay` lists dev-1 as online.
fn holds_device(relay: &Relay) -> bool {
    let (status, body) = http(relay.addr, "GET", "/api/v1/devices", Some(OPERATOR_TOKEN), None);
    status == 200 && body.contains(&format!(r#""id":"{DEVICE_ID}","online":true"#))
}

/// One echo round trip through a fresh session on `relay`.
fn echo_through(relay: &Relay, what: &[u8]) {
    let (_, url, token) = relay.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    ws.send(tungstenite::Message::binary(what.to_vec())).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::binary(what.to_vec()));
}

#[test]
fn an_agent_given_two_relays_moves_to_the_other_when_its_relay_dies() {
    let relays = [Relay::start("epoll", ""), Relay::start("epoll", "")];
    let echo = echo_server();
    let urls: Vec<String> = relays.iter().map(Relay::url).collect();
    let mut agent = spawn_agent_on(&[&urls[0], &urls[1]], &[format!("echo={echo}")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let holder = loop {
        if let Some(i) = (0..2).find(|&i| holds_device(&relays[i])) {
            break i;
        }
        assert!(std::time::Instant::now() < deadline, "the agent reached neither relay: {}", agent.stderr());
        thread::sleep(Duration::from_millis(50));
    };
    assert!(!holds_device(&relays[1 - holder]), "one agent, online on both relays");
    echo_through(&relays[holder], b"through the first relay");

    // The relay holding the device dies: the agent goes to the other one.
    let [first, second] = relays;
    let (mut gone, other) = if holder == 0 { (first, second) } else { (second, first) };
    gone.proc.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !holds_device(&other) {
        assert!(std::time::Instant::now() < deadline, "the agent never moved to the other relay: {}", agent.stderr());
        thread::sleep(Duration::from_millis(50));
    }
    echo_through(&other, b"through the second relay");
    assert!(agent.try_wait_ref().is_none(), "the agent exited: {}", agent.stderr());
}
