//! Arbitrary bytes as an HTTP request to the relay — exactly the code the relay runs per
//! accepted connection (hyper + ringway's routes, upgrades and auth), over an in-memory stream.
//! Invariants: no panic; whatever the relay answers is a well-formed HTTP/1.x status line;
//! it never answers 101 to a request that did not carry a valid credential.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ringway::config::Config;
use ringway::fuzzing::serve_connection;
use ringway::relay::handoff::{Cmd, Workers};
use ringway::relay::Relay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = r#"
[[operator]]
name = "fuzz"
token = "fuzz-token"
[[device]]
id = "dev-1"
key = "fuzz-dev-key"
[limits]
auth_failure_delay_ms = 0
handshake_timeout_secs = 1
"#;

thread_local! {
    static WORLD: (tokio::runtime::Runtime, Arc<Relay>, Vec<tokio::sync::mpsc::UnboundedReceiver<Cmd>>) = {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (workers, inboxes) = Workers::new(1);
        let relay = Arc::new(Relay::new(Config::parse(CONFIG).unwrap(), workers).unwrap());
        (rt, relay, inboxes)
    };
}

fuzz_target!(|data: &[u8]| {
    WORLD.with(|(rt, relay, _)| {
        let local = tokio::task::LocalSet::new();
        local.block_on(rt, async {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let serving = tokio::task::spawn_local(serve_connection(server, relay.clone(), "127.0.0.1:9".parse().unwrap()));
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut resp = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut resp)).await;
            serving.abort();
            if resp.is_empty() {
                return;
            }
            // hyper answers in the request's version.
            assert!(resp.starts_with(b"HTTP/1.1 ") || resp.starts_with(b"HTTP/1.0 "), "not a status line: {:?}", String::from_utf8_lossy(&resp[..resp.len().min(40)]));
            assert!(resp.len() >= 12 && resp[9..12].iter().all(u8::is_ascii_digit), "bad status code");
            if &resp[9..12] == b"101" {
                let text = String::from_utf8_lossy(data);
                assert!(text.contains("fuzz-dev-key") || text.contains("fuzz-token"), "upgrade without a credential");
            }
        });
    });
});
