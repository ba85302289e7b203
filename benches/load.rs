//! The relay load benchmark: the real `ringway relay` process (one worker, pinned to CPU 1)
//! driven by synthetic peers in this process (pinned to CPU 0) that speak raw WebSocket with
//! pre-masked frames — no per-byte work on the load side unless `--check` verifies every byte.
//! Every scenario runs each backend side by side with the reference paths in the same run:
//! direct loopback TCP (the limit) and a splice(2) relay (a user-space relay that never touches
//! the bytes), so every figure is also a ratio.
//!
//! Run: `cargo bench --bench load` (`-- --quick` for CI, `-- --check` to verify bytes).

#[path = "../tests/util.rs"]
mod util;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringway::ws::{encode, OpCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use util::*;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

struct Opts {
    quick: bool,
    check: bool,
}

/// A stream of `count` frames of `size` bytes, masked (as a peer sends) and as the relay must
/// deliver them (unmasked).
fn frames(size: usize, count: usize) -> (Arc<Vec<u8>>, Arc<Vec<u8>>) {
    let payload: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
    let (mut masked, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..count {
        encode::frame(&mut masked, true, OpCode::Binary, &payload, Some(MASK));
        encode::frame(&mut plain, true, OpCode::Binary, &payload, None);
    }
    (Arc::new(masked), Arc::new(plain))
}

/// Every backend the relay has, each measured in every scenario.
const RELAYS: [Path; 2] = [Path::Relay("epoll"), Path::Relay("uring")];

/// How the load reaches its far end: through the relay, directly, or through the splice relay.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Relay(&'static str),
    Direct,
    Splice,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Relay("uring") => "relay io_uring",
            Path::Relay(_) => "relay epoll",
            Path::Direct => "direct TCP",
            Path::Splice => "splice relay",
        }
    }
}

/// A set-up path: how to open one (client, device) socket pair through it.
struct Rig {
    path: Path,
    relay: Option<Relay>,
    splice: Option<Proc>,
    splice_addr: Option<SocketAddr>,
    agent: Option<ringway::channel::Channel>,
    session: Option<(String, String)>,
    direct: Option<TcpListener>,
    pid: Option<u32>,
}

/// Connects from 127.0.0.2–127.0.0.201 in turn: one source address has only ~28k ports.
async fn connect_rotating(addr: SocketAddr) -> TcpStream {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let k = NEXT.fetch_add(1, Relaxed) % 200;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 2 + k as u8], 0))).unwrap();
    socket.connect(addr).await.expect("connect")
}

/// How much unsent data a synthetic peer lets its kernel queue (TCP_NOTSENT_LOWAT).
const PEER_UNSENT: u32 = 128 << 10;

/// Sets up a synthetic peer's socket: no Nagle delay, and a bounded unsent queue. The peers share
/// this kernel with the relay; with the default (send buffers autotuned to 4 MiB each), 1,000 busy
/// tunnels' peers queued ~1.3 GB, pushed TCP memory to the system's hard limit (`tcp_mem`), and
/// the kernel then stalled whole tunnels (zero windows, retransmission backoff) for seconds: a
/// cost of the load generator that the relay's figures would have carried. A remote client's
/// queue lives on its own machine.
fn peer_socket(s: &TcpStream) {
    s.set_nodelay(true).unwrap();
    socket2::SockRef::from(s).set_tcp_notsent_lowat(PEER_UNSENT).unwrap();
}

async fn ws_handshake(addr: SocketAddr, path: &str, token: &str) -> Result<TcpStream, String> {
    let mut s = connect_rotating(addr).await;
    peer_socket(&s);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("handshake answer");
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(format!("{path}: {}", String::from_utf8_lossy(&head)));
    }
    Ok(s)
}

fn pin_to(cpu: usize, pid: u32) {
    let _ = std::process::Command::new("taskset").args(["-a", "-cp", &cpu.to_string(), &pid.to_string()]).output();
}

