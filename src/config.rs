//! The relay's TOML configuration: parsed, validated, typed. Secrets live behind [`Secret`],
//! whose `Debug` never shows them, so a config can be logged whole.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;
use subtle::ConstantTimeEq;

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    pub name: String,
    pub token: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub id: String,
    pub key: Secret,
}

/// Every limit the relay enforces, with its default.
#[derive(Debug, Clone, Deserialize)]
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
    pub max_connections_per_session: usize,
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
            max_connections_per_session: 256,
        }
    }
}

/// The data plane's sizing.
#[derive(Debug, Clone, Deserialize)]
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
        DataPlane {
            workers: 0,
            buffers: 256,
            buffer_size: 64 << 10,
        }
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
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading relay config {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in relay config {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.operator.is_empty() {
            bail!("no [[operator]]: nobody could use the control API");
        }
        let mut names = HashSet::new();
        for op in &self.operator {
            if op.token.expose().len() < 8 {
                bail!("operator {}: token is shorter than 8 characters", op.name);
            }
            if !names.insert(&op.name) {
                bail!("operator {} is listed twice", op.name);
            }
        }
        let mut ids = HashSet::new();
        for dev in &self.device {
            if dev.id.is_empty()
                || !dev
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                bail!(
                    "device id {:?}: use letters, digits, '-', '_' and '.'",
                    dev.id
                );
            }
            if dev.key.expose().len() < 8 {
                bail!("device {}: key is shorter than 8 characters", dev.id);
            }
            if !ids.insert(&dev.id) {
                bail!("device {} is listed twice", dev.id);
            }
        }
        let dp = &self.dataplane;
        if dp.buffer_size < 4096 || dp.buffer_size > (1 << 20) {
            bail!(
                "dataplane.buffer_size {} is outside 4096..=1048576",
                dp.buffer_size
            );
        }
        if dp.buffers < 2 {
            bail!("dataplane.buffers must be at least 2");
        }
        Ok(())
    }

    pub fn operator(&self, token: &str) -> Option<&Operator> {
        // Check every entry so the time taken does not tell which one matched.
        self.operator.iter().fold(None, |found, op| {
            if op.token.matches(token) {
                Some(op)
            } else {
                found
            }
        })
    }

    pub fn device(&self, id: &str) -> Option<&Device> {
        self.device.iter().find(|d| d.id == id)
    }
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
        assert!(
            !dump.contains("op-secret") && !dump.contains("dev-secret"),
            "{dump}"
        );
    }

    #[test]
    fn random_tokens_are_long_and_distinct() {
        let (a, b) = (Secret::random(), Secret::random());
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a.expose(), b.expose());
    }
}
