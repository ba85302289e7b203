//! End to end: the whole path `client → connect → relay → agent → service` as real processes,
//! against references measured in the same run: direct loopback TCP and a splice(2) relay.
//!
//! - **Bulk**: 1 and 4 TCP streams client → service, then 1 stream service → client; every byte
//!   compared with the sender's pattern. Gbit/s, the path's speed against direct TCP, the CPU
//!   of relay + agent + `connect` in % of a core per Gbit/s, and the edges' peak RSS (VmHWM).
//! - **Idle**: 2,000 idle connections through one session: RSS growth per connection of the
//!   agent, `connect` and the relay.
//! - **Round trip**: 64-byte echoes, p50 and p99, with every process and thread pinned to one
//!   core, against the splice relay's.
//! - **First byte**: from a local `connect()` to the first echoed byte with each edge 25 ms
//!   each way from the relay (a delaying proxy of its own in front of the relay).
//!
//! Both relay engines. With `EDGES_BASELINE=/path/to/an/older/ringway`, that build is measured
//! too, in the same run ("before" rows).
//!
//! Run: `cargo bench --bench edges` (add `-- --quick` for a short run, as CI does).

#[path = "../tests/util.rs"]
mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use util::*;

/// The pattern every stream carries: byte `p` of a stream is `PATTERN[p % PERIOD]`. The period
/// is not a power of two, so a lost, repeated or reordered piece shows.
const PERIOD: usize = (1 << 20) + 13;
const CHUNK: usize = 256 << 10;

fn pattern() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let mut block = vec![0u8; PERIOD];
        Noise::new(7).fill(&mut block);
        let mut twice = block.clone();
        twice.extend_from_slice(&block);
        twice
    })
}

/// Writes `len` bytes of the pattern.
fn send_pattern(w: &mut impl Write, len: u64) {
    let p = pattern();
    let mut at = 0u64;
    while at < len {
        let off = (at % PERIOD as u64) as usize;
        let n = (len - at).min(CHUNK as u64) as usize;
        w.write_all(&p[off..off + n]).unwrap();
        at += n as u64;
    }
}

/// Reads to EOF, comparing every byte with the pattern; returns the bytes read or where the
/// stream first differed.
fn check_pattern(r: &mut impl Read) -> Result<u64, String> {
    let p = pattern();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(at),
            Ok(n) => n,
            Err(e) => return Err(format!("read error after {at} bytes: {e}")),
        };
        let off = (at % PERIOD as u64) as usize;
        if buf[..n] != p[off..off + n] {
            return Err(format!("stream differs from the pattern within bytes {at}..{}", at + n as u64));
        }
        at += n as u64;
    }
}

/// The service: a connection that starts with `U` is a sink (reports what it read); one that
/// starts with `D` + a u64 length gets that much pattern, then EOF.
fn bulk_service() -> (SocketAddr, mpsc::Receiver<Result<u64, String>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut kind = [0u8; 1];
                if s.read_exact(&mut kind).is_err() {
                    return;
                }
                if kind[0] == b'U' {
                    let _ = tx.send(check_pattern(&mut s));
                } else {
                    let mut len = [0u8; 8];
                    s.read_exact(&mut len).unwrap();
                    send_pattern(&mut s, u64::from_be_bytes(len));
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
            });
        }
    });
    (addr, rx)
}

/// `streams` connections to `at` at once, each moving `len / streams` bytes (up: to the
/// service; down: from it). Returns Gbit/s of checked payload.
fn bulk(at: SocketAddr, sink: &mpsc::Receiver<Result<u64, String>>, streams: usize, len: u64, up: bool) -> f64 {
    let each = len / streams as u64;
    let began = Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(at).unwrap();
                s.set_nodelay(true).unwrap();
                if up {
                    s.write_all(b"U").unwrap();
                    send_pattern(&mut s, each);
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                    // The service's EOF follows once the tunnel has passed everything.
                    let _ = s.read(&mut [0u8; 1]);
                } else {
                    s.write_all(b"D").unwrap();
                    s.write_all(&each.to_be_bytes()).unwrap();
                    let got = check_pattern(&mut s).unwrap();
                    assert_eq!(got, each, "short transfer");
                }
            })
        })
        .collect();
    if up {
        for _ in 0..streams {
            let got = sink.recv_timeout(Duration::from_secs(300)).expect("the service never finished").unwrap();
            assert_eq!(got, each, "short transfer");
        }
    }
    for w in workers {
        w.join().unwrap();
    }
    let secs = began.elapsed().as_secs_f64();
    (each * streams as u64) as f64 * 8.0 / 1e9 / secs
}

