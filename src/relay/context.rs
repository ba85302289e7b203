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
use super::handoff::{Cmd, Workers};
use super::keys::{Keys, ReloadError, Reloaded};
use super::launch::LaunchCodes;
use super::logins::Logins;
use super::metrics::Metrics;
use super::registry::memory::MemoryRegistry;
use super::registry::{Refusal, Registry, SystemClock};
use crate::config::Config;
use crate::proto::Overview;

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
    /// One-time launch codes waiting to be redeemed.
    pub launch: LaunchCodes,
    /// Console logins.
    pub logins: Logins,
    /// What the console's live views show, refreshed about once a second while one watches
    /// ([`super::console::feed`]).
    pub overview: watch::Sender<Arc<Overview>>,
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
            launch: LaunchCodes::new(config.limits.max_sessions),
            logins: Logins::new(Duration::from_secs(config.limits.login_idle_timeout_secs), config.limits.max_logins),
            overview: watch::Sender::new(Arc::default()),
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

    /// Per session, the bytes its running tunnels forwarded so far, gathered from every worker
    /// (the registry counts a connection's bytes when it ends). A worker that does not answer
    /// within a second is left out.
    pub async fn live_bytes(&self) -> std::collections::HashMap<Arc<str>, (u64, u64)> {
        let asked: Vec<_> = (0..self.workers.count())
            .map(|w| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.workers.send(w, Cmd::Tally(tx));
                rx
            })
            .collect();
        let mut live = std::collections::HashMap::new();
        for rx in asked {
            if let Ok(Ok(rows)) = tokio::time::timeout(Duration::from_secs(1), rx).await {
                for (session, to_device, to_client) in rows {
                    let sum = live.entry(session).or_insert((0, 0));
                    *sum = (sum.0 + to_device, sum.1 + to_client);
                }
            }
        }
        live
    }

    /// The sessions `caller` may see with their live byte counts (ended connections' bytes
    /// plus what the running ones forwarded so far).
    pub async fn sessions_live(&self, caller: super::registry::Caller<'_>) -> Vec<crate::proto::SessionInfo> {
        let mut sessions = self.registry.sessions(caller);
        if sessions.iter().any(|s| s.connections > 0) {
            let live = self.live_bytes().await;
            for s in &mut sessions {
                if let Some((to_device, to_client)) = live.get(s.id.as_str()) {
                    s.bytes_to_device += to_device;
                    s.bytes_to_client += to_client;
                }
            }
        }
        sessions
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
    /// is refused and the running configuration stays. Logged and audited either way, with who
    /// asked (`by`: an operator's name, or `SIGHUP`).
    pub fn reload(&self, by: &str) -> Result<Reloaded, ReloadError> {
        let result = self.keys.reload();
        self.audit.write(Record::ConfigReload { by, ok: result.is_ok() });
        match result {
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
