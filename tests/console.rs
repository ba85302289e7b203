//! The operator console, launch codes and the API description, against the real binary: the
//! console in a real browser (Debian's chromium, driven over WebDriver by chromedriver), and
//! the same rules at the API without one.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

use crate::util::*;

const ADMIN_TOKEN: &str = "admin-secret-for-console-tests";

fn console_relay(dir: &std::path::Path, extra: &str) -> (Relay, std::path::PathBuf) {
    let audit = dir.join("audit.log");
    let config = format!(
        "[[operator]]\nname = \"root\"\ntoken = \"{ADMIN_TOKEN}\"\nrole = \"admin\"\n\
         [audit]\npath = \"{}\"\n{extra}",
        audit.display()
    );
    (Relay::start("epoll", &config), audit)
}

/// The login cookie's value in a `Set-Cookie` answer.
fn login_cookie(head: &str) -> String {
    let set = header(head, "set-cookie").expect("a Set-Cookie header");
    set.split(';').next().unwrap().trim().to_string()
}

/// Logs in at the API: (cookie pair `ringway_login=…`, CSRF proof).
fn api_login(relay: &Relay, token: &str) -> (String, String) {
    let body = format!(r#"{{"token":"{token}"}}"#);
    let (status, head, body) =
        http_with(relay.addr, "POST", "/api/v1/login", &[("Content-Type", "application/json")], Some(&body));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (login_cookie(&head), v["csrf_token"].as_str().unwrap().to_string())
}

fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `ringway connect --code CODE [EXTRA…]` on a local port: the process and its port.
fn connect_with_code(relay_url: &str, code: &str, extra: &[&str]) -> (Proc, std::net::SocketAddr) {
    let args = [&["connect", "--relay", relay_url, "--code", code][..], extra].concat();
    let (p, a) = Proc::spawn("connect", &args, true);
    (p, a.expect("connect's local port"))
}

/// Echoes `total` bytes through `local` in chunks and checks every byte came back in order.
fn echo_through(s: &mut TcpStream, total: usize, seed: u64) {
    let mut noise = Noise::new(seed);
    let mut sent = vec![0u8; total];
    noise.fill(&mut sent);
    s.write_all(&sent).unwrap();
    let mut back = vec![0u8; total];
    s.read_exact(&mut back).unwrap();
    assert!(back == sent, "the echo differs from what was sent");
}

#[test]
fn a_launch_code_is_redeemed_once_by_connect_and_audited_with_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, audit) = console_relay(dir.path(), "");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);

    // `session start` prints JSON with the code, and the lines to paste on stderr.
    let out = Command::new(BIN)
        .args(["session", "start", "--device", DEVICE_ID, "--service", "echo"])
        .args(["--relay", &relay.url(), "--token", OPERATOR_TOKEN])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let code = started["launch_code"].as_str().expect("a launch code").to_string();
    assert_eq!(code.len(), 11, "{code}");
    let printed = String::from_utf8_lossy(&out.stderr);
    let url = relay.url();
    assert!(printed.contains(&format!("ringway connect --relay {url} --code {code}")), "{printed}");
    assert!(
        printed.contains(&format!("ProxyCommand='ringway connect --relay {url} --code {code} --stdio'")),
        "{printed}"
    );

    // Redeemed by connect (as read out: lower case), bytes move both ways.
    let spoken = code.to_lowercase();
    let (mut connect, local) = connect_with_code(&url, &spoken, &[]);
    let mut s = TcpStream::connect(local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    echo_through(&mut s, 256 << 10, 7);

    // A second use, a wrong code: the same 401 as any bad credential, counted.
    let failures = "ringway_handshake_failures_total{reason=\"bad_token\"}";
    let before = relay.metric(failures);
    let again = Command::new(BIN).args(["connect", "--relay", &url, "--code", &code, "--stdio"]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("401"), "{}", String::from_utf8_lossy(&again.stderr));
    let body = r#"{"code":"AAAAA-AAAAA"}"#;
    let (status, _, _) =
        http_with(relay.addr, "POST", "/api/v1/launch", &[("Content-Type", "application/json")], Some(body));
    assert_eq!(status, 401);
    assert_eq!(relay.metric(failures), before + 2);
    // A form post (what another site's page could send without asking) is not taken.
    let (status, _, _) = http_with(
        relay.addr,
        "POST",
        "/api/v1/launch",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some("code=AAAAA-AAAAA"),
    );
    assert_eq!(status, 415);

    echo_through(&mut s, 64 << 10, 8);
    drop(s);
    connect.kill();
    let id = started["id"].as_str().unwrap();
    wait_for("the redemption in the audit log", || {
        audit_lines(&audit).iter().any(|r| r["event"] == "launch_redeemed" && r["session"] == id)
    });
    let lines = audit_lines(&audit);
    let redeemed: Vec<_> = lines.iter().filter(|r| r["event"] == "launch_redeemed").collect();
    assert_eq!(redeemed.len(), 1, "{redeemed:?}");
    assert_eq!(redeemed[0]["operator"], "ops");
    assert!(redeemed[0]["addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{:?}", redeemed[0]);
    assert!(lines.iter().all(|r| !r.to_string().contains(&code[..5])), "the code itself is never audited");
}

#[test]
fn console_logins_take_a_csrf_proof_expire_idle_and_die_at_logout() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, audit) = console_relay(dir.path(), "[limits]\nlogin_idle_timeout_secs = 2\n");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);

    // The page: only its own assets, no framing.
    let (status, head, page) = http_with(relay.addr, "GET", "/", &[], None);
    assert_eq!(status, 200);
    assert!(page.contains("console.js"));
    let csp = header(&head, "content-security-policy").expect("a CSP");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");

    // A wrong token gets no cookie.
    let (status, head, _) = http_with(
        relay.addr,
        "POST",
        "/api/v1/login",
        &[("Content-Type", "application/json")],
        Some(r#"{"token":"wrong"}"#),
    );
    assert_eq!(status, 401);
    assert!(header(&head, "set-cookie").is_none());

    let (status, head, _) = http_with(
        relay.addr,
        "POST",
        "/api/v1/login",
        &[("Content-Type", "application/json")],
        Some(&format!(r#"{{"token":"{OPERATOR_TOKEN}"}}"#)),
    );
    assert_eq!(status, 200);
    let set = header(&head, "set-cookie").unwrap();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && !set.contains("Secure"), "{set}");
    let cookie = login_cookie(&head);
    let (_, csrf) = api_login(&relay, OPERATOR_TOKEN);
    let (cookie2, _) = api_login(&relay, OPERATOR_TOKEN);
    assert_ne!(cookie, cookie2, "each login its own id");

    // Reads need the cookie only; changes need the login's proof too, and no foreign origin.
    let start = format!(r#"{{"device":"{DEVICE_ID}","service":"echo"}}"#);
    let (status, _, body) = http_with(relay.addr, "GET", "/api/v1/sessions", &[("Cookie", &cookie)], None);
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = http_with(relay.addr, "POST", "/api/v1/sessions", &[("Cookie", &cookie)], Some(&start));
    assert_eq!((status, body.contains("CSRF")), (403, true), "{body}");
    let forged = [("Cookie", cookie.as_str()), ("X-CSRF-Token", "forged")];
    let (status, _, _) = http_with(relay.addr, "POST", "/api/v1/sessions", &forged, Some(&start));
    assert_eq!(status, 403);
    let (_, csrf_of_cookie) = {
        let (s, _, b) = http_with(relay.addr, "GET", "/api/v1/login", &[("Cookie", &cookie)], None);
        assert_eq!(s, 200);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        ((), v["csrf_token"].as_str().unwrap().to_string())
    };
    let other = [("Cookie", cookie.as_str()), ("X-CSRF-Token", csrf.as_str())];
    let (status, _, _) = http_with(relay.addr, "POST", "/api/v1/sessions", &other, Some(&start));
    assert_eq!(status, 403, "another login's proof is no proof");
    let foreign =
        [("Cookie", cookie.as_str()), ("X-CSRF-Token", csrf_of_cookie.as_str()), ("Origin", "https://evil.example")];
    let (status, _, _) = http_with(relay.addr, "POST", "/api/v1/sessions", &foreign, Some(&start));
    assert_eq!(status, 403);
    // Behind a reverse proxy that rewrites Host, the browser's host arrives as X-Forwarded-Host.
    let proxied = [
        ("Cookie", cookie.as_str()),
        ("X-CSRF-Token", csrf_of_cookie.as_str()),
        ("Origin", "https://relay.example.net"),
        ("X-Forwarded-Host", "evil.example"),
    ];
    let (status, _, _) = http_with(relay.addr, "POST", "/api/v1/sessions", &proxied, Some(&start));
    assert_eq!(status, 403, "a forwarded host that is not the origin is no proof");
    let (_, sessions) = http(relay.addr, "GET", "/api/v1/sessions", Some(OPERATOR_TOKEN), None);
    assert_eq!(sessions, "[]", "no refused request started a session");
    let proxied = [
        ("Cookie", cookie.as_str()),
        ("X-CSRF-Token", csrf_of_cookie.as_str()),
        ("Origin", "https://relay.example.net"),
        ("X-Forwarded-Host", "relay.example.net"),
    ];
    let (status, _, body) = http_with(relay.addr, "POST", "/api/v1/sessions", &proxied, Some(&start));
    assert_eq!(status, 201, "{body}");
    let started: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = started["id"].as_str().unwrap();
    assert_eq!(http(relay.addr, "DELETE", &format!("/api/v1/sessions/{id}"), Some(OPERATOR_TOKEN), None).0, 204);
    let good = [("Cookie", cookie.as_str()), ("X-CSRF-Token", csrf_of_cookie.as_str())];
    let (status, _, body) = http_with(relay.addr, "POST", "/api/v1/sessions", &good, Some(&start));
    assert_eq!(status, 201, "{body}");

    // The live view: a WebSocket with the cookie; a foreign origin is refused.
    let ws_req = |origin: &str| {
        let mut req =
            tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{}/api/v1/live", relay.addr))
                .unwrap();
        req.headers_mut().insert("cookie", cookie.parse().unwrap());
        req.headers_mut().insert("origin", origin.parse().unwrap());
        req
    };
    let open = |origin: &str| {
        tungstenite::client(ws_req(origin), TcpStream::connect(relay.addr).unwrap()).map_err(|e| e.to_string())
    };
    let err = open("http://evil.example").map(|_| ()).expect_err("refused");
    assert!(err.to_string().contains("403"), "{err}");
    let (mut live, _) = open(&format!("http://{}", relay.addr)).unwrap();
    let first = live.read().unwrap();
    let overview: serde_json::Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(overview["sessions"].as_array().unwrap().len(), 1, "{overview}");
    assert_eq!(overview["devices"][0]["online"], true, "{overview}");

    // Logout ends the login: the old cookie is refused, and its live view closes with 1008.
    let (status, head, _) = http_with(relay.addr, "POST", "/api/v1/logout", &good, None);
    assert_eq!(status, 204);
    assert!(header(&head, "set-cookie").unwrap().contains("Max-Age=0"));
    let (status, _, _) = http_with(relay.addr, "GET", "/api/v1/sessions", &[("Cookie", &cookie)], None);
    assert_eq!(status, 401);
    wait_for("the stale cookie audited as one", || {
        audit_lines(&audit).iter().any(|r| r["event"] == "auth_failed" && r["credential"] == "login_cookie")
    });
    let (code, why) = ws_wait_close(&mut live, Duration::from_secs(15));
    assert_eq!((code, why.as_str()), (1008, "logged out"));

    // An unused login ends after its idle time (2 s here); a used one lives on.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let (s, _, _) = http_with(relay.addr, "GET", "/api/v1/devices", &[("Cookie", &cookie2)], None);
        assert_eq!(s, 200, "a login in use stays");
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (status, _, _) = http_with(relay.addr, "GET", "/api/v1/devices", &[("Cookie", &cookie2)], None);
    assert_eq!(status, 401, "idle past its time");

    wait_for("login and logout in the audit log", || {
        let lines = audit_lines(&audit);
        lines.iter().filter(|r| r["event"] == "login" && r["operator"] == "ops").count() == 3
            && lines.iter().any(|r| r["event"] == "logout" && r["operator"] == "ops")
    });
}

#[test]
fn every_documented_operation_is_routed_and_the_audit_endpoint_filters() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _audit) = console_relay(dir.path(), "");
    let (status, body) = http(relay.addr, "GET", "/api/v1/openapi.json", None, None);
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for (path, item) in paths {
        for method in ["get", "post", "delete"] {
            let Some(op) = item.get(method) else { continue };
            let concrete = path.replace("{id}", "0123456789abcdef");
            let (status, body) = http(relay.addr, &method.to_uppercase(), &concrete, Some(ADMIN_TOKEN), Some("{}"));
            let documented = op["responses"].as_object().unwrap();
            assert!(
                documented.contains_key(&status.to_string()),
                "{method} {path}: {status} is not documented ({body})"
            );
            assert!(!body.contains("no such endpoint") && status != 405, "{method} {path} is not routed: {body}");
        }
    }

    // The audit endpoint: an operator sees only its own records.
    relay.start_session("echo", None);
    let as_root = r#"{"device":"dev-2","service":"x"}"#;
    let (status, _) = http(relay.addr, "POST", "/api/v1/sessions", Some(ADMIN_TOKEN), Some(as_root));
    assert_eq!(status, 201);
    let events = |token: &str, query: &str| -> Vec<serde_json::Value> {
        wait_for("the audit writer", || {
            let (_, b) = http(relay.addr, "GET", "/api/v1/audit?device=dev-2", Some(ADMIN_TOKEN), None);
            !b.is_empty()
        });
        let (status, body) = http(relay.addr, "GET", &format!("/api/v1/audit?{query}"), Some(token), None);
        assert_eq!(status, 200, "{body}");
        body.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let mine = events(OPERATOR_TOKEN, "");
    assert!(!mine.is_empty() && mine.iter().all(|r| r["operator"] == "ops"), "{mine:?}");
    let all = events(ADMIN_TOKEN, "");
    assert!(all.iter().any(|r| r["operator"] == "root") && all.iter().any(|r| r["operator"] == "ops"));
    let dev2 = events(ADMIN_TOKEN, "device=dev-2");
    assert!(!dev2.is_empty() && dev2.iter().all(|r| r["device"] == "dev-2"), "{dev2:?}");
    assert!(events(ADMIN_TOKEN, "since=4000000000").is_empty());
    let (status, _) = http(relay.addr, "GET", "/api/v1/audit?operator=root", Some(OPERATOR_TOKEN), None);
    assert_eq!(status, 403);
    let (status, _) = http(relay.addr, "GET", "/api/v1/audit?since=yesterday", Some(ADMIN_TOKEN), None);
    assert_eq!(status, 400);
}

// ---- the browser -----------------------------------------------------------------------

/// chromedriver on a free port, killed when dropped. Missing chromium or chromedriver is a
/// failure, not a skip: `.ci/run` installs both.
struct Driver {
    child: std::process::Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // In a process group of its own, with the browsers it starts: a failing test kills
        // them all, not only chromedriver (chromium would outlive it).
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; `.ci/run` installs it)");
        let url = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver to listen", || TcpStream::connect(("127.0.0.1", port)).is_ok());
        Driver { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: signals the process group this driver leads (its pid is the group's id).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let caps = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1500,1100"],
        }
    });
    let caps = caps.as_object().unwrap().clone();
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromium session through chromedriver")
}

