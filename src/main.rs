//! The `ringway` binary: allocator, command line, logging, exit codes. Everything else lives in
//! the library so tests can drive it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hyper::Method;
use ringway::agent::{self, AgentOptions};
use ringway::client::{self, ConnectOptions, How, Mode};
use ringway::config::Config;
use ringway::peer::{self, RelayUrl};
use ringway::proto::StartSession;
use ringway::relay::{self, BackendKind};

// mimalloc: the relay holds tens of thousands of small per-tunnel allocations and churns
// sessions on several threads; mimalloc keeps that fast and its RSS low where glibc's
// per-thread arenas fragment.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Remote access to services on devices behind NAT, through a WebSocket relay.
///
/// A device runs `ringway agent`, which keeps one outbound connection to a public `ringway
/// relay`. An operator runs `ringway connect`, which starts a session and opens a local port;
/// ssh, a VNC viewer or a browser pointed at that port reaches the device's service.
/// Try `ringway demo` to see all three on this machine.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: control API, agent endpoint and data plane on one address.
    Relay {
        /// Address to listen on; port 0 picks a free port (the real one is printed).
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Relay configuration (TOML): operators, devices, limits.
        #[arg(long)]
        config: PathBuf,
        /// Data-plane backend (default: epoll, the bake-off's winner; see README, Performance).
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
    },
    /// Run the device agent: keep a control connection to the relay and serve the named services.
    Agent {
        /// The relay, e.g. https://relay.example.net or http://127.0.0.1:8080. Repeatable: the
        /// agent starts on one at random and tries the others when it loses it.
        #[arg(long, required = true)]
        relay: Vec<String>,
        /// CA certificate (PEM) to verify an https:// relay with, instead of the system roots.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// This device's id, as listed in the relay's config.
        #[arg(long)]
        device: String,
        /// This device's key, as listed in the relay's config.
        #[arg(long, env = "RINGWAY_DEVICE_KEY", hide_env_values = true)]
        key: String,
        /// A service this device offers, NAME=HOST:PORT (repeatable). Nothing else can be reached.
        #[arg(long = "service", required = true, value_parser = agent::parse_service)]
        services: Vec<(String, String)>,
        /// Spare data connections kept open to the relay, ready for the next connection (no
        /// handshake then): at least this many...
        #[arg(long, default_value_t = 1)]
        spares_min: usize,
        /// ...and at most this many, following how many connections came in the last 10 s.
        #[arg(long, default_value_t = 16)]
        spares_max: usize,
    },
    /// Start a session to a device's service (or redeem a launch code for one) and serve it on
    /// a local port.
    Connect {
        /// The relay, e.g. https://relay.example.net
        #[arg(long)]
        relay: String,
        /// CA certificate (PEM) to verify an https:// relay with, instead of the system roots.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// A one-time launch code (from `session start` or the console) instead of an operator
        /// token, device and service.
        #[arg(long, conflicts_with_all = ["token", "device", "service", "ttl"])]
        code: Option<String>,
        /// Operator token for the control API.
        #[arg(long, env = "RINGWAY_TOKEN", hide_env_values = true, required_unless_present = "code")]
        token: Option<String>,
        #[arg(long, required_unless_present = "code")]
        device: Option<String>,
        #[arg(long, required_unless_present = "code")]
        service: Option<String>,
        /// Local address to listen on (port 0: any free port, printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Run this command once listening, with {port} replaced; the session ends with it.
        #[arg(long, conflicts_with = "stdio")]
        exec: Option<String>,
        /// Carry exactly one connection over stdin/stdout (for ssh -o ProxyCommand).
        #[arg(long)]
        stdio: bool,
        /// Session lifetime in seconds (default: the relay's).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Use the control API from the shell; prints JSON.
    Session {
        #[command(subcommand)]
        action: SessionAction,
        #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
        relay: String,
        /// CA certificate (PEM) to verify an https:// relay with, instead of the system roots.
        #[arg(long, global = true)]
        ca: Option<PathBuf>,
        #[arg(long, global = true, env = "RINGWAY_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Relay, agent, a built-in web service and a session on loopback, with a self-check.
    Demo {
        #[arg(long, value_enum)]
        backend: Option<BackendKind>,
    },
}

#[derive(Subcommand)]
enum SessionAction {
    /// Start a session; prints its id, client URL, client token and launch code (JSON), and on
    /// stderr the `connect` and ssh lines that redeem the code.
    Start {
        #[arg(long)]
        device: String,
        #[arg(long)]
        service: String,
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// List open sessions.
    List,
    /// Show one session.
    Show { id: String },
    /// Close a session; its connections end with close code 4003.
    Close { id: String },
    /// List the sessions that ended recently (older ones are in the audit log).
    Ended,
    /// List the configured devices: online, agent version and address, services.
    Devices,
    /// Disconnect a device's agent (admin; it may reconnect).
    Disconnect { device: String },
    /// Print audit records (JSON lines), filtered.
    Audit {
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        operator: Option<String>,
        /// Unix seconds.
        #[arg(long)]
        since: Option<u64>,
        /// Unix seconds.
        #[arg(long)]
        until: Option<u64>,
        #[arg(long)]
        limit: Option<u64>,
    },
}

fn main() -> ExitCode {
    lean_edges();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("ringway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The edge roles run on devices where memory is scarce: no transparent huge pages for them.
/// mimalloc asks for huge pages on its arenas, and with THP in `madvise` mode (Debian's default)
/// each thread's first touch then faults in a whole 2 MiB page: 8 MiB of an idle agent's 15
/// MiB RSS, measured. The relay keeps them (fewer TLB misses on its buffer pools).
fn lean_edges() {
    let role = std::env::args().nth(1);
    if matches!(role.as_deref(), Some("agent" | "connect")) {
        // SAFETY: prctl with an integer option and arguments touches no memory of ours.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}

/// Blocks until SIGTERM or SIGINT; on each SIGHUP, reloads the relay's configuration.
fn wait_for_termination(relay: &ringway::relay::Relay) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    // Refusals are logged by reload itself; the relay runs on either way.
                    let _ = relay.reload("SIGHUP");
                }
            }
        }
    })
}

