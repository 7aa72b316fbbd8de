//! A connection's lease on its channel (DESIGN.md section 6, docs/STORE.md "Leases"): the
//! timing of its renewals and the instant after which this process must not deliver on the
//! channel any more, whatever the store says later.
//!
//! The store expires a lease `ttl` after it received the call that took or renewed it. This
//! process counts `ttl` from when it *sent* that call (earlier), less a margin for the two
//! clocks' rates, so its own deadline always passes before the store could give the channel to
//! another process: two processes never deliver on one channel at once, even when this one
//! cannot reach the store.

use std::time::Duration;

use alloy::primitives::B256;

use crate::meter::Nanos;
use crate::store::Fence;

/// A lease held by a connection for its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lease {
    /// The channel.
    pub channel: B256,
    /// The fencing token every money write of the session carries.
    pub fence: Fence,
    /// Delivery on the channel stops at this instant unless the lease is renewed before.
    valid_until: Nanos,
    /// When to renew next.
    renew_at: Nanos,
    /// Delivery is paused because the lease was not renewed in time.
    pub lapsed: bool,
    ttl: Nanos,
}

fn nanos(d: Duration) -> Nanos {
    Nanos::try_from(d.as_nanos()).unwrap_or(Nanos::MAX)
}

impl Lease {
    /// A lease taken (or renewed) by a call sent at `sent`.
    pub fn new(channel: B256, fence: Fence, sent: Nanos, ttl: Duration) -> Self {
        let mut lease = Self {
            channel,
            fence,
            valid_until: 0,
            renew_at: 0,
            lapsed: false,
            ttl: nanos(ttl),
        };
        lease.renewed(sent);
        lease
    }

    /// The margin kept before the store's expiry: a tenth of the lease.
    fn margin(&self) -> Nanos {
        self.ttl / 10
    }

    /// The store renewed the lease on a call sent at `sent`.
    pub fn renewed(&mut self, sent: Nanos) {
        self.valid_until = sent.saturating_add(self.ttl - self.margin());
        // A third of the lease: two renewals in a row can fail before the deadline.
        self.renew_at = sent.saturating_add(self.ttl / 3);
    }

    /// A renewal failed (the store did not answer): try again soon, before the deadline.
    pub fn retry_soon(&mut self, now: Nanos) {
        self.renew_at = now.saturating_add(self.margin().max(1));
    }

    /// Whether this process may deliver on the channel at `now`.
    pub fn valid(&self, now: Nanos) -> bool {
        now < self.valid_until
    }

    /// Whether a renewal is due at `now`.
    pub fn due(&self, now: Nanos) -> bool {
        now >= self.renew_at
    }

    /// When the lease next needs the connection: a renewal, or its deadline.
    pub fn next_wakeup(&self) -> Nanos {
        if self.lapsed {
            self.renew_at
        } else {
            self.renew_at.min(self.valid_until)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn the_deadline_passes_before_the_store_could_expire_the_lease() {
        let ttl = Duration::from_secs(10);
        let lease = Lease::new(B256::ZERO, Fence(1), 5 * S, ttl);
        // The store counts 10 s from when it received the call (at 5 s or later).
        assert!(lease.valid(14 * S - 1));
        assert!(
            !lease.valid(14 * S),
            "a tenth of the lease is kept as margin"
        );
        assert!(!lease.due(5 * S + 3 * S));
        assert!(lease.due(5 * S + 10 * S / 3));
        assert_eq!(lease.next_wakeup(), 5 * S + 10 * S / 3);
    }

    #[test]
    fn a_failed_renewal_is_retried_before_the_deadline() {
        let ttl = Duration::from_secs(10);
        let mut lease = Lease::new(B256::ZERO, Fence(1), 0, ttl);
        lease.retry_soon(4 * S);
        assert_eq!(lease.next_wakeup(), 5 * S);
        lease.renewed(5 * S);
        assert!(lease.valid(13 * S));
    }
}
