//! The audit log: one JSON line per session start, session end and connection end — who,
//! which device and service, from where, bytes each way, how long, and why it ended — and per
//! refused credential and agent conflict, and per operator action that is not a session (console
//! login and logout, launch code redemption, agent disconnect, configuration reload). Secrets
//! never go in: tokens and codes are not part of any record. [`Audit::search`] serves the log
//! back, filtered (`GET /api/v1/audit`).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::proto::unix_now;

#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record<'a> {
    SessionStart {
        session: &'a str,
        operator: &'a str,
        operator_addr: &'a str,
        device: &'a str,
        service: &'a str,
        expires_at: u64,
    },
    SessionEnd {
        session: &'a str,
        operator: &'a str,
        device: &'a str,
        service: &'a str,
        code: u16,
        reason: &'a str,
        duration_secs: u64,
        bytes_to_device: u64,
        bytes_to_client: u64,
    },
    /// A credential was refused. Which kind it was, never its value.
    AuthFailed {
        addr: &'a str,
        credential: &'a str,
        path: &'a str,
    },
    /// A second agent for a device whose agent is connected and alive was refused.
    AgentRefused {
        device: &'a str,
        addr: &'a str,
        holder: &'a str,
    },
    /// A new agent replaced a connection that did not answer a probe.
    AgentTakeover {
        device: &'a str,
        addr: &'a str,
        replaced: &'a str,
    },
    /// The writer could not keep up: this many records were lost.
    AuditLinesDropped {
        count: u64,
    },
    /// A launch code was redeemed for its session's client credentials.
    LaunchRedeemed {
        session: &'a str,
        operator: &'a str,
        device: &'a str,
        addr: &'a str,
    },
    /// An operator logged in to the console, or out.
    Login {
        operator: &'a str,
        addr: &'a str,
    },
    Logout {
        operator: &'a str,
        addr: &'a str,
    },
    /// An operator disconnected a device's agent.
    AgentDisconnected {
        device: &'a str,
        operator: &'a str,
        addr: &'a str,
    },
    /// The configuration was reloaded (`by`: an operator, or `SIGHUP`).
    ConfigReload {
        by: &'a str,
        ok: bool,
    },
    ConnectionEnd {
        session: &'a str,
        conn: u64,
        operator: &'a str,
        device: &'a str,
        service: &'a str,
        client_addr: &'a str,
        bytes_to_device: u64,
        bytes_to_client: u64,
        duration_ms: u64,
        code: u16,
        reason: &'a str,
    },
}

/// Lines waiting for the disk before new ones are dropped (and counted).
const QUEUE: usize = 4096;

/// Appends records to a file from a thread of its own; without a file configured it does
/// nothing. Callers (worker threads, possibly under a table lock) only serialize a line and
/// queue it: a slow or stalled disk stalls no tunnel. Past [`QUEUE`] waiting lines new ones are
/// dropped; the writer then says how many, in the relay's log and as an `audit_lines_dropped`
/// record. [`Audit::close`] writes out everything queued (a clean shutdown loses nothing).
pub struct Audit {
    writer: Option<Writer>,
    path: Option<PathBuf>,
}

/// What `GET /api/v1/audit` asks for: records naming this device and operator (when given),
/// written within `[since, until]` (Unix seconds), the newest `limit`.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub device: Option<String>,
    pub operator: Option<String>,
    pub since: Option<u64>,
    pub until: Option<u64>,
    pub limit: usize,
}