/// A relay built on splice(2): what moving bytes costs with no framing and no copies.
fn splice_relay(upstream: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(a) = s else { continue };
            let b = TcpStream::connect(upstream).unwrap();
            a.set_nodelay(true).unwrap();
            b.set_nodelay(true).unwrap();
            let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            thread::spawn(move || splice_one_way(&a, &b));
            thread::spawn(move || splice_one_way(&b2, &a2));
        }
    });
    addr
}

fn splice_one_way(from: &TcpStream, to: &TcpStream) {
    let mut fds = [0i32; 2];
    // SAFETY: plain syscalls on descriptors this function owns or borrows for its duration.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        let flags = libc::SPLICE_F_MOVE;
        loop {
            let n = libc::splice(from.as_raw_fd(), std::ptr::null_mut(), fds[1], std::ptr::null_mut(), 1 << 20, flags);
            if n <= 0 {
                break;
            }
            let mut left = n as usize;
            while left > 0 {
                let m = libc::splice(fds[0], std::ptr::null_mut(), to.as_raw_fd(), std::ptr::null_mut(), left, flags);
                if m <= 0 {
                    break;
                }
                left -= m as usize;
            }
        }
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// relay, agent and `connect` of one build, for one service.
struct Path {
    relay: Relay,
    agent: Proc,
    connect: Proc,
    local: SocketAddr,
}

impl Path {
    fn start(bin: &str, backend: &str, service: SocketAddr) -> Path {
        // Enough connections per session for the idle test.
        let relay = Relay::start_bin(bin, "127.0.0.1:0", backend, "[limits]\nmax_connections_per_session = 10000\n");
        let url = relay.url();
        let svc = format!("svc={service}");
        let args = ["agent", "--relay", &url, "--device", DEVICE_ID, "--key", DEVICE_KEY, "--service", &svc];
        let (agent, _) = Proc::spawn_bin(bin, "agent", &args, false);
        relay.wait_device_online(DEVICE_ID, true);
        let args = ["connect", "--relay", &url, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "svc"];
        let (connect, local) = Proc::spawn_bin(bin, "connect", &args, true);
        Path { relay, agent, connect, local: local.unwrap() }
    }

    fn pids(&self) -> [u32; 3] {
        [self.relay.proc.pid(), self.agent.pid(), self.connect.pid()]
    }

    /// CPU seconds so far of relay, agent and `connect`.
    fn cpu(&self) -> [f64; 3] {
        self.pids().map(proc_cpu_secs)
    }
}

/// One bulk figure: Gbit/s and, for a ringway path, % of a core per Gbit/s of relay, agent
/// and `connect`.
fn bulk_row(
    path: Option<&Path>,
    at: SocketAddr,
    sink: &mpsc::Receiver<Result<u64, String>>,
    streams: usize,
    len: u64,
    up: bool,
) -> (f64, [f64; 3]) {
    let cpu0 = path.map(Path::cpu).unwrap_or_default();
    let began = Instant::now();
    let gbps = bulk(at, sink, streams, len, up);
    let secs = began.elapsed().as_secs_f64();
    let cpu1 = path.map(Path::cpu).unwrap_or_default();
    (gbps, [0, 1, 2].map(|i| 100.0 * (cpu1[i] - cpu0[i]) / secs / gbps))
}

fn bulk_table(builds: &[(String, String)], len: u64) {
    let (service, sink) = bulk_service();
    println!("\nbulk: {} MiB per run, every byte checked; speed is against direct TCP", len >> 20);
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>13} {:>13}",
        "path", "1 up", "4 up", "1 down", "1 up", "4 up", "1 down", "%core/Gbit/s", "peak RSS MB"
    );
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>13} {:>13}",
        "", "Gbit/s", "", "", "speed", "", "", "(1 up)", "agent/connect"
    );
    let direct: Vec<f64> = [(1, true), (4, true), (1, false)]
        .iter()
        .map(|&(n, up)| bulk_row(None, service, &sink, n, len, up).0)
        .collect();
    println!(
        "{:<24} {:>8.2} {:>8.2} {:>8.2} {:>6.2}x {:>6.2}x {:>6.2}x",
        "direct TCP", direct[0], direct[1], direct[2], 1.0, 1.0, 1.0
    );
    let spliced = splice_relay(service);
    let s: Vec<f64> = [(1, true), (4, true), (1, false)]
        .iter()
        .map(|&(n, up)| bulk_row(None, spliced, &sink, n, len, up).0)
        .collect();
    println!(
        "{:<24} {:>8.2} {:>8.2} {:>8.2} {:>6.2}x {:>6.2}x {:>6.2}x",
        "splice(2) relay",
        s[0],
        s[1],
        s[2],
        s[0] / direct[0],
        s[1] / direct[1],
        s[2] / direct[2]
    );
    for (label, bin) in builds {
        for backend in ["uring", "epoll"] {
            let path = Path::start(bin, backend, service);
            let rows: Vec<(f64, [f64; 3])> = [(1, true), (4, true), (1, false)]
                .iter()
                .map(|&(n, up)| bulk_row(Some(&path), path.local, &sink, n, len, up))
                .collect();
            let peak = (
                proc_peak_rss_kib(path.agent.pid()) as f64 / 1024.0,
                proc_peak_rss_kib(path.connect.pid()) as f64 / 1024.0,
            );
            println!(
                "{:<24} {:>8.2} {:>8.2} {:>8.2} {:>6.2}x {:>6.2}x {:>6.2}x {:>13.1} {:>6.1}/{:<6.1}",
                format!("ringway {backend}, {label}"),
                rows[0].0,
                rows[1].0,
                rows[2].0,
                rows[0].0 / direct[0],
                rows[1].0 / direct[1],
                rows[2].0 / direct[2],
                rows[0].1.iter().sum::<f64>(),
                peak.0,
                peak.1
            );
            for (what, row) in ["1 up", "4 up", "1 down"].iter().zip(&rows) {
                let [r, a, c] = row.1;
                println!("    {what:<7} %core/Gbit/s: relay {r:.1} + agent {a:.1} + connect {c:.1} = {:.1}", r + a + c);
            }
        }
    }
}

