//! TLS end to end: a relay serving https/wss from a generated certificate, agent and client
//! verifying it against the CA given with --ca, and a wrong certificate refused clearly.

use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::thread;

use crate::util::*;

#[test]
fn tunnels_work_over_tls_and_a_wrong_certificate_is_refused_clearly() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(pki.path(), "relay");
    let (other_ca, _, _) = make_pki(pki.path(), "other");
    let relay = Relay::start("uring", &tls_config(&cert, &key));
    let url = format!("https://127.0.0.1:{}", relay.addr.port());
    let ca_arg = ca.to_str().unwrap();

    // The agent dials wss:// and verifies the relay.
    let echo = echo_server();
    let (_agent, _) = Proc::spawn(
        "agent",
        &[
            "agent",
            "--relay",
            &url,
            "--ca",
            ca_arg,
            "--device",
            DEVICE_ID,
            "--key",
            DEVICE_KEY,
            "--service",
            &format!("echo={echo}"),
        ],
        false,
    );
    // The control API over https, through the CLI.
    let list = |ca: &str| {
        Command::new(BIN)
            .args(["session", "list", "--relay", &url, "--ca", ca, "--token", OPERATOR_TOKEN])
            .output()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let out = Command::new(BIN)
            .args(["session", "start", "--device", DEVICE_ID, "--service", "echo"])
            .args(["--relay", &url, "--ca", ca_arg, "--token", OPERATOR_TOKEN])
            .output()
            .unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert!(v["client_url"].as_str().unwrap().starts_with("wss://"), "{v}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "agent never came online over TLS");
        thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(list(ca_arg).status.success());

    // A client with the wrong CA is refused with a message that says so.
    let out = list(other_ca.to_str().unwrap());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS handshake") && err.contains("certificate"), "{err}");

    // 32 MiB each way through a TLS tunnel, byte-exact.
    let (connect, local) = {
        let (p, a) = Proc::spawn(
            "connect",
            &[
                "connect",
                "--relay",
                &url,
                "--ca",
                ca_arg,
                "--token",
                OPERATOR_TOKEN,
                "--device",
                DEVICE_ID,
                "--service",
                "echo",
            ],
            true,
        );
        (p, a.unwrap())
    };
    let tcp = TcpStream::connect(local).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let sum = send_noise(&mut w, 77, 32 << 20);
        w.shutdown(Shutdown::Write).unwrap();
        sum
    });
    let mut r = tcp;
    let got = read_all_sum(&mut r);
    assert_eq!(got, sender.join().unwrap(), "TLS tunnel is byte-exact");
    drop(connect);

    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "{}", String::from_utf8_lossy(&answer));
}