impl Rig {
    async fn new(path: Path) -> Rig {
        let mut rig = Rig {
            path,
            relay: None,
            splice: None,
            splice_addr: None,
            agent: None,
            session: None,
            direct: None,
            pid: None,
        };
        match path {
            Path::Relay(backend) => {
                // RINGWAY_BENCH_DATAPLANE: extra `[dataplane]` keys, e.g. "buffers = 64".
                let extra = std::env::var("RINGWAY_BENCH_DATAPLANE").unwrap_or_default().replace(';', "\n");
                let relay = Relay::start(
                    backend,
                    &format!(
                        "[dataplane]\nworkers = 1\n{extra}\n[limits]\nmax_connections_per_session = 1000000\n\
                         max_handshakes = 100000\nmax_sessions_per_operator = 100000\n"
                    ),
                );
                pin_to(1, relay.proc.pid());
                let url = ringway::peer::RelayUrl::parse(&relay.url()).unwrap();
                let ws =
                    ringway::peer::dial(&url, &format!("/api/v1/agent?device={DEVICE_ID}"), DEVICE_KEY).await.unwrap();
                let limits = ringway::channel::Limits {
                    max_message: 1 << 20,
                    peer_masks: false,
                    stall: Duration::from_secs(60),
                };
                let ch = ringway::channel::channel(ws, limits);
                ch.send(ringway::channel::Outgoing::Text(
                    r#"{"type":"hello","services":["bench"],"version":"bench"}"#.into(),
                ))
                .unwrap();
                // The channel's tasks run on this runtime: wait without blocking it.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let (_, body) = http(relay.addr, "GET", "/api/v1/devices", Some(OPERATOR_TOKEN), None);
                    if body.contains(r#""id":"dev-1","online":true"#) {
                        break;
                    }
                    assert!(Instant::now() < deadline, "the synthetic agent never came online: {body}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let (_, url, token) = relay.start_session("bench", None);
                let path = ringway::peer::url_path(&url).unwrap();
                rig.pid = Some(relay.proc.pid());
                rig.session = Some((path, token));
                rig.agent = Some(ch);
                rig.relay = Some(relay);
            }
            Path::Splice => {
                let exe = std::env::current_exe().unwrap();
                let mut child = std::process::Command::new(exe)
                    .env("RINGWAY_BENCH_SPLICE", "1")
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut line = String::new();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
                    .unwrap();
                rig.splice_addr = Some(line.trim().parse().unwrap());
                pin_to(1, child.id());
                rig.pid = Some(child.id());
                rig.splice = Some(Proc { child, stderr: Default::default(), name: "splice" });
            }
            Path::Direct => rig.direct = Some(TcpListener::bind("127.0.0.1:0").unwrap()),
        }
        rig
    }

    /// One connected pair: (client side, device side). Through the relay both are WebSockets.
    async fn pair(&mut self) -> (TcpStream, TcpStream) {
        match self.path {
            Path::Relay(_) => {
                let relay = self.relay.as_ref().unwrap();
                let (path, token) = self.session.clone().unwrap();
                let fail = |e: String| -> ! {
                    let log = relay.proc.stderr();
                    let tail: Vec<&str> = log.lines().rev().take(6).collect();
                    panic!("{e}\nrelay log, last lines first:\n{}", tail.join("\n"))
                };
                let client = ws_handshake(relay.addr, &path, &token).await.unwrap_or_else(|e| fail(e));
                let agent = self.agent.as_mut().unwrap();
                let (session, conn, device_token) = loop {
                    match agent.rx.recv().await.expect("agent channel") {
                        ringway::channel::Incoming::Text(t) => match serde_json::from_str(&t).unwrap() {
                            ringway::proto::ToAgent::Connect { session, conn, token, .. } => {
                                break (session, conn, token)
                            }
                        },
                        ringway::channel::Incoming::Ping | ringway::channel::Incoming::Pong => {}
                        other => panic!("agent channel ended: {other:?}"),
                    }
                };
                let device_path = format!("/api/v1/sessions/{session}/device?conn={conn}");
                let device = ws_handshake(relay.addr, &device_path, &device_token).await.unwrap_or_else(|e| fail(e));
                (client, device)
            }
            Path::Splice => {
                let addr = self.splice_addr.unwrap();
                let a = TcpStream::connect(addr).await.unwrap();
                let b = TcpStream::connect(addr).await.unwrap();
                peer_socket(&a);
                peer_socket(&b);
                // The splice relay pairs connections in arrival order; make sure A arrived first.
                (a, b)
            }
            Path::Direct => {
                let l = self.direct.as_ref().unwrap();
                let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (b, _) = l.accept().unwrap();
                a.set_nonblocking(true).unwrap();
                b.set_nonblocking(true).unwrap();
                let (a, b) = (TcpStream::from_std(a).unwrap(), TcpStream::from_std(b).unwrap());
                peer_socket(&a);
                peer_socket(&b);
                (a, b)
            }
        }
    }

    /// Starts a fresh session; later pairs belong to it.
    fn new_session(&mut self) {
        let relay = self.relay.as_ref().unwrap();
        let (_, url, token) = relay.start_session("bench", None);
        self.session = Some((ringway::peer::url_path(&url).unwrap(), token));
    }

    /// What the far end receives for what was sent: unmasked frames through the relay, the
    /// same bytes elsewhere.
    fn delivered<'a>(&self, masked: &'a Arc<Vec<u8>>, plain: &'a Arc<Vec<u8>>) -> &'a Arc<Vec<u8>> {
        if matches!(self.path, Path::Relay(_)) {
            plain
        } else {
            masked
        }
    }

    fn cpu_secs(&self) -> f64 {
        self.pid.map(proc_cpu_secs).unwrap_or(0.0)
    }

    fn rss_kib(&self) -> u64 {
        self.pid.map(proc_rss_kib).unwrap_or(0)
    }
}

/// Writes `stream` round and round until `stop`.
async fn writer(mut w: tokio::net::tcp::OwnedWriteHalf, stream: Arc<Vec<u8>>, stop: Arc<AtomicU64>) {
    while stop.load(Relaxed) == 0 {
        if w.write_all(&stream).await.is_err() {
            return;
        }
    }
}

/// Reads and counts; with `expect`, checks every byte against the cyclic expected stream.
async fn reader(
    mut r: tokio::net::tcp::OwnedReadHalf,
    expect: Option<Arc<Vec<u8>>>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0usize;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // After the writers stop, the relay's Close for their half-closed tunnels follows.
        if stop.load(Relaxed) != 0 {
            return;
        }
        if let Some(e) = &expect {
            let mut done = 0;
            while done < n {
                let take = (n - done).min(e.len() - at);
                assert!(
                    buf[done..done + take] == e[at..at + take],
                    "bytes differ at offset {at} of the expected stream"
                );
                at = (at + take) % e.len();
                done += take;
            }
        }
        count.fetch_add(n as u64, Relaxed);
    }
}

