//! The persistence boundary for channel states (DESIGN.md section 6): the [`ChannelStore`]
//! trait, with [`redis::RedisStore`] for production and [`memory::MemoryStore`] for the demo and
//! logic tests.
//!
//! What is stored per channel: the last accepted state (nonce, cumulative, the payer's
//! signature), the consumption so far (exactly, and rounded up), whether the payee consented to
//! a cooperative close, and the claim queued for settlement when a session ends. Beside them,
//! per channel: the lease of the one process serving it, with its fencing token (every money
//! write of a session carries it, and a stale one is refused), and the session record a resume
//! needs (so any process on the store, or this one after a restart, can resume it).

pub mod memory;
pub mod redis;
pub mod settlement;

pub use settlement::{InFlight, QueuedClaim, SettlementStore, SkippedClaim};

use std::future::Future;
use std::time::Duration;

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

/// A fencing token: the generation of a channel's lease a write is made under. Every lease
/// taken on a channel gets a higher one; a money write under an older one is refused
/// ([`StoreError::Fenced`]). [`Fence::NONE`] writes without the check (the settler, tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Fence(pub u64);

impl Fence {
    /// No lease check: for writers that hold no lease (the settler, tools and tests).
    pub const NONE: Fence = Fence(0);
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What a resume needs of a session, kept in the store for the resume window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session id.
    pub sid: String,
    /// The only resume token id (`jti`) accepted next.
    pub jti: String,
    /// The `seq` the next delivered unit gets.
    pub next_seq: u64,
    /// The `seq` of the first unit of the request streaming when this was written, if one was.
    pub request: Option<u64>,
    /// The process that wrote it last (its lease holder id): tells a resume on another
    /// process from one on the same.
    pub holder: String,
    /// Written when the session was parked: its `next_seq` is exact. While the session is live
    /// the record lags (up to one usage interval), so a session restored from a record its
    /// process never parked (a crash) skips ahead in `seq` rather than reuse numbers.
    pub parked: bool,
}

/// How [`ChannelStore::put_session`] writes a session record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionWrite {
    /// A new session on the channel: its record replaces any other (whose tokens die with it).
    Fresh,
    /// Progress of the recorded session (`next_seq`, `request`, `holder`), if its `sid` is
    /// still the recorded one.
    Progress,
    /// The recorded session ended for good (`close`, or a fatal error): its record is deleted,
    /// if its `sid` is still the recorded one, so no token of it resumes anything.
    End,
}

/// A lease renewed, or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Still this holder's.
    Held,
    /// Still this holder's, but a client presented the session's current resume token
    /// elsewhere: the holder should let the session go (park it and release the lease).
    Wanted,
    /// Another holder took the channel (or the lease expired and was taken): stop at once.
    Lost,
}

/// The answer to a resume presented to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    /// The token was the session's current one: it is spent (the next is `new_jti`), and the
    /// lease is this holder's under `fence`.
    Taken {
        /// The session as recorded (before this resume: `holder` is who served it last).
        record: SessionRecord,
        /// The new lease's fencing token.
        fence: Fence,
        /// The channel's stored state, read in the same step as the lease was taken.
        stored: Box<Option<StoredChannel>>,
    },
    /// No such session (never, expired past the window, ended, or replaced by a new `open`).
    Unknown,
    /// The session's token was already spent (rotated by another resume).
    Used,
    /// Another holder still has the channel: it has been asked to let go; retry shortly.
    Busy,
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
    /// The write carried a fencing token older than the channel's: another process (or
    /// connection) took the channel over. Nothing was written; the writer must stop serving it.
    #[error("fenced: this session's lease ({fence}) was taken over ({current})")]
    Fenced {
        /// The fence the write carried.
        fence: Fence,
        /// The channel's current one.
        current: Fence,
    },
    /// Another holder has the channel's lease: it is being served elsewhere (`channel_busy`).
    #[error("the channel is being served by another session")]
    LeaseHeld,
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
            Self::Fenced { .. } => "session_superseded",
            Self::LeaseHeld => "channel_busy",
            Self::CumulativeDecreased { .. } => "cumulative_decreased",
            Self::Unavailable(_) | Self::Corrupt { .. } => "store_unavailable",
        }
    }
}