struct Writer {
    tx: Mutex<Option<std::sync::mpsc::SyncSender<Vec<u8>>>>,
    /// Lines dropped since the writer last reported.
    dropped: Arc<AtomicU64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Audit {
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let Some(path) = path else { return Ok(Audit { writer: None, path: None }) };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("opening audit log {}: {e}", path.display())))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let shown = path.display().to_string();
        let thread = std::thread::Builder::new().name("ringway-audit".into()).spawn(move || {
            loop {
                let open = match rx.recv_timeout(std::time::Duration::from_secs(1)) {
                    Ok(line) => {
                        if let Err(e) = file.write_all(&line) {
                            tracing::error!("writing the audit log {shown}: {e}");
                        }
                        true
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => true,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => false,
                };
                // Reported once the disk takes lines again (or within a second of quiet).
                let lost = counter.swap(0, Relaxed);
                if lost > 0 {
                    tracing::warn!("audit log {shown}: {lost} lines dropped (the disk did not keep up)");
                    let _ = file.write_all(&line_of(Record::AuditLinesDropped { count: lost }));
                }
                if !open {
                    return;
                }
            }
        })?;
        let writer = Writer { tx: Mutex::new(Some(tx)), dropped, thread: Mutex::new(Some(thread)) };
        Ok(Audit { writer: Some(writer), path: Some(path.to_path_buf()) })
    }

    /// Whether a file is configured.
    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    /// The records that pass `filter`, oldest first, as JSON lines. Reads the file through
    /// (call it off the async runtime); holds at most `filter.limit` lines.
    pub fn search(&self, filter: &Filter) -> std::io::Result<Vec<u8>> {
        use std::io::BufRead;
        let Some(path) = &self.path else { return Ok(Vec::new()) };
        let file = std::io::BufReader::new(std::fs::File::open(path)?);
        let mut found = std::collections::VecDeque::with_capacity(filter.limit.min(1024));
        for line in file.split(b'\n') {
            let line = line?;
            let Ok(record) = serde_json::from_slice::<serde_json::Value>(&line) else { continue };
            if passes(&record, filter) {
                if found.len() == filter.limit {
                    found.pop_front();
                }
                found.push_back(line);
            }
        }
        let mut out = Vec::new();
        for line in found {
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
        Ok(out)
    }

    /// Queues one record; never waits for the disk.
    pub fn write(&self, record: Record<'_>) {
        let Some(w) = &self.writer else { return };
        let line = line_of(record);
        let sent = match &*w.tx.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.try_send(line).is_ok(),
            None => false,
        };
        if !sent {
            w.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Stops taking records and waits until the queued ones are written.
    pub fn close(&self) {
        let Some(w) = &self.writer else { return };
        drop(w.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = w.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

/// Records one search answers with, at most; and by default.
const MAX_RECORDS: usize = 10_000;
const DEFAULT_RECORDS: usize = 1000;

impl Filter {
    /// A filter from a query string (`device`, `operator`, `since`, `until`, `limit`).
    pub fn parse(query: &str) -> Result<Filter, String> {
        let mut f = Filter { limit: DEFAULT_RECORDS, ..Filter::default() };
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let number = || value.parse::<u64>().map_err(|_| format!("{key} must be a whole number"));
            match &*key {
                "device" => f.device = Some(value.to_string()),
                "operator" => f.operator = Some(value.to_string()),
                "since" => f.since = Some(number()?),
                "until" => f.until = Some(number()?),
                "limit" => f.limit = (number()? as usize).clamp(1, MAX_RECORDS),
                _ => return Err(format!("unknown parameter {key:?} (device, operator, since, until, limit)")),
            }
        }
        Ok(f)
    }
}

/// Whether a record passes a filter. A filter on device or operator keeps only records that name
/// them (a refused credential names neither).
fn passes(record: &serde_json::Value, f: &Filter) -> bool {
    let field = |name: &str| record.get(name).and_then(|v| v.as_str());
    let time = record.get("time").and_then(|t| t.as_u64()).unwrap_or(0);
    f.device.as_deref().is_none_or(|d| field("device") == Some(d))
        && f.operator.as_deref().is_none_or(|o| field("operator") == Some(o))
        && f.since.is_none_or(|s| time >= s)
        && f.until.is_none_or(|u| time <= u)
}

fn line_of(record: Record<'_>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Line<'a> {
        time: u64,
        #[serde(flatten)]
        record: Record<'a>,
    }
    let mut line = serde_json::to_vec(&Line { time: unix_now(), record }).expect("audit records serialize");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_becomes_a_filter_or_a_clear_error() {
        let f = Filter::parse("device=dev%201&operator=al+ice&since=10&until=20&limit=999999").unwrap();
        assert_eq!(f.device.as_deref(), Some("dev 1"));
        assert_eq!(f.operator.as_deref(), Some("al ice"));
        assert_eq!((f.since, f.until, f.limit), (Some(10), Some(20), MAX_RECORDS));
        assert_eq!(Filter::parse("").unwrap().limit, DEFAULT_RECORDS);
        assert!(Filter::parse("since=yesterday").unwrap_err().contains("since"));
        assert!(Filter::parse("color=red").unwrap_err().contains("unknown parameter"));
    }

    #[test]
    fn the_log_is_searched_by_device_operator_and_time_newest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(Some(&path)).unwrap();
        let start = |session: &'static str, operator: &'static str, device: &'static str| Record::SessionStart {
            session,
            operator,
            operator_addr: "127.0.0.1:1",
            device,
            service: "ssh",
            expires_at: 0,
        };
        audit.write(start("s1", "alice", "dev-1"));
        audit.write(start("s2", "bob", "dev-1"));
        audit.write(start("s3", "alice", "dev-2"));
        audit.write(Record::AuthFailed { addr: "127.0.0.1:2", credential: "operator_token", path: "/" });
        audit.close();
        std::fs::write(&path, [std::fs::read(&path).unwrap(), b"not json\n".to_vec()].concat()).unwrap();
        let sessions = |f: Filter| -> Vec<String> {
            let out = audit.search(&Filter { limit: f.limit.max(1), ..f }).unwrap();
            out.split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                    v.get("session").and_then(|s| s.as_str()).unwrap_or("-").to_string()
                })
                .collect()
        };
        assert_eq!(sessions(Filter { limit: 100, ..Filter::default() }), ["s1", "s2", "s3", "-"]);
        assert_eq!(sessions(Filter { operator: Some("alice".into()), limit: 100, ..Filter::default() }), ["s1", "s3"]);
        assert_eq!(sessions(Filter { device: Some("dev-1".into()), limit: 100, ..Filter::default() }), ["s1", "s2"]);
        assert_eq!(sessions(Filter { limit: 2, ..Filter::default() }), ["s3", "-"], "the newest are kept");
        let now = unix_now();
        assert_eq!(sessions(Filter { since: Some(now + 60), limit: 100, ..Filter::default() }), Vec::<String>::new());
        assert_eq!(sessions(Filter { until: Some(now + 60), limit: 1, ..Filter::default() }), ["-"]);
    }
}
