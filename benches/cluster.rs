//! What the cluster costs, through the real binaries and a real `nats-server -js`: three relay
//! nodes on 127.0.0.1-3 against one single relay measured in the same run.
//!
//! - session start latency (`POST /api/v1/sessions`, one TCP connection per request as a
//!   script would): single node, cluster with the device on the node asked (same-node), and on
//!   another node (cross-node: one NATS request/reply to the device's node);
//! - one bulk tunnel, both directions at once, `ringway connect` asking another node than the
//!   device's (its bytes go straight to the device's node): MB/s and the device node's CPU per
//!   GB, as ratios to the single node;
//! - a registration storm: simulated agents (control connection, hello, pongs) connecting at
//!   once spread over the three nodes: time until every node lists them all online, registry
//!   operations per second (from the nodes' `ringway_cluster_registry_ops_total`), and the
//!   claim latency's 99th percentile (from their `ringway_cluster_claim_seconds` histograms).
//!
//! Run: `cargo bench --bench cluster` (`-- --quick`: fewer requests, a smaller tunnel, 300
//! agents instead of 2,000). Needs `nats-server` 2.10+ on PATH (`bash .ci/run` installs it).

#[path = "../tests/util.rs"]
mod util;

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use util::*;

/// Session limits high enough for the latency runs; handshake shares as if the storm's agents
/// came from many addresses (here they all come from 127.0.0.1).
const LIMITS: &str = "[limits]\nmax_sessions_per_operator = 100000\nmax_sessions = 100000\n\
                      max_handshakes = 8192\nmax_handshakes_per_address = 8192\n";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `n` session starts against `relay`; returns (p50, p99) in ms.
