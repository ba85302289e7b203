//! The cluster registry: the second implementation of [`Registry`]. Each node keeps its own
//! agents, sessions and connections in a [`MemoryRegistry`] (the data plane and the channels
//! talk to it as on a single node) and shares what the other nodes need through NATS
//! JetStream ([`store`]), mirrored in memory by watches ([`mirror`]):
//!
//! - **Devices.** The node an agent connects to takes the device's record by compare-and-swap
//!   (after probing the agent that held it, wherever it is). A node that sees its device taken
//!   closes its stale agent connection; records held by dead nodes are removed.
//! - **Sessions** live on the node holding their device (their *home*), where the client's
//!   connections go (`client_url` is that node's `advertise`, or the cluster's `public_url`, and
//!   then the node a connection lands on forwards it there as bytes). Any node
//!   starts one (asking the home node over NATS request/reply) and lists, shows and closes any.
//!   When a device's node dies, the node its agent moves to adopts its sessions.
//! - **Liveness.** Nodes heartbeat; one not heard from for `node_lifetime_secs` is dead. A node
//!   that cannot reach NATS for most of that time closes its agents (fencing: it could no longer
//!   prove it owns their devices) and answers what needs the registry with 503.
//!
//! A background runtime (one thread) runs the NATS client, the watches, the heartbeat, the
//! requests from other nodes and a reconcile pass every second that writes this node's share
//! (device online state, session figures, ended sessions) and adopts orphaned sessions.

pub mod mirror;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use hyper::StatusCode;
use tokio::sync::{mpsc, oneshot};

use self::mirror::Mirror;
use self::store::{hash_bytes, token_hash, Answer, Ask, DeviceRecord, NodeRecord, SessionRecord, Store, StoreError};
use super::ending::CloseReason;
use super::handoff::{ConnEnd, ConnEnds};
use super::metrics::sample;
use super::registry::memory::{new_session_id, MemoryRegistry, SessionStats};
use super::registry::{AgentLink, Caller, Claim, ClientConn, Forward, Pending, Refusal, Registry, Spare};
use crate::config::{Cluster, Config, Credential, Role, Secret};
use crate::proto::{DeviceInfo, SessionEvent, SessionInfo, SessionStarted, StartSession};

/// The generation [`Claim::Held`] carries for an agent held by another node.
const REMOTE: u64 = u64::MAX;

/// How often this node writes its share and adopts orphans.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// The NATS side's health as this node sees it.
#[derive(Default)]
struct Health {
    /// Cut off from the registry for too long: agents were sent away; new ones are refused.
    fenced: AtomicBool,
    /// Round trip of the last heartbeat write (µs).
    rtt_us: AtomicU64,
    /// Failed registry operations.
    errors: AtomicU64,
    /// Records or requests whose MAC did not verify.
    forged: AtomicU64,
    /// How long taking a device's record took (read + compare-and-swap, and a probe across
    /// nodes when another held it), as a histogram.
    claims: Histogram,
}

/// Upper bounds (seconds) of the claim-latency histogram's buckets.
const CLAIM_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A Prometheus histogram with fixed buckets.
#[derive(Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last one is above every bound.
    counts: [AtomicU64; CLAIM_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = CLAIM_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(CLAIM_BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP ringway_{name} {help}\n# TYPE ringway_{name} histogram");
        let mut total = 0;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Relaxed);
            let le = CLAIM_BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "ringway_{name}_bucket{{le=\"{le}\"}} {total}");
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "ringway_{name}_sum {sum}\nringway_{name}_count {total}");
    }
}

/// What the background tasks and the registry calls share.
struct Inner {
    local: MemoryRegistry,
    config: Arc<Config>,
    node: String,
    store: Store,
    mirror: Mirror,
    health: Health,
    /// When a heartbeat last reached NATS.
    last_ok: Mutex<Instant>,
}

/// The cluster [`Registry`]. See the module doc.
pub struct ClusterRegistry {
    inner: Arc<Inner>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for ClusterRegistry {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None)
}

/// `ws(s)://` URL of a session's client endpoint on the node advertised as `advertise`.
fn client_url(advertise: &str, id: &str) -> String {
    let ws = advertise.replacen("https://", "wss://", 1).replacen("http://", "ws://", 1);
    format!("{ws}/api/v1/sessions/{id}/client")
}

