//! The relay's TOML configuration: parsed, validated, typed. Secrets live behind [`Secret`],
//! whose `Debug` never shows them, so a config can be logged whole.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Returns a [`ConfigError::Invalid`] from `validate`.
macro_rules! invalid {
    ($($arg:tt)*) => { return Err(ConfigError::Invalid(format!($($arg)*))) };
}

/// A credential from the config or minted by the relay. Compared in constant time; its
/// `Debug` and `Display` print a mask, never the value.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// A fresh random token: 256 bits from the OS's CSPRNG, hex-encoded.
    pub fn random() -> Secret {
        let bytes: [u8; 32] = rand::random();
        Secret(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Constant-time comparison with what a peer presented.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }

    /// The value, for the one place that must send it (an API response, a bearer header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A credential as the config holds it: the secret itself, or its SHA-256 so that the file
/// holds nothing a reader could present. Both compare in constant time.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Plain(Secret),
    Sha256([u8; 32]),
}

impl Credential {
    pub fn matches(&self, presented: &str) -> bool {
        match self {
            Credential::Plain(secret) => secret.matches(presented),
            Credential::Sha256(hash) => Sha256::digest(presented.as_bytes()).as_slice().ct_eq(hash).into(),
        }
    }

    /// From the `X` / `X_sha256` pair of keys: exactly one must be set.
    fn from_pair(what: &str, plain: Option<Secret>, hashed: Option<String>) -> Result<Credential, String> {
        match (plain, hashed) {
            (Some(p), None) => {
                if p.expose().len() < 8 {
                    return Err(format!("{what} is shorter than 8 characters"));
                }
                Ok(Credential::Plain(p))
            }
            (None, Some(h)) => {
                let bytes: Option<Vec<u8>> = (h.len() == 64 && h.is_ascii())
                    .then(|| (0..32).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()).collect())
                    .flatten();
                let bytes = bytes.ok_or_else(|| format!("{what}_sha256 must be 64 hex digits"))?;
                Ok(Credential::Sha256(bytes.try_into().expect("32 bytes")))
            }
            (Some(_), Some(_)) => Err(format!("give either {what} or {what}_sha256, not both")),
            (None, None) => Err(format!("{what} (or {what}_sha256) is required")),
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Plain(_) => f.write_str("Credential(***)"),
            Credential::Sha256(_) => f.write_str("Credential(sha256:***)"),
        }
    }
}

/// What an operator may do on the control API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Starts sessions, and sees and ends only its own.
    #[default]
    Operator,
    /// Also sees and ends every operator's sessions.
    Admin,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawOperator")]
pub struct Operator {
    pub name: String,
    pub token: Credential,
    pub role: Role,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    name: String,
    token: Option<Secret>,
    token_sha256: Option<String>,
    #[serde(default)]
    role: Role,
}