/// Where accepted channel states live.
///
/// The contract every implementation keeps:
/// - Every money write (`save_voucher`, `save_consumed`, `mark_closing`, `queue_claim`) carries
///   the writer's [`Fence`]; unless it is [`Fence::NONE`], a write under a fence other than the
///   channel's current one is refused with [`StoreError::Fenced`] and changes nothing.
/// - `save_voucher` persists iff the new nonce is greater than the stored one and the new
///   cumulative is not below the stored one (compare-and-set); it is durable (as the backend is
///   configured to be) before it returns, and the caller acknowledges the client only after it
///   resolves. A refused write changes nothing.
/// - `save_consumed` only ever raises the stored consumption (compared by its rounded-up
///   value; at an equal one, the exact value under the same denominator).
/// - `queue_claim` replaces any claim queued for the same channel by the larger amount.
/// - `mark_closing` records the payee's consent to close once; it is never cleared. It fails
///   when the channel has no record (then the close must not be signed).
/// - A channel's lease has one holder at a time; each lease taken gets a higher fence. A lease
///   expires `ttl` after it was taken or last renewed; an expired one not yet taken by another
///   holder is renewed as before.
/// - A session record lives `session_ttl` after it was last written or renewed; a resume spends
///   its token id atomically: of two resumes with one token, exactly one is `Taken`.
pub trait ChannelStore: Send + Sync + 'static {
    /// Persists a newly accepted voucher (compare-and-set on the nonce and the cumulative).
    fn save_voucher(
        &self,
        channel_id: B256,
        voucher: StoredVoucher,
        fence: Fence,
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
        fence: Fence,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records that the payee is about to sign `Close(channel, amount)`: from then on the
    /// channel takes no new session or voucher. Must be durable before the signature exists.
    fn mark_closing(
        &self,
        channel_id: B256,
        amount: u128,
        fence: Fence,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Queues a claim for the settler.
    fn queue_claim(
        &self,
        claim: PendingClaim,
        fence: Fence,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes the channel's lease for `holder` under a new, higher fence (also when `holder`
    /// had it: the lease is a new session's), and reads the channel's state in the same step
    /// (what an earlier holder wrote before letting go is in it); [`StoreError::LeaseHeld`]
    /// while another holder has it.
    fn take_lease(
        &self,
        channel_id: B256,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<(Fence, Option<StoredChannel>), StoreError>> + Send;

    /// Renews `holder`'s lease under `fence` for `ttl`, and the session record for
    /// `session_ttl`.
    fn renew_lease(
        &self,
        channel_id: B256,
        holder: &str,
        fence: Fence,
        ttl: Duration,
        session_ttl: Duration,
    ) -> impl Future<Output = Result<LeaseStatus, StoreError>> + Send;

    /// Releases `holder`'s lease under `fence` (nothing if it is no longer theirs).
    fn release_lease(
        &self,
        channel_id: B256,
        holder: &str,
        fence: Fence,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes the channel's session record (fenced), alive for `session_ttl` (except `End`,
    /// which deletes it); see [`SessionWrite`].
    fn put_session(
        &self,
        channel_id: B256,
        record: &SessionRecord,
        write: SessionWrite,
        fence: Fence,
        session_ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A resume of session `sid` with token id `jti`: if that is the recorded session's current
    /// token and no other holder has the channel, spends it (the next is `new_jti`), gives
    /// `holder` the lease (a new fence) and reads the channel's state, in one atomic step. While
    /// another holder has the lease, marks the record wanted (its holder's next renewal says
    /// [`LeaseStatus::Wanted`]) and answers [`Resumed::Busy`].
    #[allow(clippy::too_many_arguments)]
    fn resume_session(
        &self,
        channel_id: B256,
        sid: &str,
        jti: &str,
        new_jti: &str,
        holder: &str,
        ttl: Duration,
        session_ttl: Duration,
    ) -> impl Future<Output = Result<Resumed, StoreError>> + Send;

    /// The queued claims, up to `limit`.
    fn pending_claims(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<PendingClaim>, StoreError>> + Send;

    /// Whether the store answers (for `/healthz` and to resume paused delivery).
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
