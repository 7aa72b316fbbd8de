//! The leases this process holds on its sessions' channels (DESIGN.md section 6, docs/STORE.md
//! "Leases and fencing"), and the keeper that renews them.
//!
//! A connection takes its channel's lease in the store and hands it to the keeper, which renews
//! every lease of the process together every third of the lease's life (their calls pipelined
//! on the store's connection), apart from the connections: a connection blocked on a slow
//! client's socket cannot let its lease lapse, and an idle session costs no timer of its own.
//! The keeper tells a connection when its lease was lost (another process took the channel),
//! when a resume on another process wants the session, and when a lapsed lease was renewed.
//!
//! The store expires a lease `ttl` after it received the call that took or renewed it. The
//! keeper counts `ttl` from when it *sent* that call (earlier), less a tenth of it for the two
//! clocks' rates: the lease's deadline here always passes before the store could give the
//! channel to another process, and a connection delivers nothing past it. So two processes
//! never deliver on one channel at once, even when this one cannot reach the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::primitives::B256;
use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::debug;

use super::inbox::Inbox;
use crate::meter::Nanos;
use crate::store::{ChannelStore, Fence, LeaseStatus};

/// Renewals in flight at once (the store bounds its calls too).
const RENEWALS_AT_ONCE: usize = 16;

/// What the keeper tells the connection holding a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseNews {
    /// Held (sent again when a renewal lands after the deadline had passed).
    Held,
    /// A resume on another process wants the session: let it go.
    Wanted,
    /// Another process holds the channel now: stop at once.
    Lost,
}

impl LeaseNews {
    fn code(self) -> u8 {
        match self {
            LeaseNews::Held => 1,
            LeaseNews::Wanted => 2,
            LeaseNews::Lost => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(LeaseNews::Held),
            2 => Some(LeaseNews::Wanted),
            3 => Some(LeaseNews::Lost),
            _ => None,
        }
    }
}

/// A lease held for one session.
#[derive(Debug)]
pub(super) struct Held {
    /// The channel.
    pub channel: B256,
    /// The fencing token every money write of the session carries.
    pub fence: Fence,
    /// Nothing is delivered on the channel from this instant (the server's clock) unless the
    /// lease is renewed before.
    deadline: AtomicU64,
    /// The keeper's latest news of this lease not yet taken ([`LeaseNews::code`], 0 for none).
    news: AtomicU8,
    /// Woken when there is news.
    inbox: Arc<Inbox>,
}

impl Held {
    /// Whether this process may deliver on the channel at `now`.
    pub fn valid(&self, now: Nanos) -> bool {
        now < self.deadline()
    }

    /// When delivery stops unless the lease is renewed.
    pub fn deadline(&self) -> Nanos {
        self.deadline.load(Ordering::Acquire)
    }

    /// Takes the keeper's latest news of the lease, if there is any not yet taken.
    pub fn take_news(&self) -> Option<LeaseNews> {
        LeaseNews::from_code(self.news.swap(0, Ordering::AcqRel))
    }

    /// Tells the connection (only the latest news is kept, as the connection acts on it).
    fn tell(&self, news: LeaseNews) {
        self.news.store(news.code(), Ordering::Release);
        self.inbox.wake();
    }
}

/// The timing of a lease of `ttl`.
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseTimes {
    ttl: Nanos,
}

impl LeaseTimes {
    /// For leases of `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl: Nanos::try_from(ttl.as_nanos()).unwrap_or(Nanos::MAX).max(3),
        }
    }

    /// The deadline of a lease taken or renewed by a call sent at `sent`: `ttl` less a tenth.
    pub fn deadline(&self, sent: Nanos) -> Nanos {
        sent.saturating_add(self.ttl - self.ttl / 10)
    }

    /// Time between renewals: a third of the lease, so two renewals in a row can fail before
    /// the deadline.
    pub fn period(&self) -> Duration {
        Duration::from_nanos(self.ttl / 3)
    }

    /// How soon a failed round is tried again: a tenth of the lease.
    pub fn retry(&self) -> Duration {
        Duration::from_nanos((self.ttl / 10).max(1))
    }
}

/// The leases of this process, renewed together.
#[derive(Debug, Default)]
pub(super) struct LeaseKeeper {
    held: Mutex<HashMap<B256, Arc<Held>>>,
}

impl LeaseKeeper {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<B256, Arc<Held>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the lease on `channel` under `fence`, taken by a call sent at `sent`, renewed from
    /// now on; its news wakes `inbox`.
    pub fn hold(
        &self,
        channel: B256,
        fence: Fence,
        sent: Nanos,
        times: LeaseTimes,
        inbox: Arc<Inbox>,
    ) -> Arc<Held> {
        let held = Arc::new(Held {
            channel,
            fence,
            deadline: AtomicU64::new(times.deadline(sent)),
            news: AtomicU8::new(0),
            inbox,
        });
        self.lock().insert(channel, held.clone());
        held
    }

    /// Stops renewing `held` (the session let it go).
    pub fn forget(&self, held: &Arc<Held>) {
        let mut map = self.lock();
        if map.get(&held.channel).is_some_and(|h| Arc::ptr_eq(h, held)) {
            map.remove(&held.channel);
        }
    }

