//! Test harness: the real `ringway` binary as relay, agent and client, each its own process,
//! every port chosen by the OS, every file in a temp dir of the test's own.

#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringway");
pub const OPERATOR_TOKEN: &str = "op-secret-for-tests";
pub const DEVICE_ID: &str = "dev-1";
pub const DEVICE_KEY: &str = "dev-secret-for-tests";

/// A child process killed when dropped, whose stderr is kept for failure messages.
pub struct Proc {
    pub child: Child,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    pub name: &'static str,
}

impl Proc {
    /// Spawns `ringway ARGS` and waits for its stdout line `listening on ADDR` (if `wait_listen`).
    pub fn spawn(name: &'static str, args: &[&str], wait_listen: bool) -> (Proc, Option<SocketAddr>) {
        Proc::spawn_bin(BIN, name, args, wait_listen)
    }

    /// [`Proc::spawn`] of another build of ringway (a benchmark's baseline).
    pub fn spawn_bin(bin: &str, name: &'static str, args: &[&str], wait_listen: bool) -> (Proc, Option<SocketAddr>) {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", std::env::var("RINGWAY_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err = child.stderr.take().unwrap();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut proc = Proc { child, stderr, name };
        let addr = if wait_listen {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(line) => {
                        if let Some(a) = line.strip_prefix("listening on ") {
                            break Some(a.trim().parse().unwrap());
                        }
                    }
                    Err(_) if Instant::now() > deadline => {
                        panic!("{name} never printed 'listening on': {}", proc.stderr())
                    }
                    Err(_) => {
                        if let Ok(Some(status)) = proc.child.try_wait() {
                            panic!("{name} exited with {status}: {}", proc.stderr());
                        }
                    }
                }
            }
        } else {
            None
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        thread::spawn(move || while rx.recv().is_ok() {});
        (proc, addr)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// `None` while the process runs.
    pub fn try_wait_ref(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running relay with its config in a temp dir.
pub struct Relay {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Relay {
    pub fn start(backend: &str, extra_config: &str) -> Relay {
        Relay::start_at("127.0.0.1", backend, extra_config)
    }

    /// A relay listening on `ip` (any of 127/8: several stand in for several hosts).
    pub fn start_at(ip: &str, backend: &str, extra_config: &str) -> Relay {
        Relay::start_on(&format!("{ip}:0"), backend, extra_config)
    }

    /// A relay listening on `listen` (HOST:PORT).
    pub fn start_on(listen: &str, backend: &str, extra_config: &str) -> Relay {
        Relay::start_bin(BIN, listen, backend, extra_config)
    }

    /// [`Relay::start_on`] with another build of ringway (a benchmark's baseline).
    pub fn start_bin(bin: &str, listen: &str, backend: &str, extra_config: &str) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[[operator]]\nname = \"ops\"\ntoken = \"{OPERATOR_TOKEN}\"\n\
                 [[device]]\nid = \"{DEVICE_ID}\"\nkey = \"{DEVICE_KEY}\"\n\
                 [[device]]\nid = \"dev-2\"\nkey = \"dev-2-secret-key\"\n{extra_config}"
            ),
        )
        .unwrap();
        let (proc, addr) = Proc::spawn_bin(
            bin,
            "relay",
            &["relay", "--listen", listen, "--config", config.to_str().unwrap(), "--backend", backend],
            true,
        );
        Relay { proc, addr: addr.unwrap(), dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts an agent for dev-1 with `services` (NAME=HOST:PORT) and waits until it is online.
    pub fn agent(&self, services: &[String]) -> Proc {
        let proc = spawn_agent(&self.url(), services);
        self.wait_device_online(DEVICE_ID, true);
        proc
    }

    pub fn wait_device_online(&self, id: &str, online: bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = http(self.addr, "GET", "/api/v1/devices", Some(OPERATOR_TOKEN), None);
            assert_eq!(status, 200, "{body}");
            let devices: serde_json::Value = serde_json::from_str(&body).unwrap();
            let now = devices.as_array().unwrap().iter().any(|d| d["id"] == id && d["online"] == online);
            if now {
                return;
            }
            assert!(Instant::now() < deadline, "device {id} never became online={online}: {body}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ringway connect` for `service`, returning the process and its local port.
    pub fn connect(&self, service: &str, extra: &[&str]) -> (Proc, SocketAddr) {
        let url = self.url();
        let mut args =
            vec!["connect", "--relay", &url, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", service];
        args.extend_from_slice(extra);
        let (proc, addr) = Proc::spawn("connect", &args, true);
        (proc, addr.unwrap())
    }

    /// Starts a session through the API; returns (id, client_url, client_token).
    pub fn start_session(&self, service: &str, ttl: Option<u64>) -> (String, String, String) {
        let body = match ttl {
            Some(t) => {
                format!(r#"{{"device":"{DEVICE_ID}","service":"{service}","ttl_secs":{t}}}"#)
            }
            None => format!(r#"{{"device":"{DEVICE_ID}","service":"{service}"}}"#),
        };
        let (status, body) = http(self.addr, "POST", "/api/v1/sessions", Some(OPERATOR_TOKEN), Some(&body));
        assert_eq!(status, 201, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (
            v["id"].as_str().unwrap().to_string(),
            v["client_url"].as_str().unwrap().to_string(),
            v["client_token"].as_str().unwrap().to_string(),
        )
    }

    pub fn metric(&self, name: &str) -> u64 {
        let (status, body) = http(self.addr, "GET", "/metrics", None, None);
        assert_eq!(status, 200);
        metric_in(&body, name)
    }

    pub fn rss_kib(&self) -> u64 {
        proc_rss_kib(self.proc.pid())
    }

    /// The relay's descriptors and its TCP sockets, for a failure message.
    pub fn fd_report(&self) -> String {
        let pid = self.proc.pid();
        let script = format!("ls -l /proc/{pid}/fd; ss -tnpi | grep -A1 'pid={pid},'");
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.proc.pid())).unwrap().count()
    }

    /// The relay's descriptors besides the spare connections agents keep parked there (their
    /// number follows the agents' connection rate; they are no leak).
    pub fn open_fds_but_spares(&self) -> usize {
        self.open_fds() - self.metric("ringway_spare_connections") as usize
    }
}

/// Starts an agent for dev-1 that dials `relay_url` (the relay, or a proxy in front of it),
/// offering `services` (NAME=HOST:PORT); does not wait for it.
pub fn spawn_agent(relay_url: &str, services: &[String]) -> Proc {
    spawn_agent_on(&[relay_url], services)
}

/// [`spawn_agent`] with several `--relay` URLs.
pub fn spawn_agent_on(relay_urls: &[&str], services: &[String]) -> Proc {
    let mut args = vec!["agent".to_string()];
    for url in relay_urls {
        args.extend(["--relay".into(), url.to_string()]);
    }
    args.extend(["--device".into(), DEVICE_ID.into()]);
    args.extend(["--key".into(), DEVICE_KEY.into()]);
    for s in services {
        args.extend(["--service".into(), s.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn("agent", &args, false).0
}

/// A TCP service on 127.0.0.1:0 that runs `serve` on a thread of its own for each connection.
pub fn tcp_service(serve: impl Fn(TcpStream) + Clone + Send + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let serve = serve.clone();
            thread::spawn(move || serve(s));
        }
    });
    addr
}

/// A TCP service that writes `chunk`-sized blocks as fast as it can to every connection until
/// the connection ends.
pub fn firehose_server(chunk: usize) -> SocketAddr {
    tcp_service(move |mut s| {
        let block = vec![0x5au8; chunk];
        while s.write_all(&block).is_ok() {}
    })
}

/// A minimal HTTP/1.1 request over a fresh connection: (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.unwrap_or("");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A raw WebSocket client (tungstenite, an independent implementation) to a relay URL.
pub fn ws_connect(url: &str, token: &str) -> tungstenite::WebSocket<TcpStream> {
    try_ws_connect(url, token).unwrap_or_else(|e| panic!("WebSocket to {url}: {e}"))
}

/// [`ws_connect`], returning the refusal instead of panicking.
pub fn try_ws_connect(url: &str, token: &str) -> Result<tungstenite::WebSocket<TcpStream>, String> {
    use tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let authority = req.uri().authority().unwrap().as_str().to_string();
    let tcp = TcpStream::connect(authority).map_err(|e| e.to_string())?;
    tungstenite::client(req, tcp).map(|(ws, _)| ws).map_err(|e| e.to_string())
}

/// Reads until the peer's Close; returns its code and reason.
pub fn ws_wait_close(ws: &mut tungstenite::WebSocket<TcpStream>, within: Duration) -> (u16, String) {
    ws.get_mut().set_read_timeout(Some(within)).unwrap();
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(Some(c))) => return (c.code.into(), c.reason.to_string()),
            Ok(tungstenite::Message::Close(None)) => return (1005, String::new()),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

/// A process's resident memory (KiB) from /proc; 0 once it is gone.
pub fn proc_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// A process's peak resident memory (KiB, VmHWM) from /proc; 0 once it is gone.
pub fn proc_peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// A `kB` field of /proc/PID/status; 0 once the process is gone.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (up to 15 s) until `ok`; fails with `what` otherwise.
pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// `ringway ARGS` for a `connect`, started again until it stays up (the agent needs a moment to
/// come online; `connect` exits when its session cannot start). Returns it and its local port.
pub fn connect_when_online(args: &[&str]) -> (Proc, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (mut p, local) = Proc::spawn("connect", args, true);
        thread::sleep(Duration::from_millis(300));
        if p.try_wait_ref().is_none() {
            return (p, local.unwrap());
        }
        assert!(Instant::now() < deadline, "no session: {}", p.stderr());
    }
}

/// A process's user + system CPU time (seconds) from /proc; 0 once it is gone.
pub fn proc_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A port nothing listens on.
pub fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for hundreds of MiB.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Noise {
        Noise(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (`0` for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let x = self.next();
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Reads until the peer closes the connection (EOF or reset) and returns what came before.
/// A read that times out (`within` without a byte) is an error: the peer did not close.
pub fn read_to_close(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(within)).unwrap();
    let (mut got, mut buf) = (Vec::new(), [0u8; 16 << 10]);
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => return Err(format!("not closed within {within:?} ({e}) after {} bytes", got.len())),
        }
    }
}

/// The kernel's state of the IPv4 TCP socket bound to `local` and connected to `remote`, from
/// /proc/net/tcp (1 ESTABLISHED, 4 FIN-WAIT-1, 7 CLOSE, …); `None` when no such socket exists.
pub fn tcp_state(local: SocketAddr, remote: SocketAddr) -> Option<u8> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => format!("{:08X}:{:04X}", u32::from_le_bytes(a.ip().octets()), a.port()),
        SocketAddr::V6(_) => unreachable!("the tests use IPv4 loopback"),
    };
    let (local, remote) = (hex(local), hex(remote));
    std::fs::read_to_string("/proc/net/tcp").unwrap().lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()))
            .then(|| u8::from_str_radix(f[3], 16).unwrap())
    })
}

