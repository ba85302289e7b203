//! The cluster's shared registry on NATS JetStream: three key-value buckets (nodes, devices,
//! sessions) and request subjects addressed to one node. Every record and every request
//! carries an HMAC-SHA256 made with the cluster's `peer_key` over the bucket, the key and the
//! body: a holder of NATS credentials alone can read the registry (it holds no usable token:
//! client tokens are stored hashed, device tokens never leave their node) but cannot write a
//! record or a request a node accepts.
//!
//! Ownership is written with `create`/`update` on a revision (compare-and-swap), never a blind
//! `put`: a write that timed out during a reconnect may still land, and only a revision check
//! keeps it from overwriting a newer owner.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::{Cluster, Limits};
use crate::proto::StartSession;

/// A node's heartbeat: where it is reached, since when it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub advertise: String,
    pub started_at: u64,
}

/// Which node holds a device's agent. The record's revision is the fencing token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub node: String,
    /// The agent's control connection is up (false: within its grace period).
    pub online: bool,
    pub services: Vec<String>,
    /// Unix seconds since the agent came up.
    pub since: u64,
    /// The agent's address as its node sees it.
    pub addr: String,
}

/// A session as the cluster knows it. `node` is its home: the node holding its device (or,
/// while the device is offline, the node that started it); the client's connections go there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub node: String,
    pub device: String,
    pub service: String,
    pub operator: String,
    pub created_at: u64,
    pub expires_at: u64,
    /// SHA-256 of the client token, hex.
    pub client_token_sha256: String,
    /// What its home node last reported (every second or so).
    pub connections: usize,
    pub bytes_to_device: u64,
    pub bytes_to_client: u64,
    pub client_connected: bool,
}

/// A request from one node to another.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Ask {
    /// Open a session for a device this node holds; the asking node minted the client token
    /// and sends only its hash.
    Start { id: String, operator: String, operator_addr: String, req: StartSession, client_token_sha256: String },
    /// Close a session (4003) on behalf of an operator.
    Close { id: String, operator: String, admin: bool },
    /// Is the agent of this device alive? (It answers a ping.)
    Probe { device: String },
}

/// A node's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Started { expires_at: u64 },
    Closed { found: bool },
    Alive { alive: bool },
    Refused { status: u16, message: String },
}

/// A signed value: the body as text and its MAC.
#[derive(Serialize, Deserialize)]
struct Signed {
    mac: String,
    body: String,
    /// Unix seconds when it was signed: requests older than [`REQUEST_MAX_AGE`] are refused
    /// (a recorded request cannot be replayed later).
    at: u64,
}

const REQUEST_MAX_AGE: u64 = 30;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// NATS did not answer or refused: the registry is unreachable.
    #[error("the cluster registry (NATS) is unreachable: {0}")]
    Unreachable(String),
    /// The record changed since it was read: read again and decide again.
    #[error("the record changed meanwhile")]
    Conflict,
    /// No node listens on that subject (the node is gone).
    #[error("node {0} does not answer")]
    NoNode(String),
}

/// The buckets and the connection.
pub struct Store {
    pub client: async_nats::Client,
    pub nodes: kv::Store,
    pub devices: kv::Store,
    pub sessions: kv::Store,
    key: Hmac<Sha256>,
    name: String,
    /// Reads, writes, deletes and requests made (for `/metrics`).
    pub ops: std::sync::atomic::AtomicU64,
}

/// How long a registry operation may take before the caller hears 503.
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);

