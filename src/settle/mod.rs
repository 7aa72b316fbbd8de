//! The batch settler (DESIGN.md section 7): it turns the claims sessions queue into money on
//! the chain, never twice, never lost, never stuck, and never spending more on gas than a claim
//! is worth unless it must.
//!
//! One pass ([`Settler::run_once`]) does, in order:
//! 1. **Watch withdrawals**: reads `WithdrawRequested` from the contract in bounded block ranges
//!    from a cursor kept in the store (a first run starts at the head: nothing is replayed),
//!    and records each channel's deadline.
//! 2. **Track what is in flight**: every settlement transaction is recorded in the store
//!    before it is broadcast. A mined one with the configured confirmations is final: the
//!    claims the chain shows paid leave the queue, the claims the contract skipped are recorded
//!    with its reason. One not mined for `stuck_after_secs` is sent again under the same nonce
//!    with a higher fee (up to the cap); one whose nonce went to another transaction was
//!    dropped: its claims stay queued and go again (resubmission is harmless: the contract
//!    ignores `amount <= claimed`).
//! 3. **Cooperative closes** handed over by a server without a key.
//! 4. **Plan**: every queued claim is reconciled with the chain's `claimed` (a claim already
//!    paid leaves the queue, a closed or unknown channel's is recorded as skipped, each once
//!    that has the confirmations), and goes now if its payer asked to withdraw (nearest
//!    deadline first), if it is older than the configured age, if the operator forces it, or if
//!    its value pays for its marginal gas by the configured factor ([`Economics`]) and the
//!    batch it goes in pays for its whole gas; the rest waits and grows. A batch that would
//!    revert, or reverted, keeps its claims queued: they go again after a back-off.
//! 5. **Submit**: due claims are grouped by payee and token, one payee per transaction (a payee
//!    that refuses payment reverts only its own batch), in batches bounded in claims and gas,
//!    with the settler's own nonces and EIP-1559 fees under a cap.
//!
//! The settler must be the only sender of its key (or share the server's send lock, as the
//! in-process one does): it manages the key's nonces itself.

mod economics;
mod metrics;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use k256::ecdsa::SigningKey;
use tracing::{debug, info, warn};

pub use economics::{Due, Economics};
pub use metrics::SettleMetrics;

use crate::chain::{
    ChainError, ChannelChain, ChannelEvent, Channels, Claim, Events, Fees, Mined, SkipReason,
    TxParams, TxSender,
};
use crate::channel::{ChannelInfo, Close, signature};
use crate::meter::Price;
use crate::store::{
    ChannelStore, Fence, InFlight, PendingClaim, QueuedClaim, SettlementStore, SkippedClaim,
    StoreError,
};

/// A batch is final after 2 blocks on top of it (its own and one more): a one-block reorg does
/// not undo a payment the queue forgot. Raise it on chains with deeper reorgs.
pub const DEFAULT_CONFIRMATIONS: u64 = 2;
/// At most 100 claims per transaction: about 1.2M gas, far under block limits, and the point
/// where the per-claim gas stops falling (11,616 at the margin).
pub const DEFAULT_MAX_BATCH_CLAIMS: usize = 100;
/// A batch's gas bound (estimate, before the safety margin).
pub const DEFAULT_MAX_BATCH_GAS: u64 = 3_000_000;
/// A pass every 2 s: the longest a due claim waits for its batch (the batch delay bound).
pub const DEFAULT_INTERVAL_MS: u64 = 2_000;
/// A claim waits at most a day for its value to pay for its gas.
pub const DEFAULT_MAX_CLAIM_AGE_SECS: u64 = 86_400;
/// Gas one more claim adds to a batch (11,616 measured by `scripts/gas`, rounded up).
pub const DEFAULT_MARGINAL_GAS_PER_CLAIM: u64 = 12_000;
/// A transaction not mined within 30 s is sent again with a higher fee.
pub const DEFAULT_STUCK_AFTER_SECS: u64 = 30;
/// Each replacement raises both fees by 25% (nodes need at least 10%).
pub const DEFAULT_FEE_BUMP_PERCENT: u128 = 25;
/// The most a settlement pays per gas: 50 gwei, a cap for Ethereum mainnet; set it lower on an
/// L2 (Base's fees are about a thousandth of that).
pub const DEFAULT_MAX_FEE_PER_GAS_WEI: u128 = 50_000_000_000;
/// The tip: 0.001 gwei, enough on an uncongested L2.
pub const DEFAULT_PRIORITY_FEE_WEI: u128 = 1_000_000;
/// The gas price the economics assume: 0.01 gwei (Base-like).
pub const DEFAULT_GAS_PRICE_WEI: u128 = 10_000_000;
/// A claim must pay for its marginal gas twice over to go on its value alone.
pub const DEFAULT_PROFIT_FACTOR: Price = Price { amount: 2, per: 1 };
/// Channel reads are reused for 30 s (claims and closes change them: those reads are dropped).
pub const DEFAULT_CHANNEL_CACHE_SECS: u64 = 30;
/// Blocks per `eth_getLogs` call of the withdrawal watcher.
pub const DEFAULT_LOG_RANGE_BLOCKS: u64 = 500;

