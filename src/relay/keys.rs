//! The relay's credentials — operators' tokens, devices' keys — and its TLS certificate, as the
//! config file says now: read at start, read again on SIGHUP or `POST /api/v1/reload`.
//!
//! A reload reads and validates the whole file first; a file that fails is refused with its
//! error and nothing changes. Otherwise the new operators and devices replace the old ones at
//! once (every later request is checked against them), the certificate is replaced for the
//! next TLS handshake, and the agents of devices that were removed or given a new key are
//! disconnected (1008). Nothing else is touched: running tunnels keep running; sessions keep
//! their client tokens. Sections read only at start (`[limits]`, `[dataplane]`, `[audit]`,
//! `[cluster]`, whether `[tls]` exists) are compared and a change is reported as needing a
//! restart.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::config::{Audit, Cluster, Config, ConfigError, DataPlane, Limits, Role};
use crate::tls::CertSlot;

/// The sections a reload does not apply, as the relay started with them.
struct Fixed {
    limits: Limits,
    dataplane: DataPlane,
    audit: Audit,
    cluster: Option<Cluster>,
}

impl Fixed {
    fn of(c: &Config) -> Fixed {
        Fixed {
            limits: c.limits.clone(),
            dataplane: c.dataplane.clone(),
            audit: c.audit.clone(),
            cluster: c.cluster.clone(),
        }
    }

    /// The sections that differ in `new`, compared by value (secrets too: a new `peer_key` is
    /// a change, though no log shows it).
    fn changed(&self, new: &Fixed) -> Vec<&'static str> {
        [
            ("limits", self.limits != new.limits),
            ("dataplane", self.dataplane != new.dataplane),
            ("audit", self.audit != new.audit),
            ("cluster", self.cluster != new.cluster),
        ]
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect()
    }
}

/// The live credentials and certificate.
pub struct Keys {
    /// The configuration as last read: its operators and devices apply.
    config: RwLock<Arc<Config>>,
    /// The sections that need a restart, as the relay started with them.
    running: Fixed,
    /// Set when the relay serves TLS.
    cert: Option<Arc<CertSlot>>,
    /// The file to read again; `None` for a config given as text (tests, the demo).
    source: Option<PathBuf>,
    /// One reload at a time.
    reloading: std::sync::Mutex<()>,
}

/// What a reload did.
#[derive(Debug, Serialize)]
pub struct Reloaded {
    pub operators: usize,
    pub devices: usize,
    /// The TLS certificate was read again.
    pub certificate: bool,
    /// Devices whose agent was disconnected: removed, or given a new key.
    pub revoked: Vec<String>,
    /// Sections that changed but apply only at the next start.
    pub restart_needed: Vec<&'static str>,
}

/// Why a reload was refused (the old configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the relay was not started from a config file: nothing to read again")]
    NoFile,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0:#}")]
    Certificate(anyhow::Error),
    #[error("[tls] was {}: serving TLS or not changes only with a restart", if *.0 { "removed" } else { "added" })]
    TlsToggled(bool),
}

impl Keys {
    /// The credentials of `config` and, with `[tls]`, its certificate.
    pub fn new(config: &Config) -> anyhow::Result<Keys> {
        let cert = match &config.tls {
            Some(t) => Some(CertSlot::new(crate::tls::certified_key(&t.cert, &t.key)?)),
            None => None,
        };
        Ok(Keys {
            config: RwLock::new(Arc::new(config.clone())),
            running: Fixed::of(config),
            cert,
            source: config.source.clone(),
            reloading: std::sync::Mutex::new(()),
        })
    }

    /// The certificate slot, when the relay serves TLS.
    pub fn cert(&self) -> Option<Arc<CertSlot>> {
        self.cert.clone()
    }

    fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The operator whose token this is: name and role.
    pub fn operator(&self, token: &str) -> Option<(String, Role)> {
        self.config().operator(token).map(|o| (o.name.clone(), o.role))
    }

    /// The role of the operator named `name`, if it is configured.
    pub fn operator_named(&self, name: &str) -> Option<Role> {
        self.config().operator.iter().find(|o| o.name == name).map(|o| o.role)
    }

    /// Every configured device's id.
    pub fn device_ids(&self) -> Vec<String> {
        self.config().device.iter().map(|d| d.id.clone()).collect()
    }

    /// Whether `device` is configured.
    pub fn device_known(&self, device: &str) -> bool {
        self.config().device(device).is_some()
    }

    /// Whether `key` is `device`'s key.
    pub fn device_key_ok(&self, device: &str, key: &str) -> bool {
        self.config().device(device).is_some_and(|d| d.key.matches(key))
    }

    /// Reads the config file again and applies its credentials and certificate. The caller
    /// disconnects the agents of the devices in [`Reloaded::revoked`].
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.source.as_ref().ok_or(ReloadError::NoFile)?;
        let new = Config::load(path)?;
        let old = self.config();
        let certificate = match (&self.cert, &new.tls) {
            (Some(slot), Some(t)) => {
                let key = crate::tls::certified_key(&t.cert, &t.key).map_err(ReloadError::Certificate)?;
                slot.replace(key);
                true
            }
            (None, None) => false,
            (had, _) => return Err(ReloadError::TlsToggled(had.is_some())),
        };
        // A device is revoked when it is gone or its key changed (as the file writes it: a key
        // rewritten as its hash counts as changed, which costs its agent one reconnect).
        let revoked = old
            .device
            .iter()
            .filter(|d| new.device(&d.id).is_none_or(|n| n.key != d.key))
            .map(|d| d.id.clone())
            .collect();
        // Against what the relay runs with: the file it started from, whatever was reloaded since.
        let restart_needed = self.running.changed(&Fixed::of(&new));
        let reloaded =
            Reloaded { operators: new.operator.len(), devices: new.device.len(), certificate, revoked, restart_needed };
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        Ok(reloaded)
    }
}

#[cfg(test)]
mod tests {
    use super::Fixed;
    use crate::config::Config;

    const BASE: &str = "[[operator]]\nname = \"ops\"\ntoken = \"op-secret-123\"\n\
                        [cluster]\nnode = \"n1\"\nnats = [\"nats://127.0.0.1:4222\"]\n\
                        advertise = \"http://127.0.0.1:8080\"\npeer_key = \"peer-key-number-one-0123456789abcdef\"\n";

    #[test]
    fn a_changed_secret_in_a_restart_section_needs_a_restart() {
        let before = Fixed::of(&Config::parse(BASE).unwrap());
        assert!(before.changed(&Fixed::of(&Config::parse(BASE).unwrap())).is_empty());
        // Debug shows neither key: compared by value, the change is seen.
        let rekeyed = BASE.replace("peer-key-number-one", "peer-key-number-two");
        assert_eq!(before.changed(&Fixed::of(&Config::parse(&rekeyed).unwrap())), ["cluster"]);
        let limits = format!("{BASE}[limits]\nidle_timeout_secs = 5\n");
        assert_eq!(before.changed(&Fixed::of(&Config::parse(&limits).unwrap())), ["limits"]);
    }
}
