//! Thousands of connections come and go; the relay's descriptors and buffers come back.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

fn churn(backend: &str) {
    let relay = Relay::start(backend, "");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let (_connect, local) = relay.connect("echo", &[]);
    // One connection first, so lazily created state (pools, agent link) is in the baseline.
    one_echo(local, 0);
    // Settles until `current` is back at (or, for descriptors, below) the baseline: the
    // baseline may hold a transient socket, such as the API call that read it.
    let settle = |what: &str, current: &dyn Fn() -> u64, want: u64| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while current() > want {
            assert!(Instant::now() < deadline, "{what}: {} now, {want} before", current());
            thread::sleep(Duration::from_millis(100));
        }
    };
    settle("tunnels", &|| relay.metric("ringway_tunnels_active"), 0);
    let fds_before = relay.open_fds_but_spares() as u64;
    let buffers_before = relay.metric("ringway_buffers_in_use");
    assert_eq!(buffers_before, 0);
    let opened_before = relay.metric("ringway_connections_opened_total");
    let rss_before = relay.rss_kib();

    const CONNECTIONS: u64 = 2000;
    let workers: Vec<_> = (0..8u64)
        .map(|w| {
            thread::spawn(move || {
                for i in 0..CONNECTIONS / 8 {
                    one_echo(local, w * 1_000_000 + i);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(relay.metric("ringway_connections_opened_total") - opened_before, CONNECTIONS);
    settle("tunnels", &|| relay.metric("ringway_tunnels_active"), 0);
    settle("buffers in use", &|| relay.metric("ringway_buffers_in_use"), buffers_before);
    settle("open descriptors", &|| relay.open_fds_but_spares() as u64, fds_before);
    let closed = relay.metric("ringway_connections_closed_total");
    assert_eq!(closed, relay.metric("ringway_connections_opened_total"));
    let rss_after = relay.rss_kib();
    eprintln!(
        "{backend}: {CONNECTIONS} connections; relay fds {fds_before} -> {}, RSS {rss_before} -> {rss_after} KiB",
        relay.open_fds()
    );
    // A buffer or tunnel kept per connection would show as tens of MiB here.
    assert!(rss_after < rss_before + 16 * 1024, "relay RSS grew from {rss_before} to {rss_after} KiB");
}

/// One short connection through the tunnel: a few KiB echoed back exactly.
fn one_echo(local: std::net::SocketAddr, seed: u64) {
    let mut tcp = TcpStream::connect(local).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut data = vec![0u8; 1024 + (seed as usize % 4096)];
    Noise::new(seed).fill(&mut data);
    tcp.write_all(&data).unwrap();
    tcp.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    tcp.read_to_end(&mut back).unwrap();
    assert!(back == data, "connection {seed}: {} bytes back of {}", back.len(), data.len());
}

#[test]
fn two_thousand_connections_leave_no_descriptor_or_buffer_behind_on_io_uring() {
    churn("uring");
}

#[test]
fn two_thousand_connections_leave_no_descriptor_or_buffer_behind_on_epoll() {
    churn("epoll");
}
