//! The persistence boundary for channel states (DESIGN.md section 6): the [`ChannelStore`]
//! trait, with [`redis::RedisStore`] for production and [`memory::MemoryStore`] for the demo and
//! logic tests.
//!
//! What is stored per channel: the last accepted state (nonce, cumulative, the payer's
//! signature), the consumption so far (exactly, and rounded up), whether the payee consented to
//! a cooperative close, and the claim queued for settlement when a session ends.

pub mod memory;
pub mod redis;
pub mod settlement;

pub use settlement::{InFlight, QueuedClaim, SettlementStore, SkippedClaim};

use std::future::Future;

use alloy::primitives::{B256, Signature};

use crate::meter::Exact;

/// The last accepted state of a channel, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredVoucher {
    /// The state's nonce.
    pub nonce: u64,
    /// The state's cumulative.
    pub cumulative: u128,
    /// The payer's signature over it.
    pub signature: Signature,
}

/// Everything stored for a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChannel {
    /// The last accepted voucher.
    pub voucher: StoredVoucher,
    /// Consumption persisted so far, exactly (records written before exact consumption was
    /// kept hold whole base units).
    pub consumed: Exact,
    /// The payee signed `Close` for this amount: the channel takes no new session or voucher,
    /// whatever happens to the close transaction (the consent never expires on-chain).
    pub closing: Option<u128>,
}

/// A claim waiting for the settler: take `amount` under `voucher`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingClaim {
    /// The channel.
    pub channel_id: B256,
    /// The voucher to claim under.
    pub voucher: StoredVoucher,
    /// What to take (the channel's consumption, at most the voucher's cumulative).
    pub amount: u128,
}

/// A failed store operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The stored nonce is not below the new one: another writer got there first (or the
    /// client replayed a state). Nothing was written.
    #[error("stale nonce {got}: the stored nonce is {stored}")]
    StaleNonce {
        /// The nonce offered.
        got: u64,
        /// The nonce stored.
        stored: u64,
    },
    /// The stored cumulative is above the new one (a state signed out of order). Nothing was
    /// written.
    #[error("cumulative {got} is below the stored {stored}")]
    CumulativeDecreased {
        /// The cumulative offered.
        got: u128,
        /// The cumulative stored.
        stored: u128,
    },
    /// The store cannot be reached or failed. Nothing may be acknowledged; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("corrupt stored data for {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What was wrong.
        reason: String,
    },
}

impl StoreError {
    /// The protocol error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::StaleNonce { .. } => "stale_nonce",
            Self::CumulativeDecreased { .. } => "cumulative_decreased",
            Self::Unavailable(_) | Self::Corrupt { .. } => "store_unavailable",
        }
    }
}

/// Where accepted channel states live.
///
/// The contract every implementation keeps:
/// - `save_voucher` persists iff the new nonce is greater than the stored one and the new
///   cumulative is not below the stored one (compare-and-set); it is durable (as the backend is
///   configured to be) before it returns, and the caller acknowledges the client only after it
///   resolves. A refused write changes nothing.
/// - `save_consumed` only ever raises the stored consumption (compared by its rounded-up
///   value; at an equal one, the exact value under the same denominator).
/// - `queue_claim` replaces any claim queued for the same channel by the larger amount.
/// - `mark_closing` records the payee's consent to close once; it is never cleared. It fails
///   when the channel has no record (then the close must not be signed).
pub trait ChannelStore: Send + Sync + 'static {
    /// Persists a newly accepted voucher (compare-and-set on the nonce and the cumulative).
    fn save_voucher(
        &self,
        channel_id: B256,
        voucher: StoredVoucher,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The channel's stored state, if any.
    fn load(
        &self,
        channel_id: B256,
    ) -> impl Future<Output = Result<Option<StoredChannel>, StoreError>> + Send;

    /// Raises the stored consumption to `consumed` (never lowers it).
    fn save_consumed(
        &self,
        channel_id: B256,
        consumed: Exact,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records that the payee is about to sign `Close(channel, amount)`: from then on the
    /// channel takes no new session or voucher. Must be durable before the signature exists.
    fn mark_closing(
        &self,
        channel_id: B256,
        amount: u128,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Queues a claim for the settler.
    fn queue_claim(
        &self,
        claim: PendingClaim,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The queued claims, up to `limit`.
    fn pending_claims(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<PendingClaim>, StoreError>> + Send;

    /// Whether the store answers (for `/healthz` and to resume paused delivery).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
