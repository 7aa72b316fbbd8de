//! [`MemoryStore`]: the store in a map, for the demo and logic tests. Not durable.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::B256;

use super::settlement::{InFlight, QueuedClaim, SettlementStore, SkippedClaim};
use super::{
    ChannelStore, Fence, LeaseStatus, PendingClaim, Resumed, SessionRecord, SessionWrite,
    StoreError, StoredChannel, StoredVoucher,
};
use crate::meter::Exact;

/// A channel's lease and session record.
#[derive(Debug, Default)]
struct Tenancy {
    /// The last fence issued.
    fence: u64,
    /// The holder, its fence, and when the lease expires.
    lease: Option<(String, u64, Instant)>,
    /// The session record, whether a resume elsewhere wants it, and when it expires.
    session: Option<(SessionRecord, bool, Instant)>,
}

impl Tenancy {
    fn lease(&self) -> Option<&(String, u64, Instant)> {
        self.lease.as_ref().filter(|l| l.2 > Instant::now())
    }

    fn session(&mut self) -> Option<&mut (SessionRecord, bool, Instant)> {
        self.session.as_mut().filter(|s| s.2 > Instant::now())
    }
}

/// The settler's records.
#[derive(Debug, Default)]
struct Settlement {
    skipped: BTreeMap<B256, SkippedClaim>,
    in_flight: BTreeMap<u64, InFlight>,
    cursor: Option<u64>,
    withdrawals: BTreeMap<B256, u64>,
    closes: BTreeMap<B256, PendingClaim>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Channel states in memory. Clones share the same state (as clients of one Redis do).
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    inner: std::sync::Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    channels: Mutex<HashMap<B256, StoredChannel>>,
    tenancy: Mutex<HashMap<B256, Tenancy>>,
    claims: Mutex<BTreeMap<B256, QueuedClaim>>,
    settlement: Mutex<Settlement>,
    /// When false every operation fails as `Unavailable` (to exercise outage handling).
    down: AtomicBool,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every operation fail (`true`) or work again (`false`).
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    fn up(&self) -> Result<(), StoreError> {
        if self.inner.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store switched off".into()));
        }
        Ok(())
    }

    /// Up, and the write's fence is the channel's (as the Redis scripts check it; the check
    /// and the write are not one step here: the memory store serves one process).
    fn fenced(&self, channel_id: B256, fence: Fence) -> Result<(), StoreError> {
        self.up()?;
        if fence == Fence::NONE {
            return Ok(());
        }
        let current = lock(&self.inner.tenancy)
            .get(&channel_id)
            .map_or(0, |t| t.fence);
        if current != fence.0 {
            return Err(StoreError::Fenced {
                fence,
                current: Fence(current),
            });
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ChannelStore for MemoryStore {
    async fn save_voucher(
        &self,
        channel_id: B256,
        voucher: StoredVoucher,
        fence: Fence,
    ) -> Result<(), StoreError> {
        self.fenced(channel_id, fence)?;
        let mut channels = lock(&self.inner.channels);
        match channels.get_mut(&channel_id) {
            Some(stored) if stored.voucher.nonce >= voucher.nonce => Err(StoreError::StaleNonce {
                got: voucher.nonce,
                stored: stored.voucher.nonce,
            }),
            Some(stored) if stored.voucher.cumulative > voucher.cumulative => {
                Err(StoreError::CumulativeDecreased {
                    got: voucher.cumulative,
                    stored: stored.voucher.cumulative,
                })
            }
            Some(stored) => {
                stored.voucher = voucher;
                Ok(())
            }
            None => {
                channels.insert(
                    channel_id,
                    StoredChannel {
                        voucher,
                        consumed: Exact::ZERO,
                        closing: None,
                    },
                );
                Ok(())
            }
        }
    }

    async fn load(&self, channel_id: B256) -> Result<Option<StoredChannel>, StoreError> {
        self.up()?;
        Ok(lock(&self.inner.channels).get(&channel_id).copied())
    }

    async fn save_consumed(
        &self,
        channel_id: B256,
        consumed: Exact,
        fence: Fence,
    ) -> Result<(), StoreError> {
        self.fenced(channel_id, fence)?;
        if let Some(stored) = lock(&self.inner.channels).get_mut(&channel_id) {
            // As the Redis script: by the rounded-up value, then exactly under one denominator.
            let (old, new) = (stored.consumed.ceil(), consumed.ceil());
            if new > old
                || (new == old
                    && stored.consumed.denominator == consumed.denominator
                    && consumed.numerator > stored.consumed.numerator)
            {
                stored.consumed = consumed;
            }
        }
        Ok(())
    }

    async fn mark_closing(
        &self,
        channel_id: B256,
        amount: u128,
        fence: Fence,
    ) -> Result<(), StoreError> {
        self.fenced(channel_id, fence)?;
        match lock(&self.inner.channels).get_mut(&channel_id) {
            Some(stored) => {
                stored.closing.get_or_insert(amount);
                Ok(())
            }
            None => Err(StoreError::Corrupt {
                key: channel_id.to_string(),
                reason: "no channel record to mark closing".into(),
            }),
        }
    }

    async fn queue_claim(&self, claim: PendingClaim, fence: Fence) -> Result<(), StoreError> {
        self.fenced(claim.channel_id, fence)?;
        let mut claims = lock(&self.inner.claims);
        let entry = claims.entry(claim.channel_id).or_insert(QueuedClaim {
            claim,
            since: unix_now(),
        });
        if claim.amount > entry.claim.amount {
            entry.claim = claim;
        }
        Ok(())
    }

    async fn pending_claims(&self, limit: usize) -> Result<Vec<PendingClaim>, StoreError> {
        self.up()?;
        Ok(lock(&self.inner.claims)
            .values()
            .take(limit)
            .map(|q| q.claim)
            .collect())
    }

    async fn take_lease(
        &self,
        channel_id: B256,
        holder: &str,
        ttl: Duration,
    ) -> Result<(Fence, Option<StoredChannel>), StoreError> {
        self.up()?;
        let mut tenancy = lock(&self.inner.tenancy);
        let t = tenancy.entry(channel_id).or_default();
        if t.lease().is_some_and(|(h, _, _)| h != holder) {
            return Err(StoreError::LeaseHeld);
        }
        t.fence += 1;
        t.lease = Some((holder.to_string(), t.fence, Instant::now() + ttl));
        let fence = Fence(t.fence);
        drop(tenancy);
        Ok((fence, lock(&self.inner.channels).get(&channel_id).copied()))
    }

    async fn renew_lease(
        &self,
        channel_id: B256,
        holder: &str,
        fence: Fence,
        ttl: Duration,
        session_ttl: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        self.up()?;
        let mut tenancy = lock(&self.inner.tenancy);
        let Some(t) = tenancy.get_mut(&channel_id) else {
            return Ok(LeaseStatus::Lost);
        };
        let mine = match t.lease() {
            Some((h, f, _)) => h == holder && *f == fence.0,
            None => t.fence == fence.0,
        };
        if !mine {
            return Ok(LeaseStatus::Lost);
        }
        t.lease = Some((holder.to_string(), fence.0, Instant::now() + ttl));
        let wanted = match t.session() {
            Some(session) => {
                session.2 = Instant::now() + session_ttl;
                session.1
            }
            None => false,
        };
        Ok(if wanted {
            LeaseStatus::Wanted
        } else {
            LeaseStatus::Held
        })
    }

    async fn release_lease(
        &self,
        channel_id: B256,
        holder: &str,
        fence: Fence,
    ) -> Result<(), StoreError> {
        self.up()?;
        if let Some(t) = lock(&self.inner.tenancy).get_mut(&channel_id)
            && t.lease()
                .is_some_and(|(h, f, _)| h == holder && *f == fence.0)
        {
            t.lease = None;
        }
        Ok(())
    }

    async fn put_session(
        &self,
        channel_id: B256,
        record: &SessionRecord,
        write: SessionWrite,
        fence: Fence,
        session_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.fenced(channel_id, fence)?;
        let mut tenancy = lock(&self.inner.tenancy);
        let t = tenancy.entry(channel_id).or_default();
        let expires = Instant::now() + session_ttl;
        let ours = t.session().is_some_and(|s| s.0.sid == record.sid);
        match write {
            SessionWrite::Fresh => t.session = Some((record.clone(), false, expires)),
            SessionWrite::End if ours => t.session = None,
            SessionWrite::Progress if ours => {
                let session = t.session().expect("checked");
                session.0.next_seq = record.next_seq;
                session.0.request = record.request;
                session.0.holder = record.holder.clone();
                session.0.parked = record.parked;
                session.2 = expires;
            }
            SessionWrite::End | SessionWrite::Progress => {}
        }
        Ok(())
    }

    async fn resume_session(
        &self,
        channel_id: B256,
        sid: &str,
        jti: &str,
        new_jti: &str,
        holder: &str,
        ttl: Duration,
        session_ttl: Duration,
    ) -> Result<Resumed, StoreError> {
        self.up()?;
        let mut tenancy = lock(&self.inner.tenancy);
        let Some(t) = tenancy.get_mut(&channel_id) else {
            return Ok(Resumed::Unknown);
        };
        let held_by_other = t.lease().is_some_and(|(h, _, _)| h != holder);
        let Some(session) = t.session() else {
            return Ok(Resumed::Unknown);
        };
        if session.0.sid != sid {
            return Ok(Resumed::Unknown);
        }
        if session.0.jti != jti {
            return Ok(Resumed::Used);
        }
        if held_by_other {
            session.1 = true;
            return Ok(Resumed::Busy);
        }
        let record = session.0.clone();
        session.0.jti = new_jti.to_string();
        session.0.holder = holder.to_string();
        session.1 = false;
        session.2 = Instant::now() + session_ttl;
        t.fence += 1;
        t.lease = Some((holder.to_string(), t.fence, Instant::now() + ttl));
        let fence = Fence(t.fence);
        drop(tenancy);
        Ok(Resumed::Taken {
            record: SessionRecord {
                jti: new_jti.to_string(),
                ..record
            },
            fence,
            stored: Box::new(lock(&self.inner.channels).get(&channel_id).copied()),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.up()
    }
}

impl MemoryStore {
    /// Removes the claim queued for `channel` if it is for at most `amount`; a larger one stays,
    /// its age counted from now (as in Redis).
    fn settle_claim(&self, channel: B256, amount: u128) {
        let mut claims = lock(&self.inner.claims);
        match claims.get_mut(&channel) {
            Some(q) if q.claim.amount <= amount => {
                claims.remove(&channel);
            }
            Some(q) => q.since = unix_now(),
            None => {}
        }
    }
}

impl SettlementStore for MemoryStore {
    async fn queued_claims(&self, limit: usize) -> Result<Vec<QueuedClaim>, StoreError> {
        self.up()?;
        Ok(lock(&self.inner.claims)
            .values()
            .take(limit)
            .copied()
            .collect())
    }

    async fn queued_claims_of(&self, channels: &[B256]) -> Result<Vec<QueuedClaim>, StoreError> {
        self.up()?;
        let claims = lock(&self.inner.claims);
        Ok(channels
            .iter()
            .filter_map(|c| claims.get(c).copied())
            .collect())
    }

    async fn claims_settled(&self, settled: &[(B256, u128)]) -> Result<(), StoreError> {
        self.up()?;
        for (channel, amount) in settled {
            self.settle_claim(*channel, *amount);
        }
        Ok(())
    }

    async fn claim_skipped(&self, skipped: SkippedClaim) -> Result<(), StoreError> {
        self.up()?;
        self.settle_claim(skipped.channel_id, skipped.amount);
        lock(&self.inner.settlement)
            .skipped
            .insert(skipped.channel_id, skipped);
        Ok(())
    }

    async fn skipped_claims(&self) -> Result<Vec<SkippedClaim>, StoreError> {
        self.up()?;
        Ok(lock(&self.inner.settlement)
            .skipped
            .values()
            .cloned()
            .collect())
    }

    async fn in_flight(&self) -> Result<Vec<InFlight>, StoreError> {
        self.up()?;
        Ok(lock(&self.inner.settlement)
            .in_flight
            .values()
            .cloned()
            .collect())
    }

    async fn save_in_flight(&self, tx: &InFlight) -> Result<(), StoreError> {
        self.up()?;
        lock(&self.inner.settlement)
            .in_flight
            .insert(tx.nonce, tx.clone());
        Ok(())
    }

    async fn remove_in_flight(&self, nonce: u64) -> Result<(), StoreError> {
        self.up()?;
        lock(&self.inner.settlement).in_flight.remove(&nonce);
        Ok(())
    }

    async fn watch_cursor(&self) -> Result<Option<u64>, StoreError> {
        self.up()?;
        Ok(lock(&self.inner.settlement).cursor)
    }

    async fn set_watch_cursor(&self, block: u64) -> Result<(), StoreError> {
        self.up()?;
        lock(&self.inner.settlement).cursor = Some(block);
        Ok(())
    }

    async fn withdrawals(&self) -> Result<Vec<(B256, u64)>, StoreError> {
        self.up()?;
        Ok(lock(&self.inner.settlement)
            .withdrawals
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect())
    }

    async fn add_withdrawal(&self, channel_id: B256, withdraw_at: u64) -> Result<(), StoreError> {
        self.up()?;
        lock(&self.inner.settlement)
            .withdrawals
            .insert(channel_id, withdraw_at);
        Ok(())
    }

    async fn remove_withdrawal(&self, channel_id: B256) -> Result<(), StoreError> {
        self.up()?;
        lock(&self.inner.settlement).withdrawals.remove(&channel_id);
        Ok(())
    }

    async fn queue_close(&self, claim: PendingClaim) -> Result<(), StoreError> {
        self.up()?;
        lock(&self.inner.settlement)
            .closes
            .insert(claim.channel_id, claim);
        Ok(())
    }

    async fn closes(&self) -> Result<Vec<PendingClaim>, StoreError> {
        self.up()?;
        Ok(lock(&self.inner.settlement)
            .closes
            .values()
            .copied()
            .collect())
    }

    async fn remove_close(&self, channel_id: B256) -> Result<(), StoreError> {
        self.up()?;
        lock(&self.inner.settlement).closes.remove(&channel_id);
        Ok(())
    }
}
