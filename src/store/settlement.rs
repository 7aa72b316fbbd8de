//! What the settler keeps in the store (DESIGN.md section 7): beside the claims queue that
//! sessions write, the transactions it sent and has not seen confirmed, the claims the contract
//! skipped, the cursor of its withdrawal watcher, the channels whose payer asked to withdraw,
//! and the cooperative closes a server without a key hands it.
//!
//! The settler's records are written before the action they describe (a transaction is
//! recorded before it is broadcast), so a settler killed at any point finds, on restart, every
//! transaction it may have sent, and reconciles them with the chain: nothing is settled twice
//! (the contract ignores a claim at or below what it paid) and nothing is lost (a claim leaves
//! the queue only once the chain shows it paid, with the configured confirmations).

use std::future::Future;

use alloy::primitives::B256;

use super::{PendingClaim, StoreError};
use crate::chain::Fees;

/// A queued claim and when it was first queued (unix seconds; a larger claim replacing it keeps
/// the time: the age that forces settlement is the oldest unsettled consumption's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedClaim {
    /// The claim.
    pub claim: PendingClaim,
    /// When the channel's first unsettled claim was queued.
    pub since: u64,
}

/// A settlement transaction sent and not yet seen confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// The settler's nonce for it (one transaction per nonce; replacements share it).
    pub nonce: u64,
    /// Every hash broadcast under this nonce, the latest last.
    pub hashes: Vec<B256>,
    /// The batch, in order.
    pub claims: Vec<PendingClaim>,
    /// The fees of the latest broadcast.
    pub fees: Fees,
    /// Its gas limit.
    pub gas_limit: u64,
    /// When it was first broadcast (unix seconds).
    pub first_sent: u64,
    /// When it was last broadcast (unix seconds).
    pub last_sent: u64,
}

/// A claim the contract refused, kept for the operator (and never retried).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedClaim {
    /// The channel.
    pub channel_id: B256,
    /// The amount that was claimed.
    pub amount: u128,
    /// The contract's reason (`bad_signature`, `closed`, ...).
    pub reason: String,
    /// When (unix seconds).
    pub at: u64,
}

/// The settler's records.
pub trait SettlementStore: Send + Sync + 'static {
    /// The queued claims, up to `limit`, with when each was first queued.
    fn queued_claims(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<QueuedClaim>, StoreError>> + Send;

    /// The claims queued for these channels (those with none are left out).
    fn queued_claims_of(
        &self,
        channels: &[B256],
    ) -> impl Future<Output = Result<Vec<QueuedClaim>, StoreError>> + Send;

    /// The chain shows these channels paid up to these amounts: each claim queued for at most
    /// that much leaves the queue (a larger one, queued since, stays).
    fn claims_settled(
        &self,
        settled: &[(B256, u128)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The contract skipped a claim for `reason`: it leaves the queue (unless a larger one was
    /// queued since) and is recorded for the operator.
    fn claim_skipped(
        &self,
        skipped: SkippedClaim,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The claims the contract skipped.
    fn skipped_claims(&self) -> impl Future<Output = Result<Vec<SkippedClaim>, StoreError>> + Send;

    /// The transactions sent and not seen confirmed.
    fn in_flight(&self) -> impl Future<Output = Result<Vec<InFlight>, StoreError>> + Send;

    /// Records (or updates) a transaction before it is broadcast.
    fn save_in_flight(&self, tx: &InFlight) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The transaction with this nonce is confirmed, or dropped for good.
    fn remove_in_flight(&self, nonce: u64) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The next block the withdrawal watcher reads.
    fn watch_cursor(&self) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Moves the withdrawal watcher's cursor.
    fn set_watch_cursor(&self, block: u64) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Channels whose payer asked to withdraw, with when the payer may (unix seconds).
    fn withdrawals(&self) -> impl Future<Output = Result<Vec<(B256, u64)>, StoreError>> + Send;

    /// Records a withdrawal request.
    fn add_withdrawal(
        &self,
        channel_id: B256,
        withdraw_at: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Forgets a withdrawal request (the channel is settled, or closed).
    fn remove_withdrawal(
        &self,
        channel_id: B256,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Hands a cooperative close to the settler (a server without the payee's key).
    fn queue_close(
        &self,
        claim: PendingClaim,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The cooperative closes waiting for the settler.
    fn closes(&self) -> impl Future<Output = Result<Vec<PendingClaim>, StoreError>> + Send;

    /// A cooperative close is done (or given up for the claim queue).
    fn remove_close(&self, channel_id: B256)
    -> impl Future<Output = Result<(), StoreError>> + Send;
}
