//! [`MemoryStore`]: the store in a map, for the demo and logic tests. Not durable.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use alloy::primitives::B256;

use super::{ChannelStore, PendingClaim, StoreError, StoredChannel, StoredVoucher};
use crate::meter::Exact;

/// Channel states in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    channels: Mutex<HashMap<B256, StoredChannel>>,
    claims: Mutex<BTreeMap<B256, PendingClaim>>,
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
        self.down.store(down, Ordering::SeqCst);
    }

    fn up(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store switched off".into()));
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
    ) -> Result<(), StoreError> {
        self.up()?;
        let mut channels = lock(&self.channels);
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
        Ok(lock(&self.channels).get(&channel_id).copied())
    }

    async fn save_consumed(&self, channel_id: B256, consumed: Exact) -> Result<(), StoreError> {
        self.up()?;
        if let Some(stored) = lock(&self.channels).get_mut(&channel_id) {
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

    async fn mark_closing(&self, channel_id: B256, amount: u128) -> Result<(), StoreError> {
        self.up()?;
        match lock(&self.channels).get_mut(&channel_id) {
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

    async fn queue_claim(&self, claim: PendingClaim) -> Result<(), StoreError> {
        self.up()?;
        let mut claims = lock(&self.claims);
        let entry = claims.entry(claim.channel_id).or_insert(claim);
        if claim.amount > entry.amount {
            *entry = claim;
        }
        Ok(())
    }

    async fn pending_claims(&self, limit: usize) -> Result<Vec<PendingClaim>, StoreError> {
        self.up()?;
        Ok(lock(&self.claims).values().take(limit).copied().collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.up()
    }
}
