//! The relay's two JSON control channels: the agent's (one per device) and the session's (one
//! per client). Plain tokio + fastwebsockets; nothing here is on the data path.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Relay;
use crate::peer::{self, Incoming, Outgoing, Ws};
use crate::proto::{FromAgent, SessionEvent, ToAgent};
use crate::ws::CloseCode;

/// Keepalive: a ping this often; a channel silent for three periods is dead.
const PING_EVERY: Duration = Duration::from_secs(10);

/// Serves one agent's control connection until it closes or breaks.
pub async fn agent(ws: Ws, device: String, relay: Arc<Relay>) {
    let mut ch = peer::channel(ws, relay.config.limits.max_control_message_bytes);
    // The first message must be the agent's hello, naming its services.
    let services = match tokio::time::timeout(Duration::from_secs(10), ch.rx.recv()).await {
        Ok(Some(Incoming::Text(t))) => match serde_json::from_str::<FromAgent>(&t) {
            Ok(FromAgent::Hello { services, .. }) => services,
            _ => {
                let _ = ch.tx.send(Outgoing::Close(CloseCode::PROTOCOL_ERROR.0, "expected a hello message".into()));
                return;
            }
        },
        _ => {
            let _ = ch.tx.send(Outgoing::Close(CloseCode::PROTOCOL_ERROR.0, "expected a hello message".into()));
            return;
        }
    };
    let (to_agent, mut from_relay) = mpsc::unbounded_channel::<ToAgent>();
    let generation = relay.agent_up(&device, services, to_agent);
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut silent = 0;
    loop {
        tokio::select! {
            msg = from_relay.recv() => match msg {
                Some(m) => {
                    let _ = ch.tx.send(Outgoing::Text(serde_json::to_string(&m).expect("ToAgent serializes")));
                }
                None => break,
            },
            incoming = ch.rx.recv() => match incoming {
                Some(Incoming::Text(t)) => {
                    silent = 0;
                    if let Err(reason) = agent_message(&relay, &device, &t) {
                        tracing::warn!(device, "agent sent an {reason}");
                        let _ = ch.tx.send(Outgoing::Close(CloseCode::PROTOCOL_ERROR.0, reason));
                        break;
                    }
                }
                Some(Incoming::Alive) => silent = 0,
                Some(Incoming::Closed(_)) | None => break,
            },
            _ = ping.tick() => {
                silent += 1;
                if silent > 3 {
                    tracing::warn!(device, "agent stopped answering pings");
                    break;
                }
                let _ = ch.tx.send(Outgoing::Ping);
            }
        }
    }
    relay.agent_down(&device, generation);
}

/// Acts on one message from `device`'s agent after its hello. `Err` says why the message is
/// unacceptable (the channel then closes with 1002). Public for the agent-message fuzz target.
pub fn agent_message(relay: &Relay, device: &str, text: &str) -> Result<(), String> {
    match serde_json::from_str::<FromAgent>(text) {
        Ok(FromAgent::ConnectFailed { session, conn, reason }) => {
            relay.connect_failed(device, &session, conn, &reason);
            Ok(())
        }
        Ok(FromAgent::Hello { .. }) => Ok(()),
        Err(e) => Err(format!("invalid message: {e}")),
    }
}

/// Serves a client's session control connection: pushes session events until it ends.
pub async fn session_control(
    ws: Ws,
    max_message: usize,
    ready: SessionEvent,
    mut events: mpsc::UnboundedReceiver<SessionEvent>,
) {
    let mut ch = peer::channel(ws, max_message);
    let send = |ch: &peer::Channel, e: &SessionEvent| {
        let _ = ch.tx.send(Outgoing::Text(serde_json::to_string(e).expect("events serialize")));
    };
    send(&ch, &ready);
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut silent = 0;
    loop {
        tokio::select! {
            _ = ping.tick() => {
                silent += 1;
                if silent > 3 {
                    // A client that vanished without a FIN: the session's grace period starts.
                    return;
                }
                let _ = ch.tx.send(Outgoing::Ping);
            }
            event = events.recv() => match event {
                Some(SessionEvent::Closing { code, reason }) => {
                    send(&ch, &SessionEvent::Closing { code, reason: reason.clone() });
                    let _ = ch.tx.send(Outgoing::Close(code, reason));
                    // Give the writer a moment to flush the close before the task ends.
                    let _ = tokio::time::timeout(Duration::from_secs(2), ch.rx.recv()).await;
                    return;
                }
                Some(e) => send(&ch, &e),
                None => return,
            },
            incoming = ch.rx.recv() => match incoming {
                Some(Incoming::Text(_) | Incoming::Alive) => silent = 0,
                Some(Incoming::Closed(_)) | None => return,
            },
        }
    }
}