fn session_starts(relay: &Relay, n: usize) -> (f64, f64) {
    let body = format!(r#"{{"device":"{DEVICE_ID}","service":"bulk","ttl_secs":300}}"#);
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let t0 = Instant::now();
            let (status, resp) = http(relay.addr, "POST", "/api/v1/sessions", Some(OPERATOR_TOKEN), Some(&body));
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            assert_eq!(status, 201, "{resp}");
            ms
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

/// One tunnel, `len` bytes each way at once, `connect` asking `api`; the bytes go through
/// `carriers`. Returns (MB/s each way, each carrier's CPU seconds per GB forwarded).
fn bulk(api: &Relay, carriers: &[&Relay], len: u64) -> (f64, Vec<f64>) {
    let url = api.url();
    let args = ["connect", "--relay", &url, "--token", OPERATOR_TOKEN, "--device", DEVICE_ID, "--service", "bulk"];
    let (_connect, local) = Proc::spawn("connect", &args, true);
    thread::sleep(Duration::from_millis(300));
    let cpu0: Vec<f64> = carriers.iter().map(|c| proc_cpu_secs(c.proc.pid())).collect();
    let began = Instant::now();
    let ((_, got), _) = bulk_both_ways(local.unwrap(), len, 9);
    let secs = began.elapsed().as_secs_f64();
    assert_eq!(got, len, "short transfer");
    let gb = 2.0 * len as f64 / 1e9;
    let cpu = carriers.iter().zip(cpu0).map(|(c, c0)| (proc_cpu_secs(c.proc.pid()) - c0) / gb).collect();
    (len as f64 / 1e6 / secs, cpu)
}

/// A counter or gauge sample of a cluster node (labelled with its node).
fn sample(relay: &Relay, name: &str) -> f64 {
    let (_, body) = http(relay.addr, "GET", "/metrics", None, None);
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{node=")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// The claim histogram's cumulative buckets (upper bound in s, count), summed over `nodes`.
fn claim_buckets(nodes: &[Relay]) -> Vec<(f64, f64)> {
    let mut sum: Vec<(f64, f64)> = Vec::new();
    for n in nodes {
        let (_, body) = http(n.addr, "GET", "/metrics", None, None);
        let buckets: Vec<(f64, f64)> = body
            .lines()
            .filter(|l| l.starts_with("ringway_cluster_claim_seconds_bucket"))
            .map(|l| {
                let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
                (le, l.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect();
        if sum.is_empty() {
            sum = buckets;
        } else {
            for (s, b) in sum.iter_mut().zip(buckets) {
                s.1 += b.1;
            }
        }
    }
    sum
}

fn storm(agents: usize) {
    let devices: String =
        (0..agents).map(|i| format!("[[device]]\nid = \"sim-{i}\"\nkey = \"sim-key-{i:05}-secret\"\n")).collect();
    let nats = Nats::start();
    let cfg = format!("{devices}{LIMITS}");
    let nodes = [node(&nats, "n1", 1, &cfg), node(&nats, "n2", 2, &cfg), node(&nats, "n3", 3, &cfg)];
    let ops0: f64 = nodes.iter().map(|n| sample(n, "ringway_cluster_registry_ops_total")).sum();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..agents)
        .map(|i| {
            let url = nodes[i % 3].url();
            sim_agent(vec![url], format!("sim-{i}"), format!("sim-key-{i:05}-secret"), stop.clone())
        })
        .collect();
    let all_online = |n: &Relay| {
        let (_, body) = http(n.addr, "GET", "/api/v1/devices", Some(OPERATOR_TOKEN), None);
        body.matches(r#""online":true"#).count() >= agents
    };
    while !nodes.iter().all(all_online) {
        assert!(t0.elapsed() < Duration::from_secs(300), "the storm did not settle in 5 minutes");
        thread::sleep(Duration::from_millis(20));
    }
    let secs = t0.elapsed().as_secs_f64();
    let ops: f64 = nodes.iter().map(|n| sample(n, "ringway_cluster_registry_ops_total")).sum::<f64>() - ops0;
    let buckets = claim_buckets(&nodes);
    let total = buckets.last().unwrap().1;
    let p = |q: f64| buckets.iter().find(|(_, c)| *c >= q * total).map_or(f64::INFINITY, |(le, _)| *le) * 1e3;
    println!(
        "{agents} agents over 3 nodes: all online on every node after {secs:.2} s; {ops:.0} registry operations \
         ({:.0}/s); claims: {total:.0}, p50 <= {} ms, p99 <= {} ms (histogram bucket bounds)",
        ops / secs,
        p(0.5),
        p(0.99)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
}

fn main() {
    raise_nofile();
    let quick = std::env::args().any(|a| a == "--quick");
    let (requests, len, agents) = if quick { (100, 64u64 << 20, 300) } else { (1000, 512u64 << 20, 2000) };
    let nats_version =
        std::process::Command::new("nats-server").arg("--version").output().expect("nats-server on PATH");
    println!(
        "ringway cluster benchmark ({}): 3 nodes on 127.0.0.1-3 + {}",
        if quick { "quick" } else { "full" },
        String::from_utf8_lossy(&nats_version.stdout).trim()
    );

    let service = source_sink_service(len, 3).0;
    let svc = format!("bulk={service}");

    // The single node first, then the cluster, in the same run.
    let single = Relay::start("epoll", LIMITS);
    let agent = spawn_agent(&single.url(), std::slice::from_ref(&svc));
    single.wait_device_online(DEVICE_ID, true);
    let (s50, s99) = session_starts(&single, requests);
    let (s_mbps, s_cpu) = bulk(&single, &[&single], len);
    let s_cpu = s_cpu[0];
    drop(agent);
    drop(single);

    let nats = Nats::start();
    let nodes = [node(&nats, "n1", 1, LIMITS), node(&nats, "n2", 2, LIMITS), node(&nats, "n3", 3, LIMITS)];
    let agent = spawn_agent(&nodes[1].url(), std::slice::from_ref(&svc));
    nodes[0].wait_device_online(DEVICE_ID, true);
    let (same50, same99) = session_starts(&nodes[1], requests);
    let (cross50, cross99) = session_starts(&nodes[0], requests);
    let (c_mbps, c_cpu) = bulk(&nodes[0], &[&nodes[1]], len);
    let c_cpu = c_cpu[0];
    drop(agent);
    drop(nodes);
    drop(nats);

    // Behind one public_url (n3 stands in for the load balancer's pick): n3 forwards to n2.
    let nats = Nats::start();
    let port = TcpListener::bind("127.0.0.3:0").unwrap().local_addr().unwrap().port();
    let public = format!("public_url = \"http://127.0.0.3:{port}\"\n{LIMITS}");
    let nodes = [
        node_on(&nats, "n1", "127.0.0.1:0", &public),
        node_on(&nats, "n2", "127.0.0.2:0", &public),
        node_on(&nats, "n3", &format!("127.0.0.3:{port}"), &public),
    ];
    let agent = spawn_agent(&nodes[1].url(), std::slice::from_ref(&svc));
    nodes[0].wait_device_online(DEVICE_ID, true);
    let (f_mbps, f_cpu) = bulk(&nodes[0], &[&nodes[1], &nodes[2]], len);
    drop(agent);

    println!("\nsession start, {requests} sequential POST /api/v1/sessions (new TCP connection each)");
    println!("{:<28} {:>9} {:>9} {:>10}", "where", "p50 ms", "p99 ms", "p50 ratio");
    for (name, p50, p99) in
        [("single node", s50, s99), ("cluster, same node", same50, same99), ("cluster, cross node", cross50, cross99)]
    {
        println!("{name:<28} {p50:>9.2} {p99:>9.2} {:>9.2}x", p50 / s50);
    }
    println!("\none bulk tunnel, {} MiB each way at once (epoll)", len >> 20);
    println!("{:<40} {:>13} {:>12} {:>8} {:>8}", "path", "MB/s each way", "CPU s/GB", "speed", "CPU/GB");
    println!("{:<40} {s_mbps:>13.0} {s_cpu:>12.2} {:>7.2}x {:>7.2}x", "single node", 1.0, 1.0);
    println!(
        "{:<40} {c_mbps:>13.0} {c_cpu:>12.2} {:>7.2}x {:>7.2}x",
        "cluster, asked n1, bytes straight to n2",
        c_mbps / s_mbps,
        c_cpu / s_cpu
    );
    println!(
        "{:<40} {f_mbps:>13.0} {:>12.2} {:>7.2}x {:>7.2}x",
        "cluster, via n3 (public_url) to n2",
        f_cpu[0] + f_cpu[1],
        f_mbps / s_mbps,
        (f_cpu[0] + f_cpu[1]) / s_cpu
    );
    println!("  (of which n2, unmasking and forwarding: {:.2} CPU s/GB; n3, moving bytes: {:.2})", f_cpu[0], f_cpu[1]);
    drop(nodes);
    drop(nats);

    println!("\nregistration storm");
    storm(agents);
}

fn raise_nofile() {
    // SAFETY: get/setrlimit on this process with a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}
