//! `session_sequence`: one channel's sessions (`paystream::session::Session`, I/O-free) driven
//! by a model of the server (`src/server/connection.rs`) through any sequence of events: the
//! client's `open`, `voucher` (validly signed by the payer mostly; some by another key, under
//! another domain, for another channel, stale, above the deposit, tampered, in the 64-byte
//! form or malformed), `request`, `close`; clock steps and timers (`tick` at `next_wakeup` or
//! at any instant); units delivered; Pongs; slow reads; top-ups and closings on the chain;
//! lease lapses; the connection dropping (the session parked) or the process crashing (its
//! record lagging), and resumes from the store.
//!
//! The server model performs each effect as the server does: `Verify` by really checking the
//! signature (`PayerKeys::verify_state`), `Persist` with a store that compares and sets, is
//! sometimes unavailable or fenced, and that another writer sometimes gets to first. In one
//! mode it answers at once, in order (as the server does); in the other it holds a `Verify`, a
//! `Persist` or a store probe back while other events happen, and answers later.
//!
//! Properties, checked on every effect and after every event:
//! - a `voucher_ack` comes only from a reported store write, for a state this session was told
//!   is stored; a `session` message only from an opening voucher stored, or a resume;
//! - `open` needs a nonce above the stored one and the chain's (a stored voucher replayed never
//!   opens a session), and the signature is checked before anything is stored: `Verify` only
//!   names the channel's payer and domain, and `Persist` only a voucher the payer signed;
//! - the meter's consumption never exceeds the accepted cumulative, which never exceeds what
//!   this session knows is stored (or the chain claimed), and never moves back;
//! - `deliver` succeeds only on an open session, within that credit, while the client answers
//!   its heartbeats, the lease holds and the store is not paused, and its `seq` never repeats
//!   one the client saw (across resumes and crashes);
//! - every claim is under a stored voucher the payer signed, for at most its cumulative;
//!   receipts, `usage` and `need_voucher` agree with the state (`suggested` above the
//!   cumulative and within the deposit);
//! - after a `tick`, the next wake-up is in the future (no busy loop);
//! - nothing panics.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use alloy::primitives::{Address, B256, Bytes, U512};
use paystream::channel::{ChannelDomain, ChannelInfo, signature};
use paystream::meter::{Exact, MeterConfig, Nanos, Price, Tariff};
use paystream::protocol::{ClientMessage, EndReason, ServerMessage, SignedStateMsg};
use paystream::session::{ChainUpdate, Effect, Opening, Session, SessionParams, parse_voucher};
use paystream::store::{PendingClaim, SessionRecord, StoreError, StoredChannel, StoredVoucher};

use crate::input::Input;
use crate::keys;

const PAYER: usize = 0;
const PAYEE: Address = Address::repeat_byte(0xbb);
const TOKEN: Address = Address::ZERO;
const CHANNEL: B256 = B256::repeat_byte(0xc1);
const MS: u64 = 1_000_000;

fn domain() -> ChannelDomain {
    ChannelDomain::new(8453, Address::repeat_byte(0xcc))
}

/// Where a batch of effects came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// `persisted(Ok)`.
    Stored,
    /// `resume`.
    Resumed,
    /// Anything else.
    Other,
}

/// An answer the server model holds back (the delayed mode).
#[derive(Debug)]
enum Pending {
    Verify(Effect),
    Persist(StoredVoucher),
    Probe,
}

/// The session on the connection, and what the model knows of it.
#[derive(Debug)]
struct Live {
    session: Session,
    /// States this session object was told are stored (or loaded from the store or the
    /// chain when it started).
    reported: HashSet<(u64, u128)>,
    /// The most it may charge: the largest of those cumulatives.
    authorized: u128,
    /// The deposit as the session was told.
    deposit: u128,
    /// The accepted state when last looked at (it never moves back).
    accepted: (u64, u128),
    /// The client's liveness: the last `session` message or Pong plus the liveness time.
    alive_until: Option<Nanos>,
    lease_lapsed: bool,
    store_paused: bool,
    streaming: bool,
    /// What the connection last wrote to the record (the server's `recorded`).
    recorded: (u64, Option<u64>),
}

/// A session's record, as the store holds it for a resume.
#[derive(Debug, Clone)]
struct Record {
    sid: String,
    next_seq: u64,
    request: Option<u64>,
    parked: bool,
}

struct World<'a> {
    input: Input<'a>,
    params: Arc<SessionParams>,
    delayed: bool,
    clock: Nanos,
    info: ChannelInfo,
    store: Option<StoredChannel>,
    store_up: bool,
    /// Every voucher the store ever held.
    ever_stored: HashSet<(u64, u128)>,
    /// A consumption the store refused, kept by the process to write again (its flusher).
    carried: Option<Exact>,
    live: Option<Live>,
    /// The channel's session record, if a session can be resumed.
    record: Option<Record>,
    pending: Vec<Pending>,
    /// The last `seq` delivered, per session id.
    delivered: HashMap<String, u64>,
    sessions: u64,
}

