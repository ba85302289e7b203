//! A real OpenSSH session through the relay: `sshd` on a loopback port with generated keys, the
//! agent exposing it as service `ssh`, and `ssh` reaching it through `ringway connect` — as a
//! local port, as a ProxyCommand (`--stdio`) and through `--exec`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

const SSHD: &str = "/usr/sbin/sshd";

struct Sshd {
    proc: std::process::Child,
    port: u16,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).output();
    let out = out.expect("ssh-keygen must be installed (bash .ci/run installs openssh-client)");
    assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
}

fn start_sshd() -> Sshd {
    assert!(Path::new(SSHD).exists(), "{SSHD} missing: bash .ci/run installs openssh-server");
    let dir = tempfile::tempdir().unwrap();
    let (host_key, key) = (dir.path().join("host_key"), dir.path().join("user_key"));
    keygen(&host_key);
    keygen(&key);
    std::fs::copy(dir.path().join("user_key.pub"), dir.path().join("authorized_keys")).unwrap();
    // sshd started as root wants its privilege-separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nLogLevel ERROR\n",
            host_key.display(),
            dir.path().join("sshd.pid").display(),
            dir.path().join("authorized_keys").display(),
        ),
    )
    .unwrap();
    let proc = Command::new(SSHD).args(["-D", "-e", "-f"]).arg(&config).stderr(Stdio::inherit()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not start listening on {port}");
        thread::sleep(Duration::from_millis(50));
    }
    Sshd { proc, port, key, _dir: dir }
}

fn user() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn ssh_args(key: &Path) -> Vec<String> {
    [
        "-i",
        key.to_str().unwrap(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A 64 MiB file of noise and its sha256sum line as `sha256sum` prints it for stdin.
fn payload(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("payload");
    let mut f = std::fs::File::create(&path).unwrap();
    send_noise(&mut f, 64, 64 << 20);
    drop(f);
    let out = Command::new("sha256sum").arg(&path).output().unwrap();
    let sum = String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string();
    (path, format!("{sum}  -"))
}

fn run_ssh(mut cmd: Command, stdin: &Path) -> String {
    let out = cmd.stdin(std::fs::File::open(stdin).unwrap()).output().unwrap();
    assert!(out.status.success(), "ssh failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn openssh_through_connect_its_stdio_proxy_command_and_exec() {
    let sshd = start_sshd();
    let relay = Relay::start("uring", "");
    let _agent = relay.agent(&[format!("ssh=127.0.0.1:{}", sshd.port)]);
    let work = tempfile::tempdir().unwrap();
    let (input, want) = payload(work.path());
    let target = format!("{}@127.0.0.1", user());

    // 1. ssh to the local port `ringway connect` opened.
    let (_connect, local) = relay.connect("ssh", &[]);
    let mut cmd = Command::new("ssh");
    cmd.args(ssh_args(&sshd.key)).args(["-p", &local.port().to_string(), &target, "echo ok; sha256sum"]);
    assert_eq!(run_ssh(cmd, &input), format!("ok\n{want}\n"));

    // 2. ssh with `ringway connect --stdio` as its ProxyCommand.
    let proxy = format!(
        "ProxyCommand={BIN} connect --relay {} --token {OPERATOR_TOKEN} --device {DEVICE_ID} --service ssh --stdio",
        relay.url()
    );
    let mut cmd = Command::new("ssh");
    cmd.args(ssh_args(&sshd.key)).args(["-o", &proxy, &format!("{}@device", user()), "echo ok; sha256sum"]);
    assert_eq!(run_ssh(cmd, &input), format!("ok\n{want}\n"));

    // 3. `ringway connect --exec` runs ssh against the port and exits with its status.
    let out_file = work.path().join("exec.out");
    let exec = format!(
        "ssh {} -p {{port}} {target} 'echo ok from exec' > {}",
        ssh_args(&sshd.key).join(" "),
        out_file.display()
    );
    let status = Command::new(BIN)
        .args([
            "connect",
            "--relay",
            &relay.url(),
            "--token",
            OPERATOR_TOKEN,
            "--device",
            DEVICE_ID,
            "--service",
            "ssh",
        ])
        .args(["--exec", &exec])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "connect --exec exited with {status}");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "ok from exec\n");
}
