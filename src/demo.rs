//! `ringway demo`: a relay, an agent and a built-in web service on loopback, one session
//! opened through the control API, a self-check transfer through the tunnel, then a local port
//! a person can try — all in one process, until Ctrl-C.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::agent::{self, AgentOptions};
use crate::client::{ConnectOptions, How, Session};
use crate::config::{Config, Credential, Device, Operator, Role, Secret};
use crate::peer::{self, RelayUrl};
use crate::proto::DeviceInfo;
use crate::relay::{self, BackendKind};

/// Bytes the self-check sends through the tunnel (and gets back).
const SELF_CHECK_BYTES: usize = 32 << 20;

pub async fn run(backend: Option<BackendKind>) -> anyhow::Result<()> {
    let service = start_web_service().await?;
    let operator_token = Secret::random();
    let device_key = Secret::random();
    let config = Config {
        operator: vec![Operator {
            name: "demo".into(),
            token: Credential::Plain(operator_token.clone()),
            role: Role::Operator,
        }],
        device: vec![Device { id: "demo-device".into(), key: Credential::Plain(device_key.clone()) }],
        limits: Default::default(),
        dataplane: Default::default(),
        audit: Default::default(),
        tls: None,
        cluster: None,
        source: None,
    };
    let running = relay::start(config, "127.0.0.1:0".parse()?, backend)?;
    let relay_url = RelayUrl::parse(&format!("http://{}", running.addr))?;
    println!("relay listening on {} ({} backend)", running.addr, running.backend);

    let mut services = BTreeMap::new();
    services.insert("web".to_string(), service.to_string());
    tokio::spawn(agent::run(AgentOptions {
        spares: agent::Spares::default(),
        relays: vec![relay_url.clone()],
        device: "demo-device".into(),
        key: device_key.expose().to_string(),
        services,
    }));
    wait_online(&relay_url, operator_token.expose()).await?;
    println!("agent for demo-device connected, offering service web -> {service}");

    let how = How::Start {
        token: operator_token.expose().to_string(),
        device: "demo-device".into(),
        service: "web".into(),
        ttl_secs: None,
    };
    let opts = ConnectOptions { relay: relay_url, how };
    let session = Arc::new(Session::start(&opts).await?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let local = listener.local_addr()?;
    let serving = tokio::spawn(session.clone().serve(listener, async {
        let _ = tokio::signal::ctrl_c().await;
    }));
    println!("session {} started; listening on {local}", session.started.id);

    let (secs, moved) = self_check(local).await.context("self-check through the tunnel")?;
    let mib = moved as f64 / (1 << 20) as f64;
    println!(
        "self-check ok: {mib:.0} MiB sent and {mib:.0} MiB echoed back intact through the relay in {secs:.2} s \
         ({:.0} MiB/s each way)",
        mib / secs
    );
    println!("try: curl http://{local}/        (Ctrl-C to stop)");
    println!(
        "console: http://{}/  (log in with the demo's operator token {}; it changes every run)",
        running.addr,
        operator_token.expose()
    );
    let _ = serving.await;
    session.close().await;
    Ok(())
}

/// The device's built-in service: `GET /` greets, `POST /echo` streams the body back.
async fn start_web_service() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let resp = if req.method() == Method::POST && req.uri().path() == "/echo" {
                        Response::new(req.into_body().boxed())
                    } else {
                        let text = "hello from demo-device, through the ringway relay\n";
                        Response::new(Full::new(Bytes::from_static(text.as_bytes())).map_err(|e| match e {}).boxed())
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    Ok(addr)
}

async fn wait_online(relay: &RelayUrl, token: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(body) = peer::api(relay, Method::GET, "/api/v1/devices", token, None).await {
            let devices: Vec<DeviceInfo> = serde_json::from_slice(&body)?;
            if devices.iter().any(|d| d.online) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the demo agent did not connect to the relay within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs pseudo-random bytes to the service's echo endpoint through the tunnel and checks
/// every byte comes back. Returns the seconds taken and the bytes sent.
async fn self_check(local: SocketAddr) -> anyhow::Result<(f64, usize)> {
    let mut data = vec![0u8; SELF_CHECK_BYTES];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
    let data = Bytes::from(data);
    let began = Instant::now();
    let tcp = TcpStream::connect(local).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::post("/echo").header("host", "demo").body(Full::new(data.clone()))?;
    let resp = sender.send_request(req).await?;
    let back = resp.into_body().collect().await?.to_bytes();
    let secs = began.elapsed().as_secs_f64();
    if back != data {
        bail!("echoed {} bytes differ from the {} sent", back.len(), data.len());
    }
    Ok((secs, data.len()))
}