fn params(input: &mut Input<'_>) -> SessionParams {
    let price = |input: &mut Input<'_>, max: u8, per: u128| {
        (input.below(3) != 0).then(|| Price {
            amount: u128::from(input.u8() % max),
            per: 1 + u128::from(input.u8()) % per,
        })
    };
    let tariff = Tariff {
        per_message: price(input, 50, 1000),
        per_second: price(input, 200, 1),
        per_byte_out: price(input, 4, 1000),
        per_byte_in: price(input, 4, 1000),
    };
    let credit_window = 1 + u128::from(input.u64() as u16);
    let mut p = SessionParams::new(domain(), PAYEE, TOKEN, tariff, credit_window);
    if input.bool() {
        p.meter = MeterConfig {
            rtt_ns: input.scaled_u64() % (10_000 * MS),
            margin_ns: input.scaled_u64() % (10_000 * MS),
            min_threshold: u128::from(input.u8()),
            credit_window,
            liveness_ns: input.scaled_u64() % (60_000 * MS),
        };
    }
    if input.bool() {
        p.min_deposit = u128::from(input.u8());
        p.usage_interval_ms = 1 + input.scaled_u64() % 10_000;
        p.voucher_deadline_ms = 1 + input.scaled_u64() % 60_000;
        p.max_vouchers_per_sec = 1 + input.below(30);
        p.max_requests_per_sec = 1 + input.below(8);
        p.replace_requests = input.bool();
        p.claim_interval_ms = 1 + input.scaled_u64() % 120_000;
    }
    p
}

/// `amount <= whole` by value (`Exact`'s order breaks ties of value by denominator).
fn at_most(amount: &Exact, whole: u128) -> bool {
    U512::from(amount.numerator) <= U512::from(whole) * U512::from(amount.denominator)
}

fn signed_voucher(nonce: u64, cumulative: u128) -> StoredVoucher {
    let state = keys::state(CHANNEL, nonce, cumulative);
    StoredVoucher {
        nonce,
        cumulative,
        signature: keys::sign_state(PAYER, &domain(), &state),
    }
}

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let delayed = input.below(4) == 0;
    let params = Arc::new(params(&mut input));
    let deposit = match input.below(4) {
        0 => input.scaled_u128() % (1 << 64),
        _ => u128::from(input.u64() as u32),
    };
    let claimed = if input.below(4) == 0 {
        u128::from(input.u64() as u16).min(deposit)
    } else {
        0
    };
    let claimed_nonce = if claimed > 0 {
        1 + u64::from(input.u8())
    } else {
        0
    };
    let info = ChannelInfo {
        id: CHANNEL,
        payer: keys::address(PAYER),
        payee: PAYEE,
        token: TOKEN,
        deposit,
        claimed,
        claimed_nonce,
        withdraw_delay: if input.below(16) == 0 { 60 } else { 3_600 },
        withdraw_at: 0,
        closed: false,
    };
    let mut ever_stored = HashSet::new();
    let store = (input.below(3) == 0).then(|| {
        // An earlier session's state: a voucher the payer signed, and its consumption.
        let nonce = claimed_nonce + u64::from(input.u8() % 4);
        let cumulative = claimed.max(u128::from(input.u64() as u32) % deposit.saturating_add(1));
        ever_stored.insert((nonce, cumulative));
        StoredChannel {
            voucher: signed_voucher(nonce, cumulative),
            consumed: Exact::whole(u128::from(input.u64() as u32) % cumulative.saturating_add(1)),
            closing: None,
        }
    });
    let mut world = World {
        input,
        params,
        delayed,
        clock: 1_000_000_000,
        info,
        store,
        store_up: true,
        ever_stored,
        carried: None,
        live: None,
        record: None,
        pending: Vec::new(),
        delivered: HashMap::new(),
        sessions: 0,
    };
    for _ in 0..160 {
        if world.input.is_empty() {
            break;
        }
        world.event();
        world.check_live();
    }
}

