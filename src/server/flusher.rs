//! Writes that must land (issue 9, item 6). A session's consumption and claim are written when
//! it is suspended or ends; when the store refuses such a write (an outage), it is not only
//! logged: it is kept here, per channel, and retried with backoff until the store takes it. A
//! new session on the channel starts from at least the consumption kept here, so credit that
//! was metered once is never metered again.
//!
//! Each write keeps the fencing token it was made under: once another process has taken the
//! channel over, the store refuses it ([`StoreError::Fenced`]) and it is dropped (the new
//! holder went on from what the store had: the difference is the client's, within the bound
//! docs/STORE.md states).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use alloy::primitives::B256;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::meter::Exact;
use crate::store::{ChannelStore, Fence, PendingClaim, StoreError};

/// First retry after 100 ms, doubling up to 10 s: quick through a blip, gentle on a store
/// that is down.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Default)]
struct Pending {
    consumed: Option<(Exact, Fence)>,
    claim: Option<(PendingClaim, Fence)>,
}

/// The writes waiting for the store, by channel (one entry per channel: later writes for the
/// same channel are merged into it, the larger value kept, as the store itself would).
#[derive(Debug, Default)]
pub struct Flusher {
    pending: Mutex<HashMap<B256, Pending>>,
    wake: Notify,
}

impl Flusher {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<B256, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a consumption the store refused, to retry under `fence`.
    pub fn defer_consumed(&self, channel: B256, consumed: Exact, fence: Fence) {
        let mut pending = self.lock();
        let entry = pending.entry(channel).or_default();
        entry.consumed = Some(match entry.consumed {
            Some((c, f)) => (c.max(consumed), f.max(fence)),
            None => (consumed, fence),
        });
        drop(pending);
        self.wake.notify_one();
    }

    /// Keeps a claim the store refused, to retry under `fence`.
    pub fn defer_claim(&self, claim: PendingClaim, fence: Fence) {
        let mut pending = self.lock();
        let entry = pending.entry(claim.channel_id).or_default();
        // The larger claim, under the newer fence: a claim of a later session of this process
        // on the channel must not be dropped because an older one's fence went stale.
        entry.claim = Some(match entry.claim {
            Some((c, f)) if c.amount >= claim.amount => (c, f.max(fence)),
            Some((_, f)) => (claim, f.max(fence)),
            None => (claim, fence),
        });
        drop(pending);
        self.wake.notify_one();
    }

    /// The consumption of `channel` the store does not have yet, if any.
    pub fn consumed(&self, channel: B256) -> Option<Exact> {
        self.lock()
            .get(&channel)
            .and_then(|p| p.consumed)
            .map(|(c, _)| c)
    }

    /// Channels with writes waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tries every waiting write once; returns whether all landed.
    pub async fn flush<S: ChannelStore>(&self, store: &S) -> bool {
        let batch: Vec<(B256, Pending)> = self.lock().iter().map(|(k, v)| (*k, *v)).collect();
        let mut all = true;
        for (channel, write) in batch {
            // Landed, or refused for good (fenced): either way it leaves the queue.
            let done = |r: Result<(), StoreError>| match r {
                Ok(()) => true,
                Err(e @ StoreError::Fenced { .. }) => {
                    warn!(%channel, "a deferred write is dropped: {e}");
                    true
                }
                Err(_) => false,
            };
            let consumed_ok = match write.consumed {
                Some((c, fence)) => done(store.save_consumed(channel, c, fence).await),
                None => true,
            };
            let claim_ok = match write.claim {
                Some((c, fence)) => done(store.queue_claim(c, fence).await),
                None => true,
            };
            let mut pending = self.lock();
            if let Some(entry) = pending.get_mut(&channel) {
                // Clear what landed, unless a larger value was deferred meanwhile.
                if consumed_ok && entry.consumed == write.consumed {
                    entry.consumed = None;
                }
                if claim_ok && entry.claim == write.claim {
                    entry.claim = None;
                }
                if entry.consumed.is_none() && entry.claim.is_none() {
                    pending.remove(&channel);
                }
            }
            all &= consumed_ok && claim_ok;
        }
        all
    }

    /// Retries the waiting writes with backoff until `stop` turns true, then tries once more.
    pub async fn run<S: ChannelStore>(&self, store: &S, mut stop: watch::Receiver<bool>) {
        let mut delay = FIRST_RETRY;
        loop {
            if self.is_empty() {
                delay = FIRST_RETRY;
                tokio::select! {
                    () = self.wake.notified() => {}
                    _ = stop.changed() => break,
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.changed() => break,
            }
            if self.flush(store).await {
                info!("deferred writes stored");
                delay = FIRST_RETRY;
            } else {
                delay = (delay * 2).min(MAX_RETRY);
            }
        }
        if !self.flush(store).await {
            warn!(
                channels = self.len(),
                "shutting down with consumption or claims the store did not take"
            );
        }
    }
}
