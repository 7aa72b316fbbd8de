//! Per-connection logic, I/O-free (DESIGN.md sections 4.2 and 5): messages and time in,
//! [`Effect`]s out. The server performs the effects (check a signature, persist, send, queue a
//! claim, close) and feeds back what happened; nothing here awaits or reads a clock.
//!
//! The money rules live here:
//! - a voucher's fields are checked, then its signature ([`Effect::Verify`], off the reactor),
//!   then it is [`Effect::Persist`]ed, and only once the server reports it stored
//!   ([`Session::persisted`]) is it acknowledged (`voucher_ack`) and its credit used;
//! - `open` needs a state the payer signed after the stored one (a nonce above it): the stored
//!   voucher is public (plain `ws://`, a proxy's log, `settle` calldata) and must not open a
//!   session for whoever repeats it;
//! - a unit is delivered only if the meter can charge it within the accepted cumulative, and
//!   only while the client answers its heartbeats ([`Session::deliver`]); otherwise delivery
//!   pauses (`paused`) until a voucher, or a Pong, arrives;
//! - `need_voucher` goes out early, is repeated while delivery is paused for credit, and has a
//!   deadline after which the session closes with 4408;
//! - a request needs credit for its first unit; requests are rate limited, one streams at a
//!   time, and each ends with `end`;
//! - consumption is carried exactly from one session on a channel to the next;
//! - at the end the final claim (the consumption, rounded up) is queued for settlement, and the
//!   receipt tells the client its refund. A channel the chain shows closing ends the session.

mod requests;
pub mod resume;

use std::collections::VecDeque;
use std::sync::Arc;

use alloy::primitives::{Address, B256};

use crate::channel::{
    AcceptedState, ChannelDomain, ChannelError, ChannelInfo, ChannelState, OpenChannel,
    SignedState, VerifiedState, signature,
};
use crate::meter::{Exact, Meter, MeterConfig, Nanos, PauseReason, Tariff};
use crate::protocol::{
    ClientMessage, CloseCode, EndReason, ErrorData, ServerMessage, SignedStateMsg,
};
use crate::store::{PendingClaim, SessionRecord, StoreError, StoredChannel, StoredVoucher};
use requests::{Admission, Requests};

pub use requests::DEFAULT_MAX_REQUESTS_PER_SEC;

/// 30 s to answer `need_voucher` before the session closes with 4408: well above any round
/// trip, well below the time a client could stream on an unpaid promise.
pub const DEFAULT_VOUCHER_DEADLINE_MS: u64 = 30_000;
/// A `usage` message (and a persisted consumption) every 2 s.
pub const DEFAULT_USAGE_INTERVAL_MS: u64 = 2_000;
/// Heartbeat (Ping) interval, as in the 402 challenge.
pub const DEFAULT_HEARTBEAT_MS: u64 = 5_000;
/// At most 20 vouchers in any second: an honest client signs one per credit window.
pub const DEFAULT_MAX_VOUCHERS_PER_SEC: usize = 20;
/// While delivery is paused for credit, an unanswered `need_voucher` is repeated every second
/// until its deadline: cheap, and a client that deferred the first ask answers within one.
pub const REASK_INTERVAL_MS: u64 = 1_000;
/// A live session queues its claim every minute: a long session is settled as it goes, and a
/// crash leaves at most a minute of consumption unclaimed in the queue (it is in the store).
pub const DEFAULT_CLAIM_INTERVAL_MS: u64 = 60_000;
/// While delivery is paused for the store, whether it answers again is checked every second.
pub const STORE_PROBE_MS: u64 = 1_000;
/// A channel must give the payee at least an hour to claim after a withdrawal request (the
/// contract allows 15 minutes): time for the settler to claim through an RPC outage or a
/// congested chain, before the payer can take the deposit back.
pub const DEFAULT_MIN_WITHDRAW_DELAY_SECS: u32 = 3_600;

const NS_PER_MS: u64 = 1_000_000;

/// How far `seq` skips ahead when a session is restored from a record its process did not park
/// (a crash): more units than any stream delivers between two writes of its record (one usage
/// interval: 2^20 units is half a million a second for 2 s).
pub const CRASH_SEQ_GAP: u64 = 1 << 20;

/// What every session of a server shares.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// The contract's signing domain.
    pub domain: ChannelDomain,
    /// This server's payee.
    pub payee: Address,
    /// The token it charges in.
    pub token: Address,
    /// What it charges.
    pub tariff: Tariff,
    /// Metering thresholds and the credit window.
    pub meter: MeterConfig,
    /// Smallest deposit accepted.
    pub min_deposit: u128,
    /// Shortest `withdrawDelay` accepted: the time the settler has to claim after a payer
    /// requests a withdrawal.
    pub min_withdraw_delay_secs: u32,
    /// Ping interval.
    pub heartbeat_ms: u64,
    /// Interval of `usage` messages and consumption saves.
    pub usage_interval_ms: u64,
    /// Time to answer `need_voucher`.
    pub voucher_deadline_ms: u64,
    /// Voucher flood limit (closes with 4429).
    pub max_vouchers_per_sec: usize,
    /// Requests accepted per second (`rate_limited` above it, 4429 above twice it).
    pub max_requests_per_sec: usize,
    /// A request while another streams cancels the running one (`end {cancelled}`) instead of
    /// being refused with `request_in_progress`.
    pub replace_requests: bool,
    /// A live session queues a claim for its consumption so far this often, so a long session
    /// is settled as it goes (the settler decides when it is worth it).
    pub claim_interval_ms: u64,
}

impl SessionParams {
    /// Parameters with the defaults for everything but the domain, the payee, the token, the
    /// tariff and the credit window.
    pub fn new(
        domain: ChannelDomain,
        payee: Address,
        token: Address,
        tariff: Tariff,
        credit_window: u128,
    ) -> Self {
        Self {
            domain,
            payee,
            token,
            tariff,
            meter: MeterConfig::with_credit_window(credit_window),
            min_deposit: 0,
            min_withdraw_delay_secs: DEFAULT_MIN_WITHDRAW_DELAY_SECS,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            usage_interval_ms: DEFAULT_USAGE_INTERVAL_MS,
            voucher_deadline_ms: DEFAULT_VOUCHER_DEADLINE_MS,
            max_vouchers_per_sec: DEFAULT_MAX_VOUCHERS_PER_SEC,
            max_requests_per_sec: DEFAULT_MAX_REQUESTS_PER_SEC,
            replace_requests: false,
            claim_interval_ms: DEFAULT_CLAIM_INTERVAL_MS,
        }
    }
}