impl World<'_> {
    fn now(&self) -> Nanos {
        self.clock
    }

    /// The largest nonce and cumulative anyone knows of (to write vouchers near them).
    fn frontier(&self) -> (u64, u128) {
        let mut nonce = self.info.claimed_nonce;
        let mut cumulative = self.info.claimed;
        if let Some(s) = &self.store {
            nonce = nonce.max(s.voucher.nonce);
            cumulative = cumulative.max(s.voucher.cumulative);
        }
        if let Some(live) = &self.live {
            let a = live.session.accepted();
            nonce = nonce.max(a.nonce);
            cumulative = cumulative.max(a.cumulative);
        }
        (nonce, cumulative)
    }

    /// A signed state as a client sends it: usually the payer's next, sometimes not.
    fn voucher_msg(&mut self) -> SignedStateMsg {
        let (nonce, cumulative) = self.frontier();
        let deposit = self.info.deposit;
        let consumed = self
            .live
            .as_ref()
            .map_or(0, |l| l.session.meter().consumed());
        let window = self.params.meter.credit_window;
        let input = &mut self.input;
        let nonce = match input.below(10) {
            0..=5 => nonce.saturating_add(1),
            6 => nonce.saturating_add(2 + u64::from(input.u8())),
            7 => nonce,
            8 => nonce.saturating_sub(1),
            _ => input.scaled_u64(),
        };
        let cumulative = match input.below(10) {
            0..=3 => consumed.saturating_add(window).min(deposit).max(cumulative),
            4 => cumulative.saturating_add(u128::from(input.u8())),
            5 => cumulative,
            6 => cumulative.saturating_sub(1),
            7 => deposit,
            8 => deposit.saturating_add(1),
            _ => input.scaled_u128(),
        };
        let signer = if input.below(12) == 0 {
            1 + input.below(3)
        } else {
            PAYER
        };
        let under = if input.below(12) == 0 {
            ChannelDomain::new(1, Address::repeat_byte(0xcc))
        } else {
            domain()
        };
        let channel = if input.below(16) == 0 {
            B256::repeat_byte(0xc2)
        } else {
            CHANNEL
        };
        let mut state = keys::state(channel, nonce, cumulative);
        let sig = keys::sign_state(signer, &under, &state);
        match input.below(16) {
            0 => state.nonce ^= 1,
            1 => state.cumulative ^= 1 << input.below(8),
            _ => {}
        }
        let signature: Bytes = match input.below(12) {
            0 => sig.as_erc2098().to_vec().into(),
            1 => sig.with_parity(!sig.v()).as_bytes().to_vec().into(),
            2 => input.bytes(65).to_vec().into(),
            _ => signature::to_bytes(&sig).to_vec().into(),
        };
        SignedStateMsg {
            channel_id: state.channelId,
            nonce: state.nonce,
            cumulative: state.cumulative,
            signature,
        }
    }

    fn step_clock(&mut self) {
        let step = match self.input.below(8) {
            0 => u64::from(self.input.u8()),
            1..=3 => u64::from(self.input.u8()) * MS,
            4 | 5 => u64::from(self.input.u8()) * 20 * MS,
            6 => u64::from(self.input.u8()) * 1_000 * MS,
            _ => u64::from(self.input.u8() % 64) * 60_000 * MS,
        };
        self.clock += step;
    }

    fn event(&mut self) {
        match self.input.below(35) {
            0..=3 => self.step_clock(),
            4 | 5 => self.client_open(),
            6..=8 => {
                let msg = self.voucher_msg();
                self.client_message(ClientMessage::Voucher(msg));
            }
            9 | 10 => {
                let size = self.input.below(8);
                let body = serde_json::json!({ "prompt": "x".repeat(size * size * 16) });
                self.client_message(ClientMessage::Request { body });
            }
            11 => {
                let close_channel = self.input.below(4) == 0;
                self.client_message(ClientMessage::Close { close_channel });
            }
            12 => {
                let m = if self.input.bool() {
                    ClientMessage::Resume { token: "x".into() }
                } else {
                    ClientMessage::Open(self.voucher_msg())
                };
                self.client_message(m);
            }
            13..=15 => self.timer(),
            16..=22 => self.deliver(),
            23 | 24 => self.pong(),
            25 => self.backpressure(),
            26 => self.chain(),
            27 => self.lease(),
            28 => self.connection_lost(),
            29 => {
                if self.input.below(4) == 0 {
                    self.resume_in_place();
                } else {
                    self.resume();
                }
            }
            30 | 31 => self.answer_pending(),
            32 => {
                if let Some(live) = self.live.as_mut() {
                    let reason = [
                        EndReason::Completed,
                        EndReason::MaxTokens,
                        EndReason::UpstreamFailed,
                    ][self.input.below(3)];
                    let failure = (reason == EndReason::UpstreamFailed).then(|| "down".to_string());
                    let effects = live.session.request_ended(reason, failure);
                    live.streaming = false;
                    self.apply(effects, Origin::Other);
                }
            }
            33 => self.store_up = !self.store_up || self.input.bool(),
            _ => self.other_writer(),
        }
    }

    /// The server's `on_open` when the connection has no session.
    fn client_open(&mut self) {
        let msg = self.voucher_msg();
        if self.live.is_some() {
            self.client_message(ClientMessage::Open(msg));
            return;
        }
        let Ok(voucher) = parse_voucher(&msg) else {
            return;
        };
        if msg.channel_id != CHANNEL {
            return; // an unknown channel: refused with no session
        }
        let info = self.info;
        if let Err(effects) = Session::precheck(&self.params, &info) {
            assert!(effects.iter().any(|e| matches!(e, Effect::Close(..))));
            return;
        }
        let Ok(verified) = keys::payer_keys().verify_state(&domain(), info.payer, &voucher) else {
            return;
        };
        if !self.store_up {
            return; // the store read fails: 1011, no session
        }
        let stored = self.store;
        let opening = Opening {
            info,
            stored,
            carried: self.carried,
            voucher: verified,
        };
        self.sessions += 1;
        let sid = format!("s{}", self.sessions);
        let now = self.now();
        let (session, effects) = match Session::open(self.params.clone(), sid.clone(), opening, now)
        {
            Ok(opened) => opened,
            Err(effects) => {
                for e in &effects {
                    assert!(
                        !matches!(
                            e,
                            Effect::Persist { .. } | Effect::Send(ServerMessage::Session { .. })
                        ),
                        "a refused open persisted or opened: {e:?}"
                    );
                }
                return;
            }
        };
        // Only a state signed after the stored one and the chain's opens a session.
        let s = voucher.state;
        let (stored_nonce, stored_cumulative) =
            stored.map_or((0, 0), |s| (s.voucher.nonce, s.voucher.cumulative));
        assert!(
            s.nonce > info.claimed_nonce && s.nonce > stored_nonce,
            "opened with nonce {} over stored {stored_nonce} and claimed {}",
            s.nonce,
            info.claimed_nonce
        );
        assert!(s.cumulative >= info.claimed && s.cumulative <= info.deposit);
        if stored.is_some_and(|st| st.voucher.nonce >= info.claimed_nonce) {
            assert!(
                s.cumulative >= stored_cumulative,
                "opened below the stored cumulative"
            );
        }
        let mut reported = HashSet::new();
        reported.insert((info.claimed_nonce, info.claimed));
        if let Some(st) = stored {
            reported.insert((st.voucher.nonce, st.voucher.cumulative));
        }
        let mut session = session;
        session.admitted(format!("token-{sid}"));
        let a = session.accepted();
        let authorized = reported.iter().map(|r| r.1).max().unwrap_or(0);
        assert!(a.cumulative <= authorized, "starts beyond what is stored");
        self.live = Some(Live {
            session,
            authorized,
            reported,
            deposit: info.deposit,
            accepted: (a.nonce, a.cumulative),
            alive_until: None,
            lease_lapsed: false,
            store_paused: false,
            streaming: false,
            recorded: (0, None),
        });
        assert!(self.pending.is_empty(), "answers held for no session");
        self.apply(effects, Origin::Other);
        if self.live.as_ref().is_some_and(|l| l.session.is_closed()) {
            // The opening voucher was not stored: no session (a parked one stays resumable).
            self.drop_session();
        }
    }

    fn client_message(&mut self, message: ClientMessage) {
        let now = self.now();
        let Some(live) = self.live.as_mut() else {
            return; // `no_session`
        };
        let effects = live.session.on_message(message, now);
        self.apply(effects, Origin::Other);
    }

    fn timer(&mut self) {
        let now = match self.live.as_ref().and_then(|l| l.session.next_wakeup()) {
            Some(at)
                if at > self.clock && at - self.clock < 3_600_000 * MS && self.input.bool() =>
            {
                at
            }
            _ => self.clock,
        };
        self.clock = now;
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let effects = live.session.tick(now);
        if let Some(at) = live.session.next_wakeup() {
            assert!(at > now, "next wake-up {at} is not after the tick at {now}");
        }
        self.apply(effects, Origin::Other);
    }

    /// A burst of units from the resource, some microseconds apart.
    fn deliver(&mut self) {
        let bytes = match self.input.below(4) {
            0 => u64::from(self.input.u8()) * 64,
            _ => 20 + u64::from(self.input.u8() % 64),
        };
        let gap = u64::from(self.input.u8()) * 10_000;
        for _ in 0..1 + self.input.below(8) {
            self.clock += gap;
            self.deliver_one(bytes);
            self.check_live();
        }
    }

    fn deliver_one(&mut self, bytes: u64) {
        let now = self.now();
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if !live.streaming {
            // The server has units only while a request streams (its resource's queue): a
            // request's start writes the session's record (found by this target: delivering
            // without one let a crash reuse `seq`s, which the server cannot do).
            return;
        }
        let was_open = live.session.is_open();
        let next = live.session.next_seq();
        match live.session.deliver(bytes, now) {
            Ok((seq, effects)) => {
                assert!(was_open, "delivered on a session that is not open");
                assert!(!live.lease_lapsed, "delivered with the lease lapsed");
                assert!(!live.store_paused, "delivered while paused for the store");
                let alive = live.alive_until.expect("opened");
                assert!(
                    now <= alive,
                    "delivered at {now} to a client silent since {alive}"
                );
                assert_eq!(seq, next);
                let sid = live.session.id().to_string();
                if let Some(last) = self.delivered.get(&sid) {
                    assert!(seq > *last, "seq {seq} after {last}");
                }
                self.delivered.insert(sid, seq);
                self.check_live();
                self.apply(effects, Origin::Other);
            }
            Err(effects) => self.apply(effects, Origin::Other),
        }
    }

    fn pong(&mut self) {
        let now = self.now();
        let liveness = self.params.meter.liveness_ns;
        let rtt = self
            .input
            .bool()
            .then(|| self.input.scaled_u64() % (5_000 * MS));
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if let Some(rtt) = rtt {
            live.session.set_rtt(rtt);
        }
        let effects = live.session.pong(now);
        if live.session.is_open() {
            live.alive_until = Some(now.saturating_add(liveness));
        }
        self.apply(effects, Origin::Other);
    }

    fn backpressure(&mut self) {
        let now = self.now();
        let blocked = self.input.bool();
        if let Some(live) = self.live.as_mut() {
            live.session.backpressure(blocked, now);
        }
    }

    fn chain(&mut self) {
        let now = self.now();
        let update = match self.input.below(8) {
            0 => ChainUpdate::WithdrawRequested,
            1 => ChainUpdate::Closed,
            _ => ChainUpdate::ToppedUp {
                deposit: self
                    .info
                    .deposit
                    .saturating_add(u128::from(self.input.u64() as u32)),
            },
        };
        match update {
            ChainUpdate::ToppedUp { deposit } => self.info.deposit = deposit,
            ChainUpdate::WithdrawRequested => self.info.withdraw_at = 1,
            ChainUpdate::Closed => self.info.closed = true,
        }
        if let Some(live) = self.live.as_mut() {
            if let ChainUpdate::ToppedUp { deposit } = update {
                live.deposit = live.deposit.max(deposit);
            }
            let effects = live.session.chain_update(update, now);
            self.apply(effects, Origin::Other);
        }
    }

    fn lease(&mut self) {
        let now = self.now();
        let lapse = self.input.bool();
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let effects = if lapse {
            if live.session.is_open() {
                live.lease_lapsed = true;
            }
            live.session.lease_lapsed(now)
        } else {
            live.lease_lapsed = false;
            live.session.lease_renewed(now)
        };
        self.apply(effects, Origin::Other);
    }

    /// The connection ends: as the server's `release` (the session suspended and parked), or
    /// the process crashes (nothing more happens; its record lags and its flusher is gone).
    fn connection_lost(&mut self) {
        match self.input.below(4) {
            0 => {
                // `disconnected`: a frame over the limit; the session ends.
                let now = self.now();
                if let Some(live) = self.live.as_mut() {
                    let effects = live.session.disconnected(now);
                    self.apply(effects, Origin::Other);
                }
                self.release();
            }
            1 => self.crash(),
            _ => self.release(),
        }
    }

    /// The process dies: nothing more is written (the record stays as last written, parked or
    /// not), and its flusher's consumption is lost.
    fn crash(&mut self) {
        self.live = None;
        self.carried = None;
        self.finish_pending();
    }

    /// The session is gone from the connection (no release: it never opened).
    fn drop_session(&mut self) {
        self.live = None;
        self.finish_pending();
    }

    /// Held answers die with the connection; a write already sent may still land.
    fn finish_pending(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            if let Pending::Persist(v) = p
                && self.input.bool()
            {
                let _ = self.save_voucher(v);
            }
        }
    }

    /// The server's `release`.
    fn release(&mut self) {
        self.finish_pending();
        let Some(mut live) = self.live.take() else {
            return;
        };
        if live.session.is_open() {
            let now = self.now();
            let effects = live.session.suspend(now);
            for e in &effects {
                assert!(matches!(
                    e,
                    Effect::PersistConsumed { .. } | Effect::QueueClaim(_) | Effect::Account { .. }
                ));
            }
            let record = Record {
                sid: live.session.id().to_string(),
                next_seq: live.session.next_seq(),
                request: live.session.unended_request(),
                parked: true,
            };
            self.live = Some(live);
            self.apply(effects, Origin::Other);
            self.live = None;
            self.record = Some(record);
        } else if self
            .record
            .as_ref()
            .is_some_and(|r| r.sid == live.session.id())
        {
            // The session ended: its record is deleted, and no token of it resumes anything.
            self.record = None;
        }
    }

    /// A resume with the parked session's token, as the server's `resume_reserved`.
    fn resume(&mut self) {
        if self.live.is_some() {
            return;
        }
        let (Some(record), Some(stored)) = (self.record.clone(), self.store) else {
            return;
        };
        if !self.store_up {
            return;
        }
        let now = self.now();
        let r = SessionRecord {
            sid: record.sid.clone(),
            jti: "j".into(),
            next_seq: record.next_seq,
            request: record.request,
            holder: "here".into(),
            parked: record.parked,
        };
        let restored = Session::restore(
            self.params.clone(),
            &r,
            self.info,
            stored,
            self.carried,
            now,
        );
        let mut session = match restored {
            Ok(s) => s,
            Err(effects) => {
                assert!(effects.iter().any(|e| matches!(e, Effect::Close(..))));
                self.record = None;
                return;
            }
        };
        if let Some(last) = self.delivered.get(&record.sid) {
            assert!(
                session.next_seq() > *last,
                "a resumed session reuses seq {last}"
            );
        }
        let mut reported = HashSet::new();
        reported.insert((self.info.claimed_nonce, self.info.claimed));
        reported.insert((stored.voucher.nonce, stored.voucher.cumulative));
        let authorized = reported.iter().map(|r| r.1).max().unwrap_or(0);
        let a = session.accepted();
        assert!(a.cumulative <= authorized, "resumed beyond what is stored");
        let effects = session.resume(format!("token-{}", self.sessions), now);
        self.live = Some(Live {
            session,
            reported,
            authorized,
            deposit: self.info.deposit,
            accepted: (a.nonce, a.cumulative),
            alive_until: None,
            lease_lapsed: false,
            store_paused: false,
            streaming: false,
            recorded: (record.next_seq, record.request),
        });
        self.apply(effects, Origin::Resumed);
    }

    /// `suspend` then `resume` on the same session object (the server resumes a session
    /// restored from the store instead; the API allows this too). Held answers stay held.
    fn resume_in_place(&mut self) {
        let now = self.now();
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if !live.session.is_open() {
            return;
        }
        let effects = live.session.suspend(now);
        self.apply(effects, Origin::Other);
        let Some(live) = self.live.as_mut() else {
            return;
        };
        live.lease_lapsed = false;
        live.store_paused = false;
        let effects = live.session.resume(format!("token-{}", self.sessions), now);
        self.apply(effects, Origin::Resumed);
    }

    /// Another process stored a newer voucher of the payer's (this session does not know).
    fn other_writer(&mut self) {
        let Some(stored) = self.store.as_mut() else {
            return;
        };
        if !self.store_up {
            return;
        }
        let nonce = stored.voucher.nonce + 1 + u64::from(self.input.u8() % 3);
        let cumulative =
            (stored.voucher.cumulative + u128::from(self.input.u8())).min(self.info.deposit);
        if cumulative < stored.voucher.cumulative {
            return;
        }
        stored.voucher = signed_voucher(nonce, cumulative);
        self.ever_stored.insert((nonce, cumulative));
    }

    /// The store's compare-and-set.
    fn save_voucher(&mut self, v: StoredVoucher) -> Result<(), StoreError> {
        match self.input.below(16) {
            0 => return Err(StoreError::Unavailable("down".into())),
            1 => {
                return Err(StoreError::Fenced {
                    fence: paystream::store::Fence(1),
                    current: paystream::store::Fence(2),
                });
            }
            _ => {}
        }
        if !self.store_up {
            return Err(StoreError::Unavailable("down".into()));
        }
        if let Some(s) = &self.store {
            if v.nonce <= s.voucher.nonce {
                return Err(StoreError::StaleNonce {
                    got: v.nonce,
                    stored: s.voucher.nonce,
                });
            }
            if v.cumulative < s.voucher.cumulative {
                return Err(StoreError::CumulativeDecreased {
                    got: v.cumulative,
                    stored: s.voucher.cumulative,
                });
            }
        }
        let consumed = self.store.map_or(Exact::ZERO, |s| s.consumed);
        let closing = self.store.and_then(|s| s.closing);
        self.store = Some(StoredChannel {
            voucher: v,
            consumed,
            closing,
        });
        self.ever_stored.insert((v.nonce, v.cumulative));
        Ok(())
    }

    fn answer_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let i = self.input.below(self.pending.len());
        let pending = self.pending.remove(i);
        self.answer(pending);
    }

    fn answer(&mut self, pending: Pending) {
        let now = self.now();
        match pending {
            Pending::Verify(Effect::Verify {
                payer,
                domain,
                voucher,
            }) => {
                let result = keys::payer_keys().verify_state(&domain, payer, &voucher);
                let Some(live) = self.live.as_mut() else {
                    return;
                };
                let effects = live.session.verified(&voucher, result);
                self.apply(effects, Origin::Other);
            }
            Pending::Verify(other) => unreachable!("{other:?}"),
            Pending::Persist(v) => {
                let result = self.save_voucher(v);
                let Some(live) = self.live.as_mut() else {
                    return;
                };
                let ok = result.is_ok();
                let fenced = matches!(result, Err(StoreError::Fenced { .. }));
                let outage = matches!(
                    result,
                    Err(StoreError::Unavailable(_) | StoreError::Corrupt { .. })
                );
                let was_open = live.session.is_open();
                let mut effects = live.session.persisted(&v, result, now);
                // The session ignores the answer for a voucher no longer in flight (a resume in
                // place dropped it), even with another in flight by then: it says nothing, and
                // neither pauses nor resumes delivery (found by this target twice: the model
                // paused on such an answer; the session acknowledged the next voucher on it).
                let handled = !effects.is_empty();
                if !was_open && live.session.is_open() && self.input.below(16) == 0 {
                    // The server could not write the new session's record: the opening is
                    // abandoned before the client hears of it (`session` is not sent).
                    live.session.abandon(now);
                    effects = vec![Effect::Close(
                        paystream::protocol::CloseCode::Internal,
                        "store_unavailable".into(),
                    )];
                }
                let origin = if ok {
                    live.reported.insert((v.nonce, v.cumulative));
                    live.authorized = live.authorized.max(v.cumulative);
                    if handled {
                        live.store_paused = false;
                    }
                    Origin::Stored
                } else {
                    if outage && was_open && handled {
                        live.store_paused = true;
                    }
                    Origin::Other
                };
                self.apply(effects, origin);
                if self
                    .live
                    .as_ref()
                    .is_some_and(|l| l.session.is_closed() && !was_open)
                {
                    // The opening voucher was not stored: no session.
                    self.drop_session();
                } else if fenced {
                    // Another process took the channel over: the server lets the session go.
                    self.release();
                }
            }
            Pending::Probe => {
                let up = self.store_up;
                let Some(live) = self.live.as_mut() else {
                    return;
                };
                let effects = live.session.store_probed(up, now);
                if up {
                    live.store_paused = false;
                }
                self.apply(effects, Origin::Other);
            }
        }
    }

    /// Performs effects in order, as the server's `apply`.
    fn apply(&mut self, effects: Vec<Effect>, origin: Origin) {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            if self.live.is_none() {
                return;
            }
            match effect {
                Effect::Send(message) => self.on_send(message, origin),
                Effect::Verify {
                    payer,
                    domain: under,
                    voucher,
                } => {
                    let live = self.live.as_ref().expect("checked");
                    assert_eq!(payer, self.info.payer, "verify for someone else");
                    assert_eq!(under, domain(), "verify under another domain");
                    let a = live.session.accepted();
                    let s = &voucher.state;
                    assert_eq!(s.channelId, CHANNEL);
                    assert!(s.nonce > a.nonce && s.cumulative >= a.cumulative);
                    assert!(
                        s.cumulative <= live.deposit,
                        "a voucher above the deposit verified"
                    );
                    self.pending.push(Pending::Verify(Effect::Verify {
                        payer,
                        domain: under,
                        voucher,
                    }));
                    if !self.delayed || self.input.bool() {
                        let p = self.pending.pop().expect("pushed");
                        self.answer(p);
                    }
                }
                Effect::Persist {
                    channel_id,
                    voucher,
                } => {
                    assert_eq!(channel_id, CHANNEL);
                    let state = keys::state(CHANNEL, voucher.nonce, voucher.cumulative);
                    let digest = domain().state_digest(&state);
                    assert!(
                        keys::payer_keys()
                            .verify(self.info.payer, &digest, &voucher.signature)
                            .is_ok(),
                        "persisting a voucher the payer did not sign"
                    );
                    self.pending.push(Pending::Persist(voucher));
                    if !self.delayed || self.input.bool() {
                        let p = self.pending.pop().expect("pushed");
                        self.answer(p);
                    }
                }
                Effect::PersistConsumed {
                    channel_id,
                    consumed,
                } => {
                    assert_eq!(channel_id, CHANNEL);
                    let live = self.live.as_ref().expect("checked");
                    assert!(
                        at_most(&consumed, live.authorized),
                        "saving unpaid consumption"
                    );
                    if self.store_up && self.input.below(8) != 0 {
                        if let Some(s) = self.store.as_mut() {
                            s.consumed = s.consumed.max(consumed);
                        }
                        self.progress();
                    } else {
                        self.carried = Some(self.carried.map_or(consumed, |c| c.max(consumed)));
                    }
                }
                Effect::QueueClaim(claim) => self.check_claim(&claim),
                Effect::CloseChannel(claim) => {
                    self.check_claim(&claim);
                    if self.store_up
                        && let Some(s) = self.store.as_mut()
                        && s.closing.is_none()
                    {
                        s.closing = Some(claim.amount);
                    }
                }
                Effect::Request(_) => {
                    if let Some(live) = self.live.as_mut() {
                        live.streaming = true;
                    }
                    self.progress();
                }
                Effect::CancelRequest => {
                    if let Some(live) = self.live.as_mut() {
                        live.streaming = false;
                    }
                }
                Effect::ProbeStore => {
                    self.pending.push(Pending::Probe);
                    if !self.delayed || self.input.bool() {
                        let p = self.pending.pop().expect("pushed");
                        self.answer(p);
                    }
                }
                Effect::Account { consumed, queued } => {
                    let live = self.live.as_ref().expect("checked");
                    assert!(consumed <= live.authorized && queued <= live.authorized);
                }
                Effect::Close(..) => {
                    self.release();
                    return;
                }
            }
        }
    }

    /// The record follows the session's progress (the server's `record_progress`: written when
    /// it moved since the connection last wrote it, as not parked).
    fn progress(&mut self) {
        if let (Some(live), Some(r)) = (self.live.as_mut(), self.record.as_mut())
            && live.session.is_open()
            && r.sid == live.session.id()
        {
            let now = (live.session.next_seq(), live.session.unended_request());
            if now != live.recorded {
                (r.next_seq, r.request) = now;
                r.parked = false;
                live.recorded = now;
            }
        }
    }

    fn check_claim(&self, claim: &PendingClaim) {
        let live = self.live.as_ref().expect("checked");
        let v = claim.voucher;
        assert_eq!(claim.channel_id, CHANNEL);
        assert!(
            self.ever_stored.contains(&(v.nonce, v.cumulative)),
            "a claim under a voucher never stored: {v:?}"
        );
        let digest = domain().state_digest(&keys::state(CHANNEL, v.nonce, v.cumulative));
        assert!(
            keys::payer_keys()
                .verify(self.info.payer, &digest, &v.signature)
                .is_ok(),
            "a claim the contract would refuse"
        );
        assert!(claim.amount <= v.cumulative, "a claim above its voucher");
        assert!(claim.amount <= live.authorized);
    }

    fn on_send(&mut self, message: ServerMessage, origin: Origin) {
        let now = self.now();
        let liveness = self.params.meter.liveness_ns;
        let live = self.live.as_mut().expect("checked");
        let a = live.session.accepted();
        match message {
            ServerMessage::Session {
                channel_id,
                nonce,
                cumulative,
                consumed,
                ..
            } => {
                assert!(
                    matches!(origin, Origin::Stored | Origin::Resumed),
                    "`session` sent from {origin:?}"
                );
                assert_eq!(channel_id, CHANNEL);
                assert_eq!((nonce, cumulative), (a.nonce, a.cumulative));
                assert!(cumulative <= live.authorized);
                assert!(consumed <= cumulative);
                live.alive_until = Some(now.saturating_add(liveness));
                if origin == Origin::Stored {
                    // Opened: the new session's record replaces any other.
                    self.record = Some(Record {
                        sid: live.session.id().to_string(),
                        next_seq: 0,
                        request: None,
                        parked: false,
                    });
                }
            }
            ServerMessage::VoucherAck {
                nonce,
                cumulative,
                consumed,
            } => {
                assert_eq!(origin, Origin::Stored, "an ack without a store write");
                assert!(
                    live.reported.contains(&(nonce, cumulative)),
                    "an ack for ({nonce}, {cumulative}), never reported stored"
                );
                assert!(consumed <= cumulative);
            }
            ServerMessage::NeedVoucher {
                cumulative,
                suggested,
                ..
            } => {
                assert!(
                    suggested > cumulative,
                    "suggests {suggested} at {cumulative}"
                );
                assert!(
                    suggested <= live.deposit,
                    "suggests {suggested} above the deposit"
                );
                assert!(cumulative <= live.authorized);
            }
            ServerMessage::Usage {
                consumed,
                cumulative,
                remaining,
                ..
            } => {
                assert_eq!(consumed + remaining, cumulative);
                assert!(cumulative <= live.authorized);
            }
            ServerMessage::Receipt {
                cumulative,
                consumed,
                settled_amount,
                refund,
                ..
            } => {
                assert!(cumulative <= live.authorized);
                assert_eq!(settled_amount, consumed.min(cumulative));
                assert_eq!(refund, live.deposit - settled_amount);
            }
            ServerMessage::App { .. } => panic!("the session sends no units"),
            ServerMessage::End { .. } => self.progress(),
            ServerMessage::Paused { .. }
            | ServerMessage::Resumed {}
            | ServerMessage::Error { .. } => {}
        }
    }

    /// What holds of the live session at every moment.
    fn check_live(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let a = live.session.accepted();
        let consumed = live.session.meter().exact_consumed();
        assert!(
            at_most(&consumed, a.cumulative),
            "consumed {consumed:?} beyond the accepted {}",
            a.cumulative
        );
        assert!(
            a.cumulative <= live.authorized,
            "accepted beyond what is stored"
        );
        assert!(
            live.reported.contains(&(a.nonce, a.cumulative)) || a.signature.is_none(),
            "accepted ({}, {}) was never reported stored",
            a.nonce,
            a.cumulative
        );
        assert!(
            (a.nonce, a.cumulative) >= live.accepted && a.cumulative >= live.accepted.1,
            "the accepted state moved back"
        );
        live.accepted = (a.nonce, a.cumulative);
    }
}