impl ClusterRegistry {
    /// Connects to NATS, opens the buckets, writes the first heartbeat and starts the background
    /// tasks (the watches fill the mirror within moments; ownership never relies on it: claims
    /// read the record itself).
    /// Fails if NATS cannot be reached within a few seconds (a node that starts without its
    /// registry would refuse every agent).
    pub fn start(config: Arc<Config>, local: MemoryRegistry) -> anyhow::Result<ClusterRegistry> {
        let cluster = config.cluster.clone().expect("ClusterRegistry needs [cluster]");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ringway-cluster")
            .enable_all()
            .build()?;
        // The caller may be on a runtime itself (`relay::run`): open from a plain thread.
        let store = std::thread::scope(|s| {
            s.spawn(|| rt.block_on(Store::open(&cluster, &config.limits))).join().expect("store opener panicked")
        })?;
        let lifetime = Duration::from_secs(cluster.node_lifetime_secs);
        let inner = Arc::new(Inner {
            local,
            node: cluster.node.clone(),
            config: config.clone(),
            store,
            mirror: Mirror::new(lifetime),
            health: Health::default(),
            last_ok: Mutex::new(Instant::now()),
        });
        // Announce this node before anything else needs it.
        std::thread::scope(|s| s.spawn(|| rt.block_on(inner.heartbeat(&cluster))).join().expect("heartbeat panicked"))
            .map_err(|e| anyhow::anyhow!("writing this node's heartbeat: {e}"))?;
        rt.spawn(inner.clone().keep_heartbeat(cluster.clone()));
        for bucket in [Bucket::Nodes, Bucket::Devices, Bucket::Sessions] {
            rt.spawn(inner.clone().watch(bucket));
        }
        rt.spawn(inner.clone().serve_asks());
        rt.spawn(inner.clone().keep_reconciling());
        tracing::info!(node = cluster.node, nats = cluster.nats.join(","), "cluster node joined");
        Ok(ClusterRegistry { inner, rt: Some(rt) })
    }

    fn rt(&self) -> &tokio::runtime::Handle {
        self.rt.as_ref().expect("runtime lives until drop").handle()
    }
}

#[derive(Clone, Copy, Debug)]
enum Bucket {
    Nodes,
    Devices,
    Sessions,
}

impl Inner {
    fn healthy(&self) -> bool {
        self.store.client.connection_state() == async_nats::connection::State::Connected
            && !self.health.fenced.load(Relaxed)
    }

    fn failed(&self, what: &str, e: &StoreError) {
        self.health.errors.fetch_add(1, Relaxed);
        tracing::warn!(node = self.node, "cluster registry: {what}: {e}");
    }

    fn kv(&self, bucket: Bucket) -> &kv::Store {
        match bucket {
            Bucket::Nodes => &self.store.nodes,
            Bucket::Devices => &self.store.devices,
            Bucket::Sessions => &self.store.sessions,
        }
    }