/// An order-sensitive checksum of a byte stream, fed in any chunking.
#[derive(Default)]
pub struct Checksum {
    hasher: DefaultHasher,
    pending: Vec<u8>,
    pub len: u64,
}

impl Checksum {
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        // Hash in fixed 64 KiB blocks so the chunking of reads does not matter.
        const BLOCK: usize = 64 << 10;
        if !self.pending.is_empty() {
            let take = (BLOCK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == BLOCK {
                self.hasher.write(&self.pending);
                self.pending.clear();
            }
        }
        while data.len() >= BLOCK {
            self.hasher.write(&data[..BLOCK]);
            data = &data[BLOCK..];
        }
        self.pending.extend_from_slice(data);
    }

    pub fn finish(mut self) -> (u64, u64) {
        self.hasher.write(&self.pending);
        (self.hasher.finish(), self.len)
    }
}

/// Sends `len` bytes of `Noise(seed)` into `w`, returning their checksum.
pub fn send_noise(w: &mut impl Write, seed: u64, len: u64) -> (u64, u64) {
    let mut noise = Noise::new(seed);
    let mut sum = Checksum::default();
    let mut buf = vec![0u8; 256 << 10];
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        noise.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).unwrap();
        sum.update(&buf[..n]);
        left -= n as u64;
    }
    sum.finish()
}