/// Waits until `probe` gives `Some`, polling the page (not reloading it) for up to 20 s.
async fn until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "the page never showed {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text_of(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn attr_of(c: &Client, css: &str, attr: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.attr(attr).await.ok()?
}

fn screenshot_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
}

#[test]
fn the_console_in_a_real_browser_starts_watches_ends_and_audits_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _audit) = console_relay(dir.path(), "");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}"), "ssh=127.0.0.1:22".to_string()]);
    let driver = Driver::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;
        let home = format!("{}/", relay.url());
        c.goto(&home).await.unwrap();

        // A wrong token: a clear refusal, counted like any failed login.
        let failures = "ringway_handshake_failures_total{reason=\"bad_token\"}";
        let before = relay.metric(failures);
        c.wait().for_element(Locator::Id("token")).await.unwrap().send_keys("not-the-token").await.unwrap();
        c.find(Locator::Id("login-button")).await.unwrap().click().await.unwrap();
        until("the login refusal", || async {
            text_of(&c, "#login-error").await.filter(|t| t.contains("Invalid token"))
        })
        .await;
        assert_eq!(relay.metric(failures), before + 1);

        // Log in; the token is then nowhere in the page, its URL or its storage.
        c.find(Locator::Id("token")).await.unwrap().send_keys(ADMIN_TOKEN).await.unwrap();
        c.find(Locator::Id("login-button")).await.unwrap().click().await.unwrap();
        until("the operator's name", || async { text_of(&c, "#operator").await.filter(|t| t == "root") }).await;
        let exposed = c
            .execute(
                "return document.documentElement.outerHTML + location.href + JSON.stringify(localStorage) \
                 + JSON.stringify(sessionStorage) + document.cookie",
                vec![],
            )
            .await
            .unwrap();
        assert!(!exposed.as_str().unwrap().contains(ADMIN_TOKEN), "the token stayed in the page");
        assert!(!exposed.as_str().unwrap().contains("ringway_login"), "the cookie is readable by scripts");
        let cookie = c.get_named_cookie("ringway_login").await.unwrap();
        assert_eq!(cookie.http_only(), Some(true));
        assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");

        // The agent is online, with its version, address and services.
        let row = format!("#devices tr[data-device=\"{DEVICE_ID}\"]");
        until("the agent online", || async { text_of(&c, &format!("{row} .status")).await.filter(|t| t == "online") })
            .await;
        let shown = text_of(&c, &row).await.unwrap();
        assert!(shown.contains(env!("CARGO_PKG_VERSION")) && shown.contains("127.0.0.1"), "{shown}");
        assert!(shown.contains("echo, ssh"), "{shown}");

        // A forged request from the page without the CSRF proof is refused like at the API.
        let forged = c
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 fetch('/api/v1/sessions', {method: 'POST', headers: {'Content-Type': 'application/json'},
                   body: JSON.stringify({device: 'dev-1', service: 'echo'})})
                   .then(r => r.text().then(t => done(r.status + ' ' + t)));",
                vec![],
            )
            .await
            .unwrap();
        let forged = forged.as_str().unwrap().to_string();
        assert!(forged.starts_with("403 ") && forged.contains("CSRF"), "{forged}");

        // Start a session for the echo service; read the launch code from the page.
        c.find(Locator::Id("start-device")).await.unwrap().select_by_value(DEVICE_ID).await.unwrap();
        c.find(Locator::Id("start-service")).await.unwrap().select_by_value("echo").await.unwrap();
        c.find(Locator::Id("start-button")).await.unwrap().click().await.unwrap();
        let code =
            until("the launch code", || async { text_of(&c, "#launch-code").await.filter(|t| t.len() == 11) }).await;
        let session = text_of(&c, "#launch-session").await.unwrap();
        let commands = text_of(&c, "#launch-commands").await.unwrap();
        assert!(commands.contains(&format!("--code {code}")), "{commands}");
        assert!(text_of(&c, "#launch-countdown").await.unwrap().contains("s left"));

        // connect redeems it; bytes move; the page's byte counts rise without a reload.
        let url = relay.url();
        let (mut connect, local) = connect_with_code(&url, &code, &[]);
        let mut s = TcpStream::connect(local).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        echo_through(&mut s, 1 << 20, 1);
        let cell = format!("#sessions tr[data-session=\"{session}\"] .bytes-to-device");
        let first = until("the session's bytes", || async {
            attr_of(&c, &cell, "data-value").await.and_then(|v| v.parse::<u64>().ok()).filter(|&v| v >= 1 << 20)
        })
        .await;
        echo_through(&mut s, 2 << 20, 2);
        let later = until("the session's bytes rising", || async {
            attr_of(&c, &cell, "data-value")
                .await
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|&v| v >= first + (2 << 20))
        })
        .await;
        assert!(later > first);
        let back = format!("#sessions tr[data-session=\"{session}\"] .bytes-to-client");
        let to_client = attr_of(&c, &back, "data-value").await.unwrap().parse::<u64>().unwrap();
        assert!(to_client >= 1 << 20, "{to_client}");
        screenshot(&c, "console-session").await;

        // End: connect hears 4003 and exits; the session moves to the ended list with its code.
        let end = format!("#sessions tr[data-session=\"{session}\"] .end-button");
        c.find(Locator::Css(&end)).await.unwrap().click().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = connect.try_wait_ref() {
                break status;
            }
            assert!(Instant::now() < deadline, "connect did not exit after End");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!status.success());
        assert!(connect.stderr().contains("4003"), "connect: {}", connect.stderr());
        let ended = format!("#ended tr[data-session=\"{session}\"] .close");
        let reason = until("the ended session", || async { text_of(&c, &ended).await }).await;
        assert!(reason.starts_with("4003") && reason.contains("root"), "{reason}");
        // Its bytes include the connection that was running when it ended.
        let ended_bytes = format!("#ended tr[data-session=\"{session}\"] .bytes-to-device");
        until("the ended session's bytes", || async {
            attr_of(&c, &ended_bytes, "data-value").await.and_then(|v| v.parse::<u64>().ok()).filter(|&v| v >= 3 << 20)
        })
        .await;
        assert!(c.find(Locator::Css(&format!("#sessions tr[data-session=\"{session}\"]"))).await.is_err());

        // The audit view finds it: its start, its end and the redemption.
        c.find(Locator::Id("audit-device")).await.unwrap().send_keys(DEVICE_ID).await.unwrap();
        let search = c.find(Locator::Id("audit-search")).await.unwrap();
        for event in ["session_start", "launch_redeemed", "session_end"] {
            let css = format!("#audit-results tr[data-session=\"{session}\"][data-event=\"{event}\"]");
            until(event, || async {
                search.click().await.ok()?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                c.find(Locator::Css(&css)).await.ok()
            })
            .await;
        }
        screenshot(&c, "console-audit").await;

        // Log out; the old cookie is refused by the API, and set back in the browser it gets
        // the login page again.
        let old = format!("ringway_login={}", cookie.value());
        c.find(Locator::Id("logout")).await.unwrap().click().await.unwrap();
        until("the login page", || async {
            c.find(Locator::Id("login-view")).await.ok()?.is_displayed().await.ok()?.then_some(())
        })
        .await;
        let (status, _, _) = http_with(relay.addr, "GET", "/api/v1/sessions", &[("Cookie", &old)], None);
        assert_eq!(status, 401);
        c.add_cookie(cookie.clone()).await.unwrap();
        c.refresh().await.unwrap();
        until("the stale cookie refused", || async {
            text_of(&c, "#login-error").await.filter(|t| t.contains("log in again"))
        })
        .await;
        screenshot(&c, "console-login").await;
        c.close().await.unwrap();
    });
}

