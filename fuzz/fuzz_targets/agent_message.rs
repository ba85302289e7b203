//! Arbitrary text as a message on an agent's control channel, against a relay with a live
//! session for that device. Invariants: no panic; a message is accepted exactly when it parses
//! as a known agent message, and what parses survives a serialize/parse round trip unchanged.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ringway::config::Config;
use ringway::proto::{FromAgent, StartSession};
use ringway::relay::channels::agent_message;
use ringway::relay::Relay;

const CONFIG: &str = r#"
[[operator]]
name = "fuzz"
token = "fuzz-token"
[[device]]
id = "dev-1"
key = "fuzz-dev-key"
"#;

thread_local! {
    static RELAY: (Arc<Relay>, tokio::sync::mpsc::UnboundedReceiver<ringway::relay::dataplane::Cmd>) = {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let relay = Arc::new(Relay::new(Config::parse(CONFIG).unwrap(), vec![tx]).unwrap());
        let start = StartSession { device: "dev-1".into(), service: "ssh".into(), ttl_secs: None };
        relay.start_session("fuzz", "127.0.0.1:1", start, "relay").unwrap();
        (relay, rx)
    };
}

fuzz_target!(|text: &str| {
    RELAY.with(|(relay, _)| {
        let verdict = agent_message(relay, "dev-1", text);
        match serde_json::from_str::<FromAgent>(text) {
            Ok(msg) => {
                assert!(verdict.is_ok(), "a valid message was refused: {verdict:?}");
                let again: FromAgent = serde_json::from_str(&serde_json::to_string(&msg).unwrap()).unwrap();
                assert_eq!(again, msg);
            }
            Err(_) => assert!(verdict.is_err(), "an invalid message was accepted"),
        }
    });
});
