//! The on-chain boundary (DESIGN.md section 3): typed access to the `PaymentChannels` contract.
//!
//! Two layers keep the two implementations from drifting apart:
//! - [`Backend`] is how transactions and calls reach an EVM: [`rpc::RpcBackend`] (alloy over
//!   JSON-RPC: anvil or any EVM node, HTTPS included) and [`evm::EvmBackend`] (revm in this
//!   process, running the same compiled bytecode, for the demo and unit tests).
//! - [`Channels`] encodes every contract call and decodes every event and revert once, on top of
//!   any backend, and implements [`ChannelChain`], the trait the engine uses.
//!
//! Reverts come back as [`ChainError::Reverted`] with the contract's own error, and skipped
//! claims as [`SkipReason`]s.

pub mod bindings;
mod contract;
mod error;
pub mod evm;
pub mod rpc;

use std::future::Future;

use alloy::primitives::{Address, B256, Bytes, Log, Signature, U256};

pub use contract::Channels;
pub use error::{ChainError, Result};

use crate::channel::ChannelInfo;

/// A claim to submit: the payer's signed state and the amount taken under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The channel.
    pub channel_id: B256,
    /// The signed state's nonce.
    pub nonce: u64,
    /// The signed state's cumulative amount.
    pub cumulative: u128,
    /// What the payee takes in total (`<= cumulative`); the contract pays `amount - claimed`.
    pub amount: u128,
    /// The payer's signature over the state (sent as EIP-2098 `r, vs`).
    pub signature: Signature,
}

/// Why the contract skipped a claim in a batch (`ClaimSkipped.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// Malformed, high-s, or not the payer's signature.
    BadSignature,
    /// No channel has this id.
    UnknownChannel,
    /// The channel was withdrawn or closed.
    Closed,
    /// The sender is neither the payee nor one of its operators.
    NotPayee,
    /// `amount > cumulative`.
    ExceedsCumulative,
    /// `amount > deposit`.
    ExceedsDeposit,
    /// `amount <= claimed`: already settled (resubmission is harmless).
    AlreadyClaimed,
    /// The nonce is below the last claimed nonce.
    StaleNonce,
    /// A code this build does not know.
    Other(u8),
}

impl SkipReason {
    /// A name for logs, records and `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadSignature => "bad_signature",
            Self::UnknownChannel => "unknown_channel",
            Self::Closed => "closed",
            Self::NotPayee => "not_payee",
            Self::ExceedsCumulative => "exceeds_cumulative",
            Self::ExceedsDeposit => "exceeds_deposit",
            Self::AlreadyClaimed => "already_claimed",
            Self::StaleNonce => "stale_nonce",
            Self::Other(_) => "other",
        }
    }

    /// From the contract's `SKIP_*` code.
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => Self::BadSignature,
            2 => Self::UnknownChannel,
            3 => Self::Closed,
            4 => Self::NotPayee,
            5 => Self::ExceedsCumulative,
            6 => Self::ExceedsDeposit,
            7 => Self::AlreadyClaimed,
            8 => Self::StaleNonce,
            other => Self::Other(other),
        }
    }
}

/// One claim the contract paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// The channel.
    pub channel_id: B256,
    /// The claimed state's nonce.
    pub nonce: u64,
    /// The channel's claimed total after this claim (the claim's amount).
    pub claimed: u128,
}

/// The outcome of a mined transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxReceipt {
    /// Transaction hash (a synthetic one on the in-process EVM).
    pub tx_hash: B256,
    /// Block it was mined in.
    pub block: u64,
    /// Gas used, from the receipt.
    pub gas_used: u64,
}

/// One transfer of a batch: a run of consecutive claims with the same payee and token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidRun {
    /// Who was paid.
    pub payee: Address,
    /// In what (zero for native ETH).
    pub token: Address,
    /// The run's total transfer.
    pub amount: U256,
    /// The channels whose claims the run paid, in batch order.
    pub channel_ids: Vec<B256>,
}