struct Bulk {
    gbps: f64,
    cpu_per_gb: f64,
    rss_mb: f64,
    slowest_over_fastest: f64,
    starved: usize,
}

/// `tunnels` pairs, each moving `size`-byte frames both ways for `secs`.
async fn bulk(rig: &mut Rig, tunnels: usize, size: usize, secs: f64, opts: &Opts) -> Bulk {
    let (masked, plain) = frames(size, ((1 << 20) / size).max(1));
    let stop = Arc::new(AtomicU64::new(0));
    let mut counters = Vec::new();
    // All pairs first: once load runs, this single-threaded runtime has little time for setup.
    let mut pairs = Vec::with_capacity(tunnels);
    for _ in 0..tunnels {
        pairs.push(rig.pair().await);
    }
    for (client, device) in pairs {
        let (cr, cw) = client.into_split();
        let (dr, dw) = device.into_split();
        for (r, w) in [(dr, cw), (cr, dw)] {
            let c = Arc::new(AtomicU64::new(0));
            let expect = opts.check.then(|| rig.delivered(&masked, &plain).clone());
            tokio::spawn(writer(w, masked.clone(), stop.clone()));
            tokio::spawn(reader(r, expect, c.clone(), stop.clone()));
            counters.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Vec<u64> = counters.iter().map(|c| c.load(Relaxed)).collect();
    let (cpu0, t0) = (rig.cpu_secs(), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = rig.cpu_secs() - cpu0;
    let moved: Vec<u64> = counters.iter().zip(&before).map(|(c, b)| c.load(Relaxed) - b).collect();
    let rss = rig.rss_kib();
    stop.store(1, Relaxed);
    let total: u64 = moved.iter().sum();
    let (min, max) = (*moved.iter().min().unwrap(), *moved.iter().max().unwrap());
    Bulk {
        gbps: total as f64 / elapsed / 1e9,
        cpu_per_gb: cpu / (total as f64 / 1e9),
        rss_mb: rss as f64 / 1024.0,
        slowest_over_fastest: min as f64 / max.max(1) as f64,
        starved: moved.iter().filter(|&&m| m == 0).count(),
    }
}

/// 64-byte request/response round trips on one pair: (round trips/s, p50, p99, p99.9 in µs).
async fn rtt(rig: &mut Rig, rounds: usize) -> (f64, f64, f64, f64) {
    let (mut client, mut device) = rig.pair().await;
    let (masked, plain) = frames(64, 1);
    let got = rig.delivered(&masked, &plain).len();
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; got];
        for _ in 0..rounds {
            if device.read_exact(&mut buf).await.is_err() {
                return;
            }
            let _ = device.write_all(&masked).await;
        }
    });
    let mut buf = vec![0u8; got];
    let mut samples = Vec::with_capacity(rounds);
    let began = Instant::now();
    let (masked, _) = frames(64, 1);
    for _ in 0..rounds {
        let t = Instant::now();
        client.write_all(&masked).await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let secs = began.elapsed().as_secs_f64();
    let _ = echo.await;
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    (rounds as f64 / secs, pct(0.50), pct(0.99), pct(0.999))
}

/// Relay RSS per idle tunnel with `idle` idle tunnels open, and the speed of 10 busy tunnels
/// among them relative to 10 busy tunnels alone: (KiB per idle tunnel, ratio, busy GB/s).
async fn density(rig: &mut Rig, idle: usize, secs: f64, opts: &Opts) -> (f64, f64, f64) {
    let alone = bulk(rig, 10, 16 << 10, secs, opts).await.gbps;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rig.rss_kib();
    let mut idle_pairs = Vec::with_capacity(idle);
    for _ in 0..idle {
        idle_pairs.push(rig.pair().await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = (rig.rss_kib().saturating_sub(before)) as f64 / idle as f64;
    let among = bulk(rig, 10, 16 << 10, secs, opts).await.gbps;
    drop(idle_pairs);
    (per, among / alone, among)
}

async fn run_density(relays: &[Path], opts: &Opts, secs: f64) {
    // Each idle tunnel takes 2 descriptors here and 2 in the relay (which inherits our limit).
    let fd_limit = nofile_limit();
    let most = (fd_limit.saturating_sub(500) / 2) as usize;
    let wanted: &[usize] = if opts.quick { &[1_000] } else { &[10_000, 100_000] };
    let mut densities: Vec<usize> = wanted.iter().map(|&n| n.min(most)).collect();
    densities.dedup();
    if densities.iter().zip(wanted).any(|(got, want)| got < want) {
        println!("(RLIMIT_NOFILE hard limit {fd_limit} here: at most {most} idle tunnels)");
    }
    println!("\ndensity: idle tunnels, then 10 busy tunnels among them");
    println!("{:<18} {:>8} {:>16} {:>14} {:>16}", "path", "idle", "KiB per idle", "busy GB/s", "vs busy alone");
    for &path in relays {
        for &idle in &densities {
            let mut rig = Rig::new(path).await;
            let (per, ratio, gbps) = density(&mut rig, idle, secs, opts).await;
            println!("{:<18} {:>8} {:>16.2} {:>14.2} {:>15.2}x", path.name(), idle, per, gbps, ratio);
        }
    }
}

/// Sessions started + connection paired + first byte through, per second.
async fn churn(rig: &mut Rig, n: usize) -> f64 {
    let (masked, _) = frames(64, 1);
    let began = Instant::now();
    for _ in 0..n {
        rig.new_session();
        let (mut client, mut device) = rig.pair().await;
        client.write_all(&masked).await.unwrap();
        let mut first = [0u8; 1];
        device.read_exact(&mut first).await.unwrap();
    }
    n as f64 / began.elapsed().as_secs_f64()
}

/// The splice(2) reference relay, run as a child process of this benchmark.
fn splice_relay() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", l.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    loop {
        let (a, _) = l.accept().unwrap();
        let (b, _) = l.accept().unwrap();
        for (from, to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
            std::thread::spawn(move || splice_one_way(from, to));
        }
    }
}

fn splice_one_way(from: std::net::TcpStream, to: std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let mut pipe = [0i32; 2];
    // SAFETY: pipe(2) into a 2-element array; splice(2) between descriptors we own.
    unsafe {
        assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
        loop {
            let n = libc::splice(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                pipe[1],
                std::ptr::null_mut(),
                1 << 16,
                libc::SPLICE_F_MOVE,
            );
            if n <= 0 {
                break;
            }
            let mut left = n;
            while left > 0 {
                let m = libc::splice(
                    pipe[0],
                    std::ptr::null_mut(),
                    to.as_raw_fd(),
                    std::ptr::null_mut(),
                    left as usize,
                    libc::SPLICE_F_MOVE,
                );
                if m <= 0 {
                    return;
                }
                left -= m;
            }
        }
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

fn main() {
    if std::env::var_os("RINGWAY_BENCH_SPLICE").is_some() {
        return splice_relay();
    }
    let args: Vec<String> = std::env::args().collect();
    let opts = Opts { quick: args.iter().any(|a| a == "--quick"), check: args.iter().any(|a| a == "--check") };
    // SAFETY: pins this process's current thread set to CPU 0; the relay gets CPU 1.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(run(opts));
}

fn nofile_limit() -> u64 {
    // SAFETY: getrlimit into a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

fn raise_nofile() {
    // SAFETY: get/setrlimit on this process with a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        // Root may raise the hard limit too; the relay process inherits what we get.
        let want = libc::rlimit { rlim_cur: 1_000_000, rlim_max: 1_000_000 };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn run(opts: Opts) {
    let secs = if opts.quick { 1.0 } else { 4.0 };
    let busy = if opts.quick { 100 } else { 1000 };
    let rounds = if opts.quick { 2_000 } else { 20_000 };
    let paths = selected(&[Path::Direct, Path::Splice, RELAYS[0], RELAYS[1]]);
    let relays = selected(&RELAYS);
    println!(
        "ringway load benchmark ({}; relay: 1 worker pinned to CPU 1; load pinned to CPU 0{})",
        if opts.quick { "quick" } else { "full" },
        if opts.check { "; every byte checked" } else { "" }
    );

    for size in [16 << 10, 64 << 10] {
        if !scenario("bulk") {
            break;
        }
        println!("\nbulk, 1 tunnel, {} KiB frames, both directions", size >> 10);
        println!("{:<18} {:>9} {:>10} {:>13} {:>9}", "path", "GB/s", "vs epoll", "CPU s per GB", "RSS MB");
        let mut rows = Vec::new();
        for &path in &paths {
            let mut rig = Rig::new(path).await;
            rows.push((path, bulk(&mut rig, 1, size, secs, &opts).await));
        }
        let base = rows.iter().find(|(p, _)| *p == Path::Relay("epoll")).map_or(f64::NAN, |(_, b)| b.gbps);
        for (path, b) in &rows {
            if *path == Path::Direct {
                println!("{:<18} {:>9.2} {:>9.2}x {:>13} {:>9}", path.name(), b.gbps, b.gbps / base, "-", "-");
            } else {
                println!(
                    "{:<18} {:>9.2} {:>9.2}x {:>13.2} {:>9.1}",
                    path.name(),
                    b.gbps,
                    b.gbps / base,
                    b.cpu_per_gb,
                    b.rss_mb
                );
            }
        }
    }

    if scenario("busy") {
        busy_tunnels(&paths, busy, secs, &opts).await;
    }
    if scenario("rtt") {
        round_trips(&paths, rounds).await;
    }
    if scenario("density") {
        run_density(&relays, &opts, secs).await;
    }
    if scenario("console") {
        console_cost(&opts, secs, busy).await;
    }
    if scenario("churn") {
        let n = if opts.quick { 200 } else { 2_000 };
        println!("\nsession churn: start session + pair a connection + first byte, {n} times");
        println!("{:<18} {:>12}", "path", "per second");
        for &path in &relays {
            let mut rig = Rig::new(path).await;
            println!("{:<18} {:>12.0}", path.name(), churn(&mut rig, n).await);
        }
    }
}

/// Console live views (`GET /api/v1/live`) kept open on a relay, each on a thread of its own
/// that reads every update as a browser tab would; all logged in with the operator token.
struct Pages {
    stop: Arc<std::sync::atomic::AtomicBool>,
    updates: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pages {
    /// Opens `n` live views and waits until each has its first update.
    fn open(addr: SocketAddr, n: usize) -> Pages {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let updates = Arc::new(AtomicU64::new(0));
        let opened = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        if n > 0 {
            let body = format!(r#"{{"token":"{OPERATOR_TOKEN}"}}"#);
            let json = [("Content-Type", "application/json")];
            let (status, head, _) = http_with(addr, "POST", "/api/v1/login", &json, Some(&body));
            assert_eq!(status, 200, "console login");
            let cookie = header(&head, "set-cookie").unwrap().split(';').next().unwrap().to_string();
            for _ in 0..n {
                let (cookie, stop, updates, opened) = (cookie.clone(), stop.clone(), updates.clone(), opened.clone());
                threads.push(std::thread::spawn(move || {
                    let mut req =
                        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/api/v1/live"))
                            .unwrap();
                    req.headers_mut().insert("cookie", cookie.parse().unwrap());
                    let tcp = std::net::TcpStream::connect(addr).unwrap();
                    tcp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    let (mut ws, _) = tungstenite::client(req, tcp).map_err(|e| e.to_string()).expect("a live view");
                    let mut first = true;
                    while !stop.load(Relaxed) {
                        match ws.read() {
                            Ok(tungstenite::Message::Text(_)) => {
                                if std::mem::take(&mut first) {
                                    opened.fetch_add(1, Relaxed);
                                } else {
                                    updates.fetch_add(1, Relaxed);
                                }
                            }
                            Ok(_) => {}
                            Err(tungstenite::Error::Io(e))
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(e) => panic!("a live view ended: {e}"),
                        }
                    }
                }));
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while opened.load(Relaxed) < n as u64 {
                assert!(Instant::now() < deadline, "the live views did not all open");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Pages { stop, updates, threads }
    }

    /// Closes them; the updates they received after their first.
    fn close(self) -> u64 {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            t.join().expect("a live view thread");
        }
        self.updates.load(Relaxed)
    }
}

/// What the console costs the relay: the bulk and busy figures with 100 live views open and
/// without, alternating in the same run; then the relay's CPU with one tunnel trickling (its
/// bytes change every second, so every view gets an update a second) with 100 views and without.
async fn console_cost(opts: &Opts, secs: f64, busy: usize) {
    const VIEWS: usize = 100;
    println!("\nconsole: {VIEWS} live views open or none, epoll relay (1 worker), alternating");
    println!(
        "{:<7} {:>14} {:>13} {:>16} {:>17} {:>18}",
        "views",
        "1 tunnel GB/s",
        "CPU s per GB",
        &format!("{busy} busy GB/s"),
        "slowest/fastest",
        "updates/view/s"
    );
    for views in [0, VIEWS, 0, VIEWS] {
        let mut rig = Rig::new(RELAYS[0]).await;
        let pages = Pages::open(rig.relay.as_ref().unwrap().addr, views);
        let t0 = Instant::now();
        let one = bulk(&mut rig, 1, 64 << 10, secs, opts).await;
        let many = bulk(&mut rig, busy, 16 << 10, secs * 2.0, opts).await;
        let elapsed = t0.elapsed().as_secs_f64();
        let rate = if views == 0 { 0.0 } else { pages.close() as f64 / views as f64 / elapsed };
        println!(
            "{:<7} {:>14.2} {:>13.2} {:>16.2} {:>17.3} {:>18.2}",
            views, one.gbps, one.cpu_per_gb, many.gbps, many.slowest_over_fastest, rate
        );
    }

    let measure = if opts.quick { 3.0 } else { 20.0 };
    println!("\nconsole: relay CPU, one tunnel trickling 1 KiB every 50 ms, {measure} s each, alternating");
    println!("{:<7} {:>16} {:>18}", "views", "relay % of a core", "updates/view/s");
    for views in [0, VIEWS, 0, VIEWS] {
        let mut rig = Rig::new(RELAYS[0]).await;
        let (client, mut device) = rig.pair().await;
        let (masked, _) = frames(1 << 10, 1);
        let stop = Arc::new(AtomicU64::new(0));
        let trickle = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = client;
                while stop.load(Relaxed) == 0 {
                    if client.write_all(&masked).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            while matches!(device.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let pages = Pages::open(rig.relay.as_ref().unwrap().addr, views);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (cpu0, t0) = (rig.cpu_secs(), Instant::now());
        tokio::time::sleep(Duration::from_secs_f64(measure)).await;
        let elapsed = t0.elapsed().as_secs_f64();
        let pct = (rig.cpu_secs() - cpu0) / elapsed * 100.0;
        let rate = if views == 0 { 0.0 } else { pages.close() as f64 / views as f64 / (elapsed + 1.0) };
        stop.store(1, Relaxed);
        let _ = trickle.await;
        drain.abort();
        println!("{:<7} {:>16.2} {:>18.2}", views, pct, rate);
    }
}

/// Whether `RINGWAY_BENCH_ONLY` (a comma-separated list of bulk, busy, rtt, density, console, churn)
/// selects this scenario; all run when it is unset.
fn scenario(name: &str) -> bool {
    std::env::var("RINGWAY_BENCH_ONLY").map_or(true, |only| only.split(',').any(|s| s.trim() == name))
}

/// The paths `RINGWAY_BENCH_PATHS` (comma-separated: direct, splice, epoll, uring) keeps.
fn selected(paths: &[Path]) -> Vec<Path> {
    let Ok(only) = std::env::var("RINGWAY_BENCH_PATHS") else { return paths.to_vec() };
    let key = |p: &Path| match p {
        Path::Direct => "direct",
        Path::Splice => "splice",
        Path::Relay(b) => b,
    };
    paths.iter().copied().filter(|p| only.split(',').any(|s| s.trim() == key(p))).collect()
}

async fn busy_tunnels(paths: &[Path], busy: usize, secs: f64, opts: &Opts) {
    println!("\nbulk, {busy} busy tunnels, 16 KiB frames, both directions");
    println!(
        "{:<18} {:>9} {:>10} {:>17} {:>8} {:>9}",
        "path", "GB/s", "vs epoll", "slowest/fastest", "starved", "RSS MB"
    );
    let mut rows = Vec::new();
    for &path in paths {
        let mut rig = Rig::new(path).await;
        rows.push((path, bulk(&mut rig, busy, 16 << 10, secs * 2.0, opts).await));
    }
    let base = rows.iter().find(|(p, _)| *p == Path::Relay("epoll")).map_or(f64::NAN, |(_, b)| b.gbps);
    for (path, b) in &rows {
        let rss = if *path == Path::Direct { "-".to_string() } else { format!("{:.1}", b.rss_mb) };
        println!(
            "{:<18} {:>9.2} {:>9.2}x {:>17.3} {:>8} {:>9}",
            path.name(),
            b.gbps,
            b.gbps / base,
            b.slowest_over_fastest,
            b.starved,
            rss
        );
    }
}

async fn round_trips(paths: &[Path], rounds: usize) {
    println!("\nsmall messages: 64 B request/response, 1 tunnel, {rounds} round trips");
    println!(
        "{:<18} {:>12} {:>9} {:>9} {:>9} {:>16}",
        "path", "round trips/s", "p50 µs", "p99 µs", "p99.9 µs", "p99 vs splice"
    );
    let mut rows = Vec::new();
    for &path in paths {
        let mut rig = Rig::new(path).await;
        rows.push((path, rtt(&mut rig, rounds).await));
    }
    let splice_p99 = rows.iter().find(|(p, _)| *p == Path::Splice).map_or(f64::NAN, |(_, r)| r.2);
    for (path, (rps, p50, p99, p999)) in &rows {
        println!(
            "{:<18} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>15.2}x",
            path.name(),
            rps,
            p50,
            p99,
            p999,
            p99 / splice_p99
        );
    }
}
