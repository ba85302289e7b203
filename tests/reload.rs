//! Reloading the relay's configuration without a restart (SIGHUP, `POST /api/v1/reload`): new
//! operators and devices take effect, removed devices lose their agent, a new TLS certificate is
//! presented to new connections, a file that fails validation is refused and the running
//! configuration stays; no running tunnel notices.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::util::*;

const ROOT: &str = "root-admin-token";

fn config_path(relay: &Relay) -> PathBuf {
    relay.dir.path().join("relay.toml")
}

/// Rewrites the relay's config file in one step (a reader never sees half of it).
fn rewrite(relay: &Relay, text: &str) {
    let tmp = relay.dir.path().join("relay.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, config_path(relay)).unwrap();
}

fn hup(relay: &Relay) {
    // SAFETY: kill(2) on the child's pid.
    assert_eq!(unsafe { libc::kill(relay.proc.pid() as i32, libc::SIGHUP) }, 0);
}

fn echo(s: &mut TcpStream, what: &[u8]) {
    s.write_all(what).unwrap();
    let mut back = vec![0u8; what.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, what);
}

fn sessions_status(relay: &Relay, token: &str) -> u16 {
    http(relay.addr, "GET", "/api/v1/sessions", Some(token), None).0
}

fn admin() -> String {
    format!("[[operator]]\nname = \"root\"\ntoken = \"{ROOT}\"\nrole = \"admin\"\n")
}

#[test]
fn sighup_applies_new_credentials_revokes_removed_devices_and_keeps_tunnels() {
    let relay = Relay::start("epoll", &admin());
    let echo_addr = echo_server();
    let _agent = relay.agent(&[format!("echo={echo_addr}")]);
    let (_connect, local) = relay.connect("echo", &[]);
    let mut tunnel = TcpStream::connect(local).unwrap();
    tunnel.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    echo(&mut tunnel, b"before the reload");
    // dev-2's agent is connected too; the reload removes dev-2.
    let (_agent2, _) = Proc::spawn(
        "agent2",
        &[
            "agent",
            "--relay",
            &relay.url(),
            "--device",
            "dev-2",
            "--key",
            "dev-2-secret-key",
            "--service",
            "x=127.0.0.1:1",
        ],
        false,
    );
    relay.wait_device_online("dev-2", true);
    assert_eq!(sessions_status(&relay, "new-operator-token"), 401);
    let tunnels = relay.metric("ringway_tunnels_active");

    let old = std::fs::read_to_string(config_path(&relay)).unwrap();
    let new = old.replace("[[device]]\nid = \"dev-2\"\nkey = \"dev-2-secret-key\"\n", "")
        + "[[operator]]\nname = \"newcomer\"\ntoken = \"new-operator-token\"\n\
           [[device]]\nid = \"dev-3\"\nkey = \"dev-3-secret-key\"\n";
    assert_ne!(old, new);
    rewrite(&relay, &new);
    hup(&relay);

    // The new operator is let in; the new device's agent comes online.
    wait_for("the new operator was never accepted", || sessions_status(&relay, "new-operator-token") == 200);
    let (_agent3, _) = Proc::spawn(
        "agent3",
        &[
            "agent",
            "--relay",
            &relay.url(),
            "--device",
            "dev-3",
            "--key",
            "dev-3-secret-key",
            "--service",
            "x=127.0.0.1:1",
        ],
        false,
    );
    relay.wait_device_online("dev-3", true);
    // The removed device lost its agent, which cannot come back.
    wait_for("dev-2's agent was not disconnected", || {
        let (_, body) = http(relay.addr, "GET", "/api/v1/devices", Some(OPERATOR_TOKEN), None);
        let devices: serde_json::Value = serde_json::from_str(&body).unwrap();
        !devices.as_array().unwrap().iter().any(|d| d["id"] == "dev-2" && d["online"] == true)
    });
    assert!(relay.proc.stderr().contains("configuration reloaded"), "{}", relay.proc.stderr());
    // The running tunnel never noticed; the old operator still works.
    echo(&mut tunnel, b"after the reload");
    assert_eq!(relay.metric("ringway_tunnels_active"), tunnels);
    assert_eq!(sessions_status(&relay, OPERATOR_TOKEN), 200);

    // A file that fails validation is refused, loudly, and nothing changes.
    rewrite(&relay, &new.replace("token = \"new-operator-token\"", "token = \"short\""));
    hup(&relay);
    wait_for("the refusal was not logged", || relay.proc.stderr().contains("configuration reload refused"));
    assert_eq!(sessions_status(&relay, "new-operator-token"), 200);
    echo(&mut tunnel, b"after a refused reload");
}

#[test]
fn the_reload_endpoint_takes_an_admin_and_reports_what_it_did() {
    let relay = Relay::start("epoll", &admin());
    let (status, body) = http(relay.addr, "POST", "/api/v1/reload", Some(OPERATOR_TOKEN), None);
    assert_eq!(status, 403, "{body}");
    let (status, _) = http(relay.addr, "POST", "/api/v1/reload", Some("not-a-token"), None);
    assert_eq!(status, 401);

    let old = std::fs::read_to_string(config_path(&relay)).unwrap();
    rewrite(&relay, &(old.clone() + "[limits]\nidle_timeout_secs = 30\n"));
    let (status, body) = http(relay.addr, "POST", "/api/v1/reload", Some(ROOT), None);
    assert_eq!(status, 200, "{body}");
    let done: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(done["operators"], 2, "{done}");
    assert_eq!(done["devices"], 2, "{done}");
    assert_eq!(done["restart_needed"], serde_json::json!(["limits"]), "{done}");
    // Still: the relay runs with the limits it started with, however often the file is read.
    let (_, body) = http(relay.addr, "POST", "/api/v1/reload", Some(ROOT), None);
    let again: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(again["restart_needed"], serde_json::json!(["limits"]), "{again}");

    rewrite(&relay, "[[operator]]\nname = \"x\"\n");
    let (status, body) = http(relay.addr, "POST", "/api/v1/reload", Some(ROOT), None);
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("nothing changed"), "{body}");
    // The admin from the running configuration is still the admin.
    assert_eq!(http(relay.addr, "POST", "/api/v1/reload", Some(ROOT), None).0, 422);
}