/// The edge roles' runtime: one thread. Measured against a multi-thread runtime in the same run
/// (`benches/results/edges.txt`): the same speed, CPU per byte and round trip, 1.7 MB less peak
/// memory; an edge at ~7 % of a core per Gbit/s does not need a second core.
fn tokio_main<F: std::future::Future<Output = anyhow::Result<i32>>>(f: F) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = rt.block_on(f);
    // A read of stdin (--stdio) blocks a pool thread until input comes; do not wait for it.
    rt.shutdown_background();
    result
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Relay { listen, config, backend } => {
            let config = Config::load(&config)?;
            let running = relay::start(config, listen, backend)?;
            println!("listening on {}", running.addr);
            wait_for_termination(&running.relay)?;
            running.shutdown();
            Ok(0)
        }
        Command::Agent { relay, ca, device, key, services, spares_min, spares_max } => {
            let relays = relay.iter().map(|r| RelayUrl::parse_with_ca(r, ca.as_deref())).collect::<Result<_, _>>()?;
            let spares = agent::Spares::new(spares_min, spares_max)?;
            let opts = AgentOptions { relays, device, key, services: services.into_iter().collect(), spares };
            tokio_main(async move { agent::run(opts).await.map(|()| 0) })
        }
        Command::Connect { relay, ca, code, token, device, service, listen, exec, stdio, ttl } => {
            let relay = RelayUrl::parse_with_ca(&relay, ca.as_deref())?;
            let how = match (code, token, device, service) {
                (Some(code), ..) => How::Code(code),
                (None, Some(token), Some(device), Some(service)) => {
                    How::Start { token, device, service, ttl_secs: ttl }
                }
                _ => anyhow::bail!("--code, or --token with --device and --service, is required"),
            };
            let opts = ConnectOptions { relay, how };
            let mode = if stdio { Mode::Stdio } else { Mode::Listen { addr: listen, exec } };
            tokio_main(client::run(opts, mode))
        }
        Command::Session { action, relay, ca, token } => {
            let relay = RelayUrl::parse_with_ca(&relay, ca.as_deref())?;
            let token = token.context("--token (or RINGWAY_TOKEN) is required")?;
            tokio_main(async move {
                let starting = matches!(action, SessionAction::Start { .. });
                let (method, path, body) = match action {
                    SessionAction::Start { device, service, ttl } => {
                        let body = serde_json::to_string(&StartSession { device, service, ttl_secs: ttl })?;
                        (Method::POST, "/api/v1/sessions".to_string(), Some(body))
                    }
                    SessionAction::List => (Method::GET, "/api/v1/sessions".to_string(), None),
                    SessionAction::Show { id } => (Method::GET, format!("/api/v1/sessions/{id}"), None),
                    SessionAction::Close { id } => (Method::DELETE, format!("/api/v1/sessions/{id}"), None),
                    SessionAction::Ended => (Method::GET, "/api/v1/sessions/ended".to_string(), None),
                    SessionAction::Devices => (Method::GET, "/api/v1/devices".to_string(), None),
                    SessionAction::Disconnect { device } => {
                        (Method::POST, format!("/api/v1/devices/{device}/disconnect"), None)
                    }
                    SessionAction::Audit { device, operator, since, until, limit } => {
                        let mut q = form_urlencoded::Serializer::new(String::new());
                        device.map(|v| q.append_pair("device", &v));
                        operator.map(|v| q.append_pair("operator", &v));
                        since.map(|v| q.append_pair("since", &v.to_string()));
                        until.map(|v| q.append_pair("until", &v.to_string()));
                        limit.map(|v| q.append_pair("limit", &v.to_string()));
                        let out =
                            peer::api(&relay, Method::GET, &format!("/api/v1/audit?{}", q.finish()), &token, None)
                                .await?;
                        print!("{}", String::from_utf8_lossy(&out));
                        return Ok(0);
                    }
                };
                let out = peer::api(&relay, method, &path, &token, body).await?;
                if starting {
                    let started: ringway::proto::SessionStarted = serde_json::from_slice(&out)?;
                    if let Some(code) = &started.launch_code {
                        eprint!("{}", client::launch_lines(&relay, code));
                    }
                }
                if out.is_empty() {
                    println!("{{}}");
                } else {
                    let v: serde_json::Value = serde_json::from_slice(&out)?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                Ok(0)
            })
        }
        Command::Demo { backend } => tokio_main(async move { ringway::demo::run(backend).await.map(|()| 0) }),
    }
}