/// Gas of a batch beside its claims: the transaction, the loop, one transfer (52,733 for a batch
/// of one native claim less its 11,616 marginal, measured by `scripts/gas`; rounded up).
pub const DEFAULT_BATCH_BASE_GAS: u64 = 42_000;
/// A batch that would revert, or reverted, is tried again after 60 s, then after twice as long
/// each time, up to ten times as long (withdrawal-due claims: every 60 s).
pub const DEFAULT_REVERTED_RETRY_SECS: u64 = 60;

/// Queued claims one pass looks at (withdrawal-due ones are looked up beside them).
pub const DEFAULT_MAX_QUEUED_CLAIMS: usize = 100_000;

/// How the settler works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleConfig {
    /// Blocks (the receipt's included) before a batch is final.
    pub confirmations: u64,
    /// Claims per transaction.
    pub max_batch_claims: usize,
    /// Gas per transaction (estimated).
    pub max_batch_gas: u64,
    /// Time between passes (ms): the batch delay bound.
    pub interval_ms: u64,
    /// When a claim goes.
    pub economics: Economics,
    /// Time before an unmined transaction is sent again with a higher fee (s).
    pub stuck_after_secs: u64,
    /// Fee raise per replacement (percent).
    pub fee_bump_percent: u128,
    /// The most paid per gas.
    pub max_fee_per_gas_wei: u128,
    /// The tip per gas.
    pub priority_fee_wei: u128,
    /// Blocks per `eth_getLogs` call.
    pub log_range_blocks: u64,
    /// How long a channel read (and whether the key may claim for a payee) is reused (s).
    pub channel_cache_secs: u64,
    /// Queued claims one pass looks at; the claims of channels whose payer asked to withdraw
    /// are looked up first, beside them.
    pub max_queued_claims: usize,
    /// The first wait (s) before the claims of a batch that would revert, or reverted, go
    /// again; it doubles with each revert, up to ten times this (a withdrawal-due claim's never
    /// grows).
    pub reverted_retry_secs: u64,
}

impl Default for SettleConfig {
    fn default() -> Self {
        Self {
            confirmations: DEFAULT_CONFIRMATIONS,
            max_batch_claims: DEFAULT_MAX_BATCH_CLAIMS,
            max_batch_gas: DEFAULT_MAX_BATCH_GAS,
            interval_ms: DEFAULT_INTERVAL_MS,
            economics: Economics {
                gas_price_wei: DEFAULT_GAS_PRICE_WEI,
                wei_per_base_unit: Price { amount: 1, per: 1 },
                marginal_gas_per_claim: DEFAULT_MARGINAL_GAS_PER_CLAIM,
                batch_base_gas: DEFAULT_BATCH_BASE_GAS,
                factor: DEFAULT_PROFIT_FACTOR,
                max_age_secs: DEFAULT_MAX_CLAIM_AGE_SECS,
                force: false,
            },
            stuck_after_secs: DEFAULT_STUCK_AFTER_SECS,
            fee_bump_percent: DEFAULT_FEE_BUMP_PERCENT,
            max_fee_per_gas_wei: DEFAULT_MAX_FEE_PER_GAS_WEI,
            priority_fee_wei: DEFAULT_PRIORITY_FEE_WEI,
            log_range_blocks: DEFAULT_LOG_RANGE_BLOCKS,
            channel_cache_secs: DEFAULT_CHANNEL_CACHE_SECS,
            reverted_retry_secs: DEFAULT_REVERTED_RETRY_SECS,
            max_queued_claims: DEFAULT_MAX_QUEUED_CLAIMS,
        }
    }
}

/// A failed pass: retried with backoff, nothing lost (every step is reconciled next pass).
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The chain could not be reached or refused.
    #[error("chain: {0}")]
    Chain(#[from] ChainError),
    /// The store could not be reached.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl SettleError {
    fn cause(&self) -> &'static str {
        match self {
            Self::Chain(_) => "chain",
            Self::Store(_) => "store",
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// Transactions sent: (nonce, claims).
    pub submitted: Vec<(u64, usize)>,
    /// Claims confirmed paid (by this settler's batches, or found paid on the chain).
    pub settled: usize,
    /// Claims recorded as skipped.
    pub skipped: usize,
    /// Transactions sent again (stuck or never broadcast).
    pub resent: usize,
    /// Transactions whose nonce went elsewhere (their claims stay queued).
    pub dropped: usize,
    /// Transactions mined and waiting for confirmations.
    pub confirming: usize,
    /// Due claims, and claims that wait for their value to grow.
    pub due: usize,
    /// Claims that wait.
    pub waiting: usize,
    /// Cooperative closes done.
    pub closes: usize,
    /// Claims held back, still queued: their batch would revert or reverted (a payee that
    /// refuses payment, a paused token), and they go again after a back-off.
    pub held: usize,
}

/// What is pending for one payee in one token (`paystream settle status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pending {
    /// The payee.
    pub payee: Address,
    /// The token (zero: native).
    pub token: Address,
    /// Claims queued.
    pub count: usize,
    /// Their unsettled value (base units).
    pub value: String,
    /// The oldest's age (seconds).
    pub oldest_age_secs: u64,
    /// Due now, and why (`withdrawal`, `age`, `worth`, `forced`), by count.
    pub due: BTreeMap<String, usize>,
    /// Seconds until the next waiting claim is due by age (`None` when nothing waits).
    pub next_due_in_secs: Option<u64>,
}