impl TryFrom<RawOperator> for Operator {
    type Error = String;
    fn try_from(r: RawOperator) -> Result<Operator, String> {
        let token =
            Credential::from_pair("token", r.token, r.token_sha256).map_err(|e| format!("operator {}: {e}", r.name))?;
        Ok(Operator { name: r.name, token, role: r.role })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawDevice")]
pub struct Device {
    pub id: String,
    pub key: Credential,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: String,
    key: Option<Secret>,
    key_sha256: Option<String>,
}

impl TryFrom<RawDevice> for Device {
    type Error = String;
    fn try_from(r: RawDevice) -> Result<Device, String> {
        let key = Credential::from_pair("key", r.key, r.key_sha256).map_err(|e| format!("device {}: {e}", r.id))?;
        Ok(Device { id: r.id, key })
    }
}

/// Every limit the relay enforces, with its default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest WebSocket frame payload a peer may send on a data connection (bytes).
    pub max_frame_bytes: u64,
    /// Session lifetime when the request names none, and the most a request may ask for.
    pub session_ttl_secs: u64,
    pub max_session_ttl_secs: u64,
    /// How long a session survives without its client's control connection.
    pub client_grace_secs: u64,
    /// How long a client connection waits for the device side to dial in.
    pub pair_timeout_secs: u64,
    /// How long a closing tunnel waits for the other side's Close.
    pub close_timeout_secs: u64,
    pub max_sessions: usize,
    /// Sessions one operator may hold open at once.
    pub max_sessions_per_operator: usize,
    /// A session that no client attached to (control or data connection) within this long is
    /// ended: it would otherwise hold a slot for its whole lifetime.
    pub attach_timeout_secs: u64,
    pub max_connections_per_session: usize,
    /// A connection must finish its HTTP request headers (and an API request its body) within
    /// this time.
    pub handshake_timeout_secs: u64,
    /// A tunnel with no bytes either way for this long is closed with 1001.
    pub idle_timeout_secs: u64,
    /// Connections in their HTTP phase at once, relay-wide; more are closed on accept.
    pub max_handshakes: usize,
    /// Once half of those are in use, an address holding this many gets no more (its further
    /// connections are closed on accept): one address holds at most half the slots.
    pub max_handshakes_per_address: usize,
    /// Largest HTTP request head (bytes); larger gets 431.
    pub max_header_bytes: usize,
    /// Largest JSON message on the agent and session control channels (bytes).
    pub max_control_message_bytes: usize,
    /// Control connections are pinged this often; a peer that answers no ping for three periods,
    /// or takes three periods to read what the relay writes, is dropped.
    pub keepalive_secs: u64,
    /// How long the relay waits for a device's agent to reconnect before declaring the device
    /// lost (4004): its tunnels keep running meanwhile.
    pub agent_grace_secs: u64,
    /// On SIGTERM, tunnels get this long to finish before they are closed with 1001.
    pub drain_timeout_secs: u64,
    /// After 5 failed logins within a minute from one address, its credential checks are
    /// spaced this far apart (parallel attempts queue; a long queue is refused with 429).
    pub auth_failure_delay_ms: u64,
    /// A console login (its cookie) unused for this long is over.
    pub login_idle_timeout_secs: u64,
    /// Console logins held at once, relay-wide; past it the longest idle one is dropped.
    pub max_logins: usize,
    /// Ended sessions kept in memory for the console and `GET /api/v1/sessions/ended` (older
    /// ones are in the audit log).
    pub recent_sessions: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame_bytes: 16 << 20,
            session_ttl_secs: 8 * 3600,
            max_session_ttl_secs: 7 * 24 * 3600,
            client_grace_secs: 30,
            pair_timeout_secs: 15,
            close_timeout_secs: 5,
            max_sessions: 10_000,
            max_sessions_per_operator: 1000,
            attach_timeout_secs: 120,
            max_connections_per_session: 256,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 600,
            max_handshakes: 1024,
            max_handshakes_per_address: 64,
            max_header_bytes: 16 << 10,
            max_control_message_bytes: 64 << 10,
            keepalive_secs: 10,
            agent_grace_secs: 10,
            drain_timeout_secs: 20,
            auth_failure_delay_ms: 1000,
            login_idle_timeout_secs: 15 * 60,
            max_logins: 256,
            recent_sessions: 100,
        }
    }
}

/// The relay's certificate chain and private key, PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// The audit log: one JSON line per session start and end and per connection end.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// File the lines are appended to; none: no audit log.
    pub path: Option<std::path::PathBuf>,
}

/// The data plane's sizing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlane {
    /// Worker threads, each with its own runtime, tunnel table and buffer pool; 0 = one per core.
    pub workers: usize,
    /// Buffers per worker. Only directions with bytes in flight hold one.
    pub buffers: usize,
    /// Size of each buffer (bytes).
    pub buffer_size: usize,
}