/// A service that accepts connections and holds them, idle.
fn holding_service() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            held.push(s);
            seen.store(held.len(), Ordering::SeqCst);
        }
    });
    (addr, count)
}

fn idle_table(builds: &[(String, String)], conns: usize) {
    println!("\nidle: {conns} idle connections through one session; RSS growth per connection (KiB)");
    println!("{:<24} {:>8} {:>8} {:>8}", "path", "agent", "connect", "relay");
    for (label, bin) in builds {
        for backend in ["uring", "epoll"] {
            let (service, held) = holding_service();
            let path = Path::start(bin, backend, service);
            let open = |n: usize, keep: &mut Vec<TcpStream>| {
                let want = held.load(Ordering::SeqCst) + n;
                for _ in 0..n {
                    keep.push(TcpStream::connect(path.local).unwrap());
                }
                let deadline = Instant::now() + Duration::from_secs(120);
                while held.load(Ordering::SeqCst) < want {
                    assert!(
                        Instant::now() < deadline,
                        "only {} of {want} connections reached the service",
                        held.load(Ordering::SeqCst)
                    );
                    thread::sleep(Duration::from_millis(50));
                }
                // Until the relay has paired every one (the agent dials the service first).
                while path.relay.metric("ringway_tunnels_active") < want as u64 {
                    assert!(Instant::now() < deadline, "the relay never paired {want} connections");
                    thread::sleep(Duration::from_millis(50));
                }
                thread::sleep(Duration::from_millis(500));
            };
            let mut keep = Vec::new();
            open(20, &mut keep);
            let before = path.pids().map(proc_rss_kib);
            open(conns, &mut keep);
            let after = path.pids().map(proc_rss_kib);
            let per = |i: usize| (after[i] as f64 - before[i] as f64) / conns as f64;
            println!("{:<24} {:>8.1} {:>8.1} {:>8.1}", format!("ringway {backend}, {label}"), per(1), per(2), per(0));
        }
    }
}

fn echo_rtts(at: SocketAddr, n: usize) -> (f64, f64) {
    let mut s = TcpStream::connect(at).unwrap();
    s.set_nodelay(true).unwrap();
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let mut rtts = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg, "echo differs");
        if i >= 100 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtts.sort_by(f64::total_cmp);
    (rtts[n / 2], rtts[n * 99 / 100])
}

/// Pins the calling thread, and so every thread and process it starts from now on, to `cpus`.
fn pin_to(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus {
            libc::CPU_SET(*c, &mut set);
        }
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
}