/// The settler's state, for `paystream settle status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// The sender of the settlement transactions.
    pub sender: Address,
    /// Pending, per payee and token.
    pub pending: Vec<Pending>,
    /// Transactions waiting for confirmations: (nonce, claims, hashes sent).
    pub in_flight: Vec<(u64, usize, usize)>,
    /// The last batch this process sent: (unix seconds, claims, gas used when confirmed).
    pub last_batch: Option<(u64, usize, Option<u64>)>,
    /// Claims the contract skipped, by reason.
    pub skipped: BTreeMap<String, usize>,
    /// The smallest claim (base units) worth settling on its value.
    pub worth_threshold: String,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn chain_claim(c: &PendingClaim) -> Claim {
    Claim {
        channel_id: c.channel_id,
        nonce: c.voucher.nonce,
        cumulative: c.voucher.cumulative,
        amount: c.amount,
        signature: c.voucher.signature,
    }
}

/// A claim that goes now.
struct DueClaim {
    due: Due,
    /// What it adds to the payee's balance.
    value: u128,
    /// The withdrawal deadline (unix seconds) for [`Due::Withdrawal`], else `u64::MAX`.
    deadline: u64,
    since: u64,
    claim: PendingClaim,
}

/// Fees for a replacement: both raised by `percent` (at least 10%, as nodes require, and at
/// least one wei), under `cap`. When the cap leaves no room for the 10% a node needs to replace
/// a transaction, the fees stay: the same transaction is sent again (the node knows it), rather
/// than a replacement every node refuses as underpriced.
fn bump(fees: Fees, percent: u128, cap: u128) -> Fees {
    let raise = |v: u128, pct: u128| v.saturating_mul(100 + pct).div_ceil(100).max(v + 1);
    let max_fee = raise(fees.max_fee_per_gas, percent.max(10)).min(cap);
    let tip = raise(fees.max_priority_fee_per_gas, percent.max(10)).min(max_fee);
    if max_fee < raise(fees.max_fee_per_gas, 10) || tip < raise(fees.max_priority_fee_per_gas, 10) {
        return fees;
    }
    Fees {
        max_fee_per_gas: max_fee,
        max_priority_fee_per_gas: tip,
    }
}

/// What the chain shows for a claim that needs no batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Paid up to this `claimed`.
    Paid(u128),
    /// The channel is closed or withdrawn: nothing more can be claimed.
    Closed,
    /// No such channel.
    Unknown,
}

/// A back-off after a batch would revert or reverted.
#[derive(Debug, Clone, Copy)]
struct Hold {
    /// When (unix seconds).
    at: u64,
    /// The wait before the next try (s).
    wait: u64,
}

/// The batch settler over a chain sender and a store.
pub struct Settler<B, S> {
    chain: Channels<B>,
    store: S,
    config: SettleConfig,
    metrics: Arc<SettleMetrics>,
    /// Signs `Close` for the cooperative closes a server without a key hands over (the
    /// payee's key; an operator's cannot).
    close_key: Option<SigningKey>,
    /// Shared with the in-process server's cooperative closes, so the two never take one
    /// nonce.
    send_lock: Option<Arc<tokio::sync::Mutex<()>>>,
    infos: HashMap<B256, (Instant, Option<ChannelInfo>)>,
    /// Claims the chain shows done but not yet with the configured confirmations (paid by a
    /// settlement whose receipt the settler lost, or by another; a channel closed, or not
    /// found): what was seen and the head it was first seen at. They leave the queue only once
    /// that is deep enough, read afresh every pass, and go on if a reorg (or a node that
    /// lagged) changes the answer.
    seen: HashMap<B256, (Seen, u64)>,
    /// Whether this key may claim for a payee, and when that was read.
    may_claim: HashMap<Address, (Instant, bool)>,
    /// Channels whose claims are held back after their batch would revert or reverted.
    held: HashMap<B256, Hold>,
    last_batch: Option<(u64, usize, Option<u64>)>,
}