impl Default for DataPlane {
    fn default() -> DataPlane {
        DataPlane { workers: 0, buffers: 256, buffer_size: 64 << 10 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub operator: Vec<Operator>,
    #[serde(default)]
    pub device: Vec<Device>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub dataplane: DataPlane,
    #[serde(default)]
    pub audit: Audit,
    /// Serve `https://`/`wss://` with this certificate and key; absent: plain HTTP.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// One node of a cluster whose registry is on NATS JetStream; absent: a single node with
    /// its registry in memory.
    #[serde(default)]
    pub cluster: Option<Cluster>,
    /// The file this was read from: a reload reads it again.
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
}

/// `[cluster]`: this node's name and address, the NATS servers holding the shared registry,
/// and the key the nodes sign their registry records with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// This node's name, unique in the cluster.
    pub node: String,
    /// NATS servers with JetStream (several: a NATS cluster).
    pub nats: Vec<String>,
    /// How agents and clients reach this node directly (`http://` or `https://`, host and port;
    /// port 0 stands for the port the relay listens on).
    pub advertise: String,
    /// One name in front of all nodes (a load balancer): session `client_url`s name it, and the
    /// node a client's connection lands on forwards it to the session's node.
    #[serde(default)]
    pub public_url: Option<String>,
    /// What the nodes share and nobody else has: every registry record and every request
    /// between nodes carries an HMAC made with it, so holding NATS credentials alone opens no
    /// tunnel.
    pub peer_key: Secret,
    /// NATS authentication: a token, or a credentials file (JWT + NKey seed).
    #[serde(default)]
    pub nats_token: Option<Secret>,
    #[serde(default)]
    pub nats_credentials: Option<std::path::PathBuf>,
    /// CA certificate (PEM) to verify `tls://` NATS servers with.
    #[serde(default)]
    pub nats_ca: Option<std::path::PathBuf>,
    /// Copies of each registry bucket the NATS cluster keeps (1 for a single NATS server; 3 for
    /// a NATS cluster that should survive losing a server).
    #[serde(default = "Cluster::default_replicas")]
    pub replicas: usize,
    /// CA certificate (PEM) to verify other nodes' `https://` `advertise` with when forwarding
    /// to them; absent: the system's roots.
    #[serde(default)]
    pub peer_ca: Option<std::path::PathBuf>,
    /// A node not heard from for this long is dead: its devices show offline and other nodes
    /// take over its agents and sessions. A node that cannot reach NATS for this long closes
    /// its agents' control connections (it can no longer prove it owns their devices).
    #[serde(default = "Cluster::default_lifetime")]
    pub node_lifetime_secs: u64,
    /// Prefix of the NATS key-value buckets and subjects; several clusters may share one NATS.
    #[serde(default = "Cluster::default_name")]
    pub name: String,
}

impl Cluster {
    fn default_lifetime() -> u64 {
        10
    }

    fn default_name() -> String {
        "ringway".into()
    }

