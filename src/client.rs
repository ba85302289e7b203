//! The client role, `ringway connect`: starts a session through the control API, keeps the
//! session control connection, and serves a local TCP port whose every connection becomes its
//! own data WebSocket to the relay. `--stdio` carries one connection over stdin/stdout instead
//! (for ssh's ProxyCommand); `--exec` runs the user's program against the port.

use std::net::SocketAddr;
use std::process::ExitStatus;

use std::time::Duration;

use anyhow::Context;
use hyper::{Method, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::channel::{self, Incoming};
use crate::peer::{self, RelayUrl};
use crate::proto::{printable, Launch, SessionEvent, SessionStarted, StartSession};
use crate::splice::{LocalWrite, SpliceEnd};

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub relay: RelayUrl,
    pub how: How,
}

/// How `connect` gets its session.
#[derive(Debug, Clone)]
pub enum How {
    /// Starts one with an operator token (which also closes it when `connect` exits).
    Start { token: String, device: String, service: String, ttl_secs: Option<u64> },
    /// Redeems a one-time launch code someone else's session start gave (`--code`). Without an
    /// operator token the session is not closed on exit: it ends when its client has been gone
    /// for the relay's grace period, or at its expiry.
    Code(String),
}

/// A started session with its control connection watched.
pub struct Session {
    /// Where the control API is (`--relay`).
    pub relay: RelayUrl,
    pub started: SessionStarted,
    /// The operator token that started it; `None` for a session from a launch code.
    operator_token: Option<String>,
    /// Becomes `Some((code, reason))` when the session ends (the relay ended it, or its control
    /// connection could not be re-attached within the relay's grace period).
    pub ended: watch::Receiver<Option<(u16, String)>>,
    home: std::sync::Arc<std::sync::Mutex<Home>>,
    /// A data connection opened ahead of need (`?ready=1`): the next local connection takes it
    /// and pays no handshake; another is opened behind it.
    ready: std::sync::Arc<std::sync::Mutex<Option<crate::splice::DataWs>>>,
    refilling: std::sync::atomic::AtomicBool,
}

/// Where the session lives: the relay node its `client_url` names (in a cluster, the node
/// holding the device; it changes when the device moves) and the data path there.
#[derive(Clone)]
struct Home {
    node: RelayUrl,
    data_path: String,
}

impl Home {
    fn of(api: &RelayUrl, client_url: &str) -> anyhow::Result<Home> {
        let (node, data_path) = api.at(client_url)?;
        // A single relay answers with the name it was reached by: keep `--relay` as given.
        let node = if node.authority == api.authority { api.clone() } else { node };
        Ok(Home { node, data_path })
    }
}

/// Without a word from the relay (it pings every 10 s) for this long, the control connection
/// is dead.
const RELAY_SILENCE: Duration = Duration::from_secs(35);
/// How long a session outlives its control connection when the relay does not say.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

impl Session {
    /// Starts a session (or redeems a launch code for one) and attaches its control connection.
    pub async fn start(opts: &ConnectOptions) -> anyhow::Result<Session> {
        let (resp, operator_token) = match &opts.how {
            How::Start { token, device, service, ttl_secs } => {
                let body = serde_json::to_string(&StartSession {
                    device: device.clone(),
                    service: service.clone(),
                    ttl_secs: *ttl_secs,
                })?;
                let resp = peer::api(&opts.relay, Method::POST, "/api/v1/sessions", token, Some(body))
                    .await
                    .context("starting a session")?;
                (resp, Some(token.clone()))
            }
            How::Code(code) => {
                let body = serde_json::to_string(&Launch { code: code.clone() })?;
                let resp = peer::api(&opts.relay, Method::POST, "/api/v1/launch", "", Some(body))
                    .await
                    .context("redeeming the launch code (it is good once, for 2 minutes)")?;
                (resp, None)
            }
        };
        let started: SessionStarted = serde_json::from_slice(&resp).context("the relay's session answer")?;
        let home = std::sync::Arc::new(std::sync::Mutex::new(Home::of(&opts.relay, &started.client_url)?));
        let control = Control {
            ready: Default::default(),
            api: opts.relay.clone(),
            operator_token: operator_token.clone(),
            home: home.clone(),
            id: started.id.clone(),
            token: started.client_token.clone(),
        };
        let ready = std::sync::Arc::new(std::sync::Mutex::new(None));
        let control = Control { ready: ready.clone(), ..control };
        let ws = peer::dial(&control.node(), &control.path(), &control.token).await?;
        let (ended_tx, ended) = watch::channel(None);
        tokio::spawn(control.keep(ws, ended_tx));
        Ok(Session { relay: opts.relay.clone(), started, operator_token, ended, home, ready, refilling: false.into() })
    }

