//! Who gets in, and how fast: each source address's share of the connections in their
//! handshake phase, and the gate that spaces out credential checks from an address that keeps
//! failing them. Both are keyed by IP address and bounded in size.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Failed logins from one address in a window before its checks are spaced out.
const FREE_FAILURES: u32 = 5;
const WINDOW: Duration = Duration::from_secs(60);
/// Credential checks one address may have waiting for their turn; more are refused at once.
const MAX_QUEUED_CHECKS: u32 = 8;
/// Addresses remembered before stale ones are swept out.
const SWEEP_ABOVE: usize = 100_000;

/// How long a credential check from an address must wait, if it may run at all.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    Now,
    After(Duration),
    /// Too many checks queued from this address: answer 429 without checking.
    Refused,
}

/// Failed logins from one address.
struct Failures {
    count: u32,
    window_start: Instant,
    /// When the next penalised check may run; checks run one per `delay` after this.
    next_slot: Instant,
}

pub struct Admission {
    per_address: usize,
    delay: Duration,
    /// Connections each address has in their handshake phase.
    handshakes: Mutex<HashMap<IpAddr, usize>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

/// One address's hold on a handshake slot; released on drop.
pub struct AddressSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = lock(&self.admission.handshakes);
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Admission {
    /// `per_address`: handshake slots one address may hold; `delay`: the spacing of credential
    /// checks from an address past its free failures.
    pub fn new(per_address: usize, delay: Duration) -> Arc<Admission> {
        Arc::new(Admission { per_address, delay, handshakes: Mutex::default(), failures: Mutex::default() })
    }

    /// A handshake slot for `ip`. While the relay is `crowded` (half its handshake slots or more
    /// in use), an address that holds its share already gets none; otherwise any address may
    /// take more, so one agent dialing back a burst of connections on a quiet relay is not
    /// refused. Either way a flood from one address leaves at least half the slots to others.
    pub fn handshake(self: &Arc<Self>, ip: IpAddr, crowded: bool) -> Option<AddressSlot> {
        let mut held = lock(&self.handshakes);
        let n = held.entry(ip).or_insert(0);
        if crowded && *n >= self.per_address {
            return None;
        }
        *n += 1;
        Some(AddressSlot { admission: self.clone(), ip })
    }

    /// When a credential check from `ip` may run. Past `FREE_FAILURES` failures in a minute,
    /// checks from that address run one per `delay`, however many arrive at once, and at most
    /// `MAX_QUEUED_CHECKS` wait: guessing in parallel is no faster than guessing in turn.
    pub fn login_turn(&self, ip: IpAddr, now: Instant) -> Turn {
        let mut all = lock(&self.failures);
        let Some(f) = all.get_mut(&ip) else { return Turn::Now };
        if now.duration_since(f.window_start) >= WINDOW && f.next_slot <= now {
            all.remove(&ip);
            return Turn::Now;
        }
        if f.count < FREE_FAILURES {
            return Turn::Now;
        }
        let slot = f.next_slot.max(now) + self.delay;
        if slot.duration_since(now) > self.delay * MAX_QUEUED_CHECKS {
            return Turn::Refused;
        }
        f.next_slot = slot;
        Turn::After(slot.duration_since(now))
    }

    /// Records a failed credential check from `ip`.
    pub fn login_failed(&self, ip: IpAddr, now: Instant) {
        let mut all = lock(&self.failures);
        if all.len() > SWEEP_ABOVE {
            all.retain(|_, f| now.duration_since(f.window_start) < WINDOW || f.next_slot > now);
        }
        let f = all.entry(ip).or_insert(Failures { count: 0, window_start: now, next_slot: now });
        if now.duration_since(f.window_start) >= WINDOW {
            f.count = 0;
            f.window_start = now;
        }
        f.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn one_address_gets_only_its_share_of_handshake_slots_on_a_crowded_relay() {
        let a = Admission::new(2, Duration::from_millis(100));
        let first = a.handshake(IP, true).unwrap();
        let _second = a.handshake(IP, true).unwrap();
        assert!(a.handshake(IP, true).is_none(), "past its share while the relay is crowded");
        assert!(a.handshake(IP, false).is_some(), "a quiet relay lets it take more");
        assert!(a.handshake(OTHER, true).is_some(), "another address is not affected");
        drop(first);
        assert!(a.handshake(IP, true).is_some(), "a released slot can be taken again");
    }

    #[test]
    fn checks_past_the_free_failures_run_one_per_delay_and_a_long_queue_is_refused() {
        let delay = Duration::from_millis(100);
        let a = Admission::new(8, delay);
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(a.login_turn(IP, t0), Turn::Now);
            a.login_failed(IP, t0);
        }
        // Many at once: each waits one more delay than the last, up to the queue bound.
        for k in 1..=MAX_QUEUED_CHECKS {
            assert_eq!(a.login_turn(IP, t0), Turn::After(delay * k));
        }
        assert_eq!(a.login_turn(IP, t0), Turn::Refused);
        assert_eq!(a.login_turn(OTHER, t0), Turn::Now, "another address is not affected");
        // After the window, and once the queue has run, the address starts afresh.
        let later = t0 + WINDOW + delay * (MAX_QUEUED_CHECKS + 1);
        assert_eq!(a.login_turn(IP, later), Turn::Now);
    }
}
