//! The audit log: one JSON line per session start, session end and connection end — who,
//! which device and service, from where, bytes each way, how long, and why it ended — and per
//! refused credential and agent conflict. Secrets never go in: tokens are not part of any record.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
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
    AuthFailed { addr: &'a str, credential: &'a str, path: &'a str },
    /// A second agent for a device whose agent is connected and alive was refused.
    AgentRefused { device: &'a str, addr: &'a str, holder: &'a str },
    /// A new agent replaced a connection that did not answer a probe.
    AgentTakeover { device: &'a str, addr: &'a str, replaced: &'a str },
    /// The writer could not keep up: this many records were lost.
    AuditLinesDropped { count: u64 },
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
pub struct Audit(Option<Writer>);

struct Writer {
    tx: Mutex<Option<std::sync::mpsc::SyncSender<Vec<u8>>>>,
    /// Lines dropped since the writer last reported.
    dropped: Arc<AtomicU64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Audit {
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let Some(path) = path else { return Ok(Audit(None)) };
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
        Ok(Audit(Some(Writer { tx: Mutex::new(Some(tx)), dropped, thread: Mutex::new(Some(thread)) })))
    }

    /// Queues one record; never waits for the disk.
    pub fn write(&self, record: Record<'_>) {
        let Some(w) = &self.0 else { return };
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
        let Some(w) = &self.0 else { return };
        drop(w.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = w.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
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