    /// The ready connection if it is still good (started), else a fresh one.
    async fn take_or_dial(&self) -> anyhow::Result<crate::splice::DataWs> {
        let taken = self.ready.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut ws) = taken.filter(|ws| !ws.is_stale()) {
            if crate::splice::start(&mut ws).await.is_ok() {
                return Ok(ws);
            }
        }
        self.dial().await
    }

    /// Opens a ready connection unless one is there or on its way.
    async fn refill(self: std::sync::Arc<Self>) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.ready.lock().unwrap_or_else(|p| p.into_inner()).is_some() || self.refilling.swap(true, SeqCst) {
            return;
        }
        let home = self.home.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sep = if home.data_path.contains('?') { '&' } else { '?' };
        let path = format!("{}{sep}ready=1", home.data_path);
        match peer::dial_data(&home.node, &path, &self.started.client_token).await {
            Ok(ws) => *self.ready.lock().unwrap_or_else(|p| p.into_inner()) = Some(ws),
            Err(e) => tracing::debug!("opening a ready connection: {e:#}"),
        }
        self.refilling.store(false, SeqCst);
    }

    /// Opens one data connection to the session's node.
    pub async fn dial(&self) -> anyhow::Result<crate::splice::DataWs> {
        let home = self.home.lock().unwrap_or_else(|p| p.into_inner()).clone();
        peer::dial_data(&home.node, &home.data_path, &self.started.client_token).await
    }

    /// Opens one data connection and splices `r`/`w` over it until both sides are done.
    pub async fn carry<R, W>(&self, r: R, w: W) -> anyhow::Result<SpliceEnd>
    where
        R: tokio::io::AsyncRead + Unpin + Send,
        W: LocalWrite,
    {
        let ws = self.dial().await?;
        Ok(crate::splice::splice(r, w, ws).await)
    }

    /// Serves `listener` until the session ends or `stop` resolves.
    pub async fn serve(self: std::sync::Arc<Self>, listener: TcpListener, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ended = self.ended.clone();
        tokio::spawn(self.clone().refill());
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((tcp, from)) = accepted else { continue };
                    let _ = tcp.set_nodelay(true);
                    let session = self.clone();
                    tokio::spawn(async move {
                        let ws = session.take_or_dial().await;
                        tokio::spawn(session.refill());
                        let ws = match ws {
                            Ok(ws) => ws,
                            Err(e) => return tracing::warn!(%from, "{e:#}"),
                        };
                        // A task of its own, sized for the splice alone: the dialing took more
                        // state than an idle connection should keep for its lifetime.
                        let (r, w) = tcp.into_split();
                        tokio::spawn(async move { report(from, &crate::splice::splice(r, w, ws).await) });
                    });
                }
                _ = ended.wait_for(Option::is_some) => return,
                _ = &mut stop => return,
            }
        }
    }

    /// Closes the session through the API (best effort: it may have ended already). A session
    /// from a launch code has no operator token to do it with.
    pub async fn close(&self) {
        let Some(token) = &self.operator_token else { return };
        let path = format!("/api/v1/sessions/{}", self.started.id);
        let _ = peer::api(&self.relay, Method::DELETE, &path, token, None).await;
    }
}

/// The session's control connection, kept for the life of the session.
struct Control {
    /// The control API, asked where the session lives when its node is lost.
    api: RelayUrl,
    /// The session's ready data connection: dropped when the session moves.
    ready: std::sync::Arc<std::sync::Mutex<Option<crate::splice::DataWs>>>,
    /// Asks where the session went; a session from a launch code cannot ask.
    operator_token: Option<String>,
    home: std::sync::Arc<std::sync::Mutex<Home>>,
    id: String,
    token: String,
}

/// How one attachment of the control connection ended.
enum Attachment {
    /// The relay ended the session (it said so: a `closing` event before its Close).
    Ended(u16, String),
    /// The connection dropped without the session ending: re-attach.
    Lost(String),
}

impl Control {
    fn node(&self) -> RelayUrl {
        self.home.lock().unwrap_or_else(|p| p.into_inner()).node.clone()
    }

    fn path(&self) -> String {
        format!("/api/v1/sessions/{}/control", self.id)
    }

