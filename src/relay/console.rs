//! The operator console: a small page embedded in the binary (HTML, one script, one style
//! sheet; no build step, no CDN), served at `/` with a Content-Security-Policy that allows only
//! the relay's own assets, and its live view.
//!
//! The page is only a client of the control API: it logs in (`/api/v1/login`), reads and acts
//! through the same endpoints as the CLI, and watches `GET /api/v1/live`, a WebSocket that sends
//! an [`Overview`] whenever it changes. One refresh a second is computed for all watchers
//! together ([`feed`], on a thread of its own, and only while someone watches); each watcher
//! then sees its own part of it (an operator its own sessions). A live view ends with 1008 when
//! its login ends (logout, idle, operator removed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::registry::Caller;
use super::Relay;
use crate::channel::{self, Incoming, Outgoing};
use crate::config::Role;
use crate::peer::Ws;
use crate::proto::Overview;
use crate::ws::CloseCode;

/// Only the relay's own scripts, styles and connections; no frames, no inline code.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// The console's assets by path, or `None` for any other path.
pub fn asset(path: &str) -> Option<Response<Full<Bytes>>> {
    let (body, kind) = match path {
        "/" | "/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/console.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    Some(
        Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, kind)
            .header(CACHE_CONTROL, "no-cache")
            .header("content-security-policy", CSP)
            .header("x-content-type-options", "nosniff")
            .header("x-frame-options", "DENY")
            .header("referrer-policy", "no-referrer")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response parts"),
    )
}

/// What everybody's live view is computed from: every session (with live byte counts), the
/// recently ended ones and every device.
pub async fn overview(relay: &Relay) -> Overview {
    let all = Caller { name: "", role: Role::Admin };
    Overview {
        sessions: relay.sessions_live(all).await,
        ended: relay.registry.ended_sessions(all),
        devices: relay.registry.devices(),
    }
}

/// Refreshes [`Relay::overview`] once a second while at least one live view watches; runs on
/// its own thread (so watchers add nothing to the workers but the byte tally) until `halted`.
pub fn feed(relay: Arc<Relay>, mut halted: tokio::sync::watch::Receiver<bool>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    rt.block_on(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = halted.wait_for(|h| *h) => return,
            }
            if relay.overview.receiver_count() == 0 {
                continue;
            }
            let fresh = overview(&relay).await;
            relay.overview.send_if_modified(|current| {
                let changed = **current != fresh;
                if changed {
                    *current = Arc::new(fresh);
                }
                changed
            });
        }
    });
    Ok(())
}

/// Who watches a live view: the operator, and the console login it came with (a bearer token
/// has none).
pub struct Watcher {
    pub operator: String,
    pub role: Role,
    pub login: Option<[u8; 32]>,
}

/// Serves one live view until its peer leaves, stops reading, or its login ends.
pub async fn live(ws: Ws, relay: Arc<Relay>, who: Watcher) {
    let limits = channel::Limits { max_message: 4096, peer_masks: true, stall: super::channels::stall(&relay) };
    let mut ch = channel::channel(ws, limits);
    let mut updates = relay.overview.subscribe();
    let mut shutdown = relay.shutdown.subscribe();
    let mut check = tokio::time::interval(Duration::from_secs(relay.config.limits.keepalive_secs));
    let mut last = String::new();
    // The first view is fresh, not whatever the feed computed last time somebody watched.
    let mut next = Some(Arc::new(overview(&relay).await));
    loop {
        if let Some(all) = next.take() {
            let caller = Caller { name: &who.operator, role: who.role };
            let text = serde_json::to_string(&view(&all, caller)).expect("the overview serializes");
            if text != last {
                if ch.send(Outgoing::Text(text.clone())).is_err() {
                    return;
                }
                last = text;
            }
        }
        tokio::select! {
            changed = updates.changed() => match changed {
                Ok(()) => next = Some(updates.borrow_and_update().clone()),
                Err(_) => return,
            },
            incoming = ch.rx.recv() => match incoming {
                Some(Incoming::Text(_) | Incoming::Ping | Incoming::Pong) => {}
                _ => return,
            },
            _ = check.tick() => {
                let logged_in = who.login.is_none_or(|key| relay.logins.alive(&key, Instant::now()));
                if !logged_in || relay.keys.operator_named(&who.operator).is_none() {
                    let _ = ch.send(Outgoing::Close(CloseCode::POLICY_VIOLATION.0, "logged out".into()));
                    return;
                }
                if ch.send(Outgoing::Ping).is_err() {
                    return;
                }
            }
            _ = shutdown.wait_for(|s| *s) => {
                let _ = ch.send(Outgoing::Close(CloseCode::GOING_AWAY.0, "the relay is shutting down".into()));
                return;
            }
        }
    }
}

/// The part of the overview `caller` may see: every device, and its own sessions (an admin's:
/// all).
fn view(all: &Overview, caller: Caller<'_>) -> Overview {
    if caller.role == Role::Admin {
        return all.clone();
    }
    let mine =
        |list: &[crate::proto::SessionInfo]| list.iter().filter(|s| caller.may_see(&s.operator)).cloned().collect();
    Overview { sessions: mine(&all.sessions), ended: mine(&all.ended), devices: all.devices.clone() }
}