/// Something the server must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a message.
    Send(ServerMessage),
    /// Check that `payer` signed `voucher` under `domain` (the costly step: off the async
    /// reactor), then call [`Session::verified`] with the result before anything else.
    Verify {
        /// The channel's payer.
        payer: Address,
        /// The signing domain.
        domain: ChannelDomain,
        /// The voucher.
        voucher: SignedState,
    },
    /// Store this voucher, then call [`Session::persisted`] with the result before anything
    /// else. Nothing about it is acknowledged until then.
    Persist {
        /// The channel.
        channel_id: B256,
        /// The voucher.
        voucher: StoredVoucher,
    },
    /// Save the consumption, exactly.
    PersistConsumed {
        /// The channel.
        channel_id: B256,
        /// Consumption so far.
        consumed: Exact,
    },
    /// Queue the final claim for the settler.
    QueueClaim(PendingClaim),
    /// Close the channel cooperatively with this final claim (the server signs `Close`).
    CloseChannel(PendingClaim),
    /// Start the resource on this request body.
    Request(serde_json::Value),
    /// Stop the running request's resource (it was cancelled).
    CancelRequest,
    /// Check whether the store answers again, then call [`Session::store_probed`].
    ProbeStore,
    /// For `/metrics`: base units consumed and queued for settlement since the last account
    /// of this session (so resumes and closes count each unit once).
    Account {
        /// Newly consumed.
        consumed: u128,
        /// Newly queued or closed for settlement.
        queued: u128,
    },
    /// Close the WebSocket with this code.
    Close(CloseCode, String),
}

impl Effect {
    /// Whether the effect writes money under the session's lease (a voucher, the consumption,
    /// a claim, a close): the server holds the channel until none is left to perform.
    pub fn writes_money(&self) -> bool {
        matches!(
            self,
            Self::Persist { .. }
                | Self::PersistConsumed { .. }
                | Self::QueueClaim(_)
                | Self::CloseChannel(_)
        )
    }
}

/// What the chain says happened to a channel, as the server's watcher reads its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainUpdate {
    /// The deposit grew to `deposit` (`ToppedUp`).
    ToppedUp {
        /// The new deposit.
        deposit: u128,
    },
    /// The payer requested a withdrawal: the channel takes no new credit.
    WithdrawRequested,
    /// The channel was withdrawn or closed cooperatively: nothing more can be claimed.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The `open` voucher is being stored.
    Opening,
    /// Streaming.
    Open,
    /// Ended: nothing more happens.
    Closed,
}

/// The voucher in flight (at most one).
#[derive(Debug)]
enum InFlight {
    /// Its signature is being checked.
    Verifying(SignedState),
    /// It is being stored.
    Storing(VerifiedState),
}

/// What a new session on a channel starts from.
#[derive(Debug, Clone)]
pub struct Opening {
    /// The channel as the chain holds it.
    pub info: ChannelInfo,
    /// What the store holds for it.
    pub stored: Option<StoredChannel>,
    /// Consumption of an earlier session on the channel that the store may not have yet (a
    /// write still being retried).
    pub carried: Option<Exact>,
    /// The `open` voucher, its signature already checked against the channel's payer.
    pub voucher: VerifiedState,
}

/// One session on one channel.
#[derive(Debug)]
pub struct Session {
    params: Arc<SessionParams>,
    id: String,
    channel: OpenChannel,
    meter: Meter,
    phase: Phase,
    /// Boxed: a voucher is in flight for a millisecond or so, and an idle session keeps only
    /// the pointer.
    in_flight: Option<Box<InFlight>>,
    seq: u64,
    /// A `paused` message went out and no `resumed` since.
    paused_sent: bool,
    /// When the `need_voucher` sent last must be answered by.
    voucher_deadline: Option<Nanos>,
    /// When the last `need_voucher` went out.
    asked_at: Nanos,
    next_usage: Nanos,
    recent_vouchers: VecDeque<Nanos>,
    /// The consumption last handed to [`Effect::PersistConsumed`].
    persisted_consumed: Exact,
    /// The resume token to give in the next `session` message (rotated on every resume), moved
    /// into that message: the session does not keep it after.
    resume_token: String,
    requests: Requests,
    /// What [`Effect::Account`] reported so far: consumed, and queued for settlement.
    counted: (u128, u128),
    /// The chain showed the channel closing while the session was parked.
    closing: Option<&'static str>,
    /// While delivery is paused for the store: when to check whether it answers again.
    store_probe_at: Option<Nanos>,
    /// When the live session next queues its claim.
    next_claim: Nanos,
}

/// `error` with the channel's accepted state, so the client can re-sync.
fn error(
    code: &str,
    message: impl Into<String>,
    retriable: bool,
    data: Option<ErrorData>,
) -> Effect {
    Effect::Send(ServerMessage::Error {
        code: code.into(),
        message: message.into(),
        retriable,
        data,
    })
}

/// The accepted state of `channel` and the consumption, with the payer's signature over the
/// state when there is one (so a client can check it signed it).
fn error_data(channel: &OpenChannel, consumed: u128) -> ErrorData {
    let a = channel.accepted();
    ErrorData {
        nonce: a.nonce,
        cumulative: a.cumulative,
        consumed,
        signature: a.signature.map(|s| signature::to_bytes(&s).to_vec().into()),
    }
}

/// A wire voucher's fields and parsed signature.
pub fn parse_voucher(msg: &SignedStateMsg) -> Result<SignedState, ChannelError> {
    let signature = signature::parse_signature(&msg.signature)?;
    Ok(SignedState {
        state: ChannelState {
            channelId: msg.channel_id,
            nonce: msg.nonce,
            cumulative: msg.cumulative,
        },
        signature,
    })
}

fn stored_voucher(voucher: &SignedState) -> StoredVoucher {
    StoredVoucher {
        nonce: voucher.state.nonce,
        cumulative: voucher.state.cumulative,
        signature: voucher.signature,
    }
}

