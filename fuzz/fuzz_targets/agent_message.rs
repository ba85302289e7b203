//! Arbitrary text as a message on an agent's control channel, against a relay with a live
//! session and one open client connection on that device. Invariants on what the relay does,
//! not on the parse itself: no panic; a refusal's words are printable and bounded (they go into
//! a close reason and the log); whatever the relay orders a worker to do is a close of that one
//! connection as "service unreachable" (4001), quoting the agent only escaped and bounded; and a
//! refused message orders nothing.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ringway::config::Config;
use ringway::proto::StartSession;
use ringway::fuzzing::agent_message;
use ringway::relay::ending::CloseReason;
use ringway::relay::handoff::{Cmd, Workers};
use ringway::relay::Relay;

const CONFIG: &str = r#"
[[operator]]
name = "fuzz"
token = "fuzz-token"
[[device]]
id = "dev-1"
key = "fuzz-dev-key"
"#;

struct World {
    relay: Arc<Relay>,
    inbox: std::cell::RefCell<tokio::sync::mpsc::UnboundedReceiver<Cmd>>,
    conn: u64,
}

thread_local! {
    static WORLD: World = {
        let (workers, mut inboxes) = Workers::new(1);
        let relay = Arc::new(Relay::new(Config::parse(CONFIG).unwrap(), workers).unwrap());
        let start = StartSession { device: "dev-1".into(), service: "ssh".into(), ttl_secs: None };
        // The in-memory registry's session start is ready at once; a runtime polls it.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let started = rt.block_on(relay.registry.start_session("fuzz", "127.0.0.1:1", start, "relay")).unwrap();
        let conn = relay.registry.client_conn(&started.id, &started.client_token, "127.0.0.1:2".parse().unwrap()).unwrap();
        World { relay, inbox: std::cell::RefCell::new(inboxes.remove(0)), conn: conn.conn }
    };
}

fn printable_and_bounded(s: &str, max: usize) -> bool {
    s.chars().count() <= max && !s.chars().any(char::is_control)
}

fuzz_target!(|text: &str| {
    WORLD.with(|w| {
        let verdict = agent_message(&w.relay, "dev-1", text);
        let mut inbox = w.inbox.borrow_mut();
        let mut orders = Vec::new();
        while let Ok(cmd) = inbox.try_recv() {
            orders.push(cmd);
        }
        match verdict {
            Err(reason) => {
                assert!(printable_and_bounded(&reason, 140), "refusal not printable or too long: {reason:?}");
                assert!(orders.is_empty(), "a refused message made the relay act");
            }
            Ok(()) => {
                assert!(orders.len() <= 1, "one message, {} orders", orders.len());
                for cmd in orders {
                    let Cmd::Close { conn, reason } = cmd else { panic!("an agent message ordered something other than a close") };
                    assert_eq!(conn, w.conn, "a close for a connection the agent did not name");
                    let CloseReason::ServiceUnreachable { ref why, .. } = reason else { panic!("unexpected reason {reason:?}") };
                    assert!(printable_and_bounded(why, 81), "the agent's words unescaped or unbounded: {why:?}");
                    assert_eq!(reason.code().0, 4001);
                }
            }
        }
    });
});