impl Store {
    /// Connects to NATS and opens (or creates) the buckets. The client reconnects by itself,
    /// quickly (at most 1 s between attempts), forever.
    pub async fn open(c: &Cluster, limits: &Limits) -> anyhow::Result<Store> {
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("ringway-{}", c.node))
            .connection_timeout(Duration::from_secs(3))
            .request_timeout(Some(OP_TIMEOUT))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| Duration::from_millis((100 * attempts as u64).min(1000)));
        if let Some(token) = &c.nats_token {
            opts = opts.token(token.expose().to_string());
        }
        if let Some(path) = &c.nats_credentials {
            opts = opts.credentials_file(path).await.map_err(|e| anyhow::anyhow!("cluster.nats_credentials: {e}"))?;
        }
        if let Some(ca) = &c.nats_ca {
            opts = opts.add_root_certificates(ca.clone());
        }
        let client = tokio::time::timeout(Duration::from_secs(15), opts.connect(c.nats.join(",")))
            .await
            .map_err(|_| anyhow::anyhow!("no NATS server answered within 15 s at {}", c.nats.join(", ")))?
            .map_err(|e| anyhow::anyhow!("connecting to NATS at {}: {e}", c.nats.join(", ")))?;
        let js = jetstream::new(client.clone());
        let bucket = |suffix: &str, max_age: Duration| kv::Config {
            bucket: format!("{}_{suffix}", c.name),
            history: 1,
            max_age,
            num_replicas: c.replicas,
            ..Default::default()
        };
        let open = |config: kv::Config| {
            let js = js.clone();
            async move {
                let name = config.bucket.clone();
                match js.create_key_value(config).await {
                    Ok(kv) => Ok(kv),
                    Err(create) => js.get_key_value(&name).await.map_err(|get| {
                        anyhow::anyhow!(
                            "opening the key-value bucket {name} (JetStream enabled? nats-server 2.10 or newer?): \
                             {create}; {get}"
                        )
                    }),
                }
            }
        };
        // A dead node's heartbeat and a forgotten session fall out of their buckets by age.
        let nodes = open(bucket("nodes", Duration::from_secs(c.node_lifetime_secs * 6))).await?;
        let devices = open(bucket("devices", Duration::ZERO)).await?;
        let sessions = open(bucket("sessions", Duration::from_secs(limits.max_session_ttl_secs + 3600))).await?;
        let key = Hmac::<Sha256>::new_from_slice(c.peer_key.expose().as_bytes()).expect("HMAC takes any key length");
        Ok(Store { client, nodes, devices, sessions, key, name: c.name.clone(), ops: Default::default() })
    }

    fn mac(&self, context: &str, key: &str, body: &str, at: u64) -> Hmac<Sha256> {
        let mut mac = self.key.clone();
        for part in [context, key, body, &at.to_string()] {
            mac.update(part.as_bytes());
            mac.update(&[0]);
        }
        mac
    }

    /// `value` signed for `key` in `context` (a bucket, or a request subject).
    pub fn seal<T: Serialize>(&self, context: &str, key: &str, value: &T) -> Bytes {
        let body = serde_json::to_string(value).expect("records serialize");
        let at = crate::proto::unix_now();
        let mac = hex(&self.mac(context, key, &body, at).finalize().into_bytes());
        Bytes::from(serde_json::to_vec(&Signed { mac, body, at }).expect("records serialize"))
    }

    /// The value if its MAC is right; `None` (logged by the caller) if not.
    pub fn open_sealed<T: DeserializeOwned>(&self, context: &str, key: &str, bytes: &[u8]) -> Option<T> {
        let signed: Signed = serde_json::from_slice(bytes).ok()?;
        let mac = unhex(&signed.mac)?;
        self.mac(context, key, &signed.body, signed.at).verify_slice(&mac).ok()?;
        serde_json::from_str(&signed.body).ok()
    }

    /// What a node presents when it forwards a client's connection for `session` to another:
    /// `SECONDS.MAC`, valid for [`REQUEST_MAX_AGE`].
    pub fn forward_proof(&self, session: &str, from: &str) -> String {
        let at = crate::proto::unix_now();
        format!("{at}.{from}.{}", hex(&self.mac("forward", session, from, at).finalize().into_bytes()))
    }

    /// The forwarding node's name if `proof` is one, fresh, for `session`.
    pub fn check_forward_proof(&self, session: &str, proof: &str) -> Option<String> {
        let mut parts = proof.splitn(3, '.');
        let at: u64 = parts.next()?.parse().ok()?;
        let from = parts.next()?;
        let mac = unhex(parts.next()?)?;
        if crate::proto::unix_now().abs_diff(at) > REQUEST_MAX_AGE {
            return None;
        }
        self.mac("forward", session, from, at).verify_slice(&mac).ok()?;
        Some(from.to_string())
    }

    /// A request's subject for `node`.
    pub fn subject(&self, node: &str) -> String {
        format!("{}.node.{node}", self.name)
    }

    /// Asks `node`; fails fast when no node listens there.
    pub async fn ask(&self, node: &str, ask: &Ask) -> Result<Answer, StoreError> {
        self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let subject = self.subject(node);
        let payload = self.seal(&subject, "ask", ask);
        let reply = match tokio::time::timeout(OP_TIMEOUT, self.client.request(subject.clone(), payload)).await {
            Err(_) => return Err(StoreError::Unreachable(format!("node {node} did not answer in time"))),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(StoreError::NoNode(node.to_string()))
            }
            Ok(Err(e)) => return Err(StoreError::Unreachable(e.to_string())),
            Ok(Ok(m)) => m,
        };
        self.open_sealed(&subject, "answer", &reply.payload)
            .ok_or_else(|| StoreError::Unreachable(format!("node {node} sent an answer that does not verify")))
    }

    /// A request addressed to this node, verified and fresh; `None` if not.
    pub fn read_ask(&self, subject: &str, payload: &[u8]) -> Option<Ask> {
        let signed: Signed = serde_json::from_slice(payload).ok()?;
        if crate::proto::unix_now().abs_diff(signed.at) > REQUEST_MAX_AGE {
            return None;
        }
        self.open_sealed(subject, "ask", payload)
    }

    /// Creates `key` if absent (`revision` None) or replaces the revision read.
    pub async fn write<T: Serialize>(
        &self,
        bucket: &kv::Store,
        key: &str,
        value: &T,
        revision: Option<u64>,
    ) -> Result<u64, StoreError> {
        self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sealed = self.seal(&bucket.name, key, value);
        let write = async {
            match revision {
                None => bucket.create(key, sealed).await.map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => StoreError::Conflict,
                    _ => StoreError::Unreachable(e.to_string()),
                }),
                Some(r) => bucket.update(key, sealed, r).await.map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => StoreError::Conflict,
                    _ => StoreError::Unreachable(e.to_string()),
                }),
            }
        };
        tokio::time::timeout(OP_TIMEOUT, write)
            .await
            .unwrap_or_else(|_| Err(StoreError::Unreachable("timed out".into())))
    }

    /// Deletes `key` if it is still at `revision`.
    pub async fn remove(&self, bucket: &kv::Store, key: &str, revision: u64) -> Result<(), StoreError> {
        self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let delete = bucket.delete_expect_revision(key, Some(revision));
        match tokio::time::timeout(OP_TIMEOUT, delete).await {
            Err(_) => Err(StoreError::Unreachable("timed out".into())),
            // The server's "wrong last sequence" comes back as the publish's error.
            Ok(Err(e))
                if e.kind() == kv::DeleteErrorKind::WrongLastRevision || e.to_string().contains("wrong last") =>
            {
                Err(StoreError::Conflict)
            }
            Ok(Err(e)) => Err(StoreError::Unreachable(e.to_string())),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// The current value of `key` if it verifies, and the revision to write over (`None`: the
    /// key is absent or deleted, create it). A forged value reads as no value, overwritable.
    pub async fn read<T: DeserializeOwned>(
        &self,
        bucket: &kv::Store,
        key: &str,
    ) -> Result<(Option<T>, Option<u64>), StoreError> {
        self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = tokio::time::timeout(OP_TIMEOUT, bucket.entry(key))
            .await
            .map_err(|_| StoreError::Unreachable("timed out".into()))?
            .map_err(|e| StoreError::Unreachable(e.to_string()))?;
        Ok(match entry.filter(|e| e.operation == kv::Operation::Put) {
            None => (None, None),
            Some(e) => (self.open_sealed(&bucket.name, key, &e.value), Some(e.revision)),
        })
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
}

/// SHA-256 of a token, hex: what the sessions bucket stores.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex(&Sha256::digest(token.as_bytes()))
}

/// The hash back as bytes, for [`crate::config::Credential::Sha256`].
pub fn hash_bytes(hex_hash: &str) -> Option<[u8; 32]> {
    unhex(hex_hash)?.try_into().ok()
}