/// Reads `r` to EOF, returning the checksum of what came.
pub fn read_all_sum(r: &mut impl Read) -> (u64, u64) {
    let mut sum = Checksum::default();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => sum.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading: {e}"),
        }
    }
    sum.finish()
}

/// A device-side service that, per connection, sends `len` bytes of `Noise(seed)` while it
/// reads everything the client sends; reports the checksum of what it read.
pub fn source_sink_service(len: u64, seed: u64) -> (SocketAddr, mpsc::Receiver<(u64, u64)>, (u64, u64)) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let expected = send_noise(&mut std::io::sink(), seed, len);
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let tx = tx.clone();
            let mut w = s.try_clone().unwrap();
            thread::spawn(move || {
                send_noise(&mut w, seed, len);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
            thread::spawn(move || {
                let mut r = s;
                let _ = tx.send(read_all_sum(&mut r));
            });
        }
    });
    (addr, rx, expected)
}

/// Sends `len` bytes of `Noise(seed)` into the local port `local` while reading what comes
/// back, as a source-sink service (see [`source_sink_service`]) answers; returns the checksums
/// of (what came back, what was sent).
pub fn bulk_both_ways(local: SocketAddr, len: u64, seed: u64) -> ((u64, u64), (u64, u64)) {
    let tcp = TcpStream::connect(local).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let sum = send_noise(&mut w, seed, len);
        w.shutdown(std::net::Shutdown::Write).unwrap();
        sum
    });
    let mut r = tcp;
    let got = read_all_sum(&mut r);
    (got, sender.join().unwrap())
}

