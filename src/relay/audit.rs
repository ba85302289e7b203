//! The audit log: one JSON line per session start, session end and connection end — who,
//! which device and service, from where, bytes each way, how long, and why it ended — and per
//! refused credential and agent conflict. Secrets never go in: tokens are not part of any record.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

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
        reason: &'a str,
    },
}

/// Appends records to a file; without a file configured it does nothing.
pub struct Audit(Option<Mutex<File>>);

impl Audit {
    pub fn open(path: Option<&Path>) -> anyhow::Result<Audit> {
        let file = match path {
            Some(p) => Some(Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| anyhow::anyhow!("opening audit log {}: {e}", p.display()))?,
            )),
            None => None,
        };
        Ok(Audit(file))
    }

    pub fn write(&self, record: Record<'_>) {
        let Some(file) = &self.0 else { return };
        #[derive(Serialize)]
        struct Line<'a> {
            time: u64,
            #[serde(flatten)]
            record: Record<'a>,
        }
        let mut line = serde_json::to_vec(&Line { time: unix_now(), record }).expect("audit records serialize");
        line.push(b'\n');
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(&line) {
            tracing::error!("writing the audit log: {e}");
        }
    }
}
