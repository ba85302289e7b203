//! Spare device connections: the agent keeps authenticated data connections open to the relay,
//! and a new connection is paired with one instead of the agent dialing (no handshake), with
//! the pool refilled behind it; a spare whose service is unreachable still ends in 4001.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::*;

#[test]
fn a_new_connection_takes_a_parked_spare_and_the_agent_refills_it() {
    let relay = Relay::start("epoll", "");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    wait_for("the agent never parked a spare", || relay.metric("ringway_spare_connections") >= 1);
    let (_connect, local) = relay.connect("echo", &[]);
    let mut s = TcpStream::connect(local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"through a spare").unwrap();
    let mut back = [0u8; 15];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"through a spare");
    assert_eq!(relay.metric("ringway_spare_connections_used_total"), 1, "the connection was not paired with a spare");
    wait_for("the agent never refilled its spares", || relay.metric("ringway_spare_connections") >= 1);

    // A burst: spares and dials together, every byte right.
    let workers: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(local).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let msg = vec![i as u8; 100_000];
                s.write_all(&msg).unwrap();
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).unwrap();
                assert!(back == msg, "connection {i} came back altered");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert!(relay.metric("ringway_spare_connections_used_total") >= 2);
}

#[test]
fn a_spare_whose_service_is_unreachable_ends_with_4001() {
    let relay = Relay::start("epoll", "");
    let _agent = relay.agent(&[format!("dead=127.0.0.1:{}", closed_port())]);
    wait_for("the agent never parked a spare", || relay.metric("ringway_spare_connections") >= 1);
    let (_, url, token) = relay.start_session("dead", None);
    let mut ws = ws_connect(&url, &token);
    let (code, reason) = ws_wait_close(&mut ws, Duration::from_secs(10));
    assert_eq!(code, 4001, "{reason}");
    assert!(reason.contains("refused"), "{reason}");
    assert_eq!(relay.metric("ringway_spare_connections_used_total"), 1);
}

#[test]
fn connect_keeps_a_ready_connection_so_a_new_one_needs_no_handshake_even_when_the_service_speaks_first() {
    let relay = Relay::start("epoll", "");
    // A service that speaks first, as sshd and VNC servers do.
    let banner = tcp_service(|mut s| {
        let _ = s.write_all(b"SSH-2.0-banner\r\n");
        let mut r = s.try_clone().unwrap();
        let _ = std::io::copy(&mut r, &mut s);
    });
    let _agent = relay.agent(&[format!("b={banner}")]);
    let (_connect, local) = relay.connect("b", &[]);
    wait_spare(&relay);
    wait_for("connect never opened its ready connection", || relay.metric("ringway_ready_connections") == 1);
    assert_eq!(relay.metric("ringway_connections_opened_total"), 0, "a ready connection is no connection yet");
    let mut s = TcpStream::connect(local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = [0u8; 16];
    s.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"SSH-2.0-banner\r\n");
    assert_eq!(relay.metric("ringway_ready_connections_used_total"), 1, "the ready connection was not used");
    assert_eq!(relay.metric("ringway_spare_connections_used_total"), 1, "the agent's spare was not used");
    s.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
}

fn wait_spare(relay: &Relay) {
    wait_for("the agent never parked a spare", || relay.metric("ringway_spare_connections") >= 1);
}

#[test]
fn over_tls_a_ready_connection_its_client_closed_dials_nothing_and_one_used_carries_its_bytes() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(pki.path(), "relay");
    let relay = Relay::start("epoll", &tls_config(&cert, &key));
    let url = format!("https://127.0.0.1:{}", relay.addr.port());
    let ca = ca.to_str().unwrap();
    // An echo service that counts the connections the agent makes to it.
    let dials = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = dials.clone();
    let echo = tcp_service(move |mut s| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut r = s.try_clone().unwrap();
        let _ = std::io::copy(&mut r, &mut s);
    });
    let service = format!("echo={echo}");
    let agent_args = ["agent", "--relay", &url, "--ca", ca, "--device", DEVICE_ID, "--key", DEVICE_KEY, "--service"];
    let (_agent, _) = Proc::spawn("agent", &[&agent_args[..], &[&service]].concat(), false);
    // The relay speaks only TLS: its metrics through curl (which .ci/run installs).
    let metric = |name: &str| -> u64 {
        let out = std::process::Command::new("curl").args(["-sf", "--cacert", ca, &format!("{url}/metrics")]).output();
        metric_in(&String::from_utf8(out.expect("curl").stdout).unwrap(), name)
    };
    let connect_args =
        ["connect", "--relay", &url, "--ca", ca, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "echo"];

    // connect opens its ready connection and exits without using it: over TLS the relay reads
    // the close, so no connection is opened and the agent dials nothing.
    let (mut first, _) = connect_when_online(&connect_args);
    wait_for("connect never opened its ready connection", || metric("ringway_ready_connections") == 1);
    first.kill();
    wait_for("the ready connection was never let go", || metric("ringway_ready_connections") == 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(metric("ringway_connections_opened_total"), 0, "a closed ready connection became a connection");
    assert_eq!(dials.load(std::sync::atomic::Ordering::SeqCst), 0, "the agent dialed for a closed ready connection");

    // A used one carries its first bytes, read by the relay to tell data from a close.
    let (_second, local) = connect_when_online(&connect_args);
    wait_for("connect never opened its ready connection", || metric("ringway_ready_connections") == 1);
    let mut s = TcpStream::connect(local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    s.write_all(&payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).unwrap();
    assert!(back == payload, "the echo through a used TLS ready connection differs");
    assert_eq!(metric("ringway_ready_connections_used_total"), 1);
    assert_eq!(dials.load(std::sync::atomic::Ordering::SeqCst), 1);
}