/// A TCP echo server on 127.0.0.1:0, one thread per connection.
pub fn echo_server() -> SocketAddr {
    tcp_service(|mut s| {
        let mut r = s.try_clone().unwrap();
        let _ = std::io::copy(&mut r, &mut s);
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

pub fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Writes a CA and a relay certificate for 127.0.0.1/localhost signed by it; returns
/// (ca.pem, cert.pem, key.pem).
pub fn make_pki(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let paths =
        (dir.join(format!("{name}-ca.pem")), dir.join(format!("{name}-cert.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// A TCP connection to `addr` from the source address `from` (127.0.0.x stands for another host).
pub fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(from, 0).into())?;
    sock.connect(&addr.into())?;
    Ok(sock.into())
}

/// [`http`] from the source address `from`.
pub fn http_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = connect_from(from, addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A WebSocket handshake done by hand, reading nothing past the response head, so the test can
/// write raw frames and read the relay's raw bytes. Returns the socket, or the refusal status.
pub fn raw_ws(addr: SocketAddr, path: &str, token: &str) -> Result<TcpStream, u16> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("the relay answers the handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if status == 101 {
        Ok(s)
    } else {
        Err(status)
    }
}

/// A masked frame, as a WebSocket client sends it.
pub fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let op = ringway::ws::OpCode::from_u8(opcode).expect("a known opcode");
    let mut out = Vec::new();
    ringway::ws::encode::frame(&mut out, fin, op, payload, Some([0x12, 0x34, 0x56, 0x78]));
    out
}

/// Reads one unmasked frame (as the relay sends): (first byte, payload). An error is returned,
/// not a panic: a reset or EOF instead of a frame is what some tests look for.
pub fn read_raw_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l)?;
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l)?;
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((h[0], payload))
}

/// Reads raw frames until the relay's Close: its code and reason. Anything else (EOF, a reset,
/// a read timeout) is an error saying what came instead.
pub fn read_raw_close(s: &mut TcpStream) -> Result<(u16, String), String> {
    loop {
        match read_raw_frame(s) {
            Ok((b0, p)) if b0 & 0x0f == 0x8 => {
                let code = if p.len() >= 2 { u16::from_be_bytes([p[0], p[1]]) } else { 1005 };
                return Ok((code, String::from_utf8_lossy(p.get(2..).unwrap_or(&[])).into_owned()));
            }
            Ok(_) => {}
            Err(e) => return Err(format!("no close frame: {e}")),
        }
    }
}

/// A TCP proxy in front of the relay that can reset chosen connections (both halves, RST), as a
/// network blip would. Each connection is known by its first request line.
pub struct BlipProxy {
    pub addr: SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<ProxyConn>>>,
}

struct ProxyConn {
    first_line: String,
    down: TcpStream,
    up: TcpStream,
    resetting: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl BlipProxy {
    pub fn start(upstream: SocketAddr) -> BlipProxy {
        BlipProxy::throttled(upstream, 16 << 10, Duration::ZERO)
    }

    /// A proxy that passes bytes on in pieces of at most `piece`, pausing `pause` after each: a
    /// slow link that splits frames.
    pub fn throttled(upstream: SocketAddr, piece: usize, pause: Duration) -> BlipProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<ProxyConn>>> = Arc::default();
        let list = conns.clone();
        thread::spawn(move || {
            for down in l.incoming() {
                let Ok(mut down) = down else { continue };
                let Ok(mut up) = TcpStream::connect(upstream) else { continue };
                // The first line names the connection: read it byte by byte and pass it on.
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while !line.ends_with(b"\r\n") && down.read_exact(&mut byte).is_ok() {
                    line.push(byte[0]);
                }
                if up.write_all(&line).is_err() {
                    continue;
                }
                let resetting = Arc::new(AtomicBool::new(false));
                for (mut from, mut to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up.try_clone().unwrap(), down.try_clone().unwrap()),
                ] {
                    let resetting = resetting.clone();
                    thread::spawn(move || {
                        let mut buf = vec![0u8; piece];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                    if !pause.is_zero() {
                                        thread::sleep(pause);
                                    }
                                }
                            }
                        }
                        if !resetting.load(Ordering::SeqCst) {
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        }
                    });
                }
                let first_line = String::from_utf8_lossy(&line).trim().to_string();
                list.lock().unwrap().push(ProxyConn { first_line, down, up, resetting });
            }
        });
        BlipProxy { addr, conns }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Resets (RST, both ways) every connection whose first line contains `pattern`; returns how
    /// many.
    pub fn reset(&self, pattern: &str) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let (hit, keep): (Vec<ProxyConn>, Vec<ProxyConn>) =
            std::mem::take(&mut *conns).into_iter().partition(|c| c.first_line.contains(pattern));
        *conns = keep;
        let n = hit.len();
        for c in hit {
            c.resetting.store(true, std::sync::atomic::Ordering::SeqCst);
            for s in [&c.down, &c.up] {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                // Wakes the copy threads (their reads end) without sending anything.
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
            // Let the copy threads drop their handles; the last close then sends the RST.
            thread::sleep(Duration::from_millis(50));
        }
        n
    }
}