#[test]
fn an_admin_disconnects_an_agent_and_ended_sessions_are_kept_with_their_close_code() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, audit) = console_relay(dir.path(), "");
    let echo = echo_server();
    let _agent = relay.agent(&[format!("echo={echo}")]);
    let cli = |token: &str, args: &[&str]| {
        Command::new(BIN).arg("session").args(args).args(["--relay", &relay.url(), "--token", token]).output().unwrap()
    };

    let out = cli(OPERATOR_TOKEN, &["devices"]);
    let devices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dev1 = devices.as_array().unwrap().iter().find(|d| d["id"] == DEVICE_ID).unwrap().clone();
    assert_eq!(dev1["agent_version"], env!("CARGO_PKG_VERSION"), "{dev1}");
    assert!(dev1["agent_addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{dev1}");
    assert!(dev1["last_seen"].as_u64().unwrap() > 1_700_000_000, "{dev1}");
    let first_addr = dev1["agent_addr"].clone();

    // An operator may not; an admin may, the agent comes back on a new connection.
    let out = cli(OPERATOR_TOKEN, &["disconnect", DEVICE_ID]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("403"));
    let out = cli(ADMIN_TOKEN, &["disconnect", DEVICE_ID]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the agent back on a new connection", || {
        let (_, body) = http(relay.addr, "GET", "/api/v1/devices", Some(OPERATOR_TOKEN), None);
        let devices: serde_json::Value = serde_json::from_str(&body).unwrap();
        let d = devices.as_array().unwrap().iter().find(|d| d["id"] == DEVICE_ID).unwrap().clone();
        d["online"] == true && d["agent_addr"] != first_addr
    });
    let out = cli(ADMIN_TOKEN, &["disconnect", "no-such-device"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));

    // A session closed with a connection running is listed as ended, with its code, who closed
    // it and the bytes of that connection too; the connection's end is audited with 4003.
    let (id, url, token) = relay.start_session("echo", None);
    let mut ws = ws_connect(&url, &token);
    ws.send(tungstenite::Message::binary(vec![7u8; 1000])).unwrap();
    ws.get_mut().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(ws.read().unwrap().len(), 1000);
    let out = cli(OPERATOR_TOKEN, &["close", &id]);
    assert!(out.status.success());
    assert_eq!(ws_wait_close(&mut ws, Duration::from_secs(10)).0, 4003);
    wait_for("the ended session's bytes", || {
        let out = cli(OPERATOR_TOKEN, &["ended"]);
        let ended: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        ended[0]["bytes_to_device"].as_u64() >= Some(1004) && ended[0]["bytes_to_client"].as_u64() >= Some(1004)
    });
    wait_for("the connection's end in the audit log", || {
        audit_lines(&audit).iter().any(|r| {
            r["event"] == "connection_end" && r["session"] == id.as_str() && r["code"] == 4003 && r["operator"] == "ops"
        })
    });
    let out = cli(OPERATOR_TOKEN, &["ended"]);
    let ended: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ended[0]["id"], id.as_str(), "{ended}");
    assert_eq!(ended[0]["close_code"], 4003, "{ended}");
    assert!(ended[0]["close_reason"].as_str().unwrap().contains("ops"), "{ended}");
    assert!(ended[0]["ended_at"].as_u64().is_some(), "{ended}");
    let (_, theirs) = http(relay.addr, "GET", "/api/v1/sessions/ended", Some(ADMIN_TOKEN), None);
    assert!(theirs.contains(&id), "an admin sees every operator's");

    wait_for("the disconnect in the audit log", || {
        audit_lines(&audit)
            .iter()
            .any(|r| r["event"] == "agent_disconnected" && r["operator"] == "root" && r["device"] == DEVICE_ID)
    });
    let out = cli(ADMIN_TOKEN, &["audit", "--device", DEVICE_ID, "--limit", "1000"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.contains("agent_disconnected")), "{text}");
    assert!(text.lines().all(|l| l.contains(DEVICE_ID)), "{text}");
}

