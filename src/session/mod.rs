//! Per-connection logic, I/O-free (DESIGN.md sections 4.2 and 5): messages and time in,
//! [`Effect`]s out. The server performs the effects (send, persist, queue a claim, close) and
//! feeds back what happened; nothing here awaits or reads a clock.
//!
//! The money rules live here:
//! - a voucher is checked, then [`Effect::Persist`]ed, and only once the server reports it
//!   stored ([`Session::persisted`]) is it acknowledged (`voucher_ack`) and its credit used;
//! - a unit is delivered only if the meter can charge it within the accepted cumulative
//!   ([`Session::deliver`]); otherwise delivery pauses (`paused`) until a voucher arrives;
//! - `need_voucher` goes out early, with a deadline after which the session closes with 4408;
//! - at the end the final claim (the consumption, rounded up) is queued for settlement, and the
//!   receipt tells the client its refund.

use std::collections::VecDeque;
use std::sync::Arc;

use alloy::primitives::{Address, B256};

use crate::channel::{AcceptedState, ChannelState};
use crate::channel::{
    ChannelDomain, ChannelError, ChannelInfo, OpenChannel, PayerKeys, SignedState, signature,
};
use crate::meter::{Meter, MeterConfig, Nanos, PauseReason, Tariff};
use crate::protocol::{ClientMessage, CloseCode, ErrorData, ServerMessage, SignedStateMsg};
use crate::store::{PendingClaim, StoreError, StoredChannel, StoredVoucher};

pub mod resume;

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

const NS_PER_MS: u64 = 1_000_000;

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
    /// Ping interval.
    pub heartbeat_ms: u64,
    /// Interval of `usage` messages and consumption saves.
    pub usage_interval_ms: u64,
    /// Time to answer `need_voucher`.
    pub voucher_deadline_ms: u64,
    /// Voucher flood limit (closes with 4429).
    pub max_vouchers_per_sec: usize,
}

/// Something the server must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a message.
    Send(ServerMessage),
    /// Store this voucher, then call [`Session::persisted`] with the result before anything
    /// else. Nothing about it is acknowledged until then.
    Persist {
        /// The channel.
        channel_id: B256,
        /// The voucher.
        voucher: StoredVoucher,
    },
    /// Save the consumption (whole base units, rounded up).
    PersistConsumed {
        /// The channel.
        channel_id: B256,
        /// Consumption so far.
        consumed: u128,
    },
    /// Queue the final claim for the settler.
    QueueClaim(PendingClaim),
    /// Close the channel cooperatively with this final claim (the server signs `Close`).
    CloseChannel(PendingClaim),
    /// Start the resource on this request body.
    Request(serde_json::Value),
    /// Close the WebSocket with this code.
    Close(CloseCode, String),
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

