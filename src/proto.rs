//! What travels as JSON: the control API's bodies, the agent's control channel and the
//! session control channel. Data connections carry only binary frames and never touch this,
//! except a spare device connection's first message: its order, a [`ToAgent::Connect`].

use serde::{Deserialize, Serialize};

/// Spare device connections a relay parks for one agent (and so the most an agent keeps).
pub const MAX_SPARES: usize = 64;

/// Relay → agent, on the agent's control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToAgent {
    /// Dial `service` locally, then the session's device endpoint for connection `conn`,
    /// presenting `token`.
    Connect { session: String, conn: u64, service: String, token: String },
}

/// Agent → relay, on the agent's control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromAgent {
    /// Sent once after connecting: the services this agent's own configuration names.
    Hello { services: Vec<String>, version: String },
    /// The agent could not reach the service for `conn` (or refused to: not configured).
    ConnectFailed { session: String, conn: u64, reason: String },
}

/// Relay → client, on the session control connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SessionEvent {
    /// First message: the session as the relay sees it now.
    Ready {
        session: String,
        device: String,
        service: String,
        device_online: bool,
        expires_at: u64,
        /// How long the relay keeps the session after this connection drops: a client
        /// re-attaches within it (absent from older relays).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_grace_secs: Option<u64>,
    },
    DeviceOffline,
    DeviceOnline,
    /// The session is ending; the connection then closes with `code`.
    Closing {
        code: u16,
        reason: String,
    },
}

/// `POST /api/v1/sessions` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartSession {
    pub device: String,
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// `POST /api/v1/sessions` answer (201).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStarted {
    pub id: String,
    pub client_url: String,
    pub client_token: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// A one-time code for `ringway connect --code` (`POST /api/v1/launch`): it stands for
    /// this answer, for [`LAUNCH_CODE_SECS`] and one use. Absent from a redeemed answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_code: Option<String>,
}

/// How long a launch code can be redeemed.
pub const LAUNCH_CODE_SECS: u64 = 120;

/// `POST /api/v1/launch` body; the answer is the session's [`SessionStarted`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    pub code: String,
}

/// `POST /api/v1/login` body: an operator token, exchanged for a console login (a cookie).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub token: String,
}

/// `POST` and `GET /api/v1/login` answer: who is logged in, and the proof every state-changing
/// request of this login carries in its `X-CSRF-Token` header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedIn {
    pub operator: String,
    pub role: String,
    pub csrf_token: String,
    pub idle_timeout_secs: u64,
}

/// A session in `GET /api/v1/sessions[/{id}]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: String,
    pub device: String,
    pub service: String,
    pub operator: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub device_online: bool,
    pub client_connected: bool,
    pub connections: usize,
    pub bytes_to_device: u64,
    pub bytes_to_client: u64,
    /// Cluster only: the node the session lives on (its device's node), and where its client
    /// connects now (it changes when the device moves to another node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_url: Option<String>,
    /// The distinct addresses its client connections came from (at most 8, first seen first).
    #[serde(default)]
    pub client_addrs: Vec<String>,
    /// An ended session (`GET /api/v1/sessions/ended`): when, and the close code and reason
    /// its connections heard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<String>,
}

/// A device in `GET /api/v1/devices`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    pub online: bool,
    pub services: Vec<String>,
    /// Unix seconds since the current control connection came up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<u64>,
    /// Cluster only: the node holding the device's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Unix seconds when its agent was last connected here (now, if it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
    /// What its agent said in its hello, and where it connected from (this node's agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_addr: Option<String>,
}

/// What the console's live view (`GET /api/v1/live`, a WebSocket) sends whenever it changes:
/// the same lists as `GET /api/v1/sessions`, `/sessions/ended` and `/devices`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    pub sessions: Vec<SessionInfo>,
    pub ended: Vec<SessionInfo>,
    pub devices: Vec<DeviceInfo>,
}

/// Every error body of the control API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// A peer-supplied string made safe for a log line or a close reason: control characters
/// (newlines, escape sequences) are escaped and the result is cut to at most `max` characters,
/// so a peer can neither forge log lines nor grow what the relay stores about it.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    let mut count = 0;
    for c in s.chars() {
        let escaped: String = if c.is_control() { c.escape_default().collect() } else { c.to_string() };
        let n = escaped.chars().count();
        if count + n > max {
            out.push('…');
            break;
        }
        count += n;
        out.push_str(&escaped);
    }
    out
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_messages_are_tagged_json() {
        let m = ToAgent::Connect { session: "s".into(), conn: 7, service: "ssh".into(), token: "t".into() };
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#"{"type":"connect","session":"s","conn":7,"service":"ssh","token":"t"}"#);
        assert_eq!(serde_json::from_str::<ToAgent>(&j).unwrap(), m);
    }

    #[test]
    fn printable_escapes_control_characters_and_bounds_the_length() {
        assert_eq!(printable("a\nb\x1b[31m", 100), "a\\nb\\u{1b}[31m");
        assert_eq!(printable(&"x".repeat(500), 10), format!("{}…", "x".repeat(10)));
        assert_eq!(printable("plain", 10), "plain");
    }

    #[test]
    fn unknown_message_types_and_fields_are_rejected() {
        assert!(serde_json::from_str::<FromAgent>(r#"{"type":"launch_missiles"}"#).is_err());
        assert!(serde_json::from_str::<FromAgent>(r#"{"type":"hello","services":[],"version":"1","x":1}"#).is_err());
    }
}
