//! What TLS costs the relay, measured through the real binaries: relay, agent and
//! `ringway connect` as processes, one tunnel moving data both ways at once, for the io_uring
//! and epoll backends in plain HTTP and for TLS. Reports throughput and the relay's own CPU time
//! per GB forwarded (from /proc), with ratios against plain io_uring from the same run.
//!
//! Run: `cargo bench --bench relay_paths` (add `-- --quick` for a short run).

#[path = "../tests/util.rs"]
mod util;

use std::thread;
use std::time::Instant;

use util::*;

/// Returns (MB/s each way, relay CPU seconds per GB forwarded).
fn run(backend: &str, tls: bool, len: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(dir.path(), "relay_paths");
    let (ca, cert, key) = (ca.display().to_string(), cert.display().to_string(), key.display().to_string());
    let extra = if tls { format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n") } else { String::new() };
    let relay = Relay::start(backend, &extra);
    let url = format!("{}://127.0.0.1:{}", if tls { "https" } else { "http" }, relay.addr.port());
    let (service, sink, _) = source_sink_service(len, 3);
    let svc = format!("bulk={service}");
    let (_agent, _) = Proc::spawn(
        "agent",
        &["agent", "--relay", &url, "--ca", &ca, "--device", DEVICE_ID, "--key", DEVICE_KEY, "--service", &svc],
        false,
    );
    let args = [
        "connect",
        "--relay",
        &url,
        "--ca",
        &ca,
        "--token",
        OPERATOR_TOKEN,
        "--device",
        DEVICE_ID,
        "--service",
        "bulk",
    ];
    let (_connect, local) = connect_when_online(&args);
    thread::sleep(std::time::Duration::from_millis(300));
    let cpu0 = proc_cpu_secs(relay.proc.pid());
    let began = Instant::now();
    let ((_, got), sent) = bulk_both_ways(local, len, 9);
    let secs = began.elapsed().as_secs_f64();
    let cpu = proc_cpu_secs(relay.proc.pid()) - cpu0;
    assert_eq!(got, len, "short transfer");
    // The other direction too, and before the processes go: the service must have read all of
    // it (tearing down earlier reset its reader mid-stream).
    let received = sink.recv_timeout(std::time::Duration::from_secs(60)).expect("the service's sink");
    assert_eq!(received, sent, "the service did not receive what the client sent");
    let gb = 2.0 * len as f64 / 1e9;
    (len as f64 / 1e6 / secs, cpu / gb)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let len: u64 = if quick { 64 << 20 } else { 512 << 20 };
    println!("relay paths: 1 tunnel, {} MiB each way at once, client -> relay -> agent -> service", len >> 20);
    println!("{:<18} {:>12} {:>16} {:>10} {:>10}", "path", "MB/s each way", "relay CPU s/GB", "speed", "CPU/GB");
    let mut base = None;
    for (name, backend, tls) in
        [("io_uring, plain", "uring", false), ("epoll, plain", "epoll", false), ("TLS (tokio-rustls)", "uring", true)]
    {
        let (mbps, cpu) = run(backend, tls, len);
        let (b_mbps, b_cpu) = *base.get_or_insert((mbps, cpu));
        println!("{name:<18} {mbps:>12.0} {cpu:>16.2} {:>9.2}x {:>9.2}x", mbps / b_mbps, cpu / b_cpu);
    }
}