/// One session on one channel.
#[derive(Debug)]
pub struct Session {
    params: Arc<SessionParams>,
    id: String,
    channel: OpenChannel,
    meter: Meter,
    phase: Phase,
    /// The voucher being stored.
    pending: Option<SignedState>,
    seq: u64,
    /// A `paused` message went out and no `resumed` since.
    paused_sent: bool,
    /// When the `need_voucher` sent last must be answered by.
    voucher_deadline: Option<Nanos>,
    /// When the last `need_voucher` went out.
    asked_at: Nanos,
    next_usage: Nanos,
    recent_vouchers: VecDeque<Nanos>,
    persisted_consumed: u128,
    /// The current resume token (rotated on every resume).
    resume_token: String,
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

fn parse_voucher(msg: &SignedStateMsg) -> Result<SignedState, ChannelError> {
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

impl Session {
    /// Starts a session from an `open`, given the chain's view of the channel and what the store
    /// holds. On success the session is `Opening` and the effects persist the voucher (or, when
    /// the `open` repeats the stored voucher, the session is open at once). On failure the
    /// effects answer the client; no session exists.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        params: Arc<SessionParams>,
        id: String,
        resume_token: String,
        info: Option<ChannelInfo>,
        stored: Option<StoredChannel>,
        msg: &SignedStateMsg,
        keys: &mut PayerKeys,
        now: Nanos,
    ) -> Result<(Self, Vec<Effect>), Vec<Effect>> {
        let fail = |e: ChannelError| {
            let mut effects = vec![error(e.code(), e.to_string(), e.retriable(), None)];
            if let Some(code) = e.close_code() {
                effects.push(Effect::Close(code, e.code().into()));
            }
            effects
        };
        let Some(info) = info else {
            return Err(fail(ChannelError::ChannelNotOpen {
                channel_id: msg.channel_id,
                reason: "unknown channel",
            }));
        };
        let mut channel =
            OpenChannel::open(params.domain, info, params.payee, params.token).map_err(fail)?;
        if info.deposit < params.min_deposit {
            return Err(vec![
                error(
                    "insufficient_deposit",
                    format!(
                        "deposit {} is below the minimum {}",
                        info.deposit, params.min_deposit
                    ),
                    false,
                    None,
                ),
                Effect::Close(CloseCode::PaymentRequired, "insufficient_deposit".into()),
            ]);
        }
        let mut consumed = info.claimed;
        if let Some(stored) = stored {
            let accepted = AcceptedState {
                nonce: stored.voucher.nonce,
                cumulative: stored.voucher.cumulative,
                signature: Some(stored.voucher.signature),
            };
            // A stored state behind the chain's claimed one is obsolete: the chain wins.
            if let Ok(restored) = channel.clone().restore(accepted) {
                channel = restored;
            }
            consumed = consumed.max(stored.consumed);
        }
        let voucher = parse_voucher(msg).map_err(fail)?;
        let accepted = *channel.accepted();
        let meter = Meter::resume_from(
            &params.tariff,
            params.meter,
            accepted.cumulative,
            consumed,
            now,
        )
        .map_err(|e| vec![error("internal_error", e.to_string(), false, None)])?;
        let next_usage = now.saturating_add(params.usage_interval_ms.saturating_mul(NS_PER_MS));
        let mut session = Self {
            params,
            id,
            channel,
            meter,
            phase: Phase::Opening,
            pending: None,
            seq: 0,
            paused_sent: false,
            voucher_deadline: None,
            asked_at: 0,
            next_usage,
            recent_vouchers: VecDeque::new(),
            persisted_consumed: consumed,
            resume_token,
        };
        let repeats_stored = accepted.nonce == voucher.state.nonce
            && accepted.cumulative == voucher.state.cumulative
            && accepted.signature == Some(voucher.signature);
        if repeats_stored {
            let effects = session.opened(now);
            return Ok((session, effects));
        }
        if let Err(e) = session.channel.check(&voucher, keys) {
            let data = session.error_data();
            return Err(vec![error(
                e.code(),
                e.to_string(),
                e.retriable(),
                Some(data),
            )]);
        }
        let effect = Effect::Persist {
            channel_id: msg.channel_id,
            voucher: StoredVoucher {
                nonce: msg.nonce,
                cumulative: msg.cumulative,
                signature: voucher.signature,
            },
        };
        session.pending = Some(voucher);
        Ok((session, vec![effect]))
    }

    /// Moves to `Open`: connects the meter and says `session`.
    fn opened(&mut self, now: Nanos) -> Vec<Effect> {
        self.phase = Phase::Open;
        self.meter.connect(now);
        let accepted = *self.channel.accepted();
        let message = ServerMessage::Session {
            session_id: self.id.clone(),
            resume_token: self.resume_token.clone(),
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

    /// Whether the session has ended.
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

    fn error_data(&self) -> ErrorData {
        let a = self.channel.accepted();
        ErrorData {
            nonce: a.nonce,
            cumulative: a.cumulative,
            consumed: self.meter.consumed(),
        }
    }

    /// The store answered a [`Effect::Persist`].
    pub fn persisted(&mut self, result: Result<(), StoreError>, now: Nanos) -> Vec<Effect> {
        let Some(voucher) = self.pending.take() else {
            return Vec::new();
        };
        match result {
            Ok(()) => {
                self.channel.apply_checked(&voucher);
                let cumulative = self.channel.accepted().cumulative;
                // The meter's cumulative only grows; the channel's accepted one is the same.
                let _ = self.meter.set_cumulative(cumulative, now);
                self.voucher_deadline = None;
                let mut effects = Vec::new();
                if self.meter.is_paused(PauseReason::StoreUnavailable) {
                    self.meter.resume(PauseReason::StoreUnavailable, now);
                }
                if self.phase == Phase::Opening {
                    effects.extend(self.opened(now));
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
                let mut effects = vec![error(
                    e.code(),
                    e.to_string(),
                    true,
                    Some(self.error_data()),
                )];
                if matches!(e, StoreError::Unavailable(_) | StoreError::Corrupt { .. }) {
                    if self.phase == Phase::Opening {
                        self.phase = Phase::Closed;
                        effects.push(Effect::Close(
                            CloseCode::Internal,
                            "store_unavailable".into(),
                        ));
                        return effects;
                    }
                    self.meter.pause(PauseReason::StoreUnavailable, now);
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

    /// The store answers again after an outage: paid delivery goes on.
    pub fn store_recovered(&mut self, now: Nanos) -> Vec<Effect> {
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
    }

    /// The sequence number the next delivered unit gets.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Tries to deliver one unit of `bytes` bytes: `Ok(seq, effects)` if it is paid for (send
    /// it now, then the effects: a `need_voucher` when credit runs low), or the effects of
    /// pausing (the unit must wait for a voucher).
    pub fn deliver(&mut self, bytes: u64, now: Nanos) -> Result<(u64, Vec<Effect>), Vec<Effect>> {
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
            let reason = if self.meter.is_paused(PauseReason::StoreUnavailable) {
                "store_unavailable"
            } else {
                "credit_exhausted"
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
        if self.pending.is_some() || !self.meter.is_paused(PauseReason::Exhausted) {
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

    /// A heartbeat (Pong) arrived.
    pub fn pong(&mut self, now: Nanos) {
        self.meter.heartbeat(now);
    }

    /// A measured round trip to the client.
    pub fn set_rtt(&mut self, rtt_ns: u64) {
        self.meter.set_rtt(rtt_ns);
    }

    /// Delivery is blocked on (`true`) or released from (`false`) a slow reader; the client is
    /// not charged time for the wait. `at` is when the block began or ended.
    pub fn backpressure(&mut self, blocked: bool, at: Nanos) {
        if blocked {
            self.meter.pause(PauseReason::Backpressure, at);
        } else {
            self.meter.resume(PauseReason::Backpressure, at);
        }
    }

    /// Time passes: charges it, pauses at exhaustion, asks for a voucher, sends `usage`, and
    /// closes with 4408 when a `need_voucher` went unanswered past its deadline.
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
            effects.push(error(
                "voucher_deadline",
                "no voucher arrived before the need_voucher deadline",
                false,
                Some(self.error_data()),
            ));
            effects.extend(self.finish(false, CloseCode::VoucherDeadline, now, false));
            return effects;
        }
        if self.reask_at().is_some_and(|at| now >= at) {
            effects.extend(self.reask(now));
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
            self.voucher_deadline,
            self.reask_at(),
            self.meter.exhausted_at().map(|t| t.saturating_add(1)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn persist_consumed(&mut self) -> Option<Effect> {
        let consumed = self.meter.consumed();
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
    pub fn on_message(
        &mut self,
        message: ClientMessage,
        keys: &mut PayerKeys,
        now: Nanos,
    ) -> Vec<Effect> {
        if self.phase != Phase::Open {
            return vec![error(
                "unexpected_message",
                "the session is not open",
                true,
                None,
            )];
        }
        match message {
            ClientMessage::Voucher(msg) => self.on_voucher(&msg, keys, now),
            ClientMessage::Request { body } => {
                let bytes = serde_json::to_vec(&body).map_or(0, |b| b.len() as u64);
                match self.meter.try_bytes_in(bytes, now) {
                    Ok(()) => vec![Effect::Request(body)],
                    Err(e) => vec![error(
                        "payment_required",
                        e.to_string(),
                        true,
                        Some(self.error_data()),
                    )],
                }
            }
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

    fn on_voucher(
        &mut self,
        msg: &SignedStateMsg,
        keys: &mut PayerKeys,
        now: Nanos,
    ) -> Vec<Effect> {
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
        if self.pending.is_some() {
            return vec![error(
                "voucher_in_flight",
                "the previous voucher is still being stored",
                true,
                Some(self.error_data()),
            )];
        }
        let voucher = match parse_voucher(msg) {
            Ok(v) => v,
            Err(e) => {
                return vec![error(
                    e.code(),
                    e.to_string(),
                    true,
                    Some(self.error_data()),
                )];
            }
        };
        if let Err(e) = self.channel.check(&voucher, keys) {
            return vec![error(
                e.code(),
                e.to_string(),
                e.retriable(),
                Some(self.error_data()),
            )];
        }
        self.pending = Some(voucher.clone());
        vec![Effect::Persist {
            channel_id: msg.channel_id,
            voucher: StoredVoucher {
                nonce: msg.nonce,
                cumulative: msg.cumulative,
                signature: voucher.signature,
            },
        }]
    }

    /// The connection dropped without `close`, and the session may be resumed: the clock stops,
    /// consumption is saved and the claim queued (a later, larger claim replaces it), but the
    /// session stays open for [`Session::resume`].
    pub fn suspend(&mut self, now: Nanos) -> Vec<Effect> {
        if self.phase != Phase::Open {
            return Vec::new();
        }
        self.meter.disconnect(now);
        let mut effects: Vec<Effect> = self.persist_consumed().into_iter().collect();
        effects.extend(self.final_claim(false));
        effects
    }

    /// The client came back with the session's resume token on a new connection: the session
    /// goes on with its balance and state, under a new token.
    pub fn resume(&mut self, resume_token: String, now: Nanos) -> Vec<Effect> {
        if self.phase != Phase::Open {
            return Vec::new();
        }
        self.resume_token = resume_token;
        self.paused_sent = false;
        self.pending = None;
        self.opened(now)
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

    /// The client disconnected without `close`: the clock stops, consumption is saved and the
    /// claim queued (a later claim for more replaces it).
    pub fn disconnected(&mut self, now: Nanos) -> Vec<Effect> {
        if self.phase == Phase::Closed {
            return Vec::new();
        }
        self.finish(false, CloseCode::Normal, now, false)
    }

    /// Ends the session: stops the meter, saves consumption, queues the final claim (or closes
    /// the channel), sends the receipt when asked for, and closes the socket with `code`.
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
        let accepted = *self.channel.accepted();
        let info = *self.channel.info();
        let amount = self.meter.consumed().min(accepted.cumulative);
        effects.extend(self.persist_consumed());
        effects.extend(self.final_claim(close_channel));
        if receipt {
            effects.push(Effect::Send(ServerMessage::Receipt {
                nonce: accepted.nonce,
                cumulative: accepted.cumulative,
                consumed: self.meter.consumed(),
                settled_amount: amount,
                refund: info.deposit.saturating_sub(amount),
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
