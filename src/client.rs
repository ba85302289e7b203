//! The client role, `ringway connect`: starts a session through the control API, keeps the
//! session control connection, and serves a local TCP port whose every connection becomes its
//! own data WebSocket to the relay. `--stdio` carries one connection over stdin/stdout instead
//! (for ssh's ProxyCommand); `--exec` runs the user's program against the port.

use std::net::SocketAddr;
use std::process::ExitStatus;

use anyhow::Context;
use hyper::Method;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::peer::{self, Incoming, RelayUrl};
use crate::proto::{SessionEvent, SessionStarted, StartSession};

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub relay: RelayUrl,
    pub token: String,
    pub device: String,
    pub service: String,
    pub ttl_secs: Option<u64>,
}

/// A started session with its control connection watched.
pub struct Session {
    pub relay: RelayUrl,
    pub started: SessionStarted,
    operator_token: String,
    /// Becomes `Some((code, reason))` when the relay ends the session.
    pub ended: watch::Receiver<Option<(u16, String)>>,
    data_path: String,
}

impl Session {
    /// Starts a session and attaches its control connection.
    pub async fn start(opts: &ConnectOptions) -> anyhow::Result<Session> {
        let body = serde_json::to_string(&StartSession {
            device: opts.device.clone(),
            service: opts.service.clone(),
            ttl_secs: opts.ttl_secs,
        })?;
        let resp = peer::api(&opts.relay, Method::POST, "/api/v1/sessions", &opts.token, Some(body))
            .await
            .context("starting a session")?;
        let started: SessionStarted = serde_json::from_slice(&resp).context("the relay's session answer")?;
        let data_path = peer::url_path(&started.client_url)?;
        let control_path = format!("/api/v1/sessions/{}/control", started.id);
        let ws = peer::dial(&opts.relay, &control_path, &started.client_token).await?;
        let mut ch = peer::channel(ws, 64 << 10);
        let (ended_tx, ended) = watch::channel(None);
        tokio::spawn(async move {
            // Holding `ch.tx` keeps the control connection open for the life of the session.
            let _keep = ch.tx;
            while let Some(msg) = ch.rx.recv().await {
                match msg {
                    Incoming::Alive => {}
                    Incoming::Text(t) => match serde_json::from_str::<SessionEvent>(&t) {
                        Ok(SessionEvent::DeviceOffline) => tracing::warn!("device went offline"),
                        Ok(SessionEvent::DeviceOnline) => tracing::info!("device is back online"),
                        Ok(SessionEvent::Ready { device_online: false, device, .. }) => {
                            tracing::warn!("device {device} is offline; connections fail until it is back")
                        }
                        Ok(SessionEvent::Closing { code, reason }) => {
                            let _ = ended_tx.send(Some((code, reason)));
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!("unknown session event ({e})"),
                    },
                    Incoming::Closed(close) => {
                        let end = close.unwrap_or((1006, "control connection lost".into()));
                        ended_tx.send_if_modified(|e| {
                            e.get_or_insert(end);
                            true
                        });
                        return;
                    }
                }
            }
        });
        Ok(Session { relay: opts.relay.clone(), started, operator_token: opts.token.clone(), ended, data_path })
    }

    /// Opens one data connection and splices `r`/`w` over it until both sides are done.
    pub async fn carry<R, W>(&self, r: R, w: W) -> anyhow::Result<peer::SpliceEnd>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let ws = peer::dial(&self.relay, &self.data_path, &self.started.client_token).await?;
        Ok(peer::splice(r, w, ws).await)
    }

    /// Serves `listener` until the session ends or `stop` resolves.
    pub async fn serve(self: std::sync::Arc<Self>, listener: TcpListener, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ended = self.ended.clone();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((tcp, from)) = accepted else { continue };
                    let _ = tcp.set_nodelay(true);
                    let session = self.clone();
                    tokio::spawn(async move {
                        let (r, w) = tcp.into_split();
                        match session.carry(r, w).await {
                            Ok(end) => report(from, &end),
                            Err(e) => tracing::warn!(%from, "{e:#}"),
                        }
                    });
                }
                _ = ended.wait_for(Option::is_some) => return,
                _ = &mut stop => return,
            }
        }
    }

    /// Closes the session through the API (best effort: it may have ended already).
    pub async fn close(&self) {
        let path = format!("/api/v1/sessions/{}", self.started.id);
        let _ = peer::api(&self.relay, Method::DELETE, &path, &self.operator_token, None).await;
    }
}

fn report(from: SocketAddr, end: &peer::SpliceEnd) {
    match &end.close {
        Some((1000, _)) | None => {
            tracing::debug!(%from, up = end.bytes_up, down = end.bytes_down, "connection done")
        }
        Some((code, reason)) => {
            tracing::warn!(%from, "connection closed by the relay: {code} {reason}")
        }
    }
}

/// How `ringway connect` should serve the session.
pub enum Mode {
    Listen { addr: SocketAddr, exec: Option<String> },
    Stdio,
}

/// `ringway connect`: returns the process exit code.
pub async fn run(opts: ConnectOptions, mode: Mode) -> anyhow::Result<i32> {
    let session = std::sync::Arc::new(Session::start(&opts).await?);
    tracing::info!(session = session.started.id, device = opts.device, service = opts.service, "session started");
    let code = match mode {
        Mode::Stdio => {
            let end = session.carry(tokio::io::stdin(), tokio::io::stdout()).await?;
            match end.close {
                Some((1000, _)) | None => 0,
                Some((code, reason)) => {
                    eprintln!("ringway: connection closed by the relay: {code} {reason}");
                    1
                }
            }
        }
        Mode::Listen { addr, exec } => {
            let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
            let local = listener.local_addr()?;
            println!("listening on {local}");
            let serving = tokio::spawn(session.clone().serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            }));
            let code = match exec {
                Some(cmd) => run_exec(&cmd, local.port(), session.ended.clone()).await?,
                None => {
                    let _ = serving.await;
                    0
                }
            };
            if let Some((code, reason)) = session.ended.borrow().clone() {
                eprintln!("ringway: session ended: {code} {reason}");
            }
            code
        }
    };
    session.close().await;
    Ok(code)
}

/// Runs `sh -c CMD` with `{port}` replaced; the session lasts as long as the command.
async fn run_exec(cmd: &str, port: u16, mut ended: watch::Receiver<Option<(u16, String)>>) -> anyhow::Result<i32> {
    let cmd = cmd.replace("{port}", &port.to_string());
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    tokio::select! {
        status = child.wait() => Ok(exit_code(status?)),
        _ = ended.wait_for(Option::is_some) => Ok(1),
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or(1)
}