/// The outcome of a `settle` batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleOutcome {
    /// The transaction.
    pub receipt: TxReceipt,
    /// Claims paid, in batch order.
    pub claimed: Vec<Claimed>,
    /// Claims skipped, in batch order, with the reason.
    pub skipped: Vec<(B256, SkipReason)>,
    /// The transfers, one per run of claims with the same payee and token.
    pub runs: Vec<PaidRun>,
}

/// The outcome of `closeCooperative`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseOutcome {
    /// The transaction.
    pub receipt: TxReceipt,
    /// The channel's final claimed total.
    pub claimed: u128,
    /// Paid to the payee by this close.
    pub paid: u128,
    /// Refunded to the payer.
    pub refund: u128,
}

/// A payer asked to withdraw: the payee must claim before `withdraw_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WithdrawRequest {
    /// The channel.
    pub channel_id: B256,
    /// Unix time after which the payer can withdraw.
    pub withdraw_at: u64,
    /// Block of the request.
    pub block: u64,
}

/// A transaction for a [`Backend`] to sign and send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxRequest {
    /// Callee, or `None` to create a contract.
    pub to: Option<Address>,
    /// Calldata or init code.
    pub input: Bytes,
    /// Native value sent.
    pub value: U256,
}

/// A mined transaction as a backend reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxOutcome {
    /// The receipt's summary.
    pub receipt: TxReceipt,
    /// The logs it emitted.
    pub logs: Vec<Log>,
    /// The created contract, for a creation.
    pub created: Option<Address>,
}

/// A log with the block it was emitted in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLog {
    /// The log.
    pub log: Log,
    /// Its block.
    pub block: u64,
}

/// How transactions and calls reach an EVM, as one sender account.
///
/// `send` returns only once the transaction is mined; a transaction that would revert is
/// refused with [`ChainError::Reverted`] (decoded from the revert data) and changes nothing.
pub trait Backend: Send + Sync + 'static {
    /// The chain id.
    fn chain_id(&self) -> u64;
    /// The account transactions are sent from.
    fn sender(&self) -> Address;
    /// Signs, sends and waits for a transaction.
    fn send(&self, tx: TxRequest) -> impl Future<Output = Result<TxOutcome>> + Send;
    /// A read-only call against the latest state.
    fn call(&self, to: Address, input: Bytes) -> impl Future<Output = Result<Bytes>> + Send;
    /// The latest block number.
    fn block_number(&self) -> impl Future<Output = Result<u64>> + Send;
    /// Logs of `address` whose first topic is one of `topics0`, in blocks `from..=to` (the
    /// caller bounds the range: public nodes cap `eth_getLogs`), in chain order.
    fn logs(
        &self,
        address: Address,
        topics0: &[B256],
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<BlockLog>>> + Send;
    /// The native balance of `owner`.
    fn balance(&self, owner: Address) -> impl Future<Output = Result<U256>> + Send;
}

/// EIP-1559 fees of a transaction, in wei per gas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fees {
    /// The most the sender pays per gas (base fee included).
    pub max_fee_per_gas: u128,
    /// The tip per gas to the block producer.
    pub max_priority_fee_per_gas: u128,
}

/// How a transaction is sent: its nonce, gas limit and fees, all chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxParams {
    /// The sender's nonce for it.
    pub nonce: u64,
    /// Its gas limit.
    pub gas_limit: u64,
    /// Its fees.
    pub fees: Fees,
}

/// A transaction in a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mined {
    /// The receipt and logs.
    pub outcome: TxOutcome,
    /// Whether it succeeded (status 1); a failed one's logs are empty.
    pub success: bool,
}