    /// Leases held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Renews every lease once; returns whether every renewal got an answer.
    pub async fn renew_all<S: ChannelStore>(
        &self,
        store: &S,
        holder: &str,
        times: LeaseTimes,
        session_ttl: Duration,
        now: impl Fn() -> Nanos,
    ) -> bool {
        let leases: Vec<Arc<Held>> = self.lock().values().cloned().collect();
        let ttl = Duration::from_nanos(times.ttl);
        let now = &now;
        let results: Vec<bool> = futures_util::stream::iter(leases)
            .map(|held| async move {
                let sent = now();
                let status = store
                    .renew_lease(held.channel, holder, held.fence, ttl, session_ttl)
                    .await;
                match status {
                    Ok(LeaseStatus::Held) => {
                        let before = held.deadline.swap(times.deadline(sent), Ordering::AcqRel);
                        if before <= sent {
                            // It had lapsed: the connection paused delivery, and may go on.
                            held.tell(LeaseNews::Held);
                        }
                        true
                    }
                    Ok(news @ (LeaseStatus::Wanted | LeaseStatus::Lost)) => {
                        self.forget(&held);
                        held.tell(if news == LeaseStatus::Wanted {
                            LeaseNews::Wanted
                        } else {
                            LeaseNews::Lost
                        });
                        true
                    }
                    Err(e) => {
                        debug!(channel = %held.channel, "lease not renewed, retrying: {e}");
                        false
                    }
                }
            })
            .buffer_unordered(RENEWALS_AT_ONCE)
            .collect()
            .await;
        results.into_iter().all(|ok| ok)
    }

    /// Renews the leases every [`LeaseTimes::period`] (sooner after a round with failures)
    /// until `stop` turns true.
    pub async fn run<S: ChannelStore>(
        &self,
        store: &S,
        holder: &str,
        times: LeaseTimes,
        session_ttl: Duration,
        now: impl Fn() -> Nanos,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut wait = times.period();
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            let all = self
                .renew_all(store, holder, times, session_ttl, &now)
                .await;
            wait = if all { times.period() } else { times.retry() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn the_deadline_passes_before_the_store_could_expire_the_lease() {
        let times = LeaseTimes::new(Duration::from_secs(10));
        let keeper = LeaseKeeper::default();
        let held = keeper.hold(B256::ZERO, Fence(1), 5 * S, times, Arc::default());
        // The store counts 10 s from when it received the call (at 5 s or later).
        assert!(held.valid(14 * S - 1));
        assert!(
            !held.valid(14 * S),
            "a tenth of the lease is kept as margin"
        );
        assert_eq!(times.period(), Duration::from_nanos(10 * S / 3));
        assert_eq!(times.retry(), Duration::from_secs(1));
        assert_eq!(keeper.len(), 1);
        keeper.forget(&held);
        assert_eq!(keeper.len(), 0);
    }

    #[tokio::test]
    async fn the_keeper_renews_and_tells_of_lapses_losses_and_wants() {
        use crate::store::memory::MemoryStore;
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(10);
        let times = LeaseTimes::new(ttl);
        let window = Duration::from_secs(300);
        let keeper = LeaseKeeper::default();
        let (a, b) = (B256::repeat_byte(1), B256::repeat_byte(2));
        let (fa, _) = store.take_lease(a, "me", ttl).await.unwrap();
        let (fb, _) = store.take_lease(b, "me", ttl).await.unwrap();
        let held_a = keeper.hold(a, fa, 0, times, Arc::default());
        let held_b = keeper.hold(b, fb, 0, times, Arc::default());
        // Renewed at 5 s: the deadline moves; no news for a lease that had not lapsed.
        assert!(
            keeper
                .renew_all(&store, "me", times, window, || 5 * S)
                .await
        );
        assert_eq!(held_a.deadline(), 14 * S);
        assert_eq!(held_a.take_news(), None);
        // Renewed at 20 s, past the deadline: the connection hears it may go on.
        assert!(
            keeper
                .renew_all(&store, "me", times, window, || 20 * S)
                .await
        );
        assert_eq!(held_a.take_news(), Some(LeaseNews::Held));
        assert_eq!(held_a.take_news(), None, "taken once");
        // Another holder takes b (released here, as if it lapsed): b is lost, and forgotten.
        store.release_lease(b, "me", fb).await.unwrap();
        store.take_lease(b, "other", ttl).await.unwrap();
        assert!(
            keeper
                .renew_all(&store, "me", times, window, || 21 * S)
                .await
        );
        assert_eq!(held_b.take_news(), Some(LeaseNews::Lost));
        assert_eq!(keeper.len(), 1);
        assert!(
            held_b.valid(21 * S),
            "its deadline is the connection's to keep"
        );
        // A store that does not answer: the round reports it, nothing changes.
        store.set_down(true);
        assert!(
            !keeper
                .renew_all(&store, "me", times, window, || 22 * S)
                .await
        );
        assert_eq!(held_a.deadline(), times.deadline(21 * S));
    }

    #[test]
    fn a_newer_lease_on_the_channel_is_not_forgotten_for_an_older_one() {
        let times = LeaseTimes::new(Duration::from_secs(10));
        let keeper = LeaseKeeper::default();
        let old = keeper.hold(B256::ZERO, Fence(1), 0, times, Arc::default());
        let _new = keeper.hold(B256::ZERO, Fence(2), 0, times, Arc::default());
        keeper.forget(&old);
        assert_eq!(keeper.len(), 1);
    }
}
