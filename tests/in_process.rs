//! The relay as a library: `ringway::relay::run` on a listener the test bound, stopped by a
//! future the test resolves — with the real agent binary and a real WebSocket client.

use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::util::*;

#[test]
fn the_relay_runs_in_process_and_its_shutdown_closes_tunnels_with_1001_and_returns() {
    let config = ringway::config::Config::parse(&format!(
        "[[operator]]\nname = \"ops\"\ntoken = \"{OPERATOR_TOKEN}\"\n\
         [[device]]\nid = \"{DEVICE_ID}\"\nkey = \"{DEVICE_KEY}\"\n\
         [limits]\ndrain_timeout_secs = 1\n"
    ))
    .unwrap();
    let listener = ringway::relay::server::listen_on("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(ringway::relay::run(config, listener, Some(ringway::relay::BackendKind::Epoll), async {
            let _ = stopped.await;
        }))
    });

    let echo = echo_server();
    let mut agent = spawn_agent(&format!("http://{addr}"), &[format!("echo={echo}")]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !http(addr, "GET", "/api/v1/devices", Some(OPERATOR_TOKEN), None).1.contains("\"online\":true") {
        assert!(Instant::now() < deadline, "the agent never came online: {}", agent.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = format!(r#"{{"device":"{DEVICE_ID}","service":"echo"}}"#);
    let (status, started) = http(addr, "POST", "/api/v1/sessions", Some(OPERATOR_TOKEN), Some(&body));
    assert_eq!(status, 201, "{started}");
    let started: serde_json::Value = serde_json::from_str(&started).unwrap();
    let mut ws = ws_connect(started["client_url"].as_str().unwrap(), started["client_token"].as_str().unwrap());
    ws.send(Message::binary(b"in process".to_vec())).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(b"in process".to_vec()));

    // Shutdown: the tunnel outlives the drain period, so it hears 1001 and why.
    stop.send(()).unwrap();
    assert_eq!(ws_wait_close(&mut ws, Duration::from_secs(10)), (1001, "relay shutting down".to_string()));
    // `run` returns once its threads ended, and the port is closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !relay.is_finished() {
        assert!(Instant::now() < deadline, "run did not return after its shutdown future resolved");
        std::thread::sleep(Duration::from_millis(20));
    }
    relay.join().unwrap().unwrap();
    assert!(std::net::TcpStream::connect(addr).is_err(), "the relay's port still accepts after run returned");
    agent.kill();
}
