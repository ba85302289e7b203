//! Each node's copy of the cluster registry, kept by watching the three buckets: reads (lists,
//! who holds a device, where a session lives) never wait on NATS. A node is alive while its
//! heartbeat is younger than the node lifetime.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::store::{DeviceRecord, NodeRecord, SessionRecord};

/// A node as last heard.
#[derive(Debug, Clone)]
pub struct NodeSeen {
    pub record: NodeRecord,
    pub heard: Instant,
}

#[derive(Default)]
struct Maps {
    nodes: HashMap<String, NodeSeen>,
    devices: HashMap<String, (DeviceRecord, u64)>,
    sessions: HashMap<String, (SessionRecord, u64)>,
    /// Keys whose latest revision did not verify (written by someone without the peer key):
    /// the mirror keeps the last genuine record at that revision, and its node writes it back.
    tainted: std::collections::HashSet<String>,
}

/// The mirror. See the module doc.
pub struct Mirror {
    maps: Mutex<Maps>,
    lifetime: Duration,
}

impl Mirror {
    pub fn new(lifetime: Duration) -> Mirror {
        Mirror { maps: Mutex::default(), lifetime }
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A heartbeat `age` old (its server timestamp against this node's clock) arrived.
    pub fn node_heard(&self, node: &str, record: NodeRecord, age: Duration) {
        let heard = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        self.maps().nodes.insert(node.to_string(), NodeSeen { record, heard });
    }

    /// A node said goodbye (its heartbeat was deleted) or aged out.
    pub fn node_gone(&self, node: &str) {
        self.maps().nodes.remove(node);
    }

    pub fn alive(&self, node: &str) -> bool {
        self.maps().nodes.get(node).is_some_and(|n| n.heard.elapsed() < self.lifetime)
    }

    /// The nodes heard within the lifetime, with their advertised addresses.
    pub fn live_nodes(&self) -> Vec<(String, String)> {
        let maps = self.maps();
        let mut v: Vec<_> = maps
            .nodes
            .iter()
            .filter(|(_, n)| n.heard.elapsed() < self.lifetime)
            .map(|(name, n)| (name.clone(), n.record.advertise.clone()))
            .collect();
        v.sort();
        v
    }

    pub fn advertise(&self, node: &str) -> Option<String> {
        self.maps().nodes.get(node).map(|n| n.record.advertise.clone())
    }

    /// Sets `device`'s record; false (and nothing changes) if the mirror holds a newer one.
    pub fn set_device(&self, device: &str, record: Option<(DeviceRecord, u64)>) -> bool {
        set_newer(&mut self.maps().devices, device, record)
    }

    /// A delete at `revision`: forgets the record unless a newer one is held.
    pub fn forget_device(&self, device: &str, revision: u64) {
        forget_older(&mut self.maps().devices, device, revision)
    }

    /// Sets session `id`'s record; false (and nothing changes) if the mirror holds a newer one.
    pub fn set_session(&self, id: &str, record: Option<(SessionRecord, u64)>) -> bool {
        set_newer(&mut self.maps().sessions, id, record)
    }

    /// A delete at `revision`: forgets the record unless a newer one is held.
    pub fn forget_session(&self, id: &str, revision: u64) {
        forget_older(&mut self.maps().sessions, id, revision)
    }

    /// A device or session record was overwritten with something that does not verify: keep
    /// the genuine record, note the new revision (so that it can be written back over it).
    pub fn taint(&self, key: &str, revision: u64) {
        let mut maps = self.maps();
        let maps = &mut *maps;
        let mut found = false;
        if let Some((_, rev)) = maps.devices.get_mut(key) {
            *rev = revision;
            found = true;
        }
        if let Some((_, rev)) = maps.sessions.get_mut(key) {
            *rev = revision;
            found = true;
        }
        if found {
            maps.tainted.insert(key.to_string());
        }
    }

    /// Whether `key` needs writing back; clears the mark.
    pub fn untaint(&self, key: &str) -> bool {
        self.maps().tainted.remove(key)
    }

    pub fn device(&self, device: &str) -> Option<(DeviceRecord, u64)> {
        self.maps().devices.get(device).cloned()
    }

    /// The node holding `device`'s agent, if that node is alive.
    pub fn owner(&self, device: &str) -> Option<String> {
        let node = self.maps().devices.get(device)?.0.node.clone();
        self.alive(&node).then_some(node)
    }

    pub fn devices(&self) -> Vec<(String, DeviceRecord, u64)> {
        self.maps().devices.iter().map(|(d, (r, rev))| (d.clone(), r.clone(), *rev)).collect()
    }

    pub fn session(&self, id: &str) -> Option<(SessionRecord, u64)> {
        self.maps().sessions.get(id).cloned()
    }

    pub fn sessions(&self) -> Vec<(String, SessionRecord, u64)> {
        self.maps().sessions.iter().map(|(id, (r, rev))| (id.clone(), r.clone(), *rev)).collect()
    }
}

/// Puts `record` (or removes the key for `None`) unless the map holds a newer revision.
fn set_newer<R>(map: &mut HashMap<String, (R, u64)>, key: &str, record: Option<(R, u64)>) -> bool {
    match record {
        Some((_, rev)) if map.get(key).is_some_and(|(_, have)| *have > rev) => false,
        Some(r) => {
            map.insert(key.to_string(), r);
            true
        }
        None => {
            map.remove(key);
            true
        }
    }
}

/// Removes `key` if what the map holds is older than `revision`.
fn forget_older<R>(map: &mut HashMap<String, (R, u64)>, key: &str, revision: u64) {
    if map.get(key).is_some_and(|(_, have)| *have < revision) {
        map.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_alive_while_its_heartbeat_is_younger_than_the_lifetime() {
        let m = Mirror::new(Duration::from_secs(10));
        let rec = NodeRecord { advertise: "http://127.0.0.1:1".into(), started_at: 0 };
        m.node_heard("n1", rec.clone(), Duration::from_secs(2));
        m.node_heard("n2", rec.clone(), Duration::from_secs(11));
        assert!(m.alive("n1"));
        assert!(!m.alive("n2"), "a heartbeat older than the lifetime is a dead node");
        assert!(!m.alive("n3"));
        assert_eq!(m.live_nodes(), vec![("n1".to_string(), rec.advertise.clone())]);

        let dev = DeviceRecord { node: "n2".into(), online: true, services: vec![], since: 0, addr: String::new() };
        m.set_device("d", Some((dev.clone(), 7)));
        assert_eq!(m.owner("d"), None, "a device held by a dead node has no owner");
        assert!(m.set_device("d", Some((DeviceRecord { node: "n1".into(), ..dev.clone() }, 8))));
        assert_eq!(m.owner("d").as_deref(), Some("n1"));
        // A late event of an older revision changes nothing; nor does an older delete.
        assert!(!m.set_device("d", Some((dev, 7))));
        m.forget_device("d", 6);
        assert_eq!(m.owner("d").as_deref(), Some("n1"));
        m.node_gone("n1");
        assert_eq!(m.owner("d"), None);
    }
}