    async fn heartbeat(&self, cluster: &Cluster) -> Result<(), String> {
        let record = NodeRecord { advertise: cluster.advertise.clone(), started_at: crate::proto::unix_now() };
        let sealed = self.store.seal(&self.store.nodes.name, &self.node, &record);
        let t0 = Instant::now();
        match tokio::time::timeout(store::OP_TIMEOUT, self.store.nodes.put(&self.node, sealed)).await {
            Ok(Ok(_)) => {
                self.health.rtt_us.store(t0.elapsed().as_micros() as u64, Relaxed);
                *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Heartbeats every quarter lifetime; fences this node when NATS stays out of reach.
    async fn keep_heartbeat(self: Arc<Self>, cluster: Cluster) {
        let lifetime = Duration::from_secs(cluster.node_lifetime_secs);
        let mut tick = tokio::time::interval(lifetime / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Other nodes call this one dead a lifetime after its last heartbeat: its agents
            // must be gone before then, so that no device has two owners. Checked before the
            // next write: a node that was frozen (SIGSTOP, a VM pause) must assume its devices
            // were taken meanwhile.
            let silent = self.last_ok.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
            if silent > lifetime * 3 / 4 && !self.health.fenced.swap(true, Relaxed) {
                tracing::warn!(
                    node = self.node,
                    "cut off from the cluster registry for {silent:.1?}: sending agents to other nodes"
                );
                for a in self.local.agents() {
                    self.local
                        .evict_agent(&a.device, CloseReason::Moving("relay node cut off from its cluster".into()));
                }
            }
            match self.heartbeat(&cluster).await {
                Ok(()) => {
                    if self.health.fenced.swap(false, Relaxed) {
                        tracing::info!(node = self.node, "cluster registry reachable again: taking agents");
                    }
                }
                Err(e) => {
                    self.health.errors.fetch_add(1, Relaxed);
                    tracing::warn!(node = self.node, "heartbeat failed ({e}); registry silent for {silent:.1?}");
                }
            }
        }
    }

    /// Mirrors one bucket: current values first, then every change; starts over when the
    /// watch ends (the client resumes it across reconnects, this covers the rest).
    async fn watch(self: Arc<Self>, bucket: Bucket) {
        loop {
            match self.kv(bucket).watch_with_history(">").await {
                Ok(mut entries) => {
                    while let Some(entry) = entries.next().await {
                        match entry {
                            Ok(e) => self.apply(bucket, e),
                            Err(e) => {
                                tracing::warn!(node = self.node, "watch of {bucket:?} failed: {e}");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(node = self.node, "cannot watch {bucket:?}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn apply(&self, bucket: Bucket, e: kv::Entry) {
        let put = e.operation == kv::Operation::Put;
        let key = e.key.as_str();
        macro_rules! verified {
            () => {
                match self.store.open_sealed(&e.bucket, key, &e.value) {
                    Some(v) => v,
                    None => {
                        self.health.forged.fetch_add(1, Relaxed);
                        tracing::warn!(bucket = e.bucket, key, "ignored a registry record whose MAC does not verify");
                        self.mirror.taint(key, e.revision);
                        return;
                    }
                }
            };
        }
        match bucket {
            Bucket::Nodes if put => {
                let record: NodeRecord = verified!();
                let age = crate::proto::unix_now().saturating_sub(e.created.unix_timestamp().max(0) as u64);
                self.mirror.node_heard(key, record, Duration::from_secs(age));
            }
            Bucket::Nodes => self.mirror.node_gone(key),
            Bucket::Devices if put => {
                let record: DeviceRecord = verified!();
                let elsewhere = record.node != self.node;
                // An event older than what this node wrote itself (its own compare-and-swap
                // went to the mirror at once) says nothing about the owner now.
                let fresh = self.mirror.set_device(key, Some((record, e.revision)));
                // Fencing: another node took the device; this node's connection is stale.
                if fresh && elsewhere && self.local.evict_agent(key, CloseReason::AgentReplaced) {
                    tracing::info!(device = key, "device taken by another node: closed its stale agent connection");
                }
            }
            Bucket::Devices => {
                self.mirror.forget_device(key, e.revision);
            }
            Bucket::Sessions if put => {
                let record: SessionRecord = verified!();
                let elsewhere = record.node != self.node;
                let fresh = self.mirror.set_session(key, Some((record, e.revision)));
                if fresh && elsewhere && self.local.has_session(key) {
                    self.local.release_session(key);
                }
            }
            Bucket::Sessions => {
                self.mirror.forget_session(key, e.revision);
            }
        }
    }

    /// Answers requests addressed to this node.
    async fn serve_asks(self: Arc<Self>) {
        let subject = self.store.subject(&self.node);
        loop {
            match self.store.client.subscribe(subject.clone()).await {
                Ok(mut sub) => {
                    while let Some(msg) = sub.next().await {
                        let me = self.clone();
                        let subject = subject.clone();
                        tokio::spawn(async move {
                            let Some(reply) = msg.reply.clone() else { return };
                            let Some(ask) = me.store.read_ask(&subject, &msg.payload) else {
                                me.health.forged.fetch_add(1, Relaxed);
                                tracing::warn!(node = me.node, "ignored a node request that does not verify");
                                return;
                            };
                            let answer = me.answer(ask).await;
                            let _ = me.store.client.publish(reply, me.store.seal(&subject, "answer", &answer)).await;
                        });
                    }
                }
                Err(e) => tracing::warn!(node = self.node, "cannot subscribe to {subject}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn answer(&self, ask: Ask) -> Answer {
        let refused = |r: Refusal| Answer::Refused { status: r.status.as_u16(), message: r.message };
        match ask {
            Ask::Start { id, operator, operator_addr, req, client_token_sha256 } => {
                match self.open_here(id.into(), &operator, &operator_addr, req, &client_token_sha256).await {
                    Ok(expires_at) => Answer::Started { expires_at },
                    Err(r) => refused(r),
                }
            }
            Ask::Close { id, operator, admin } => {
                let role = if admin { Role::Admin } else { Role::Operator };
                let found = self.close_here(Caller { name: &operator, role }, &id).await;
                Answer::Closed { found }
            }
            Ask::Probe { device } => {
                let Some((_, _, probe)) = self.local.holder(&device) else { return Answer::Alive { alive: false } };
                let (tx, rx) = oneshot::channel();
                let alive = probe.send(tx).await.is_ok()
                    && tokio::time::timeout(Duration::from_secs(2), rx).await.is_ok_and(|r| r.is_ok());
                Answer::Alive { alive }
            }
        }
    }

    /// Opens a session on this node (its device is here, or offline) and records it.
    async fn open_here(
        &self,
        id: Arc<str>,
        operator: &str,
        operator_addr: &str,
        req: StartSession,
        token_sha256: &str,
    ) -> Result<u64, Refusal> {
        let ttl = self.local.check_request(&req)?;
        let hash = hash_bytes(token_sha256).ok_or_else(|| unavailable("malformed token hash"))?;
        let expires_at = self.local.open(id.clone(), operator, operator_addr, &req, ttl, Credential::Sha256(hash))?;
        let record = SessionRecord {
            node: self.node.clone(),
            device: req.device,
            service: req.service,
            operator: operator.to_string(),
            created_at: expires_at - ttl,
            expires_at,
            client_token_sha256: token_sha256.to_string(),
            connections: 0,
            bytes_to_device: 0,
            bytes_to_client: 0,
            client_connected: false,
        };
        match self.store.write(&self.store.sessions, &id, &record, None).await {
            Ok(rev) => {
                self.mirror.set_session(&id, Some((record, rev)));
                Ok(expires_at)
            }
            Err(e) => {
                self.failed("recording a new session", &e);
                self.local.release_session(&id);
                Err(unavailable(e))
            }
        }
    }

    /// Closes a session that lives here, and its record.
    async fn close_here(&self, caller: Caller<'_>, id: &str) -> bool {
        let found = self.local.close_session_as(caller, id);
        if found {
            // Removed now rather than at the next reconcile (which finds it gone).
            if let Some((_, rev)) = self.mirror.session(id) {
                if let Err(e) = self.store.remove(&self.store.sessions, id, rev).await {
                    self.failed("removing a closed session", &e);
                }
            }
        }
        found
    }

    /// Takes `device` for `link` by compare-and-swap. `force`: even from a live holder on
    /// another node (its agent did not answer a probe).
    async fn take(
        self: &Arc<Self>,
        device: &str,
        services: &[String],
        link: &AgentLink,
        force: bool,
    ) -> Result<(), Claim> {
        if !self.healthy() {
            return Err(Claim::Unavailable("this relay node cannot reach its cluster registry".into()));
        }
        for _ in 0..4 {
            let (current, revision) = match self.store.read::<DeviceRecord>(&self.store.devices, device).await {
                Ok(c) => c,
                Err(e) => return Err(Claim::Unavailable(e.to_string())),
            };
            if let Some(held) = &current {
                if !force && held.node != self.node && self.mirror.alive(&held.node) {
                    return Err(self.held_remotely(device, held));
                }
            }
            let record = DeviceRecord {
                node: self.node.clone(),
                online: true,
                services: services.to_vec(),
                since: crate::proto::unix_now(),
                addr: link.addr.to_string(),
            };
            match self.store.write(&self.store.devices, device, &record, revision).await {
                Ok(rev) => {
                    self.mirror.set_device(device, Some((record, rev)));
                    return Ok(());
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(Claim::Unavailable(e.to_string())),
            }
        }
        Err(Claim::Unavailable("the device's record kept changing".into()))
    }

    /// A claim held by another node's agent: the caller's probe goes there over NATS.
    fn held_remotely(self: &Arc<Self>, device: &str, held: &DeviceRecord) -> Claim {
        let (probe, mut probes) = mpsc::channel::<oneshot::Sender<()>>(1);
        let node = held.node.clone();
        let device = device.to_string();
        let store_node = self.node.clone();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(waiter) = probes.recv().await {
                match me.store.ask(&node, &Ask::Probe { device: device.clone() }).await {
                    Ok(Answer::Alive { alive: true }) => {
                        let _ = waiter.send(());
                    }
                    Ok(_) => {}
                    Err(e) => tracing::info!(node = store_node, device, "probing the agent on node {node}: {e}"),
                }
            }
        });
        let addr = held.addr.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        Claim::Held { generation: REMOTE, addr, probe }
    }

    /// Every second: this node's share of the registry written, orphans adopted.
    async fn keep_reconciling(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.store.client.connection_state() == async_nats::connection::State::Connected {
                self.reconcile().await;
            }
        }
    }

    async fn reconcile(&self) {
        let now = crate::proto::unix_now();
        let (devices, sessions) = (&self.store.devices, &self.store.sessions);

        // Sessions that ended here: their records go.
        for id in self.local.take_ended() {
            if let Some((_, rev)) = self.mirror.session(&id).filter(|(r, _)| r.node == self.node) {
                if let Err(e) = self.store.remove(sessions, &id, rev).await {
                    self.failed("removing an ended session", &e);
                }
            }
        }

        // Devices: this node's agents as they are; stale holds let go; dead nodes' records go.
        let agents = self.local.agents();
        for a in agents.iter().filter(|a| a.linked && self.mirror.device(&a.device).is_none()) {
            // Linked here with no record (a record removed between a claim and its link):
            // written again, unless someone wrote one meanwhile.
            let record = DeviceRecord {
                node: self.node.clone(),
                online: true,
                services: a.services.clone(),
                since: a.since,
                addr: a.addr.map(|x| x.to_string()).unwrap_or_default(),
            };
            match self.store.write(devices, &a.device, &record, None).await {
                Ok(rev) => {
                    self.mirror.set_device(&a.device, Some((record, rev)));
                }
                Err(StoreError::Conflict) => {}
                Err(e) => self.failed("writing a device's record", &e),
            }
        }
        for (device, record, rev) in self.mirror.devices() {
            let here = agents.iter().find(|a| a.device == device);
            if record.node == self.node {
                let result = match here {
                    None => self.store.remove(devices, &device, rev).await,
                    Some(a)
                        if a.linked != record.online
                            || a.services != record.services
                            || self.mirror.untaint(&device) =>
                    {
                        let updated = DeviceRecord { online: a.linked, services: a.services.clone(), ..record };
                        self.store.write(devices, &device, &updated, Some(rev)).await.map(|_| ())
                    }
                    Some(_) => Ok(()),
                };
                if let Err(e) = result {
                    if !matches!(e, StoreError::Conflict) {
                        self.failed("writing a device's state", &e);
                    }
                }
            } else {
                if here.is_some() && self.local.evict_agent(&device, CloseReason::AgentReplaced) {
                    tracing::info!(
                        device,
                        "device held by node {}: closed the stale agent connection here",
                        record.node
                    );
                }
                if !self.mirror.alive(&record.node) {
                    // Anyone may clear a dead node's hold; the revision keeps a fresh take.
                    let _ = self.store.remove(devices, &device, rev).await;
                }
            }
        }

        // Sessions: figures of those here; orphans adopted; expired records cleared.
        let stats = self.local.session_stats();
        for (id, record, rev) in self.mirror.sessions() {
            if record.expires_at + 60 < now {
                let _ = self.store.remove(sessions, &id, rev).await;
                continue;
            }
            let owner = self.mirror.owner(&record.device);
            let here = stats.iter().find(|s| *s.id == *id);
            let mine = owner.as_deref() == Some(self.node.as_str());
            let write = match here {
                Some(s) if record.node == self.node => {
                    let fresh = SessionRecord {
                        connections: s.connections,
                        bytes_to_device: s.bytes_to_device,
                        bytes_to_client: s.bytes_to_client,
                        client_connected: s.client_connected,
                        ..record.clone()
                    };
                    (fresh != record || self.mirror.untaint(&id)).then_some(fresh)
                }
                // Here, and its device too, but the record names another node: claim it back.
                Some(_) if mine => Some(SessionRecord { node: self.node.clone(), ..record.clone() }),
                // Here, but it lives elsewhere now.
                Some(_) => {
                    self.local.release_session(&id);
                    None
                }
                // A session lives where its device is: adopt it (its node died, drained, or the
                // device moved).
                None if mine => self.adopt(&id, &record).then(|| SessionRecord {
                    node: self.node.clone(),
                    connections: 0,
                    client_connected: false,
                    ..record.clone()
                }),
                // This node is its home but its device is on another: hand it over.
                None if record.node == self.node => owner.map(|o| SessionRecord { node: o, ..record.clone() }),
                None => None,
            };
            if let Some(fresh) = write {
                match self.store.write(sessions, &id, &fresh, Some(rev)).await {
                    Ok(rev) => {
                        self.mirror.set_session(&id, Some((fresh, rev)));
                    }
                    Err(StoreError::Conflict) => {}
                    Err(e) => self.failed("writing a session's state", &e),
                }
            }
        }
    }

    fn adopt(&self, id: &str, r: &SessionRecord) -> bool {
        let Some(hash) = hash_bytes(&r.client_token_sha256) else { return false };
        let req = StartSession { device: r.device.clone(), service: r.service.clone(), ttl_secs: None };
        let adopted = self.local.adopt(id, &req, &r.operator, (r.created_at, r.expires_at), Credential::Sha256(hash));
        if adopted {
            tracing::info!(
                session = id,
                device = r.device,
                from = r.node,
                "adopted a session: its node is gone and its device is here"
            );
        }
        adopted
    }

    /// Where a client connects for session `id` living on `home`: the cluster's `public_url`
    /// (any node forwards), else that node's `advertise`.
    fn client_url_at(&self, home: &str, id: &str) -> String {
        let cluster = self.config.cluster.as_ref().expect("a cluster node has [cluster]");
        let base = match &cluster.public_url {
            Some(public) => public.clone(),
            None => self.mirror.advertise(home).unwrap_or_else(|| cluster.advertise.clone()),
        };
        client_url(&base, id)
    }

    /// A session as listed: its record, with the live figures of this node's sessions
    /// (`here`, gathered once per listing) instead of the record's last written ones.
    fn session_info(&self, id: &str, r: &SessionRecord, here: &HashMap<Arc<str>, SessionStats>) -> SessionInfo {
        let live = here.get(id).filter(|_| r.node == self.node);
        SessionInfo {
            id: id.to_string(),
            device: r.device.clone(),
            service: r.service.clone(),
            operator: r.operator.clone(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            device_online: self.device_online(&r.device),
            client_connected: live.map_or(r.client_connected, |s| s.client_connected),
            connections: live.map_or(r.connections, |s| s.connections),
            bytes_to_device: live.map_or(r.bytes_to_device, |s| s.bytes_to_device),
            bytes_to_client: live.map_or(r.bytes_to_client, |s| s.bytes_to_client),
            node: Some(r.node.clone()),
            client_url: Some(self.client_url_at(&r.node, id)),
            client_addrs: live.map(|s| s.client_addrs.clone()).unwrap_or_default(),
            ended_at: None,
            close_code: None,
            close_reason: None,
        }
    }

    fn local_stats(&self) -> HashMap<Arc<str>, SessionStats> {
        self.local.session_stats().into_iter().map(|s| (s.id.clone(), s)).collect()
    }

    fn device_online(&self, device: &str) -> bool {
        match self.mirror.device(device) {
            Some((r, _)) if r.node == self.node => self.local.holder(device).is_some(),
            Some((r, _)) => r.online && self.mirror.alive(&r.node),
            None => false,
        }
    }
}

impl ConnEnds for ClusterRegistry {
    fn conn_ended(&self, session: &str, conn: u64, end: ConnEnd) {
        self.inner.local.conn_ended(session, conn, end)
    }
}

impl Registry for ClusterRegistry {
    fn start_session<'a>(
        &'a self,
        operator: &'a str,
        operator_addr: &'a str,
        req: StartSession,
        _host: &'a str,
    ) -> Pending<'a, Result<SessionStarted, Refusal>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner.local.check_request(&req)?;
            if !inner.healthy() {
                return Err(unavailable("this relay node cannot reach its cluster registry (NATS); try again shortly"));
            }
            let home = inner.mirror.owner(&req.device).unwrap_or_else(|| inner.node.clone());
            let id = new_session_id();
            let token = Secret::random();
            let hash = token_hash(token.expose());
            let expires_at = if home == inner.node {
                inner.open_here(id.clone(), operator, operator_addr, req, &hash).await?
            } else {
                let ask = Ask::Start {
                    id: id.to_string(),
                    operator: operator.to_string(),
                    operator_addr: operator_addr.to_string(),
                    req,
                    client_token_sha256: hash,
                };
                match inner.store.ask(&home, &ask).await {
                    Ok(Answer::Started { expires_at }) => expires_at,
                    Ok(Answer::Refused { status, message }) => {
                        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                        return Err(Refusal::new(status, message, None));
                    }
                    Ok(_) => return Err(unavailable(format!("node {home} answered something else"))),
                    Err(e) => {
                        inner.failed("starting a session on the device's node", &e);
                        return Err(unavailable(format!("{e}; try again in a few seconds")));
                    }
                }
            };
            Ok(SessionStarted {
                client_url: inner.client_url_at(&home, &id),
                id: id.to_string(),
                client_token: token.expose().to_string(),
                expires_at,
                launch_code: None,
            })
        })
    }

    fn sessions(&self, caller: Caller<'_>) -> Vec<SessionInfo> {
        let here = self.inner.local_stats();
        let mut v: Vec<SessionInfo> = self
            .inner
            .mirror
            .sessions()
            .into_iter()
            .filter(|(_, r, _)| caller.may_see(&r.operator))
            .map(|(id, r, _)| self.inner.session_info(&id, &r, &here))
            .collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    fn ended_sessions(&self, caller: Caller<'_>) -> Vec<SessionInfo> {
        self.inner.local.ended_sessions(caller)
    }

    fn session(&self, caller: Caller<'_>, id: &str) -> Option<SessionInfo> {
        let (r, _) = self.inner.mirror.session(id).filter(|(r, _)| caller.may_see(&r.operator))?;
        Some(self.inner.session_info(id, &r, &self.inner.local_stats()))
    }

    fn close_session_as<'a>(&'a self, caller: Caller<'a>, id: &'a str) -> Pending<'a, Result<bool, Refusal>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let Some((record, rev)) = inner.mirror.session(id) else { return Ok(false) };
            if !caller.may_see(&record.operator) {
                return Ok(false);
            }
            if record.node == inner.node {
                return Ok(inner.close_here(caller, id).await);
            }
            let ask =
                Ask::Close { id: id.to_string(), operator: caller.name.to_string(), admin: caller.role == Role::Admin };
            match inner.store.ask(&record.node, &ask).await {
                Ok(Answer::Closed { found }) => Ok(found),
                Ok(_) => Err(unavailable(format!("node {} answered something else", record.node))),
                // Its node is gone: the session has no connections left; its record goes.
                Err(StoreError::NoNode(_)) => match inner.store.remove(&inner.store.sessions, id, rev).await {
                    Ok(()) | Err(StoreError::Conflict) => Ok(true),
                    Err(e) => Err(unavailable(e)),
                },
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn close_session(&self, id: &str, reason: CloseReason) -> bool {
        self.inner.local.close_session(id, reason)
    }

    fn close_all(&self, reason: CloseReason) {
        self.inner.local.close_all(reason)
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        let inner = &self.inner;
        // What this node itself remembers of each device's agent (version, address, last seen).
        let here: HashMap<String, DeviceInfo> = inner.local.devices().into_iter().map(|d| (d.id.clone(), d)).collect();
        inner
            .local
            .device_ids()
            .into_iter()
            .map(|id| {
                let record = inner.mirror.device(&id).map(|(r, _)| r).filter(|r| inner.mirror.alive(&r.node));
                let local = here.get(&id);
                DeviceInfo {
                    online: inner.device_online(&id),
                    services: record.as_ref().map(|r| r.services.clone()).unwrap_or_default(),
                    connected_since: record.as_ref().map(|r| r.since),
                    node: record.map(|r| r.node),
                    last_seen: local.and_then(|d| d.last_seen),
                    agent_version: local.and_then(|d| d.agent_version.clone()),
                    agent_addr: local.and_then(|d| d.agent_addr.clone()),
                    id,
                }
            })
            .collect()
    }

    fn counts(&self) -> (usize, usize) {
        self.inner.local.counts()
    }

    fn client_conn(&self, session: &str, token: &str, client_addr: SocketAddr) -> Result<ClientConn, Refusal> {
        self.inner.local.client_conn(session, token, client_addr)
    }

    fn announce_conn(&self, c: &ClientConn) {
        self.inner.local.announce_conn(c)
    }

    fn ready_begin(&self, session: &str, token: &str) -> Result<(), Refusal> {
        self.inner.local.ready_begin(session, token)
    }

    fn ready_end(&self, session: &str) {
        self.inner.local.ready_end(session)
    }

    fn device_conn(&self, session: &str, conn: u64, token: &str) -> Result<usize, Refusal> {
        self.inner.local.device_conn(session, conn, token)
    }

    fn connect_failed(&self, device: &str, session: &str, conn: u64, reason: &str) {
        self.inner.local.connect_failed(device, session, conn, reason)
    }

    fn agent_claim<'a>(&'a self, device: &'a str, services: &'a [String], link: &'a AgentLink) -> Pending<'a, Claim> {
        let inner = self.inner.clone();
        Box::pin(async move {
            if let Some((generation, addr, probe)) = inner.local.holder(device) {
                return Claim::Held { generation, addr, probe };
            }
            let t0 = Instant::now();
            if let Err(refused) = inner.take(device, services, link, false).await {
                return refused;
            }
            inner.health.claims.observe(t0.elapsed());
            inner.local.agent_claim(device, services, link)
        })
    }

    fn agent_take_over<'a>(
        &'a self,
        device: &'a str,
        stale: u64,
        services: &'a [String],
        link: &'a AgentLink,
    ) -> Pending<'a, Option<u64>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let t0 = Instant::now();
            inner.take(device, services, link, true).await.ok()?;
            inner.health.claims.observe(t0.elapsed());
            if stale == REMOTE {
                match inner.local.agent_claim(device, services, link) {
                    Claim::Granted(g) => Some(g),
                    _ => None,
                }
            } else {
                inner.local.agent_take_over(device, stale, services, link)
            }
        })
    }

    fn agent_down(&self, device: &str, generation: u64) {
        self.inner.local.agent_down(device, generation)
    }

    fn disconnect_agent(&self, device: &str, reason: CloseReason) -> bool {
        self.inner.local.disconnect_agent(device, reason)
    }

    fn park_spare(&self, device: &str, spare: Spare) -> bool {
        self.inner.local.park_spare(device, spare)
    }

    fn attach_control(
        &self,
        session: &str,
        token: &str,
        tx: mpsc::Sender<SessionEvent>,
    ) -> Result<(u64, SessionEvent), Refusal> {
        self.inner.local.attach_control(session, token, tx)
    }

    fn detach_control(&self, session: &str, id: u64) {
        self.inner.local.detach_control(session, id)
    }

    fn reap(&self) {
        self.inner.local.reap()
    }

    fn elsewhere(&self, session: &str, token: &str) -> Option<Result<Forward, Refusal>> {
        let inner = &self.inner;
        if inner.local.has_session(session) {
            return None;
        }
        let (record, _) = inner.mirror.session(session)?;
        if record.node == inner.node || !inner.mirror.alive(&record.node) {
            return None;
        }
        // This node checks the token too: a bad one is refused (and counted) here.
        let hash = hash_bytes(&record.client_token_sha256)?;
        if !Credential::Sha256(hash).matches(token) {
            return Some(Err(Refusal::bad_token()));
        }
        let advertise = inner.mirror.advertise(&record.node)?;
        let proof = inner.store.forward_proof(session, &inner.node);
        Some(Ok(Forward { node: record.node, advertise, proof }))
    }

    fn forwarded_by_peer(&self, session: &str, proof: &str) -> bool {
        match self.inner.store.check_forward_proof(session, proof) {
            Some(from) => self.inner.mirror.alive(&from),
            None => {
                self.inner.health.forged.fetch_add(1, Relaxed);
                false
            }
        }
    }

    fn drain(&self) {
        for a in self.inner.local.agents() {
            self.inner.local.evict_agent(&a.device, CloseReason::Moving("relay node draining".into()));
        }
    }

    fn stopped(&self) {
        // Say goodbye: other nodes see this one gone at once instead of a lifetime later, and
        // adopt its sessions when their devices reach them.
        let inner = self.inner.clone();
        let rt = self.rt().clone();
        let bye = std::thread::spawn(move || {
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(2), inner.store.nodes.delete(&inner.node)).await;
            })
        });
        let _ = bye.join();
        tracing::info!(node = self.inner.node, "left the cluster");
    }

    fn cluster_metrics(&self) -> Option<String> {
        let inner = &self.inner;
        let h = &inner.health;
        let connected = inner.store.client.connection_state() == async_nats::connection::State::Connected;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| sample(&mut out, name, kind, help, value);
        metric(
            "cluster_nodes_seen",
            "gauge",
            "Relay nodes heard within the node lifetime.",
            inner.mirror.live_nodes().len() as u64,
        );
        metric("cluster_nats_connected", "gauge", "1 while this node is connected to NATS.", connected as u64);
        metric(
            "cluster_fenced",
            "gauge",
            "1 while this node is cut off from the registry and refuses agents.",
            h.fenced.load(Relaxed) as u64,
        );
        metric(
            "cluster_registry_rtt_microseconds",
            "gauge",
            "Round trip of the last heartbeat write.",
            h.rtt_us.load(Relaxed),
        );
        metric("cluster_registry_errors_total", "counter", "Registry operations that failed.", h.errors.load(Relaxed));
        metric(
            "cluster_forged_total",
            "counter",
            "Registry records or node requests whose MAC did not verify.",
            h.forged.load(Relaxed),
        );
        metric(
            "cluster_registry_ops_total",
            "counter",
            "Registry reads, writes, deletes and node requests.",
            inner.store.ops.load(Relaxed),
        );
        h.claims.render(
            &mut out,
            "cluster_claim_seconds",
            "Time to take a device's registry record for a connecting agent.",
        );
        Some(out)
    }
}