    fn default_replicas() -> usize {
        1
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let token = |s: &str| {
            !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        };
        if !token(&self.node) {
            invalid!("cluster.node {:?}: use 1 to 64 letters, digits, '-' and '_'", self.node);
        }
        if !token(&self.name) {
            invalid!("cluster.name {:?}: use 1 to 64 letters, digits, '-' and '_'", self.name);
        }
        if self.nats.is_empty() {
            invalid!("cluster.nats lists no NATS server");
        }
        if !(self.advertise.starts_with("http://") || self.advertise.starts_with("https://"))
            || self.advertise.trim_start_matches("http://").trim_start_matches("https://").contains('/')
        {
            invalid!(
                "cluster.advertise {:?}: give http(s)://HOST:PORT, how agents and clients reach this node",
                self.advertise
            );
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.trim_start_matches("http://").trim_start_matches("https://").contains('/')
            {
                invalid!("cluster.public_url {url:?}: give http(s)://HOST[:PORT], the name in front of every node");
            }
        }
        if self.peer_key.expose().len() < 16 {
            invalid!("cluster.peer_key is shorter than 16 characters");
        }
        if self.nats_token.is_some() && self.nats_credentials.is_some() {
            invalid!("give either cluster.nats_token or cluster.nats_credentials, not both");
        }
        if !(1..=5).contains(&self.replicas) {
            invalid!("cluster.replicas {} is outside 1..=5 (JetStream's limit)", self.replicas);
        }
        if !(3..=300).contains(&self.node_lifetime_secs) {
            invalid!("cluster.node_lifetime_secs {} is outside 3..=300", self.node_lifetime_secs);
        }
        Ok(())
    }
}

/// Why a relay configuration was refused. Messages name the line, key or limit, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading relay config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("in relay config {path}: {error}")]
    In { path: String, error: Box<ConfigError> },
    /// Not TOML, or not the keys and types the relay takes ("line N, key `k`: …").
    #[error("{0}")]
    Syntax(String),
    /// Well-formed, but a value or a combination of values the relay refuses.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
        let mut config = Config::parse(&text).map_err(|e| ConfigError::In { path: shown, error: Box::new(e) })?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax(describe(text, &e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.operator.is_empty() {
            invalid!("no [[operator]]: nobody could use the control API");
        }
        let mut names = HashSet::new();
        for op in &self.operator {
            if !names.insert(&op.name) {
                invalid!("operator {} is listed twice", op.name);
            }
        }
        let mut ids = HashSet::new();
        for dev in &self.device {
            if dev.id.is_empty() || !dev.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                invalid!("device id {:?}: use letters, digits, '-', '_' and '.'", dev.id);
            }
            if !ids.insert(&dev.id) {
                invalid!("device {} is listed twice", dev.id);
            }
        }
        let dp = &self.dataplane;
        if dp.buffer_size < 4096 || dp.buffer_size > (1 << 20) {
            invalid!("dataplane.buffer_size {} is outside 4096..=1048576", dp.buffer_size);
        }
        // 2^15: the most an io_uring buffer ring holds (per worker).
        if !(2..=32_768).contains(&dp.buffers) {
            invalid!("dataplane.buffers {} is outside 2..=32768 (per worker)", dp.buffers);
        }
        let l = &self.limits;
        if l.max_header_bytes < 8192 {
            invalid!("limits.max_header_bytes must be at least 8192");
        }
        if l.handshake_timeout_secs == 0 || l.idle_timeout_secs == 0 || l.max_handshakes == 0 {
            invalid!("limits.handshake_timeout_secs, idle_timeout_secs and max_handshakes must be above 0");
        }
        if l.keepalive_secs == 0 || l.attach_timeout_secs == 0 || l.max_sessions_per_operator == 0 {
            invalid!("limits.keepalive_secs, attach_timeout_secs and max_sessions_per_operator must be above 0");
        }
        if l.login_idle_timeout_secs == 0 || l.max_logins == 0 {
            invalid!("limits.login_idle_timeout_secs and max_logins must be above 0");
        }
        if l.max_handshakes_per_address == 0 {
            invalid!("limits.max_handshakes_per_address must be above 0");
        }
        if l.session_ttl_secs == 0 || l.session_ttl_secs > l.max_session_ttl_secs {
            invalid!(
                "limits.session_ttl_secs {} must be 1..=max_session_ttl_secs ({}): otherwise every session request \
                 without a ttl_secs is refused",
                l.session_ttl_secs,
                l.max_session_ttl_secs
            );
        }
        // Durations are added to the clock: an absurd one would overflow it on a request.
        const TEN_YEARS: u64 = 10 * 365 * 24 * 3600;
        for (key, secs) in [
            ("session_ttl_secs", l.session_ttl_secs),
            ("max_session_ttl_secs", l.max_session_ttl_secs),
            ("client_grace_secs", l.client_grace_secs),
            ("pair_timeout_secs", l.pair_timeout_secs),
            ("close_timeout_secs", l.close_timeout_secs),
            ("attach_timeout_secs", l.attach_timeout_secs),
            ("handshake_timeout_secs", l.handshake_timeout_secs),
            ("idle_timeout_secs", l.idle_timeout_secs),
            ("keepalive_secs", l.keepalive_secs),
            ("agent_grace_secs", l.agent_grace_secs),
            ("drain_timeout_secs", l.drain_timeout_secs),
            ("auth_failure_delay_ms", l.auth_failure_delay_ms / 1000),
        ] {
            if secs > TEN_YEARS {
                invalid!("limits.{key} is over ten years");
            }
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        Ok(())
    }

    pub fn operator(&self, token: &str) -> Option<&Operator> {
        // Check every entry so the time taken does not tell which one matched.
        self.operator.iter().fold(None, |found, op| if op.token.matches(token) { Some(op) } else { found })
    }

    pub fn device(&self, id: &str) -> Option<&Device> {
        self.device.iter().find(|d| d.id == id)
    }
}

/// A TOML error as the operator should see it: the line and key it is about and what is wrong,
/// never the text of that line. toml's own message quotes the offending source line, and serde's
/// type errors quote the value: on a `token` or `key` line either would print a secret.
fn describe(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else { return e.message().trim().to_string() };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let mut message = e.message().trim().to_string();
    let where_ = match line.split_once('=') {
        Some((key, value)) => {
            let key = key.trim().trim_matches('"');
            // Whatever the value was, it does not go into the message.
            let value = value.trim();
            for shown in [value, value.trim_matches(|c| c == '"' || c == '\'')] {
                if shown.len() >= 3 {
                    message = message.replace(shown, "***");
                }
            }
            format!("line {line_no}, key `{key}`")
        }
        None => format!("line {line_no}"),
    };
    format!("{where_}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[operator]]
        name = "ops"
        token = "op-secret"
        [[device]]
        id = "dev-1"
        key = "dev-secret"
    "#;

    #[test]
    fn the_documented_minimal_config_parses() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.operator[0].name, "ops");
        assert!(c.operator("op-secret").is_some());
        assert!(c.operator("op-secreT").is_none());
        assert!(c.device("dev-1").unwrap().key.matches("dev-secret"));
        assert_eq!(c.limits.max_frame_bytes, 16 << 20);
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = Config::parse(&format!("{MINIMAL}\n[limits]\nmax_fram_bytes = 5\n")).unwrap_err();
        assert!(format!("{err:#}").contains("max_fram_bytes"), "{err:#}");
        let err = Config::parse(&format!("colour = 1\n{MINIMAL}")).unwrap_err();
        assert!(format!("{err:#}").contains("colour"), "{err:#}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let c = Config::parse(MINIMAL).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("op-secret") && !dump.contains("dev-secret"), "{dump}");
    }

    #[test]
    fn credentials_may_be_stored_as_sha256() {
        // A well-formed SHA-256 of something else: parses, but matches nothing.
        let other_hash = "4c70c0a1fb3f8e1c1d1d3bd7a7fa1f6e2c4aa8b9c1d5a0fd0a5f8d0ea37c7b0e";
        let real = Sha256::digest(b"op-secret").iter().map(|b| format!("{b:02x}")).collect::<String>();
        let text = format!("[[operator]]\nname = \"ops\"\ntoken_sha256 = \"{real}\"\n");
        let c = Config::parse(&text).unwrap();
        assert!(c.operator("op-secret").is_some());
        assert!(c.operator(&real).is_none(), "the hash itself is not a credential");
        let wrong = format!("[[operator]]\nname = \"ops\"\ntoken_sha256 = \"{other_hash}\"\n");
        assert!(Config::parse(&wrong).unwrap().operator("op-secret").is_none());
        let both = format!("[[operator]]\nname = \"ops\"\ntoken = \"op-secret\"\ntoken_sha256 = \"{real}\"\n");
        assert!(format!("{:#}", Config::parse(&both).unwrap_err()).contains("not both"));
        let short = "[[operator]]\nname = \"ops\"\ntoken_sha256 = \"abc\"\n";
        assert!(format!("{:#}", Config::parse(short).unwrap_err()).contains("64 hex digits"));
    }

    #[test]
    fn a_bad_line_is_named_by_line_and_key_without_its_value() {
        for bad in [
            "token = \"op-secret-value\n",
            "token = op-secret-value\n",
            "token = 123456789012\n",
            "token = [\"op-secret-value\"]\n",
        ] {
            let text = format!("[[operator]]\nname = \"ops\"\n{bad}");
            let err = format!("{:#}", Config::parse(&text).unwrap_err());
            assert!(err.contains("line 3"), "{err}");
            assert!(!err.contains("op-secret-value") && !err.contains("123456789012"), "{err}");
        }
        let err = format!("{:#}", Config::parse("[[operator]]\nname = \"ops\"\ntoken = 5\n").unwrap_err());
        assert!(err.contains("key `token`"), "{err}");
    }

    #[test]
    fn limits_are_checked_against_each_other_and_bounded() {
        let with = |limits: &str| Config::parse(&format!("{MINIMAL}\n[limits]\n{limits}\n"));
        let err = format!("{:#}", with("session_ttl_secs = 100\nmax_session_ttl_secs = 50").unwrap_err());
        assert!(err.contains("session_ttl_secs 100 must be 1..=max_session_ttl_secs (50)"), "{err}");
        let err = format!("{:#}", with("idle_timeout_secs = 18446744073709551615").unwrap_err());
        assert!(err.contains("idle_timeout_secs is over ten years"), "{err}");
        let err = format!("{:#}", with("max_session_ttl_secs = 18446744073709551615").unwrap_err());
        assert!(err.contains("max_session_ttl_secs is over ten years"), "{err}");
        assert!(with("session_ttl_secs = 60\nmax_session_ttl_secs = 60").is_ok());
    }

    #[test]
    fn a_non_ascii_hash_is_an_error_not_a_panic() {
        let text = format!("[[operator]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\n", "é".repeat(32));
        assert!(format!("{:#}", Config::parse(&text).unwrap_err()).contains("64 hex digits"));
    }

    /// README's config block is `examples/relay.toml`, it parses, and the values it shows are
    /// the defaults (README says so).
    #[test]
    fn readme_config_block_is_the_example_file_and_shows_the_defaults() {
        let readme = include_str!("../README.md");
        let block = readme
            .split("## Relay configuration")
            .nth(1)
            .and_then(|s| s.split("```toml\n").nth(1))
            .and_then(|s| s.split("```").next())
            .expect("README has a config block");
        let example = include_str!("../examples/relay.toml");
        assert_eq!(block, example, "README's config block and examples/relay.toml differ");
        let c = Config::parse(example).unwrap();
        assert_eq!(format!("{:?}", c.limits), format!("{:?}", Limits::default()));
        assert_eq!(format!("{:?}", c.dataplane), format!("{:?}", DataPlane::default()));
    }

    /// README's `[cluster]` block is the one in `examples/cluster-node.toml`, which parses and
    /// shows the defaults of the keys it may leave out.
    #[test]
    fn readme_cluster_block_is_in_the_example_file_and_parses() {
        let readme = include_str!("../README.md");
        let block = readme
            .split("## Cluster")
            .nth(1)
            .and_then(|s| s.split("```toml\n").nth(1))
            .and_then(|s| s.split("```").next())
            .expect("README has a cluster config block");
        let example = include_str!("../examples/cluster-node.toml");
        assert!(example.ends_with(block), "README's [cluster] block and examples/cluster-node.toml differ");
        let c = Config::parse(example).unwrap().cluster.expect("[cluster]");
        assert_eq!((c.node_lifetime_secs, c.name.as_str(), c.replicas), (Cluster::default_lifetime(), "ringway", 1));
        assert!(c.public_url.is_none());
    }

    fn corpus(kind: &str) -> Vec<(String, String)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config").join(kind);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no configs in {}", dir.display());
        files
    }

    #[test]
    fn every_config_in_the_valid_corpus_parses() {
        for (name, text) in corpus("valid") {
            if let Err(e) = Config::parse(&text) {
                panic!("tests/config/valid/{name}: {e:#}");
            }
        }
    }

    /// Each invalid config's first line says the error it must produce (`# error: …`).
    #[test]
    fn every_config_in_the_invalid_corpus_fails_with_its_error() {
        for (name, text) in corpus("invalid") {
            let want =
                text.lines().next().and_then(|l| l.strip_prefix("# error: ")).unwrap_or_else(|| {
                    panic!("tests/config/invalid/{name} must start with '# error: <what it must say>'")
                });
            match Config::parse(&text) {
                Ok(_) => panic!("tests/config/invalid/{name} parsed"),
                Err(e) => {
                    let got = format!("{e:#}");
                    assert!(got.contains(want), "tests/config/invalid/{name}: said {got:?}, not {want:?}");
                }
            }
        }
    }

    #[test]
    fn random_tokens_are_long_and_distinct() {
        let (a, b) = (Secret::random(), Secret::random());
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a.expose(), b.expose());
    }
}