impl<B, S> std::fmt::Debug for Settler<B, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settler")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<B: TxSender, S: ChannelStore + SettlementStore> Settler<B, S> {
    /// A settler sending from `chain`'s backend (the payee or one of its operators).
    pub fn new(chain: Channels<B>, store: S, config: SettleConfig) -> Self {
        Self {
            chain,
            store,
            config,
            metrics: Arc::default(),
            close_key: None,
            send_lock: None,
            infos: HashMap::new(),
            seen: HashMap::new(),
            may_claim: HashMap::new(),
            held: HashMap::new(),
            last_batch: None,
        }
    }

    /// The payee's key, to close channels cooperatively for a server that holds none.
    pub fn with_close_key(mut self, key: SigningKey) -> Self {
        self.close_key = Some(key);
        self
    }

    /// A lock the settler holds while it sends, shared with another sender of the same key.
    pub fn with_send_lock(mut self, lock: Arc<tokio::sync::Mutex<()>>) -> Self {
        self.send_lock = Some(lock);
        self
    }

    /// Its counters.
    pub fn metrics(&self) -> Arc<SettleMetrics> {
        self.metrics.clone()
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Passes every `interval_ms` until `stop` completes; a failed pass is retried with backoff
    /// (doubling up to 30 s), and nothing it did is lost (the next pass reconciles).
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let interval = Duration::from_millis(self.config.interval_ms.max(10));
        let mut wait = interval;
        loop {
            match self.run_once().await {
                Ok(pass) => {
                    if !pass.submitted.is_empty() || pass.settled > 0 || pass.skipped > 0 {
                        info!(?pass, "settler pass");
                    }
                    wait = interval;
                }
                Err(e) => {
                    warn!("settler pass failed, retrying: {e}");
                    self.metrics.failed(e.cause());
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut stop => return,
            }
        }
    }

    /// One pass: watch withdrawals, track what is in flight, do handed-over closes, plan, and
    /// submit.
    pub async fn run_once(&mut self) -> Result<Pass, SettleError> {
        let now = unix_now();
        let head = self.chain.block_number().await?;
        self.watch(head).await?;
        let mut pass = Pass::default();
        let mut busy = HashSet::new();
        let mut waiting = 0u64;
        for tx in self.store.in_flight().await? {
            if let Some(tx) = self.track(tx, head, now, &mut pass).await? {
                busy.extend(tx.claims.iter().map(|c| c.channel_id));
                waiting += 1;
            }
        }
        self.metrics
            .in_flight
            .store(waiting, std::sync::atomic::Ordering::Relaxed);
        self.closes(&mut pass).await?;
        for batch in self.plan(&busy, head, now, &mut pass).await? {
            self.submit(batch, now, &mut pass).await?;
        }
        Ok(pass)
    }

    /// Records the withdrawal requests since the cursor.
    async fn watch(&mut self, head: u64) -> Result<(), SettleError> {
        let mut from = match self.store.watch_cursor().await? {
            Some(cursor) => cursor,
            None => head,
        };
        let mut range = self.config.log_range_blocks.max(1);
        while from <= head {
            let to = head.min(from.saturating_add(range - 1));
            // Withdrawals and closes only: not the `Opened` logs, most of a busy chain's.
            let events = match self.chain.channel_events(from, to, Events::Changes).await {
                Ok(events) => events,
                Err(e) if range > 1 => {
                    debug!(from, to, "withdrawal watcher: {e}; halving the range");
                    range /= 2;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for (event, _) in events {
                match event {
                    ChannelEvent::WithdrawRequested(r) => {
                        info!(channel = %r.channel_id, withdraw_at = r.withdraw_at, "withdrawal requested: settling before its deadline");
                        self.store
                            .add_withdrawal(r.channel_id, r.withdraw_at)
                            .await?;
                        self.infos.remove(&r.channel_id);
                    }
                    ChannelEvent::Withdrawn { channel_id }
                    | ChannelEvent::Closed { channel_id } => {
                        self.store.remove_withdrawal(channel_id).await?;
                        self.infos.remove(&channel_id);
                    }
                    ChannelEvent::ToppedUp { .. }
                    | ChannelEvent::Opened(_)
                    | ChannelEvent::Settled { .. } => {}
                }
            }
            from = to + 1;
            self.store.set_watch_cursor(from).await?;
        }
        Ok(())
    }

    /// Follows one transaction: final, still confirming, to be sent again, or dropped.
    /// Returns it if it stays in flight.
    async fn track(
        &mut self,
        mut tx: InFlight,
        head: u64,
        now: u64,
        pass: &mut Pass,
    ) -> Result<Option<InFlight>, SettleError> {
        for hash in tx.hashes.iter().rev() {
            let Some(mined) = self.chain.backend().receipt(*hash).await? else {
                continue;
            };
            let depth = head.saturating_sub(mined.outcome.receipt.block) + 1;
            if depth < self.config.confirmations {
                pass.confirming += 1;
                return Ok(Some(tx));
            }
            self.finalize(&tx, mined, now, pass).await?;
            return Ok(None);
        }
        if self.chain.backend().mined_nonce().await? > tx.nonce {
            // The nonce went to a transaction we hold no receipt of (dropped and reused, or a
            // replacement broadcast before a crash recorded its hash). The claims are still
            // queued: they go again, and the contract ignores what it already paid.
            warn!(
                nonce = tx.nonce,
                "settlement transaction dropped; its claims go again"
            );
            self.store.remove_in_flight(tx.nonce).await?;
            for c in &tx.claims {
                self.infos.remove(&c.channel_id);
            }
            pass.dropped += 1;
            return Ok(None);
        }
        if tx.hashes.is_empty() || now >= tx.last_sent + self.config.stuck_after_secs {
            // Never broadcast (a crash or an RPC failure between the record and the send),
            // dropped from the mempool, or stuck under its fee: again, with a higher fee.
            if !tx.hashes.is_empty() {
                tx.fees = self.bump(tx.fees);
            }
            self.broadcast(&mut tx, now).await?;
            self.metrics
                .replacements
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            pass.resent += 1;
        }
        Ok(Some(tx))
    }

    /// A confirmed transaction: its paid claims leave the queue, its skipped ones are recorded.
    async fn finalize(
        &mut self,
        tx: &InFlight,
        mined: Mined,
        now: u64,
        pass: &mut Pass,
    ) -> Result<(), SettleError> {
        use std::sync::atomic::Ordering::Relaxed;
        let claims: Vec<Claim> = tx.claims.iter().map(chain_claim).collect();
        let gas = mined.outcome.receipt.gas_used;
        if mined.success {
            let outcome = self.chain.settle_outcome(&claims, mined.outcome);
            let mut settled: Vec<(B256, u128)> = outcome
                .claimed
                .iter()
                .map(|c| (c.channel_id, c.claimed))
                .collect();
            for (channel, reason) in &outcome.skipped {
                // One claim per channel in a batch (the queue holds one per channel).
                let amount = claims
                    .iter()
                    .find(|c| c.channel_id == *channel)
                    .map_or(0, |c| c.amount);
                if *reason == SkipReason::AlreadyClaimed {
                    // Paid already (a resubmission, or a close): the claim is done.
                    settled.push((*channel, amount));
                    continue;
                }
                if *reason == SkipReason::NotPayee {
                    // The payee revoked this key: the claim stays queued for a key it allows
                    // (or for this one, allowed again).
                    warn!(channel = %channel, "this key may no longer claim for the payee");
                    self.may_claim.clear();
                    continue;
                }
                self.skip(*channel, amount, reason.as_str(), now, pass)
                    .await?;
            }
            pass.settled += settled.len();
            self.metrics
                .claims_settled
                .fetch_add(settled.len() as u64, Relaxed);
            self.store.claims_settled(&settled).await?;
            for (channel, _) in &settled {
                self.store.remove_withdrawal(*channel).await?;
            }
        } else if gas >= tx.gas_limit {
            // Out of gas (the state moved between the estimate and the block): nothing was
            // paid, and the claims, still queued, go again with a fresh estimate.
            warn!(
                nonce = tx.nonce,
                "settlement ran out of gas; its claims go again"
            );
            self.metrics.failed("out_of_gas");
        } else {
            // The batch reverted on-chain: a transfer to its payee failed (a payee that refuses
            // ETH, a token paused or blacklisting it). Its claims stay queued and go again
            // after a back-off.
            warn!(
                nonce = tx.nonce,
                "settlement batch reverted, holding its claims back"
            );
            self.hold(&tx.claims, now, pass);
        }
        self.metrics.confirmed_batches.fetch_add(1, Relaxed);
        self.metrics.gas_used.fetch_add(gas, Relaxed);
        self.metrics
            .confirm_seconds
            .fetch_add(now.saturating_sub(tx.first_sent), Relaxed);
        if let Some(last) = self.last_batch.as_mut()
            && last.2.is_none()
        {
            last.2 = Some(gas);
        }
        self.store.remove_in_flight(tx.nonce).await?;
        for c in &tx.claims {
            self.infos.remove(&c.channel_id);
        }
        Ok(())
    }

    async fn skip(
        &mut self,
        channel_id: B256,
        amount: u128,
        reason: &str,
        at: u64,
        pass: &mut Pass,
    ) -> Result<(), SettleError> {
        warn!(%channel_id, amount, reason, "claim skipped");
        self.store
            .claim_skipped(SkippedClaim {
                channel_id,
                amount,
                reason: reason.to_string(),
                at,
            })
            .await?;
        self.metrics.skipped(reason);
        pass.skipped += 1;
        Ok(())
    }

    /// The cooperative closes a server without a key handed over.
    async fn closes(&mut self, pass: &mut Pass) -> Result<(), SettleError> {
        for claim in self.store.closes().await? {
            let Some(key) = self.close_key.clone() else {
                // An operator's key cannot sign the payee's `Close`: the claim is settled the
                // ordinary way, and the payer withdraws the rest after its delay.
                self.store.queue_claim(claim, Fence::NONE).await?;
                self.store.remove_close(claim.channel_id).await?;
                continue;
            };
            let digest = self.chain_domain().close_digest(&Close {
                channelId: claim.channel_id,
                amount: claim.amount,
            });
            let payee_signature = signature::sign_digest(&key, &digest);
            let result = {
                let _guard = self.lock_sends().await;
                self.chain
                    .close_cooperative(&chain_claim(&claim), &payee_signature)
                    .await
            };
            match result {
                Ok(_) => {
                    self.store
                        .claims_settled(&[(claim.channel_id, claim.amount)])
                        .await?;
                    self.store.remove_close(claim.channel_id).await?;
                    self.metrics
                        .closes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    pass.closes += 1;
                }
                Err(e) if e.retriable() => {
                    // Kept for the next pass; the claims and withdrawals of this one go on.
                    warn!(channel = %claim.channel_id, "cooperative close failed, trying again next pass: {e}");
                    self.metrics.failed("close");
                    break;
                }
                Err(e) => {
                    warn!(channel = %claim.channel_id, "cooperative close refused, claiming instead: {e}");
                    self.store.queue_claim(claim, Fence::NONE).await?;
                    self.store.remove_close(claim.channel_id).await?;
                }
            }
            self.infos.remove(&claim.channel_id);
        }
        Ok(())
    }

    fn chain_domain(&self) -> crate::channel::ChannelDomain {
        crate::channel::ChannelDomain::new(self.chain.chain_id(), self.chain.address())
    }

    async fn lock_sends(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match &self.send_lock {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        }
    }

    /// The chain's view of a channel, reused for `channel_cache_secs`.
    async fn info(&mut self, channel: B256) -> Result<Option<ChannelInfo>, SettleError> {
        let ttl = Duration::from_secs(self.config.channel_cache_secs);
        if let Some((at, info)) = self.infos.get(&channel)
            && at.elapsed() < ttl
        {
            return Ok(*info);
        }
        let info = self.chain.read_channel(channel).await?;
        self.infos.insert(channel, (Instant::now(), info));
        Ok(info)
    }

    /// Whether this settler's key may claim for `payee` (it is the payee, or its operator).
    /// Read again after `channel_cache_secs`: a payee may add or revoke the operator.
    async fn may_claim(&mut self, payee: Address) -> Result<bool, SettleError> {
        let ttl = Duration::from_secs(self.config.channel_cache_secs);
        if let Some((at, yes)) = self.may_claim.get(&payee)
            && at.elapsed() < ttl
        {
            return Ok(*yes);
        }
        let sender = self.chain.backend().sender();
        let yes = payee == sender || self.chain.is_operator(payee, sender).await?;
        if !yes {
            warn!(%payee, %sender, "not this settler's payee: its claims are left for another");
        }
        self.may_claim.insert(payee, (Instant::now(), yes));
        Ok(yes)
    }

    /// Whether what the chain shows for `channel` (`seen` at `head`) has the configured
    /// confirmations: first seen at least `confirmations` blocks ago, unchanged since.
    fn confirmed(&mut self, channel: B256, seen: Seen, head: u64) -> bool {
        let first = self.seen.entry(channel).or_insert((seen, head));
        if first.0 != seen {
            *first = (seen, head);
        }
        let depth = head.saturating_sub(first.1) + 1;
        if depth >= self.config.confirmations {
            self.seen.remove(&channel);
            true
        } else {
            false
        }
    }

    /// Holds back the claims of a batch that would revert or reverted: they stay queued and go
    /// again after a back-off that doubles with each revert.
    fn hold(&mut self, claims: &[PendingClaim], now: u64, pass: &mut Pass) {
        let first = self.config.reverted_retry_secs.max(1);
        for c in claims {
            let wait = self.held.get(&c.channel_id).map_or(first, |h| {
                h.wait.saturating_mul(2).min(first.saturating_mul(10))
            });
            self.held.insert(c.channel_id, Hold { at: now, wait });
            self.infos.remove(&c.channel_id);
        }
        self.metrics.failed("batch_reverted");
        pass.held += claims.len();
    }

    /// Reconciles the queue with the chain and picks what goes now, in batches of one payee
    /// and token each, the nearest withdrawal deadline first.
    async fn plan(
        &mut self,
        busy: &HashSet<B256>,
        head: u64,
        now: u64,
        pass: &mut Pass,
    ) -> Result<Vec<Vec<PendingClaim>>, SettleError> {
        use std::sync::atomic::Ordering::Relaxed;
        let withdrawals: HashMap<B256, u64> = self.store.withdrawals().await?.into_iter().collect();
        // The withdrawal-due claims first, wherever they are in the queue; then a bounded scan.
        let urgent: Vec<B256> = withdrawals.keys().copied().collect();
        let mut queued = self.store.queued_claims_of(&urgent).await?;
        let scanned = self
            .store
            .queued_claims(self.config.max_queued_claims.max(1))
            .await?;
        queued.extend(
            scanned
                .into_iter()
                .filter(|q| !withdrawals.contains_key(&q.claim.channel_id)),
        );
        let mut reconciled = Vec::new();
        let mut groups: BTreeMap<(Address, Address), Vec<DueClaim>> = BTreeMap::new();
        let (mut pending, mut value, mut oldest) = (0u64, 0u128, 0u64);
        for QueuedClaim { claim, since } in queued {
            if busy.contains(&claim.channel_id) {
                continue;
            }
            if self.seen.contains_key(&claim.channel_id) {
                // Confirming what the chain showed: read it afresh (a reorg may have undone it).
                self.infos.remove(&claim.channel_id);
            }
            let info = self.info(claim.channel_id).await?;
            // Paid already (by an earlier run whose receipt was lost, a close, or another
            // settler), closed, or unknown: the claim leaves the queue once that is confirmed.
            let seen = match info {
                None => Some(Seen::Unknown),
                Some(info) if claim.amount <= info.claimed => Some(Seen::Paid(info.claimed)),
                Some(info) if info.closed => Some(Seen::Closed),
                Some(_) => None,
            };
            if let Some(seen) = seen {
                if !self.confirmed(claim.channel_id, seen, head) {
                    pass.confirming += 1;
                    continue;
                }
                match seen {
                    Seen::Paid(_) => reconciled.push((claim.channel_id, claim.amount)),
                    Seen::Closed => {
                        self.skip(claim.channel_id, claim.amount, "closed", now, pass)
                            .await?;
                    }
                    Seen::Unknown => {
                        self.skip(claim.channel_id, claim.amount, "unknown_channel", now, pass)
                            .await?;
                    }
                }
                continue;
            }
            self.seen.remove(&claim.channel_id);
            let Some(info) = info else { continue };
            if !self.may_claim(info.payee).await? {
                continue;
            }
            let deadline = withdrawals
                .get(&claim.channel_id)
                .copied()
                .max((info.withdraw_at != 0).then_some(info.withdraw_at));
            let unsettled = claim.amount - info.claimed;
            pending += 1;
            value = value.saturating_add(unsettled);
            oldest = oldest.max(now.saturating_sub(since));
            let due =
                self.config
                    .economics
                    .due(unsettled, now.saturating_sub(since), deadline.is_some());
            if !due.now() {
                pass.waiting += 1;
                continue;
            }
            if let Some(hold) = self.held.get(&claim.channel_id) {
                // Its last batch would revert or reverted: it waits out its back-off (a
                // withdrawal-due one the shortest).
                let wait = if due == Due::Withdrawal {
                    self.config.reverted_retry_secs
                } else {
                    hold.wait
                };
                if now < hold.at.saturating_add(wait) {
                    pass.held += 1;
                    continue;
                }
            }
            pass.due += 1;
            groups
                .entry((info.payee, info.token))
                .or_default()
                .push(DueClaim {
                    due,
                    value: unsettled,
                    deadline: deadline.unwrap_or(u64::MAX),
                    since,
                    claim,
                });
        }
        pass.settled += reconciled.len();
        self.store.claims_settled(&reconciled).await?;
        self.metrics.pending_claims.store(pending, Relaxed);
        self.metrics
            .pending_value
            .store(u64::try_from(value).unwrap_or(u64::MAX), Relaxed);
        self.metrics.oldest_pending_secs.store(oldest, Relaxed);
        // Batches: withdrawals by nearest deadline, then the claims that must go (forced, by
        // age), then those worth their gas, the oldest first; one payee and token per batch,
        // bounded in claims and gas.
        let economics = self.config.economics;
        let per_claim = economics.marginal_gas_per_claim.max(1);
        let fit = ((self
            .config
            .max_batch_gas
            .saturating_sub(economics.batch_base_gas))
            / per_claim)
            .max(1) as usize;
        let size = self.config.max_batch_claims.clamp(1, fit);
        let mut batches: Vec<(u64, Vec<PendingClaim>)> = Vec::new();
        for (_, mut claims) in groups {
            claims.sort_by_key(|d| (d.deadline, d.due == Due::Worth, d.since));
            for chunk in claims.chunks(size) {
                if chunk.iter().all(|d| d.due == Due::Worth) {
                    // Claims that go on their value alone go when together they pay for the
                    // whole transaction, not only for their own part of it.
                    let value = chunk
                        .iter()
                        .fold(0u128, |sum, d| sum.saturating_add(d.value));
                    if !economics.batch_worth(value, chunk.len()) {
                        pass.due -= chunk.len();
                        pass.waiting += chunk.len();
                        continue;
                    }
                }
                let urgency = chunk.iter().map(|d| d.deadline).min().unwrap_or(u64::MAX);
                debug!(
                    claims = chunk.len(),
                    why = chunk[0].due.as_str(),
                    "batch planned"
                );
                batches.push((urgency, chunk.iter().map(|d| d.claim).collect()));
            }
        }
        batches.sort_by_key(|(urgency, _)| *urgency);
        Ok(batches.into_iter().map(|(_, b)| b).collect())
    }

    /// Fees for a new transaction: twice the base fee plus the tip, under the cap.
    async fn fees(&self) -> Result<Fees, SettleError> {
        let base = self.chain.backend().base_fee().await?;
        let cap = self.config.max_fee_per_gas_wei;
        let tip = self.config.priority_fee_wei.min(cap);
        Ok(Fees {
            max_fee_per_gas: base.saturating_mul(2).saturating_add(tip).min(cap),
            max_priority_fee_per_gas: tip,
        })
    }

    fn bump(&self, fees: Fees) -> Fees {
        bump(
            fees,
            self.config.fee_bump_percent,
            self.config.max_fee_per_gas_wei,
        )
    }

    /// The next nonce: the chain's pending count, or past this settler's own transactions in
    /// flight (each recorded before it is sent), whichever is higher. Nothing is remembered
    /// beside them: after a reorg undoes a transaction, its nonce is the next again.
    async fn take_nonce(&mut self) -> Result<u64, SettleError> {
        let pending = self.chain.backend().pending_nonce().await?;
        let in_flight = self
            .store
            .in_flight()
            .await?
            .iter()
            .map(|t| t.nonce + 1)
            .max()
            .unwrap_or(0);
        Ok(pending.max(in_flight))
    }

    /// Records, then broadcasts, a transaction (sent again under its nonce when it has hashes).
    async fn broadcast(&mut self, tx: &mut InFlight, now: u64) -> Result<(), SettleError> {
        let _guard = self.lock_sends().await;
        self.broadcast_locked(tx, now).await
    }

    /// [`Self::broadcast`], the send lock held by the caller.
    async fn broadcast_locked(&mut self, tx: &mut InFlight, now: u64) -> Result<(), SettleError> {
        let claims: Vec<Claim> = tx.claims.iter().map(chain_claim).collect();
        let request = self.chain.settle_tx(&claims);
        tx.last_sent = now;
        // Written before the send: a crash after it finds the transaction on restart.
        self.store.save_in_flight(tx).await?;
        let hash = self
            .chain
            .backend()
            .broadcast(
                request,
                TxParams {
                    nonce: tx.nonce,
                    gas_limit: tx.gas_limit,
                    fees: tx.fees,
                },
            )
            .await?;
        if !tx.hashes.contains(&hash) {
            tx.hashes.push(hash);
        }
        self.store.save_in_flight(tx).await?;
        Ok(())
    }

    /// Sends one batch.
    async fn submit(
        &mut self,
        batch: Vec<PendingClaim>,
        now: u64,
        pass: &mut Pass,
    ) -> Result<(), SettleError> {
        use std::sync::atomic::Ordering::Relaxed;
        let claims: Vec<Claim> = batch.iter().map(chain_claim).collect();
        let request = self.chain.settle_tx(&claims);
        let gas = match self.chain.backend().estimate_gas(&request).await {
            Ok(gas) => gas.saturating_mul(6) / 5 + 10_000,
            Err(e) if !e.retriable() => {
                // The whole batch would revert: a transfer to its payee fails (a payee that
                // refuses payment, a token paused or blacklisting it). Often for a while only:
                // the claims stay queued and go again after a back-off.
                warn!(
                    claims = batch.len(),
                    "settlement batch would revert, holding its claims back: {e}"
                );
                self.hold(&batch, now, pass);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let fees = self.fees().await?;
        // The nonce is taken and used under one hold of the send lock: a close the server
        // sends meanwhile would take the same pending count.
        let guard = self.lock_sends().await;
        let nonce = self.take_nonce().await?;
        let mut tx = InFlight {
            nonce,
            hashes: Vec::new(),
            claims: batch,
            fees,
            gas_limit: gas,
            first_sent: now,
            last_sent: now,
        };
        info!(
            nonce,
            claims = tx.claims.len(),
            gas,
            "submitting a settlement batch"
        );
        self.broadcast_locked(&mut tx, now).await?;
        drop(guard);
        self.metrics.batches.fetch_add(1, Relaxed);
        self.metrics
            .batch_claims
            .fetch_add(tx.claims.len() as u64, Relaxed);
        self.last_batch = Some((now, tx.claims.len(), None));
        pass.submitted.push((nonce, tx.claims.len()));
        Ok(())
    }

    /// What is pending, per payee and token, and what is in flight.
    pub async fn status(&mut self) -> Result<Status, SettleError> {
        let now = unix_now();
        let withdrawals: HashMap<B256, u64> = self.store.withdrawals().await?.into_iter().collect();
        let mut pending: BTreeMap<(Address, Address), (Pending, u128)> = BTreeMap::new();
        for QueuedClaim { claim, since } in self
            .store
            .queued_claims(self.config.max_queued_claims.max(1))
            .await?
        {
            let Some(info) = self.info(claim.channel_id).await? else {
                continue;
            };
            if claim.amount <= info.claimed {
                continue;
            }
            let unsettled = claim.amount - info.claimed;
            let age = now.saturating_sub(since);
            let withdrawing = info.withdraw_at != 0 || withdrawals.contains_key(&claim.channel_id);
            let due = self.config.economics.due(unsettled, age, withdrawing);
            let (p, value) = pending.entry((info.payee, info.token)).or_insert_with(|| {
                (
                    Pending {
                        payee: info.payee,
                        token: info.token,
                        ..Pending::default()
                    },
                    0,
                )
            });
            p.count += 1;
            *value = value.saturating_add(unsettled);
            p.oldest_age_secs = p.oldest_age_secs.max(age);
            if due.now() {
                *p.due.entry(due.as_str().into()).or_default() += 1;
            } else {
                let left = self.config.economics.max_age_secs.saturating_sub(age);
                p.next_due_in_secs = Some(p.next_due_in_secs.map_or(left, |n| n.min(left)));
            }
        }
        let mut skipped = BTreeMap::new();
        for s in self.store.skipped_claims().await? {
            *skipped.entry(s.reason).or_default() += 1;
        }
        Ok(Status {
            sender: self.chain.backend().sender(),
            pending: pending
                .into_values()
                .map(|(mut p, value)| {
                    p.value = value.to_string();
                    p
                })
                .collect(),
            in_flight: self
                .store
                .in_flight()
                .await?
                .iter()
                .map(|t| (t.nonce, t.claims.len(), t.hashes.len()))
                .collect(),
            last_batch: self.last_batch,
            skipped,
            worth_threshold: self.config.economics.threshold().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fees(max: u128, tip: u128) -> Fees {
        Fees {
            max_fee_per_gas: max,
            max_priority_fee_per_gas: tip,
        }
    }

    #[test]
    fn a_replacement_raises_both_fees_by_the_percent() {
        assert_eq!(bump(fees(1_000, 100), 25, 10_000), fees(1_250, 125));
        // At least the 10% nodes need, and at least one wei.
        assert_eq!(bump(fees(1_000, 100), 5, 10_000), fees(1_100, 110));
        assert_eq!(bump(fees(3, 1), 25, 10_000), fees(4, 2));
    }

    #[test]
    fn a_replacement_stays_under_the_cap() {
        assert_eq!(bump(fees(1_000, 100), 25, 1_200), fees(1_200, 125));
        // The tip never exceeds the max fee.
        assert_eq!(bump(fees(1_000, 1_000), 25, 1_200), fees(1_200, 1_200));
    }

    #[test]
    fn no_replacement_nodes_would_refuse_at_the_cap() {
        // 1,050 is not 10% above 1,000: the same transaction goes again.
        assert_eq!(bump(fees(1_000, 100), 25, 1_050), fees(1_000, 100));
        assert_eq!(bump(fees(1_000, 100), 25, 1_000), fees(1_000, 100));
        // The tip capped by a max fee too close to it.
        assert_eq!(bump(fees(1_000, 1_000), 25, 1_050), fees(1_000, 1_000));
    }
}