fn rtt_table(builds: &[(String, String)], n: usize) {
    println!("\nround trip: 64 B echoes, {n} of them, every process and thread on core 0 (µs)");
    println!("{:<24} {:>8} {:>8} {:>10}", "path", "p50", "p99", "p50 vs splice");
    let all: Vec<usize> = (0..thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect();
    pin_to(&[0]);
    let echo = echo_server();
    let direct = echo_rtts(echo, n);
    println!("{:<24} {:>8.1} {:>8.1}", "direct TCP", direct.0, direct.1);
    let spliced = echo_rtts(splice_relay(echo), n);
    println!("{:<24} {:>8.1} {:>8.1} {:>9.2}x", "splice(2) relay", spliced.0, spliced.1, 1.0);
    for (label, bin) in builds {
        for backend in ["uring", "epoll"] {
            let path = Path::start(bin, backend, echo);
            let (p50, p99) = echo_rtts(path.local, n);
            println!(
                "{:<24} {:>8.1} {:>8.1} {:>9.2}x",
                format!("ringway {backend}, {label}"),
                p50,
                p99,
                p50 / spliced.0
            );
        }
    }
    pin_to(&all);
}

/// A proxy that delays like a link with `delay` each way: the connection to upstream is made
/// `delay` after the client's (the SYN's trip), the client's bytes reach upstream no earlier
/// than one round trip after it connected (the handshake) plus `delay`, and every chunk either
/// way arrives `delay` after it was sent. (This kernel has no netem.)
fn delay_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let t0 = Instant::now();
            thread::spawn(move || {
                thread::sleep(delay);
                let Ok(u) = TcpStream::connect(upstream) else { return };
                let _ = (c.set_nodelay(true), u.set_nodelay(true));
                let ready = t0 + 2 * delay;
                let (c2, u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
                thread::spawn(move || delayed_copy(c2, u2, move |at| at.max(ready) + delay));
                delayed_copy(u, c, move |at| at + delay);
            });
        }
    });
    addr
}

/// Copies `from` to `to`, each chunk written at `release(when it was read)`.
fn delayed_copy(mut from: TcpStream, mut to: TcpStream, release: impl Fn(Instant) -> Instant + Send + 'static) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = thread::spawn(move || {
        for (at, chunk) in rx {
            let now = Instant::now();
            if at > now {
                thread::sleep(at - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || tx.send((release(Instant::now()), buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// Time from a local connect() to the first echoed byte, with both edges 25 ms (each way) from
/// the relay.
fn first_byte_table(builds: &[(String, String)], n: usize) {
    const DELAY: Duration = Duration::from_millis(25);
    println!(
        "
first byte: connect() to the first echoed byte, each edge 50 ms round trip from the relay, {n} connections (ms)"
    );
    println!("{:<24} {:>8} {:>8} {:>8}", "path", "min", "p50", "max");
    let echo = echo_server();
    for (label, bin) in builds {
        let relay = Relay::start_bin(bin, "127.0.0.1:0", "epoll", "");
        let (to_agent, to_connect) = (delay_proxy(relay.addr, DELAY), delay_proxy(relay.addr, DELAY));
        let svc = format!("svc={echo}");
        let agent_url = format!("http://{to_agent}");
        let args = ["agent", "--relay", &agent_url, "--device", DEVICE_ID, "--key", DEVICE_KEY, "--service", &svc];
        let (_agent, _) = Proc::spawn_bin(bin, "agent", &args, false);
        relay.wait_device_online(DEVICE_ID, true);
        let connect_url = format!("http://{to_connect}");
        let args =
            ["connect", "--relay", &connect_url, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "svc"];
        let (_connect, local) = Proc::spawn_bin(bin, "connect", &args, true);
        let local = local.unwrap();
        let mut times: Vec<f64> = (0..n)
            .map(|_| {
                // Time for whatever the edges keep ready to be ready again.
                thread::sleep(Duration::from_millis(1500));
                let began = Instant::now();
                let mut s = TcpStream::connect(local).unwrap();
                s.set_nodelay(true).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"x").unwrap();
                let mut back = [0u8; 1];
                s.read_exact(&mut back).unwrap();
                assert_eq!(&back, b"x");
                began.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "{:<24} {:>8.1} {:>8.1} {:>8.1}",
            format!("ringway epoll, {label}"),
            times[0],
            times[n / 2],
            times[n - 1]
        );
    }
    println!("(one round trip of the whole path, client to relay to device, is 100 ms here)");
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // 2,000 idle connections take 4,000 descriptors in the benchmark and in each process.
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let mut builds = vec![("this build".to_string(), BIN.to_string())];
    if let Ok(base) = std::env::var("EDGES_BASELINE") {
        builds.insert(0, ("before".to_string(), base));
    }
    let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("edges: end to end through real processes; {cpus} CPUs, Linux {}", kernel.trim());
    // EDGES_PARTS=bulk,idle,rtt,first (any of them) runs only those parts.
    let parts = std::env::var("EDGES_PARTS").unwrap_or_else(|_| "bulk,idle,rtt,first".into());
    if parts.contains("bulk") {
        bulk_table(&builds, if quick { 1 << 30 } else { 4 << 30 });
    }
    if parts.contains("idle") {
        idle_table(&builds, if quick { 500 } else { 2000 });
    }
    if parts.contains("rtt") {
        rtt_table(&builds, if quick { 2000 } else { 20000 });
    }
    if parts.contains("first") {
        first_byte_table(&builds, if quick { 5 } else { 15 });
    }
}
