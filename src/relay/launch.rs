//! One-time launch codes: a session's start answer also carries a short code that stands for
//! that answer (its client URL and token) for [`LAUNCH_CODE_SECS`] and a single use, so an
//! operator can read it out to a field technician instead of handing over an operator token.
//!
//! A code is 10 characters from Crockford's base32 alphabet (no I, L, O, U; 50 random bits),
//! shown as `XXXXX-XXXXX`. Redeeming ignores case, dashes and spaces and reads O as 0 and I, L
//! as 1, as read out over a phone. Only a code's SHA-256 is kept. Codes live with the node that
//! issued them, at most one per session and never more than the relay's session limit; the API
//! refuses a code whose session has ended.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::proto::{SessionStarted, LAUNCH_CODE_SECS};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const LEN: usize = 10;

struct Pending {
    /// The start answer the code stands for (without its code).
    started: SessionStarted,
    operator: String,
    until: Instant,
}

/// The codes waiting to be redeemed, by hash.
pub struct LaunchCodes {
    pending: Mutex<HashMap<[u8; 32], Pending>>,
    max: usize,
}

/// What a redeemed code gives: the session's start answer, and whose session it is.
pub struct Redeemed {
    pub started: SessionStarted,
    pub operator: String,
}

impl LaunchCodes {
    /// At most `max` codes wait at once (the relay's session limit).
    pub fn new(max: usize) -> LaunchCodes {
        LaunchCodes { pending: Mutex::new(HashMap::new()), max: max.max(1) }
    }

    /// Mints a code for `started` (a session `operator` just started); returns it as shown.
    pub fn issue(&self, started: &SessionStarted, operator: &str, now: Instant) -> String {
        let raw: String = (0..LEN).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, p| p.until > now);
        if pending.len() >= self.max {
            // Full of live codes: the one closest to expiry makes room.
            if let Some(oldest) = pending.iter().min_by_key(|(_, p)| p.until).map(|(k, _)| *k) {
                pending.remove(&oldest);
            }
        }
        let started = SessionStarted { launch_code: None, ..started.clone() };
        let until = now + Duration::from_secs(LAUNCH_CODE_SECS);
        pending.insert(digest(&raw), Pending { started, operator: operator.to_string(), until });
        format!("{}-{}", &raw[..LEN / 2], &raw[LEN / 2..])
    }

    /// Takes the code's answer if the code is known and not expired; it is gone afterwards
    /// (a second use fails like a wrong code).
    pub fn redeem(&self, code: &str, now: Instant) -> Option<Redeemed> {
        let normal = normalize(code)?;
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let p = pending.remove(&digest(&normal))?;
        (p.until > now).then_some(Redeemed { started: p.started, operator: p.operator })
    }
}

/// A code as typed or read out, in its canonical form; `None` if it cannot be one.
fn normalize(code: &str) -> Option<String> {
    let mut out = String::with_capacity(LEN);
    for c in code.chars() {
        let c = match c.to_ascii_uppercase() {
            '-' | ' ' => continue,
            'O' => '0',
            'I' | 'L' => '1',
            c => c,
        };
        if !ALPHABET.contains(&(c as u8)) || !c.is_ascii() || out.len() == LEN {
            return None;
        }
        out.push(c);
    }
    (out.len() == LEN).then_some(out)
}

fn digest(code: &str) -> [u8; 32] {
    Sha256::digest(code.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(id: &str) -> SessionStarted {
        SessionStarted {
            id: id.into(),
            client_url: "ws://r/x".into(),
            client_token: "secret".into(),
            expires_at: 1,
            launch_code: None,
        }
    }

    #[test]
    fn a_code_is_good_once_within_its_time_and_forgiving_as_read_out() {
        let codes = LaunchCodes::new(10);
        let t0 = Instant::now();
        let code = codes.issue(&started("a"), "alice", t0);
        assert_eq!(code.len(), LEN + 1);
        assert!(code.chars().all(|c| c == '-' || ALPHABET.contains(&(c as u8))));
        // Read out over a phone: lower case, no dash, O for 0 and l for 1.
        let spoken = code.replace('-', " ").to_lowercase().replace('0', "o").replace('1', "l");
        let r = codes.redeem(&spoken, t0 + Duration::from_secs(5)).expect("redeemed");
        assert_eq!(
            (r.started.id.as_str(), r.operator.as_str(), r.started.client_token.as_str()),
            ("a", "alice", "secret")
        );
        assert!(codes.redeem(&code, t0 + Duration::from_secs(6)).is_none(), "a second use fails");

        let late = codes.issue(&started("b"), "alice", t0);
        assert!(codes.redeem(&late, t0 + Duration::from_secs(LAUNCH_CODE_SECS)).is_none(), "expired");
        assert!(codes.redeem("AAAAA-AAAAA", t0).is_none());
        assert!(codes.redeem("", t0).is_none());
        assert!(codes.redeem("UUUUU-UUUUU", t0).is_none(), "not in the alphabet");
        assert!(codes.redeem(&"A".repeat(5000), t0).is_none());
    }

    #[test]
    fn codes_are_bounded() {
        let codes = LaunchCodes::new(2);
        let t0 = Instant::now();
        let first = codes.issue(&started("a"), "o", t0);
        let second = codes.issue(&started("b"), "o", t0 + Duration::from_secs(1));
        let third = codes.issue(&started("c"), "o", t0 + Duration::from_secs(2));
        assert!(codes.redeem(&first, t0).is_none(), "the oldest made room");
        assert!(codes.redeem(&second, t0).is_some());
        assert!(codes.redeem(&third, t0).is_some());
    }
}
