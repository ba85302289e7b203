//! What every part of the control plane shares and only reads: the configuration, counters,
//! the audit log, TLS, the handshake bounds, the shutdown signal — and the session registry
//! ([`Registry`]), the one part that holds mutable state, behind its trait.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use super::admission::Admission;
use super::audit::{Audit, Record};
use super::cluster::ClusterRegistry;
use super::ending::CloseReason;
use super::handoff::Workers;
use super::keys::{Keys, ReloadError, Reloaded};
use super::metrics::Metrics;
use super::registry::memory::MemoryRegistry;
use super::registry::{Refusal, Registry, SystemClock};
use crate::config::Config;

/// The relay's shared context. See the module doc.
pub struct Relay {
    pub config: Arc<Config>,
    /// Operators, devices and the TLS certificate, as the config file says now (reloadable).
    pub keys: Arc<Keys>,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<Audit>,
    /// Set when the config has `[tls]`: every connection is TLS.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Connections in their HTTP phase (relay-wide), bounded by `limits.max_handshakes`.
    pub handshakes: Arc<Semaphore>,
    /// Flips to true on SIGTERM: accept loops stop, new sessions are refused.
    pub shutdown: watch::Sender<bool>,
    /// Per-address handshake shares and the failed-login gate.
    pub admission: Arc<Admission>,
    /// Agents, sessions and connections.
    pub registry: Arc<dyn Registry>,
    /// Where upgraded data sockets go.
    pub workers: Workers,
}

impl Relay {
    /// The context of a relay whose workers listen on `workers`, with the in-memory registry,
    /// or the cluster's when the config has `[cluster]`.
    pub fn new(config: Config, workers: Workers) -> anyhow::Result<Relay> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let audit = Arc::new(Audit::open(config.audit.path.as_deref())?);
        let keys = Arc::new(Keys::new(&config)?);
        let local = MemoryRegistry::new(
            config.clone(),
            keys.clone(),
            metrics.clone(),
            audit.clone(),
            workers.clone(),
            Arc::new(SystemClock),
        );
        let registry: Arc<dyn Registry> = match &config.cluster {
            None => Arc::new(local),
            Some(_) => Arc::new(ClusterRegistry::start(config.clone(), local)?),
        };
        let tls = match keys.cert() {
            Some(slot) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(slot)?)),
            None => None,
        };
        let admission = Admission::new(
            config.limits.max_handshakes_per_address.min(config.limits.max_handshakes),
            Duration::from_millis(config.limits.auth_failure_delay_ms),
        );
        Ok(Relay {
            handshakes: Arc::new(Semaphore::new(config.limits.max_handshakes)),
            config,
            keys,
            metrics,
            audit,
            tls,
            shutdown: watch::Sender::new(false),
            admission,
            registry,
            workers,
        })
    }

    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Checks a device key.
    pub fn device_key_ok(&self, device: &str, key: &str) -> Result<(), Refusal> {
        if self.keys.device_key_ok(device, key) {
            Ok(())
        } else {
            Err(Refusal::bad_token())
        }
    }

    /// Reads the config file again (SIGHUP, `POST /api/v1/reload`): new credentials and
    /// certificate take effect, agents of revoked devices are disconnected; a file that fails
    /// is refused and the running configuration stays. Logged either way.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        match self.keys.reload() {
            Ok(done) => {
                for device in &done.revoked {
                    if self.registry.disconnect_agent(device, CloseReason::Revoked) {
                        tracing::warn!(device, "agent disconnected: its device was removed or given a new key");
                    }
                }
                tracing::info!(
                    operators = done.operators,
                    devices = done.devices,
                    certificate = done.certificate,
                    "configuration reloaded"
                );
                if !done.restart_needed.is_empty() {
                    tracing::warn!(
                        "configuration reloaded, but these sections changed and apply only after a restart: {}",
                        done.restart_needed.join(", ")
                    );
                }
                Ok(done)
            }
            Err(e) => {
                tracing::error!("configuration reload refused, the running configuration stays: {e}");
                Err(e)
            }
        }
    }

    /// A second agent for a device whose agent answered: refused, logged, audited, counted.
    pub fn agent_refused(&self, device: &str, addr: SocketAddr, holder: SocketAddr) {
        self.metrics.agent_refusals.fetch_add(1, Relaxed);
        tracing::warn!(device, %addr, %holder, "agent refused: this device's agent is connected and alive (a copied key?)");
        self.audit.write(Record::AgentRefused { device, addr: &addr.to_string(), holder: &holder.to_string() });
    }
}