/// The error and close 4402 for a channel this server cannot take credit on.
fn refuse_channel(code: &str, message: String) -> Vec<Effect> {
    vec![
        error(code, message, false, None),
        Effect::Close(CloseCode::PaymentRequired, code.into()),
    ]
}

impl Session {
    /// The checks of a channel that need no signature: open on-chain for this server's payee
    /// and token, not closing, with at least the minimum deposit and withdrawal delay. The
    /// server runs them before the signature check, so a channel that cannot pay it costs no
    /// ECDSA; [`Session::open`] runs them again. On failure, the effects refuse it (4402).
    pub fn precheck(params: &SessionParams, info: &ChannelInfo) -> Result<(), Vec<Effect>> {
        Self::channel_for(params, info).map(|_| ())
    }

    fn channel_for(params: &SessionParams, info: &ChannelInfo) -> Result<OpenChannel, Vec<Effect>> {
        let channel =
            OpenChannel::open(params.domain, *info, params.payee, params.token).map_err(|e| {
                let mut effects = vec![error(e.code(), e.to_string(), e.retriable(), None)];
                if let Some(code) = e.close_code() {
                    effects.push(Effect::Close(code, e.code().into()));
                }
                effects
            })?;
        if info.deposit < params.min_deposit {
            return Err(refuse_channel(
                "insufficient_deposit",
                format!(
                    "deposit {} is below the minimum {}",
                    info.deposit, params.min_deposit
                ),
            ));
        }
        if info.withdraw_delay < params.min_withdraw_delay_secs {
            return Err(refuse_channel(
                "withdraw_delay_too_short",
                format!(
                    "the channel's withdrawDelay is {} s; this server needs at least {} s to claim after a withdrawal request",
                    info.withdraw_delay, params.min_withdraw_delay_secs
                ),
            ));
        }
        Ok(channel)
    }

    /// Starts a session from a checked `open`, given the chain's view of the channel and what
    /// the store holds. On success the session is `Opening` and the effects persist the
    /// voucher, once the server has reserved the channel for it ([`Session::admitted`]). On
    /// failure the effects answer the client; no session exists.
    pub fn open(
        params: Arc<SessionParams>,
        id: String,
        opening: Opening,
        now: Nanos,
    ) -> Result<(Self, Vec<Effect>), Vec<Effect>> {
        let info = opening.info;
        let mut channel = Self::channel_for(&params, &info)?;
        let mut consumed = Exact::whole(info.claimed);
        // What the store has: anything above it (a write of this process still being retried,
        // under an older lease's fence that the store will refuse) is written again by this
        // session, under its own.
        let in_store = opening.stored.map_or(Exact::whole(0), |s| s.consumed);
        if let Some(stored) = opening.stored {
            if let Some(amount) = stored.closing {
                return Err(refuse_channel(
                    "channel_closing",
                    format!(
                        "the payee agreed to close this channel at {amount}; open a new channel"
                    ),
                ));
            }
            channel = channel.restore_floor(AcceptedState {
                nonce: stored.voucher.nonce,
                cumulative: stored.voucher.cumulative,
                signature: Some(stored.voucher.signature),
            });
            consumed = consumed.max(stored.consumed);
        }
        if let Some(carried) = opening.carried {
            consumed = consumed.max(carried);
        }
        if let Err(e) = channel.check_verified(&opening.voucher) {
            let data = error_data(&channel, consumed.ceil());
            return Err(vec![error(
                e.code(),
                e.to_string(),
                e.retriable(),
                Some(data),
            )]);
        }
        let meter = Meter::resume_from(
            &params.tariff,
            params.meter,
            channel.accepted().cumulative,
            consumed,
            now,
        )
        .map_err(|e| vec![error("internal_error", e.to_string(), false, None)])?;
        let next_usage = now.saturating_add(params.usage_interval_ms.saturating_mul(NS_PER_MS));
        let next_claim = now.saturating_add(params.claim_interval_ms.saturating_mul(NS_PER_MS));
        let start = meter.consumed();
        let effect = Effect::Persist {
            channel_id: info.id,
            voucher: stored_voucher(opening.voucher.signed()),
        };
        let session = Self {
            params,
            id,
            channel,
            meter,
            phase: Phase::Opening,
            in_flight: Some(Box::new(InFlight::Storing(opening.voucher))),
            seq: 0,
            paused_sent: false,
            voucher_deadline: None,
            asked_at: 0,
            next_usage,
            recent_vouchers: VecDeque::new(),
            persisted_consumed: in_store,
            resume_token: String::new(),
            requests: Requests::default(),
            counted: (start, start),
            closing: None,
            store_probe_at: None,
            next_claim,
        };
        Ok((session, vec![effect]))
    }

    /// A session resumed from the store (DESIGN.md section 6): its process is gone or another
    /// one parked it, and this one holds the channel's lease now. It goes on from the stored
    /// state: the last accepted voucher, the consumption saved (at most one usage interval
    /// behind what was delivered, in the client's favour), and the record's `seq`; a request
    /// the record shows streaming ends `interrupted` when it is resumed ([`Session::resume`]).
    /// `carried` is a consumption of the channel this process still holds for the store.
    pub fn restore(
        params: Arc<SessionParams>,
        record: &SessionRecord,
        info: ChannelInfo,
        stored: StoredChannel,
        carried: Option<Exact>,
        now: Nanos,
    ) -> Result<Self, Vec<Effect>> {
        let (id, next_seq, request) = (record.sid.clone(), record.next_seq, record.request);
        // A record its process never parked (it crashed) may lag the units delivered: the
        // next request's units skip ahead rather than reuse numbers the client has seen.
        let seq = if record.parked {
            next_seq
        } else {
            next_seq.saturating_add(CRASH_SEQ_GAP)
        };
        let channel = Self::channel_for(&params, &info)?;
        let in_store = stored.consumed;
        if let Some(amount) = stored.closing {
            return Err(refuse_channel(
                "channel_closing",
                format!("the payee agreed to close this channel at {amount}; open a new channel"),
            ));
        }
        let channel = channel.restore_floor(AcceptedState {
            nonce: stored.voucher.nonce,
            cumulative: stored.voucher.cumulative,
            signature: Some(stored.voucher.signature),
        });
        let mut consumed = Exact::whole(info.claimed).max(stored.consumed);
        if let Some(carried) = carried {
            consumed = consumed.max(carried);
        }
        let meter = Meter::resume_from(
            &params.tariff,
            params.meter,
            channel.accepted().cumulative,
            consumed,
            now,
        )
        .map_err(|e| vec![error("internal_error", e.to_string(), false, None)])?;
        let mut requests = Requests::default();
        if let Some(first) = request {
            requests.start(first);
            requests.interrupt(next_seq);
        }
        let next_usage = now.saturating_add(params.usage_interval_ms.saturating_mul(NS_PER_MS));
        let next_claim = now.saturating_add(params.claim_interval_ms.saturating_mul(NS_PER_MS));
        let start = meter.consumed();
        Ok(Self {
            params,
            id,
            channel,
            meter,
            phase: Phase::Open,
            in_flight: None,
            seq,
            paused_sent: false,
            voucher_deadline: None,
            asked_at: 0,
            next_usage,
            recent_vouchers: VecDeque::new(),
            persisted_consumed: in_store,
            resume_token: String::new(),
            requests,
            counted: (start, start),
            closing: None,
            store_probe_at: None,
            next_claim,
        })
    }