#[test]
fn over_tls_the_login_cookie_is_secure_and_a_launch_code_works_with_the_ca() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(pki.path(), "relay");
    let relay = Relay::start("epoll", &tls_config(&cert, &key));
    let url = format!("https://127.0.0.1:{}", relay.addr.port());
    let ca = ca.to_str().unwrap();

    // curl (installed by .ci/run) as the browser's stand-in: the cookie carries Secure.
    let out = Command::new("curl")
        .args(["-si", "--cacert", ca, "-H", "Content-Type: application/json"])
        .args(["-d", &format!(r#"{{"token":"{OPERATOR_TOKEN}"}}"#), &format!("{url}/api/v1/login")])
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let set = header(&head, "set-cookie").expect("a login cookie");
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("; Secure"), "{set}");

    let echo = echo_server();
    let args = ["agent", "--relay", &url, "--ca", ca, "--device", DEVICE_ID, "--key", DEVICE_KEY];
    let service = format!("echo={echo}");
    let (_agent, _) = Proc::spawn("agent", &[&args[..], &["--service", &service]].concat(), false);
    let start = || {
        Command::new(BIN)
            .args(["session", "start", "--device", DEVICE_ID, "--service", "echo"])
            .args(["--relay", &url, "--ca", ca, "--token", OPERATOR_TOKEN])
            .output()
            .unwrap()
    };
    wait_for("the agent online over TLS", || start().status.success());
    let started: serde_json::Value = serde_json::from_slice(&start().stdout).unwrap();
    let code = started["launch_code"].as_str().unwrap();
    let (_connect, local) = connect_with_code(&url, code, &["--ca", ca]);
    let mut s = TcpStream::connect(local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    echo_through(&mut s, 256 << 10, 3);
}
