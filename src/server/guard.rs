//! What an address may cost before it is anyone's session (issue 9, items 7 and 10): how many
//! WebSocket connections it may hold before one of them opens a session, and how many `open`s
//! from it may fail in a minute (each costs a chain read or a signature check). The limits
//! themselves are in [`super::Limits`].
//!
//! An address is the client's as the server sees it ([`client_key`]): the TCP peer, or, behind a
//! trusted proxy that says so in a header (`client_ip_header`), the address the proxy appended;
//! IPv6 addresses count by their /64, which one host usually holds whole.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The window of the failed-open budget.
const FAILED_OPEN_WINDOW: Duration = Duration::from_secs(60);
/// Above this many tracked addresses, forgotten ones are swept out on the next update.
const SWEEP_ABOVE: usize = 10_000;

#[derive(Debug)]
struct PerIp {
    /// Connections from the address that have not opened a session.
    unauthenticated: usize,
    /// Failed opens since `window_start`.
    failed: u32,
    window_start: Instant,
}

impl PerIp {
    fn forgettable(&self) -> bool {
        self.unauthenticated == 0
            && (self.failed == 0 || self.window_start.elapsed() >= FAILED_OPEN_WINDOW)
    }
}

/// The address a client is counted under: `ip`, or for IPv6 its /64 prefix.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

/// The client's address from a proxy header such as `X-Forwarded-For`: the last entry, the one
/// the trusted proxy appended (earlier entries are the client's own claims).
pub fn forwarded_ip(value: &str) -> Option<IpAddr> {
    value.rsplit(',').next()?.trim().parse().ok()
}

/// Per-address counts, shared by the connections.
#[derive(Debug, Default)]
pub struct Guards {
    by_ip: Mutex<HashMap<IpAddr, PerIp>>,
}

/// A connection counted against its address until it opens a session (or ends).
#[derive(Debug)]
pub struct Unauthenticated {
    guards: Arc<Guards>,
    ip: IpAddr,
    released: AtomicBool,
}

impl Unauthenticated {
    /// The connection's address.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The connection opened a session (or ended): it no longer counts.
    pub fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut by_ip = self.guards.lock();
        if let Some(entry) = by_ip.get_mut(&self.ip) {
            entry.unauthenticated = entry.unauthenticated.saturating_sub(1);
            if entry.forgettable() {
                by_ip.remove(&self.ip);
            }
        }
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.release();
    }
}

impl Guards {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PerIp>> {
        self.by_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection from `ip`, or refuses it when the address already holds `max`
    /// connections that have not opened a session.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Unauthenticated> {
        let mut by_ip = self.lock();
        if by_ip.len() > SWEEP_ABOVE {
            by_ip.retain(|_, e| !e.forgettable());
        }
        let entry = by_ip.entry(ip).or_insert(PerIp {
            unauthenticated: 0,
            failed: 0,
            window_start: Instant::now(),
        });
        if entry.unauthenticated >= max {
            return None;
        }
        entry.unauthenticated += 1;
        Some(Unauthenticated {
            guards: self.clone(),
            ip,
            released: AtomicBool::new(false),
        })
    }

    /// Whether `ip` may try another `open`: fewer than `max` of its opens failed this minute.
    pub fn may_open(&self, ip: IpAddr, max: u32) -> bool {
        self.lock()
            .get(&ip)
            .is_none_or(|e| e.window_start.elapsed() >= FAILED_OPEN_WINDOW || e.failed < max)
    }

    /// An `open` from `ip` failed after its signature was checked.
    pub fn failed_open(&self, ip: IpAddr) {
        let mut by_ip = self.lock();
        let entry = by_ip.entry(ip).or_insert(PerIp {
            unauthenticated: 0,
            failed: 0,
            window_start: Instant::now(),
        });
        if entry.window_start.elapsed() >= FAILED_OPEN_WINDOW {
            entry.window_start = Instant::now();
            entry.failed = 0;
        }
        entry.failed = entry.failed.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_unauthenticated_connections_and_failed_opens() {
        let guards = Arc::new(Guards::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(client_key(ip), ip);
        assert_eq!(
            client_key("2001:db8::1".parse().unwrap()),
            client_key("2001:db8::ffff:1".parse().unwrap()),
            "one /64"
        );
        assert_eq!(
            forwarded_ip("203.0.113.9, 10.0.0.7"),
            Some("10.0.0.7".parse().unwrap())
        );
        assert_eq!(forwarded_ip("junk"), None);
        let a = guards.admit(ip, 2).unwrap();
        let b = guards.admit(ip, 2).unwrap();
        assert!(guards.admit(ip, 2).is_none(), "a third is refused");
        assert!(guards.admit("10.0.0.2".parse().unwrap(), 2).is_some());
        a.release();
        a.release();
        let _c = guards.admit(ip, 2).expect("released twice counts once");
        drop(b);
        assert!(guards.may_open(ip, 2));
        guards.failed_open(ip);
        guards.failed_open(ip);
        assert!(!guards.may_open(ip, 2));
        assert!(guards.may_open("10.0.0.3".parse().unwrap(), 2));
    }
}