    /// The first `seq` of a request that has not ended (streaming, or cut by a disconnect and
    /// not yet told `interrupted`), for the session record.
    pub fn unended_request(&self) -> Option<u64> {
        self.requests.unended()
    }

    /// The session's lease could not be renewed in time: another process may take the channel,
    /// so nothing more is delivered (and no time is charged) until it is renewed
    /// ([`Session::lease_renewed`]). Only a renewal lifts this pause.
    pub fn lease_lapsed(&mut self, now: Nanos) -> Vec<Effect> {
        if self.phase != Phase::Open || self.meter.is_paused(PauseReason::LeaseLapsed) {
            return Vec::new();
        }
        self.meter.pause(PauseReason::LeaseLapsed, now);
        if self.paused_sent {
            return Vec::new();
        }
        self.paused_sent = true;
        vec![Effect::Send(ServerMessage::Paused {
            reason: "store_unavailable".into(),
        })]
    }

    /// The session's lease was renewed after it lapsed: delivery goes on (unless something
    /// else still pauses it).
    pub fn lease_renewed(&mut self, now: Nanos) -> Vec<Effect> {
        if !self.meter.is_paused(PauseReason::LeaseLapsed) {
            return Vec::new();
        }
        self.meter.resume(PauseReason::LeaseLapsed, now);
        if self.paused_sent && self.can_deliver() {
            self.paused_sent = false;
            return vec![Effect::Send(ServerMessage::Resumed {})];
        }
        Vec::new()
    }

    /// The opening could not be completed after its voucher was stored (the session's record
    /// was not written, so it could not be resumed): there is no session. Nothing was
    /// delivered; the client opens again with its next nonce.
    pub fn abandon(&mut self, now: Nanos) {
        self.meter.disconnect(now);
        self.phase = Phase::Closed;
    }

    /// The channel was reserved for this opening session: its resume token.
    pub fn admitted(&mut self, resume_token: String) {
        self.resume_token = resume_token;
    }

    /// Moves to `Open`: connects the meter and says `session`.
    fn opened(&mut self, now: Nanos) -> Vec<Effect> {
        self.phase = Phase::Open;
        self.meter.connect(now);
        let accepted = *self.channel.accepted();
        let message = ServerMessage::Session {
            session_id: self.id.clone(),
            resume_token: std::mem::take(&mut self.resume_token),
            channel_id: self.channel.info().id,
            nonce: accepted.nonce,
            cumulative: accepted.cumulative,
            consumed: self.meter.consumed(),
            tariff: Box::new(self.params.tariff),
            heartbeat_ms: self.params.heartbeat_ms,
        };
        vec![Effect::Send(message)]
    }

    /// The session's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The channel.
    pub fn channel_id(&self) -> B256 {
        self.channel.info().id
    }

    /// Whether the session is streaming (opened and not closed).
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Whether the session has ended (or its opening failed).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The meter (read-only).
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// The last accepted state.
    pub fn accepted(&self) -> AcceptedState {
        *self.channel.accepted()
    }

    /// The accepted state and the consumption, for an `error`'s `data`.
    pub fn error_data(&self) -> ErrorData {
        error_data(&self.channel, self.meter.consumed())
    }

    /// The signature check of the [`Effect::Verify`] of `checked` finished. An answer for a
    /// voucher that is not the one being checked (one a `resume` dropped) is ignored.
    pub fn verified(
        &mut self,
        checked: &SignedState,
        result: Result<VerifiedState, ChannelError>,
    ) -> Vec<Effect> {
        let voucher = match self.in_flight.take().map(|b| *b) {
            Some(InFlight::Verifying(voucher)) if voucher == *checked => voucher,
            other => {
                // An answer for a voucher no longer in flight: it says nothing of the one that is.
                self.in_flight = other.map(Box::new);
                return Vec::new();
            }
        };
        let checked = result.and_then(|v| {
            if v.signed() != &voucher {
                return Err(ChannelError::InvalidSignature(
                    signature::SignatureError::Unrecoverable,
                ));
            }
            self.channel.check_verified(&v)?;
            Ok(v)
        });
        match checked {
            Ok(v) => {
                let effect = Effect::Persist {
                    channel_id: self.channel_id(),
                    voucher: stored_voucher(v.signed()),
                };
                self.in_flight = Some(Box::new(InFlight::Storing(v)));
                vec![effect]
            }
            Err(e) => vec![error(
                e.code(),
                e.to_string(),
                e.retriable(),
                Some(self.error_data()),
            )],
        }
    }