#[test]
fn a_reloaded_certificate_is_presented_to_new_connections_and_old_ones_keep_running() {
    let pki = tempfile::tempdir().unwrap();
    let (ca1, cert, key) = make_pki(pki.path(), "first");
    let relay = Relay::start("epoll", &tls_config(&cert, &key));
    let url = format!("https://127.0.0.1:{}", relay.addr.port());
    let echo_addr = echo_server();
    let ca1 = ca1.to_str().unwrap().to_string();
    let svc = format!("echo={echo_addr}");
    let (_agent, _) = Proc::spawn(
        "agent",
        &["agent", "--relay", &url, "--ca", &ca1, "--device", DEVICE_ID, "--key", DEVICE_KEY, "--service", &svc],
        false,
    );
    let start = |ca: &str| {
        std::process::Command::new(BIN)
            .args(["session", "start", "--device", DEVICE_ID, "--service", "echo"])
            .args(["--relay", &url, "--ca", ca, "--token", OPERATOR_TOKEN])
            .output()
            .unwrap()
    };
    wait_for("the agent never came online over TLS", || start(&ca1).status.success());
    let args = [
        "connect",
        "--relay",
        &url,
        "--ca",
        &ca1,
        "--token",
        OPERATOR_TOKEN,
        "--device",
        DEVICE_ID,
        "--service",
        "echo",
    ];
    let (_connect, local) = Proc::spawn("connect", &args, true);
    let mut tunnel = TcpStream::connect(local.unwrap()).unwrap();
    tunnel.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    echo(&mut tunnel, b"on the first certificate");

    // A new certificate from another CA, written over the same files.
    let other = tempfile::tempdir().unwrap();
    let (ca2, cert2, key2) = make_pki(other.path(), "second");
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    hup(&relay);
    let ca2 = ca2.to_str().unwrap().to_string();
    wait_for("the new certificate was never presented", || start(&ca2).status.success());
    let refused = start(&ca1);
    assert!(!refused.status.success(), "the old CA still verifies the relay after the reload");
    // The tunnel made on the first certificate runs on.
    echo(&mut tunnel, b"after the certificate changed");
}