    /// Asks the control API where the session lives now (a cluster moves it with its device);
    /// follows it there. Best effort: a single relay's answer has no `client_url`.
    async fn relocate(&self) {
        let Some(token) = &self.operator_token else { return };
        let path = format!("/api/v1/sessions/{}", self.id);
        let Ok(body) = peer::api(&self.api, Method::GET, &path, token, None).await else { return };
        let Ok(info) = serde_json::from_slice::<crate::proto::SessionInfo>(&body) else { return };
        let Some(url) = info.client_url else { return };
        match Home::of(&self.api, &url) {
            Ok(home) => {
                let mut current = self.home.lock().unwrap_or_else(|p| p.into_inner());
                if current.node.authority != home.node.authority {
                    tracing::info!(
                        node = info.node.as_deref().unwrap_or("?"),
                        at = home.node.authority,
                        "the session moved"
                    );
                    *current = home;
                    self.ready.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
            }
            Err(e) => tracing::debug!("the session's new client_url: {e:#}"),
        }
    }

    /// Follows the control connection; when it drops without the session ending, re-attaches
    /// (with backoff) within the relay's grace period, so a network blip ends no tunnel.
    async fn keep(self, mut ws: peer::Ws, ended: watch::Sender<Option<(u16, String)>>) {
        let mut grace = DEFAULT_GRACE;
        loop {
            let why = match follow(ws, &mut grace).await {
                Attachment::Ended(code, reason) => {
                    let _ = ended.send(Some((code, reason)));
                    return;
                }
                Attachment::Lost(why) => why,
            };
            tracing::warn!("session control connection lost ({why}); re-attaching");
            let give_up = tokio::time::Instant::now() + grace;
            let mut backoff = Duration::from_millis(200);
            ws = loop {
                if tokio::time::Instant::now() >= give_up {
                    let reason = format!("control connection lost ({why}) and not re-attached within {grace:?}");
                    let _ = ended.send(Some((1001, reason)));
                    return;
                }
                tokio::time::sleep(backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                self.relocate().await;
                match peer::dial(&self.node(), &self.path(), &self.token).await {
                    Ok(ws) => {
                        tracing::info!("re-attached to the session");
                        break ws;
                    }
                    Err(e)
                        if e.downcast_ref::<peer::Refused>().is_some_and(|r| r.status == StatusCode::UNAUTHORIZED) =>
                    {
                        let reason = "the session ended while its control connection was down".to_string();
                        let _ = ended.send(Some((1001, reason)));
                        return;
                    }
                    Err(e) => tracing::debug!("re-attaching: {e:#}"),
                }
            };
        }
    }
}

async fn follow(ws: peer::Ws, grace: &mut Duration) -> Attachment {
    let limits = channel::Limits { max_message: 64 << 10, peer_masks: false, stall: RELAY_SILENCE };
    let mut ch = channel::channel(ws, limits);
    let mut closing: Option<(u16, String)> = None;
    loop {
        let Ok(msg) = tokio::time::timeout(RELAY_SILENCE, ch.rx.recv()).await else {
            return Attachment::Lost(format!("no word from the relay for {RELAY_SILENCE:?}"));
        };
        match msg {
            Some(Incoming::Ping | Incoming::Pong) => {}
            Some(Incoming::Text(t)) => match serde_json::from_str::<SessionEvent>(&t) {
                Ok(SessionEvent::DeviceOffline) => tracing::warn!("device went offline"),
                Ok(SessionEvent::DeviceOnline) => tracing::info!("device is back online"),
                Ok(SessionEvent::Ready { device_online, device, client_grace_secs, .. }) => {
                    if let Some(secs) = client_grace_secs {
                        *grace = Duration::from_secs(secs);
                    }
                    if !device_online {
                        tracing::warn!("device {device} is offline; connections fail until it is back");
                    }
                }
                Ok(SessionEvent::Closing { code, reason }) => closing = Some((code, printable(&reason, 200))),
                Err(e) => tracing::debug!("unknown session event ({e})"),
            },
            Some(Incoming::Closed(close)) => {
                return match closing {
                    Some((code, reason)) => Attachment::Ended(code, reason),
                    None => Attachment::Lost(match close {
                        Some((code, reason)) => format!("closed with {code} {}", printable(&reason, 200)),
                        None => "connection broke".to_string(),
                    }),
                };
            }
            Some(Incoming::Violation(code, why)) => {
                return Attachment::Lost(format!("relay broke the protocol: {code} {why}"))
            }
            Some(Incoming::Stalled) => return Attachment::Lost("the relay stopped reading".into()),
            None => return Attachment::Lost("connection broke".into()),
        }
    }
}

fn report(from: SocketAddr, end: &SpliceEnd) {
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
    tracing::info!(session = session.started.id, "session started");
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
            // Ended by the relay (closed, expired, device lost, control connection gone for
            // good): say why and exit non-zero. Ctrl-C or the program's own exit keep theirs.
            match session.ended.borrow().clone() {
                Some((end, reason)) => {
                    eprintln!("ringway: session ended: {end} {reason}");
                    if code == 0 {
                        1
                    } else {
                        code
                    }
                }
                None => code,
            }
        }
    };
    session.close().await;
    Ok(code)
}

/// What `session start` (and the console) tell an operator to pass on with a launch code.
pub fn launch_lines(relay: &RelayUrl, code: &str) -> String {
    let relay = relay.base();
    format!(
        "launch code {code}: good once, for {secs} s\n  \
         ringway connect --relay {relay} --code {code}\n  \
         ssh -o ProxyCommand='ringway connect --relay {relay} --code {code} --stdio' user@device\n",
        secs = crate::proto::LAUNCH_CODE_SECS,
    )
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