    /// The store answered the [`Effect::Persist`] of `stored`. An answer for a voucher that is
    /// not the one being stored (one a `resume` dropped, answered after another took its
    /// place) is ignored: it says nothing of the voucher in flight, which is never
    /// acknowledged, nor its credit used, on another write's word.
    pub fn persisted(
        &mut self,
        stored: &StoredVoucher,
        result: Result<(), StoreError>,
        now: Nanos,
    ) -> Vec<Effect> {
        let voucher = match self.in_flight.take().map(|b| *b) {
            Some(InFlight::Storing(voucher)) if stored_voucher(voucher.signed()) == *stored => {
                voucher
            }
            other => {
                self.in_flight = other.map(Box::new);
                return Vec::new();
            }
        };
        match result {
            Ok(()) => {
                self.channel.apply_checked(voucher.signed());
                let cumulative = self.channel.accepted().cumulative;
                // The meter's cumulative only grows; the channel's accepted one is the same.
                let _ = self.meter.set_cumulative(cumulative, now);
                self.voucher_deadline = None;
                let mut effects = Vec::new();
                if self.meter.is_paused(PauseReason::StoreUnavailable) {
                    self.meter.resume(PauseReason::StoreUnavailable, now);
                }
                self.store_probe_at = None;
                if self.phase == Phase::Opening {
                    effects.extend(self.opened(now));
                    if let Some(reason) = self.closing {
                        // The chain showed the channel closing while it was being opened.
                        effects.extend(self.end_closing(reason, now));
                        return effects;
                    }
                } else {
                    let a = self.channel.accepted();
                    effects.push(Effect::Send(ServerMessage::VoucherAck {
                        nonce: a.nonce,
                        cumulative: a.cumulative,
                        consumed: self.meter.consumed(),
                    }));
                }
                if self.paused_sent && self.can_deliver() {
                    self.paused_sent = false;
                    effects.push(Effect::Send(ServerMessage::Resumed {}));
                }
                effects
            }
            Err(e) => {
                // Where the store is ahead (another writer), say where it is: a client re-syncs
                // its nonce from this (nonces cost nothing; cumulatives it checks itself).
                let mut data = self.error_data();
                match e {
                    StoreError::StaleNonce { stored, .. } => {
                        data.nonce = data.nonce.max(stored);
                        data.signature = None;
                    }
                    StoreError::CumulativeDecreased { stored, .. } => {
                        data.cumulative = data.cumulative.max(stored);
                        data.signature = None;
                    }
                    StoreError::Unavailable(_)
                    | StoreError::Corrupt { .. }
                    | StoreError::Fenced { .. }
                    | StoreError::LeaseHeld => {}
                }
                let mut effects = vec![error(e.code(), e.to_string(), true, Some(data))];
                let outage = matches!(e, StoreError::Unavailable(_) | StoreError::Corrupt { .. });
                if self.phase == Phase::Opening {
                    // No session without its opening voucher stored: the opening ends with the
                    // store's code. On an outage the connection closes (1011) so the client
                    // retries later, possibly elsewhere; otherwise it may open again at once.
                    self.phase = Phase::Closed;
                    if outage {
                        effects.push(Effect::Close(
                            CloseCode::Internal,
                            "store_unavailable".into(),
                        ));
                    }
                    return effects;
                }
                if outage {
                    self.meter.pause(PauseReason::StoreUnavailable, now);
                    self.store_probe_at = Some(now.saturating_add(STORE_PROBE_MS * NS_PER_MS));
                    if !self.paused_sent {
                        self.paused_sent = true;
                        effects.push(Effect::Send(ServerMessage::Paused {
                            reason: "store_unavailable".into(),
                        }));
                    }
                }
                effects
            }
        }
    }

    /// The answer to [`Effect::ProbeStore`]: when the store answers again, paid delivery goes
    /// on (the client re-sends the voucher the store refused when it is asked for credit);
    /// otherwise it is checked again a little later.
    pub fn store_probed(&mut self, up: bool, now: Nanos) -> Vec<Effect> {
        if !up {
            if self.store_probe_at.is_some() {
                self.store_probe_at = Some(now.saturating_add(STORE_PROBE_MS * NS_PER_MS));
            }
            return Vec::new();
        }
        self.store_recovered(now)
    }

    /// The store answers again after an outage: paid delivery goes on.
    pub fn store_recovered(&mut self, now: Nanos) -> Vec<Effect> {
        self.store_probe_at = None;
        if !self.meter.is_paused(PauseReason::StoreUnavailable) {
            return Vec::new();
        }
        self.meter.resume(PauseReason::StoreUnavailable, now);
        if self.paused_sent && self.can_deliver() {
            self.paused_sent = false;
            return vec![Effect::Send(ServerMessage::Resumed {})];
        }
        Vec::new()
    }

    /// Whether a unit could go out now as far as pauses go (the meter still has the last word).
    pub fn can_deliver(&self) -> bool {
        self.phase == Phase::Open
            && !self.meter.is_paused(PauseReason::Exhausted)
            && !self.meter.is_paused(PauseReason::StoreUnavailable)
            && !self.meter.is_paused(PauseReason::LeaseLapsed)
            && !self.meter.is_paused(PauseReason::Unresponsive)
    }

    /// The sequence number the next delivered unit gets.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Tries to deliver one unit of `bytes` bytes: `Ok(seq, effects)` if it is paid for (send
    /// it now, then the effects: a `need_voucher` when credit runs low), or the effects of
    /// pausing (the unit must wait for a voucher, or for the client to answer its heartbeat).
    pub fn deliver(&mut self, bytes: u64, now: Nanos) -> Result<(u64, Vec<Effect>), Vec<Effect>> {
        if self.phase == Phase::Open
            && self.meter.lapsed(now)
            && !self.meter.is_paused(PauseReason::Unresponsive)
        {
            // Time is not charged past the last heartbeat's liveness; nor is anything
            // delivered, or a client could stream for free by never answering Pings.
            self.meter.pause(PauseReason::Unresponsive, now);
        }
        if !self.can_deliver() {
            return Err(self.pause_effects(now));
        }
        match self.meter.try_message(bytes, now) {
            Ok(()) => {
                let seq = self.seq;
                self.seq += 1;
                Ok((seq, self.ask_for_voucher(now)))
            }
            Err(_) => Err(self.pause_effects(now)),
        }
    }