/// Sending transactions without waiting for them, for a sender that manages its own nonces,
/// fees and confirmations (the settler): a transaction is signed with the caller's parameters,
/// broadcast, and its receipt looked up later.
pub trait TxSender: Backend {
    /// The sender's next nonce counting only mined transactions.
    fn mined_nonce(&self) -> impl Future<Output = Result<u64>> + Send;
    /// The sender's next nonce counting the node's pending transactions too.
    fn pending_nonce(&self) -> impl Future<Output = Result<u64>> + Send;
    /// The latest block's base fee per gas.
    fn base_fee(&self) -> impl Future<Output = Result<u128>> + Send;
    /// The gas `tx` would use now (refused with the contract's error if it would revert).
    fn estimate_gas(&self, tx: &TxRequest) -> impl Future<Output = Result<u64>> + Send;
    /// Signs `tx` with `params` and broadcasts it; returns its hash. Broadcasting the same
    /// transaction again (same parameters) is harmless and returns the same hash.
    fn broadcast(
        &self,
        tx: TxRequest,
        params: TxParams,
    ) -> impl Future<Output = Result<B256>> + Send;
    /// The transaction's receipt, once it is in a block.
    fn receipt(&self, hash: B256) -> impl Future<Output = Result<Option<Mined>>> + Send;
}

/// What the engine needs from the contract: read a channel, settle a batch, close
/// cooperatively, and watch withdrawal requests.
pub trait ChannelChain: Send + Sync + 'static {
    /// The chain id.
    fn chain_id(&self) -> u64;
    /// The `PaymentChannels` contract.
    fn contract(&self) -> Address;
    /// The channel as the contract holds it, or `None` when no channel has this id.
    fn read_channel(&self, id: B256) -> impl Future<Output = Result<Option<ChannelInfo>>> + Send;
    /// Submits a batch of claims; invalid claims are skipped, not reverted.
    fn settle(&self, claims: &[Claim]) -> impl Future<Output = Result<SettleOutcome>> + Send;
    /// Settles `claim` as final and refunds the rest, with the payee's `Close` signature.
    fn close_cooperative(
        &self,
        claim: &Claim,
        payee_signature: &Signature,
    ) -> impl Future<Output = Result<CloseOutcome>> + Send;
    /// The latest block number.
    fn block_number(&self) -> impl Future<Output = Result<u64>> + Send;
    /// What happened to channels in blocks `from..=to` (those of the kinds `events` asks for),
    /// in chain order, each with its block.
    fn channel_events(
        &self,
        from: u64,
        to: u64,
        events: Events,
    ) -> impl Future<Output = Result<Vec<(ChannelEvent, u64)>>> + Send;
}

/// Which of the contract's channel events a read asks the node for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Events {
    /// Every channel event, `Opened` included.
    All,
    /// The events that change a channel already open: all but `Opened`. What a read of blocks
    /// already read once (a reorg window) or a watch for withdrawals needs: on a busy chain
    /// `Opened` logs are most of the logs, one per channel, and the largest.
    Changes,
}

/// A change to a channel, from the contract's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelEvent {
    /// `Opened`: a new channel, as the contract holds it right after (nothing claimed, no
    /// withdrawal requested).
    Opened(crate::channel::ChannelInfo),
    /// `Settled` named the channel: its claimed total changed.
    Settled {
        /// The channel.
        channel_id: B256,
    },
    /// `ToppedUp`: the deposit grew.
    ToppedUp {
        /// The channel.
        channel_id: B256,
        /// The deposit after it.
        deposit: u128,
    },
    /// `WithdrawRequested`: the payee must claim before `withdraw_at`.
    WithdrawRequested(WithdrawRequest),
    /// `Withdrawn`: the channel is closed, its rest refunded.
    Withdrawn {
        /// The channel.
        channel_id: B256,
    },
    /// `ClosedCooperatively`: the channel is closed.
    Closed {
        /// The channel.
        channel_id: B256,
    },
}

impl ChannelEvent {
    /// The channel it is about.
    pub fn channel_id(&self) -> B256 {
        match self {
            Self::ToppedUp { channel_id, .. }
            | Self::Settled { channel_id }
            | Self::Withdrawn { channel_id }
            | Self::Closed { channel_id } => *channel_id,
            Self::Opened(info) => info.id,
            Self::WithdrawRequested(r) => r.channel_id,
        }
    }
}