// ---- the cluster: a real nats-server, relay nodes on 127.0.0.x, simulated agents ----

pub const PEER_KEY: &str = "peer-key-for-the-cluster-tests";

/// A `nats-server` with JetStream on a free port of 127.0.0.1, its store in a temp dir.
pub struct Nats {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nats {
    pub fn start() -> Nats {
        let mut nats = Nats { child: None, port: 0, dir: tempfile::tempdir().unwrap() };
        nats.run();
        nats
    }

    /// Starts the server (again: same port, same store).
    pub fn run(&mut self) {
        let port = if self.port == 0 { "-1".to_string() } else { self.port.to_string() };
        let store = self.dir.path().to_str().unwrap().to_string();
        let mut child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd", &store])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting nats-server (bash .ci/run installs it): {e}"));
        let err = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in err.lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
                    let _ = tx.send(addr.trim().rsplit(':').next().unwrap().parse::<u16>().unwrap());
                }
                if line.contains("Server is ready") {
                    let _ = tx.send(0);
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(20)).expect("nats-server did not start listening");
        rx.recv_timeout(Duration::from_secs(20)).expect("nats-server never said it is ready");
        self.port = port;
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A relay node `name` on 127.0.0.`host`.
pub fn node(nats: &Nats, name: &str, host: u8, extra: &str) -> Relay {
    node_on(nats, name, &format!("127.0.0.{host}:0"), extra)
}

/// [`node`] listening on `listen` (HOST:PORT), which it also advertises. `extra` goes inside
/// `[cluster]` first (e.g. `public_url = …`), so further tables must follow it.
pub fn node_on(nats: &Nats, name: &str, listen: &str, extra: &str) -> Relay {
    let config = format!(
        "[cluster]\nnode = \"{name}\"\nnats = [\"{}\"]\nadvertise = \"http://{listen}\"\npeer_key = \"{PEER_KEY}\"\n{extra}",
        nats.url()
    );
    Relay::start_on(listen, "epoll", &config)
}

/// A stand-in for an agent: its control connection (hello, answers pings), moving to the next
/// URL when the connection ends, at once, until `stop`.
pub fn sim_agent(urls: Vec<String>, id: String, key: String, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut at = 0;
        while !stop.load(Relaxed) {
            let url = format!("{}/api/v1/agent?device={id}", urls[at].replacen("http://", "ws://", 1));
            if let Ok(mut ws) = try_ws_connect(&url, &key) {
                let hello = r#"{"type":"hello","services":["echo"],"version":"sim"}"#;
                let _ = ws.send(tungstenite::Message::text(hello));
                ws.get_mut().set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                loop {
                    match ws.read() {
                        Ok(_) => {}
                        Err(tungstenite::Error::Io(e))
                            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                        {
                            if stop.load(Relaxed) {
                                return;
                            }
                        }
                        Err(_) => break,
                    }
                }
            } else {
                thread::sleep(Duration::from_millis(100));
            }
            at = (at + 1) % urls.len();
        }
    })
}

/// An HTTP/1.1 request with the given headers over a fresh connection: (status, response head,
/// body). For what [`http`] cannot say: cookies, CSRF proofs, origins, content types.
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.unwrap_or("");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (status, head.to_string(), body.to_string())
}

/// The value of response header `name` in a response head (case-insensitive name).
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The value of metric `name` (with its labels, if any) in Prometheus text.
pub fn metric_in(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

/// The relay config's `[tls]` section for a certificate and key.
pub fn tls_config(cert: &Path, key: &Path) -> String {
    format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\n", cert.display(), key.display())
}