    fn pause_effects(&mut self, now: Nanos) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.phase != Phase::Open {
            return effects;
        }
        if !self.paused_sent && !self.can_deliver() {
            self.paused_sent = true;
            let reason = if self.meter.is_paused(PauseReason::StoreUnavailable)
                || self.meter.is_paused(PauseReason::LeaseLapsed)
            {
                "store_unavailable"
            } else if self.meter.is_paused(PauseReason::Exhausted) {
                "credit_exhausted"
            } else {
                "heartbeat_missed"
            };
            effects.push(Effect::Send(ServerMessage::Paused {
                reason: reason.into(),
            }));
        }
        effects.extend(self.ask_for_voucher(now));
        effects
    }

    fn ask_for_voucher(&mut self, now: Nanos) -> Vec<Effect> {
        let Some(ask) = self.meter.poll_need_voucher(now) else {
            return Vec::new();
        };
        let deposit = self.channel.deposit();
        let suggested = ask.suggested.min(deposit).max(ask.cumulative);
        if suggested <= ask.cumulative {
            // The deposit is used up: only a top-up can extend credit. Say so once.
            return vec![error(
                "exceeds_deposit",
                "the channel's deposit is used up; top it up to continue",
                true,
                Some(self.error_data()),
            )];
        }
        self.voucher_deadline =
            Some(now.saturating_add(self.params.voucher_deadline_ms.saturating_mul(NS_PER_MS)));
        self.asked_at = now;
        vec![Effect::Send(ServerMessage::NeedVoucher {
            consumed: ask.consumed,
            cumulative: ask.cumulative,
            suggested,
            deadline_ms: self.params.voucher_deadline_ms,
        })]
    }

    /// When an unanswered ask is repeated: while delivery is paused for credit, every
    /// [`REASK_INTERVAL_MS`] until the deadline. A client whose count lagged the server's when
    /// the first ask came (units in flight) may have deferred it; asking once per cumulative
    /// and then waiting for the deadline closed such sessions with 4408.
    fn reask_at(&self) -> Option<Nanos> {
        let deadline = self.voucher_deadline?;
        if self.in_flight.is_some() || !self.meter.is_paused(PauseReason::Exhausted) {
            return None;
        }
        let at = self
            .asked_at
            .saturating_add(REASK_INTERVAL_MS.saturating_mul(NS_PER_MS));
        (at < deadline).then_some(at)
    }

    /// Repeats the ask with the consumption as it stands, under the original deadline.
    fn reask(&mut self, now: Nanos) -> Vec<Effect> {
        let Some(deadline) = self.voucher_deadline else {
            return Vec::new();
        };
        let ask = self.meter.repeat_need_voucher(now);
        let suggested = ask
            .suggested
            .min(self.channel.deposit())
            .max(ask.cumulative);
        self.asked_at = now;
        vec![Effect::Send(ServerMessage::NeedVoucher {
            consumed: ask.consumed,
            cumulative: ask.cumulative,
            suggested,
            deadline_ms: deadline.saturating_sub(now) / NS_PER_MS,
        })]
    }

    /// A heartbeat (Pong) arrived: the client is alive, its time counts again, and delivery
    /// paused for a lapsed heartbeat resumes.
    pub fn pong(&mut self, now: Nanos) -> Vec<Effect> {
        self.meter.heartbeat(now);
        if !self.meter.is_paused(PauseReason::Unresponsive) {
            return Vec::new();
        }
        self.meter.resume(PauseReason::Unresponsive, now);
        if self.paused_sent && self.can_deliver() {
            self.paused_sent = false;
            return vec![Effect::Send(ServerMessage::Resumed {})];
        }
        Vec::new()
    }

    /// A measured round trip to the client.
    pub fn set_rtt(&mut self, rtt_ns: u64) {
        self.meter.set_rtt(rtt_ns);
    }

    /// Delivery is blocked on (`true`) or released from (`false`) a slow reader; the client is
    /// not charged for the wait. `at` is when the block began or ended.
    pub fn backpressure(&mut self, blocked: bool, at: Nanos) {
        if blocked {
            self.meter.pause(PauseReason::Backpressure, at);
        } else {
            self.meter.resume(PauseReason::Backpressure, at);
        }
    }

    /// Time passes: charges it, pauses at exhaustion, asks (and asks again) for a voucher,
    /// sends `usage`, and closes with 4408 when a `need_voucher` went unanswered past its
    /// deadline.
    pub fn tick(&mut self, now: Nanos) -> Vec<Effect> {
        if self.phase != Phase::Open {
            return Vec::new();
        }
        let mut effects = Vec::new();
        if self.meter.advance(now) && !self.paused_sent {
            effects.extend(self.pause_effects(now));
        } else {
            effects.extend(self.ask_for_voucher(now));
        }
        if let Some(deadline) = self.voucher_deadline
            && now >= deadline
        {
            if !self.meter.is_paused(PauseReason::Exhausted) {
                // The ask came early and the client has not needed the credit yet (its stream
                // ended, or its count did not allow a voucher): nothing was delivered unpaid and
                // none is waiting. The ask lapses, and the next one comes when credit runs low.
                self.voucher_deadline = None;
                self.meter.reset_ask();
            } else {
                effects.push(error(
                    "voucher_deadline",
                    "no voucher arrived before the need_voucher deadline",
                    false,
                    Some(self.error_data()),
                ));
                effects.extend(self.finish(false, CloseCode::VoucherDeadline, now, false));
                return effects;
            }
        }
        if self.reask_at().is_some_and(|at| now >= at) {
            effects.extend(self.reask(now));
        }
        if self.store_probe_at.is_some_and(|at| now >= at) {
            self.store_probe_at = Some(now.saturating_add(STORE_PROBE_MS * NS_PER_MS));
            effects.push(Effect::ProbeStore);
        }
        if now >= self.next_claim {
            // Settled as it goes: the claim for the consumption so far (replaced by larger ones;
            // the settler decides when it is worth the gas).
            self.next_claim =
                now.saturating_add(self.params.claim_interval_ms.saturating_mul(NS_PER_MS));
            effects.extend(self.persist_consumed());
            effects.extend(self.final_claim(false));
        }
        if now >= self.next_usage {
            self.next_usage =
                now.saturating_add(self.params.usage_interval_ms.saturating_mul(NS_PER_MS));
            let u = self.meter.usage();
            effects.push(Effect::Send(ServerMessage::Usage {
                consumed: u.consumed,
                cumulative: u.cumulative,
                remaining: u.remaining,
                messages: u.messages,
                bytes_in: u.bytes_in,
                bytes_out: u.bytes_out,
                elapsed_ns: u.elapsed_ns,
            }));
            effects.extend(self.persist_consumed());
        }
        effects
    }

    /// When [`Session::tick`] next has something to do.
    pub fn next_wakeup(&self) -> Option<Nanos> {
        if self.phase != Phase::Open {
            return None;
        }
        [
            Some(self.next_usage),
            Some(self.next_claim),
            self.voucher_deadline,
            self.reask_at(),
            self.store_probe_at,
            self.meter.exhausted_at().map(|t| t.saturating_add(1)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn persist_consumed(&mut self) -> Option<Effect> {
        let consumed = self.meter.exact_consumed();
        if consumed <= self.persisted_consumed {
            return None;
        }
        self.persisted_consumed = consumed;
        Some(Effect::PersistConsumed {
            channel_id: self.channel_id(),
            consumed,
        })
    }

    /// A message from the client on an open session.
    pub fn on_message(&mut self, message: ClientMessage, now: Nanos) -> Vec<Effect> {
        if self.phase != Phase::Open {
            return vec![error(
                "unexpected_message",
                "the session is not open",
                true,
                None,
            )];
        }
        match message {
            ClientMessage::Voucher(msg) => self.on_voucher(&msg, now),
            ClientMessage::Request { body } => self.on_request(body, now),
            ClientMessage::Close { close_channel } => {
                self.finish(close_channel, CloseCode::Normal, now, true)
            }
            ClientMessage::Open(_) | ClientMessage::Resume { .. } => {
                vec![error(
                    "unexpected_message",
                    "a session is already open on this connection",
                    true,
                    None,
                )]
            }
        }
    }

    fn on_request(&mut self, body: serde_json::Value, now: Nanos) -> Vec<Effect> {
        match self.requests.admit(now, self.params.max_requests_per_sec) {
            Admission::Admitted => {}
            Admission::Refused => {
                return vec![error(
                    "rate_limited",
                    format!(
                        "more than {} requests in a second",
                        self.params.max_requests_per_sec
                    ),
                    true,
                    None,
                )];
            }
            Admission::Flood => {
                let mut effects = vec![error(
                    "rate_limited",
                    "requests keep coming over the limit",
                    false,
                    None,
                )];
                effects.extend(self.finish(false, CloseCode::RateLimited, now, false));
                return effects;
            }
        }
        if self.requests.active() && !self.params.replace_requests {
            return vec![error(
                "request_in_progress",
                "a request is streaming; wait for its end",
                true,
                None,
            )];
        }
        let bytes = serde_json::to_vec(&body).map_or(0, |b| b.len() as u64);
        if let Err(e) = self.meter.try_request(bytes, now) {
            // Refused before anything else: a request that cannot be paid for does not cancel
            // the one streaming.
            let mut effects = vec![error(
                "payment_required",
                format!("{e}; the request needs credit for its first unit"),
                true,
                Some(self.error_data()),
            )];
            effects.extend(self.ask_for_voucher(now));
            return effects;
        }
        let mut effects = self.end_request(EndReason::Cancelled, None);
        self.requests.start(self.seq);
        effects.push(Effect::Request(body));
        effects
    }

    /// The streaming request's end (with the upstream's failure, if that is why): `end`, and
    /// `error {upstream_failed}` before it when the upstream failed. Cancels the resource when
    /// the request was cancelled.
    fn end_request(&mut self, reason: EndReason, failure: Option<String>) -> Vec<Effect> {
        let Some(last) = self.requests.finish(self.seq) else {
            return Vec::new();
        };
        let mut effects = Vec::new();
        if reason == EndReason::Cancelled {
            effects.push(Effect::CancelRequest);
        }
        if reason == EndReason::UpstreamFailed {
            effects.push(error(
                "upstream_failed",
                failure.unwrap_or_else(|| "the upstream failed".into()),
                true,
                None,
            ));
        }
        effects.push(Effect::Send(ServerMessage::End {
            seq: last,
            reason: reason.as_str().into(),
        }));
        effects
    }

    /// The resource finished the streaming request (every unit it produced was delivered):
    /// `end {seq, reason}`.
    pub fn request_ended(&mut self, reason: EndReason, failure: Option<String>) -> Vec<Effect> {
        if self.phase != Phase::Open {
            return Vec::new();
        }
        self.end_request(reason, failure)
    }

    fn on_voucher(&mut self, msg: &SignedStateMsg, now: Nanos) -> Vec<Effect> {
        let window = 1_000 * NS_PER_MS;
        while self
            .recent_vouchers
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= window)
        {
            self.recent_vouchers.pop_front();
        }
        if self.recent_vouchers.len() >= self.params.max_vouchers_per_sec {
            let mut effects = vec![error(
                "rate_limited",
                "too many vouchers",
                false,
                Some(self.error_data()),
            )];
            effects.extend(self.finish(false, CloseCode::RateLimited, now, false));
            return effects;
        }
        self.recent_vouchers.push_back(now);
        if self.in_flight.is_some() {
            return vec![error(
                "voucher_in_flight",
                "the previous voucher is still being checked and stored",
                true,
                Some(self.error_data()),
            )];
        }
        let checked = parse_voucher(msg).and_then(|v| {
            self.channel.check_fields(&v)?;
            Ok(v)
        });
        match checked {
            Ok(voucher) => {
                self.in_flight = Some(Box::new(InFlight::Verifying(voucher.clone())));
                vec![Effect::Verify {
                    payer: self.channel.info().payer,
                    domain: *self.channel.domain(),
                    voucher,
                }]
            }
            Err(e) => vec![error(
                e.code(),
                e.to_string(),
                e.retriable(),
                Some(self.error_data()),
            )],
        }
    }

    /// The chain says something happened to the channel. A top-up raises the deposit; a
    /// withdrawal request or a close ends a live session (error `channel_not_open`, the claim
    /// queued, close 4402): from then on the channel takes no new credit, and after the
    /// withdrawal nothing delivered could be claimed. A session that is not live (parked)
    /// only records it, and ends when it is resumed.
    pub fn chain_update(&mut self, update: ChainUpdate, now: Nanos) -> Vec<Effect> {
        let reason = match update {
            ChainUpdate::ToppedUp { deposit } => {
                if deposit <= self.channel.deposit() {
                    return Vec::new();
                }
                self.channel.raise_deposit(deposit);
                // A session that ran out of deposit was told to top up, and its ask lapsed
                // then: ask again now that the deposit allows more credit.
                self.meter.reset_ask();
                if self.phase != Phase::Open {
                    return Vec::new();
                }
                return self.ask_for_voucher(now);
            }
            ChainUpdate::WithdrawRequested => "the payer requested a withdrawal",
            ChainUpdate::Closed => "the channel was closed on-chain",
        };
        if self.phase != Phase::Open || !self.meter.is_connected() {
            self.closing = Some(reason);
            return Vec::new();
        }
        self.end_closing(reason, now)
    }

    fn end_closing(&mut self, reason: &'static str, now: Nanos) -> Vec<Effect> {
        let mut effects = vec![error(
            "channel_not_open",
            format!("{reason}: this channel takes no new credit"),
            false,
            Some(self.error_data()),
        )];
        effects.extend(self.finish(false, CloseCode::PaymentRequired, now, false));
        effects
    }

    /// The connection dropped without `close`, and the session may be resumed: the clock stops,
    /// a streaming request is cut (it ends `interrupted` on resume), consumption is saved and
    /// the claim queued (a later, larger claim replaces it), but the session stays open for
    /// [`Session::resume`].
    pub fn suspend(&mut self, now: Nanos) -> Vec<Effect> {
        if self.phase != Phase::Open {
            return Vec::new();
        }
        self.meter.disconnect(now);
        self.requests.interrupt(self.seq);
        let mut effects: Vec<Effect> = self.persist_consumed().into_iter().collect();
        effects.extend(self.final_claim(false));
        effects.extend(self.account());
        effects
    }

    /// The client came back with the session's resume token on a new connection: the session
    /// goes on with its balance and state, under a new token. A request the disconnect cut ends
    /// `interrupted` (it is not replayed). If the chain showed the channel closing meanwhile,
    /// the session ends instead.
    pub fn resume(&mut self, resume_token: String, now: Nanos) -> Vec<Effect> {
        if self.phase != Phase::Open {
            return Vec::new();
        }
        self.resume_token = resume_token;
        self.paused_sent = false;
        self.in_flight = None;
        let mut effects = self.opened(now);
        if let Some(last) = self.requests.take_interrupted() {
            effects.push(Effect::Send(ServerMessage::End {
                seq: last,
                reason: EndReason::Interrupted.as_str().into(),
            }));
        }
        if let Some(reason) = self.closing {
            effects.extend(self.end_closing(reason, now));
        }
        effects
    }

    /// The claim to settle what was consumed, or the cooperative close, if there is one.
    fn final_claim(&self, close_channel: bool) -> Option<Effect> {
        let accepted = *self.channel.accepted();
        let info = self.channel.info();
        let signature = accepted.signature?;
        let amount = self.meter.consumed().min(accepted.cumulative);
        let claim = PendingClaim {
            channel_id: info.id,
            voucher: StoredVoucher {
                nonce: accepted.nonce,
                cumulative: accepted.cumulative,
                signature,
            },
            amount,
        };
        if close_channel {
            Some(Effect::CloseChannel(claim))
        } else if amount > info.claimed {
            Some(Effect::QueueClaim(claim))
        } else {
            None
        }
    }

    /// What was consumed and queued since the last account.
    fn account(&mut self) -> Option<Effect> {
        let consumed = self.meter.consumed();
        let queued = consumed.min(self.channel.accepted().cumulative);
        let (counted_consumed, counted_queued) = self.counted;
        let delta = (
            consumed.saturating_sub(counted_consumed),
            queued.saturating_sub(counted_queued),
        );
        self.counted = (consumed.max(counted_consumed), queued.max(counted_queued));
        (delta != (0, 0)).then_some(Effect::Account {
            consumed: delta.0,
            queued: delta.1,
        })
    }

    /// The client disconnected without `close` and the session is not kept for resume: the
    /// clock stops, consumption is saved and the claim queued (a later claim for more replaces
    /// it).
    pub fn disconnected(&mut self, now: Nanos) -> Vec<Effect> {
        if self.phase == Phase::Closed {
            return Vec::new();
        }
        self.finish(false, CloseCode::Normal, now, false)
    }

    /// Ends the session: stops the meter, ends a streaming request (`cancelled`), saves
    /// consumption, queues the final claim (or closes the channel), sends the receipt when asked
    /// for, and closes the socket with `code`.
    fn finish(
        &mut self,
        close_channel: bool,
        code: CloseCode,
        now: Nanos,
        receipt: bool,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        self.meter.disconnect(now);
        let was_open = self.phase == Phase::Open;
        self.phase = Phase::Closed;
        if !was_open {
            effects.push(Effect::Close(code, code_reason(code).into()));
            return effects;
        }
        effects.extend(self.end_request(EndReason::Cancelled, None));
        let accepted = *self.channel.accepted();
        let info = *self.channel.info();
        let amount = self.meter.consumed().min(accepted.cumulative);
        effects.extend(self.persist_consumed());
        effects.extend(self.final_claim(close_channel));
        effects.extend(self.account());
        if receipt {
            effects.push(Effect::Send(ServerMessage::Receipt {
                nonce: accepted.nonce,
                cumulative: accepted.cumulative,
                consumed: self.meter.consumed(),
                settled_amount: amount,
                refund: info.deposit.saturating_sub(amount),
                close_pending: false,
            }));
        }
        effects.push(Effect::Close(code, code_reason(code).into()));
        effects
    }
}

fn code_reason(code: CloseCode) -> &'static str {
    match code {
        CloseCode::Normal => "closed",
        CloseCode::GoingAway => "server going away",
        CloseCode::VoucherDeadline => "voucher deadline missed",
        CloseCode::RateLimited => "rate limited",
        CloseCode::PaymentRequired => "payment required",
        CloseCode::TooLarge => "message too large",
        CloseCode::Policy => "policy",
        CloseCode::Internal => "internal error",
        CloseCode::BadResumeToken => "bad resume token",
        CloseCode::SessionSuperseded => "session superseded",
    }
}
