//! Console logins: an operator token exchanged (`POST /api/v1/login`) for a random login id
//! that lives in an HttpOnly, SameSite=Strict cookie, so the token itself never stays in the
//! browser. A login ends at logout, after `limits.login_idle_timeout_secs` unused, or when its
//! operator leaves the configuration; only the id's SHA-256 is kept. Each login has its own
//! CSRF proof, which every state-changing request made with the cookie must carry in the
//! `X-CSRF-Token` header. The API resolves a login's operator against the configuration at
//! every use, so an operator removed by a reload is logged out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// The cookie's name.
pub const COOKIE: &str = "ringway_login";

struct Login {
    operator: String,
    csrf: String,
    last: Instant,
}

/// A login as a request presents it.
#[derive(Debug, Clone)]
pub struct LoggedIn {
    /// Its key (the id's hash), to end it or watch it.
    pub key: [u8; 32],
    pub operator: String,
    pub csrf: String,
}

impl LoggedIn {
    /// Whether `proof` is this login's CSRF proof.
    pub fn csrf_ok(&self, proof: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(proof.as_bytes()))
    }
}

/// The live logins, bounded: past `max` the longest idle one is dropped.
pub struct Logins {
    live: Mutex<HashMap<[u8; 32], Login>>,
    idle: Duration,
    max: usize,
}

impl Logins {
    pub fn new(idle: Duration, max: usize) -> Logins {
        Logins { live: Mutex::new(HashMap::new()), idle, max: max.max(1) }
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle
    }

    /// A new login for `operator`: the cookie's value and the login.
    pub fn create(&self, operator: &str, now: Instant) -> (String, LoggedIn) {
        let id = Secret::random().expose().to_string();
        let key = digest(&id);
        let csrf = Secret::random().expose().to_string();
        let mut live = self.lock();
        live.retain(|_, l| now.saturating_duration_since(l.last) < self.idle);
        if live.len() >= self.max {
            if let Some(stalest) = live.iter().min_by_key(|(_, l)| l.last).map(|(k, _)| *k) {
                live.remove(&stalest);
            }
        }
        live.insert(key, Login { operator: operator.to_string(), csrf: csrf.clone(), last: now });
        (id, LoggedIn { key, operator: operator.to_string(), csrf })
    }

    /// The login a cookie value names, if it is live; using it restarts its idle time.
    pub fn check(&self, id: &str, now: Instant) -> Option<LoggedIn> {
        let key = digest(id);
        let mut live = self.lock();
        let login = live.get_mut(&key)?;
        if now.saturating_duration_since(login.last) >= self.idle {
            live.remove(&key);
            return None;
        }
        login.last = now;
        Some(LoggedIn { key, operator: login.operator.clone(), csrf: login.csrf.clone() })
    }

    /// Whether a login is still live, without counting as a use (a live view watches this).
    pub fn alive(&self, key: &[u8; 32], now: Instant) -> bool {
        self.lock().get(key).is_some_and(|l| now.saturating_duration_since(l.last) < self.idle)
    }

    /// Ends a login (logout).
    pub fn end(&self, key: &[u8; 32]) -> bool {
        self.lock().remove(key).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Login>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The login id in a request's `Cookie` header(s), if any.
pub fn cookie_of(headers: &hyper::HeaderMap) -> Option<&str> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The `Set-Cookie` value that holds a login (`Secure` when the relay serves TLS).
pub fn set_cookie(id: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}")
}

/// The `Set-Cookie` value that removes it.
pub fn clear_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_lives_while_used_and_ends_idle_or_at_logout() {
        let logins = Logins::new(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        let (id, login) = logins.create("alice", t0);
        assert!(login.csrf_ok(&login.csrf) && !login.csrf_ok("forged") && !login.csrf_ok(""));
        // Used every 50 s, it outlives its 60 s idle time.
        assert!(logins.check(&id, t0 + Duration::from_secs(50)).is_some());
        assert!(logins.check(&id, t0 + Duration::from_secs(100)).is_some());
        assert!(logins.alive(&login.key, t0 + Duration::from_secs(150)));
        assert!(!logins.alive(&login.key, t0 + Duration::from_secs(160)), "watching is not using");
        assert!(logins.check(&id, t0 + Duration::from_secs(160)).is_none(), "idle too long");
        assert!(logins.check(&id, t0 + Duration::from_secs(161)).is_none());

        let (id, login) = logins.create("alice", t0);
        assert!(logins.end(&login.key));
        assert!(logins.check(&id, t0).is_none(), "logged out");
        assert!(logins.check("made-up", t0).is_none());
    }

    #[test]
    fn logins_are_bounded() {
        let logins = Logins::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        let (a, _) = logins.create("o", t0);
        let (b, _) = logins.create("o", t0 + Duration::from_secs(1));
        let (c, _) = logins.create("o", t0 + Duration::from_secs(2));
        assert!(logins.check(&a, t0 + Duration::from_secs(3)).is_none(), "the stalest made room");
        assert!(logins.check(&b, t0 + Duration::from_secs(3)).is_some());
        assert!(logins.check(&c, t0 + Duration::from_secs(3)).is_some());
    }

    #[test]
    fn the_cookie_is_found_among_others_and_set_strictly() {
        let mut h = hyper::HeaderMap::new();
        h.append(hyper::header::COOKIE, "a=1; ringway_login=xyz; b=2".parse().unwrap());
        assert_eq!(cookie_of(&h), Some("xyz"));
        assert_eq!(cookie_of(&hyper::HeaderMap::new()), None);
        let set = set_cookie("xyz", true);
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.ends_with("; Secure"));
        assert!(!set_cookie("xyz", false).contains("Secure"));
    }
}
