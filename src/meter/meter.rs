//! [`Meter`]: exact accounting of one session's consumption against its accepted cumulative.

use std::sync::Arc;

use alloy::primitives::U256;

use super::Exact;
use super::error::{MeterError, TariffError};
use super::tariff::{Rates, Tariff};
use crate::shared::SharedTable;

/// A monotonic instant in nanoseconds, from a clock the caller owns (the meter never reads one).
pub type Nanos = u64;

/// 250 ms is a round trip over a slow mobile link; the session replaces it with the measured
/// ping/pong round trip.
pub const DEFAULT_RTT_NS: u64 = 250_000_000;
/// Margin on top of the round trip: a client must also sign, which a hardware wallet or a busy
/// agent can take a while to do.
pub const DEFAULT_MARGIN_NS: u64 = 750_000_000;
/// Floor under the round trip used for asking early, whatever was measured.
pub const MIN_RTT_NS: u64 = 10_000_000;
/// Shortest time between two `need_voucher` asks while delivery goes on.
const MIN_ASK_SPACING_NS: u64 = 100_000_000;
/// Longest time between two full `need_voucher` checks while credit is plentiful.
const RECHECK_NS: u64 = 10_000_000;
/// How long one heartbeat proves the client is there: the heartbeat interval (5 s) plus
/// one interval of grace.
pub const DEFAULT_LIVENESS_NS: u64 = 10_000_000_000;

/// What every meter of one tariff and configuration shares: the compiled rates and the
/// configuration (less the round trip, which each session measures).
#[derive(Debug, PartialEq, Eq)]
struct Terms {
    rates: Rates,
    config: MeterConfig,
}

/// The terms of `tariff` under `config`, compiled once and shared by every meter on them: an
/// idle session keeps a pointer instead of 224 bytes (a server has a tariff per resource and
/// one configuration).
fn shared_terms(tariff: &Tariff, config: MeterConfig) -> Result<Arc<Terms>, TariffError> {
    static SHARED: SharedTable<(Tariff, MeterConfig), Terms, 16> = SharedTable::new();
    let config = MeterConfig {
        rtt_ns: 0,
        ..config
    };
    SHARED.get_or_try_make((*tariff, config), || {
        Ok(Terms {
            rates: tariff.rates()?,
            config,
        })
    })
}

/// When to ask for credit, and how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterConfig {
    /// The client's round trip (ns); raised to [`MIN_RTT_NS`] if lower.
    pub rtt_ns: u64,
    /// Extra time (ns) the client gets to sign and send.
    pub margin_ns: u64,
    /// Ask for a voucher when less than this many base units remain, whatever the burn rate.
    pub min_threshold: u128,
    /// The suggested next cumulative is the consumption plus this many base units.
    pub credit_window: u128,
    /// Time (ns) after a heartbeat during which the client counts as connected.
    pub liveness_ns: u64,
}

impl MeterConfig {
    /// Defaults for a given credit window.
    pub fn with_credit_window(credit_window: u128) -> Self {
        Self {
            rtt_ns: DEFAULT_RTT_NS,
            margin_ns: DEFAULT_MARGIN_NS,
            min_threshold: 0,
            credit_window,
            liveness_ns: DEFAULT_LIVENESS_NS,
        }
    }
}

/// Why the clock is stopped; time is charged only when none applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PauseReason {
    /// The credit is used up: delivery stops until a voucher raises the cumulative.
    Exhausted = 1,
    /// The client reads too slowly: delivery waits for the socket, and the client is not
    /// charged for the wait.
    Backpressure = 2,
    /// Paused at the client's or the application's request.
    Requested = 4,
    /// The store is unreachable: paid delivery waits until vouchers can be stored again.
    StoreUnavailable = 8,
    /// The client's heartbeat lapsed (no Pong within the liveness time): delivery waits for
    /// the next Pong, as the clock does.
    Unresponsive = 16,
    /// The server's lease on the channel was not renewed in time: another server may be about
    /// to serve it, so this one delivers nothing until the lease is renewed.
    LeaseLapsed = 32,
}

/// What the meter asks the client for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedVoucher {
    /// Consumption so far, rounded up.
    pub consumed: u128,
    /// The accepted cumulative.
    pub cumulative: u128,
    /// The cumulative the next voucher should carry.
    pub suggested: u128,
    /// At the measured burn rate, in how many nanoseconds the credit runs out (`None` when
    /// nothing is being consumed).
    pub runs_out_in_ns: Option<u64>,
}

/// A snapshot for the `usage` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Consumption so far, rounded up: what settling now would take.
    pub consumed: u128,
    /// The accepted cumulative.
    pub cumulative: u128,
    /// Whole base units left (rounded down).
    pub remaining: u128,
    /// Messages delivered.
    pub messages: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes delivered.
    pub bytes_out: u64,
    /// Nanoseconds charged (connected, alive and unpaused).
    pub elapsed_ns: u64,
}

/// The consumption of one session, kept exactly: `scaled / D` base units, where `D` is the
/// tariff's common denominator, so no fraction of a base unit is ever lost or invented. Every
/// `try_*` either charges the whole unit within the accepted cumulative or refuses it and
/// changes nothing, so consumption never exceeds the cumulative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    /// The rates and the configuration, shared by the meters of one tariff and configuration.
    terms: Arc<Terms>,
    /// The client's round trip (ns), as configured until the session measures it.
    rtt_ns: u64,
    /// Consumption times `D`.
    scaled: U256,
    /// Cumulative times `D`.
    limit: U256,
    cumulative: u128,
    messages: u64,
    bytes_in: u64,
    bytes_out: u64,
    charged_ns: u64,
    connected: bool,
    /// Bits of [`PauseReason`].
    pauses: u8,
    /// Time is accounted up to here.
    accrued_to: Nanos,
    /// The last heartbeat proves liveness until here.
    live_until: Nanos,
    /// Start of the current credit window (since the last voucher): instant and consumption.
    window_start: (Nanos, U256),
    /// Consumption, duration and charges of the previous credit window, for the burn rate.
    previous_window: (U256, u64, u64),
    /// Charges (messages, inbound requests) since the current window started.
    window_events: u64,
    /// The cumulative for which `need_voucher` was already asked.
    asked_at: Option<u128>,
    /// The last full check found no need while the credit left was above this (scaled) and
    /// the time was before `recheck_at`: until either changes, the check is two comparisons.
    /// (Asking early is a heuristic; this only saves recomputing the burn rate per event.)
    skip_while_room_above: U256,
    recheck_at: Nanos,
    /// When `need_voucher` was last asked (for the spacing between asks).
    last_ask: Option<Nanos>,
    /// The asking threshold (scaled) of the last ask; the suggested step is twice it.
    ask_step: U256,
}

impl Meter {
    /// A meter for `tariff`, with nothing consumed, credit `cumulative`, not yet connected.
    pub fn new(
        tariff: &Tariff,
        config: MeterConfig,
        cumulative: u128,
        now: Nanos,
    ) -> Result<Self, TariffError> {
        let terms = shared_terms(tariff, config)?;
        Ok(Self {
            limit: U256::from(cumulative) * terms.rates.denominator,
            terms,
            rtt_ns: config.rtt_ns,
            scaled: U256::ZERO,
            cumulative,
            messages: 0,
            bytes_in: 0,
            bytes_out: 0,
            charged_ns: 0,
            connected: false,
            pauses: 0,
            accrued_to: now,
            live_until: now,
            window_start: (now, U256::ZERO),
            previous_window: (U256::ZERO, 0, 0),
            window_events: 0,
            asked_at: None,
            skip_while_room_above: U256::MAX,
            recheck_at: 0,
            last_ask: None,
            ask_step: U256::ZERO,
        })
    }

    /// Restores a meter whose consumption was carried over from earlier sessions on the
    /// channel: exactly, when it was kept under this tariff's denominator; otherwise rounded
    /// down by less than one `1/denominator` of a base unit, in the client's favour.
    pub fn resume_from(
        tariff: &Tariff,
        config: MeterConfig,
        cumulative: u128,
        consumed: Exact,
        now: Nanos,
    ) -> Result<Self, TariffError> {
        let mut meter = Self::new(tariff, config, cumulative.max(consumed.ceil()), now)?;
        meter.scaled = consumed
            .scaled_to(meter.terms.rates.denominator)
            .min(meter.limit);
        meter.window_start.1 = meter.scaled;
        Ok(meter)
    }

    fn running(&self) -> bool {
        self.connected && self.pauses == 0
    }

    /// Charges the time since the last accounting, up to `now` and to the end of liveness.
    /// If the credit runs out inside the interval, charges exactly up to that nanosecond and
    /// pauses with [`PauseReason::Exhausted`].
    fn accrue(&mut self, now: Nanos) {
        if !self.running() {
            return;
        }
        let end = now.min(self.live_until);
        if end <= self.accrued_to {
            return;
        }
        let dt = end - self.accrued_to;
        // Saturating, as every cost here: a weight (up to 2^248) times a count can pass 2^256,
        // and a wrapped product would charge almost nothing (a saturated one is above any room).
        let cost = self.terms.rates.nanosecond.saturating_mul(U256::from(dt));
        let room = self.limit - self.scaled;
        if cost <= room {
            self.scaled += cost;
            self.charged_ns += dt;
            self.accrued_to = end;
        } else {
            // cost > room >= 0 implies a non-zero rate; the affordable part is < dt.
            let affordable: u64 = (room / self.terms.rates.nanosecond).to();
            self.scaled += self.terms.rates.nanosecond * U256::from(affordable);
            self.charged_ns += affordable;
            self.accrued_to += affordable;
            self.pauses |= PauseReason::Exhausted as u8;
        }
    }

    /// Applies a change to what stops the clock, charging time up to `now` first and
    /// restarting the clock at `now` if it starts.
    fn transition(&mut self, now: Nanos, change: impl FnOnce(&mut Self)) {
        let now = now.max(self.accrued_to);
        self.accrue(now);
        let was_running = self.running();
        change(self);
        if !was_running && self.running() {
            self.accrued_to = now;
        }
    }

    /// The client connected (or reconnected): the clock runs while it stays alive.
    pub fn connect(&mut self, now: Nanos) {
        let liveness = self.terms.config.liveness_ns;
        self.transition(now, |m| {
            m.connected = true;
            m.live_until = now.saturating_add(liveness);
        });
    }

    /// The client disconnected: the clock stops.
    pub fn disconnect(&mut self, now: Nanos) {
        self.transition(now, |m| m.connected = false);
    }

    /// A heartbeat answered at `now`: the client is alive until `now + liveness`. Time between
    /// a lapsed liveness and this heartbeat is not charged.
    pub fn heartbeat(&mut self, now: Nanos) {
        let now = now.max(self.accrued_to);
        self.accrue(now);
        if self.running() && now > self.live_until {
            self.accrued_to = now;
        }
        self.live_until = now.saturating_add(self.terms.config.liveness_ns);
    }

    /// Stops the clock for `reason`.
    pub fn pause(&mut self, reason: PauseReason, now: Nanos) {
        self.transition(now, |m| m.pauses |= reason as u8);
    }

    /// Lifts `reason`; the clock restarts at `now` if nothing else stops it.
    pub fn resume(&mut self, reason: PauseReason, now: Nanos) {
        self.transition(now, |m| m.pauses &= !(reason as u8));
    }

    /// Whether `reason` currently stops the clock.
    pub fn is_paused(&self, reason: PauseReason) -> bool {
        self.pauses & reason as u8 != 0
    }

    /// Whether the client is connected (between [`Meter::connect`] and
    /// [`Meter::disconnect`]).
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether the client's last heartbeat (or connect) has lapsed by `now`: its time is no
    /// longer charged, and nothing should be delivered to it until it answers again.
    pub fn lapsed(&self, now: Nanos) -> bool {
        self.connected && now > self.live_until
    }

    /// Charges time up to `now`; returns whether the credit is exhausted.
    pub fn advance(&mut self, now: Nanos) -> bool {
        self.accrue(now.max(self.accrued_to));
        self.is_paused(PauseReason::Exhausted)
    }

    /// The instant at which the running clock uses up the credit, so delivery can pause at
    /// exactly that instant. `None` when time is free or the clock is stopped.
    ///
    /// A clock that stops first, because the client's liveness lapses before the credit runs
    /// out, has no such instant: a stopped clock asks for no wake-up. (It used to return an
    /// instant in the past once liveness lapsed, and the session woke about a thousand times a
    /// second.)
    pub fn exhausted_at(&self) -> Option<Nanos> {
        if !self.running() || self.terms.rates.nanosecond.is_zero() {
            return None;
        }
        let room = (self.limit - self.scaled) / self.terms.rates.nanosecond;
        let room: u64 = room.try_into().unwrap_or(u64::MAX);
        let at = self.accrued_to.saturating_add(room);
        (at < self.live_until).then_some(at)
    }

    fn charge(&mut self, cost: U256) -> Result<(), MeterError> {
        let after = self.scaled.checked_add(cost).ok_or(MeterError::Overflow)?;
        if after > self.limit {
            return Err(MeterError::Exhausted {
                remaining: self.remaining(),
            });
        }
        self.scaled = after;
        Ok(())
    }

    /// Delivers one message of `bytes` bytes if it fits in the credit; otherwise refuses it,
    /// pauses with [`PauseReason::Exhausted`] (the clock stops: nothing is being delivered),
    /// and changes nothing else.
    pub fn try_message(&mut self, bytes: u64, now: Nanos) -> Result<(), MeterError> {
        self.accrue(now.max(self.accrued_to));
        if self.is_paused(PauseReason::Exhausted) {
            return Err(MeterError::Exhausted {
                remaining: self.remaining(),
            });
        }
        let cost = self
            .terms
            .rates
            .byte_out
            .saturating_mul(U256::from(bytes))
            .saturating_add(self.terms.rates.message);
        if let Err(error) = self.charge(cost) {
            self.pauses |= PauseReason::Exhausted as u8;
            return Err(error);
        }
        self.messages += 1;
        self.bytes_out += bytes;
        self.window_events += 1;
        Ok(())
    }

    /// Charges `bytes` received from the client if they fit in the credit; otherwise refuses
    /// them (the request is not processed) and changes nothing.
    pub fn try_bytes_in(&mut self, bytes: u64, now: Nanos) -> Result<(), MeterError> {
        self.accrue(now.max(self.accrued_to));
        self.charge(self.terms.rates.byte_in.saturating_mul(U256::from(bytes)))?;
        self.bytes_in += bytes;
        self.window_events += 1;
        Ok(())
    }

    /// Charges a request's `bytes` in if, after them, the credit left still pays for one
    /// message and is not nothing: a request must be able to deliver its first unit, or it
    /// would start upstream work (a model's prompt processing) nobody pays for. Otherwise
    /// refuses it and changes nothing.
    pub fn try_request(&mut self, bytes: u64, now: Nanos) -> Result<(), MeterError> {
        self.accrue(now.max(self.accrued_to));
        let cost = self.terms.rates.byte_in.saturating_mul(U256::from(bytes));
        let after = self.scaled.saturating_add(cost);
        if after >= self.limit || self.limit - after < self.terms.rates.message {
            return Err(MeterError::Exhausted {
                remaining: self.remaining(),
            });
        }
        self.scaled = after;
        self.bytes_in += bytes;
        self.window_events += 1;
        Ok(())
    }

    /// A voucher raised the accepted cumulative to `cumulative`: credit grows, an exhausted
    /// meter resumes at `now`, and a new credit window starts for the burn rate.
    pub fn set_cumulative(&mut self, cumulative: u128, now: Nanos) -> Result<(), MeterError> {
        if cumulative < self.cumulative {
            return Err(MeterError::CumulativeDecreased {
                got: cumulative,
                current: self.cumulative,
            });
        }
        let now = now.max(self.accrued_to);
        self.accrue(now);
        if cumulative == self.cumulative {
            return Ok(());
        }
        let denominator = self.terms.rates.denominator;
        self.transition(now, |m| {
            m.cumulative = cumulative;
            m.limit = U256::from(cumulative) * denominator;
            m.pauses &= !(PauseReason::Exhausted as u8);
        });
        let (start, scaled_at_start) = self.window_start;
        if now > start {
            self.previous_window = (
                self.scaled - scaled_at_start,
                now - start,
                self.window_events,
            );
        }
        self.window_start = (now, self.scaled);
        self.window_events = 0;
        self.asked_at = None;
        self.recheck_at = 0;
        Ok(())
    }

    /// Forgets that `need_voucher` was asked for the current cumulative, so the next check may
    /// ask again (an ask that lapsed, or a deposit that grew).
    pub fn reset_ask(&mut self) {
        self.asked_at = None;
        self.recheck_at = 0;
        self.skip_while_room_above = U256::MAX;
    }

    /// Raises the consumption to `consumed` (carried over from a session this one takes over),
    /// within the accepted cumulative; never lowers it.
    pub fn raise_consumed(&mut self, consumed: Exact) {
        let scaled = consumed
            .scaled_to(self.terms.rates.denominator)
            .min(self.limit);
        if scaled > self.scaled {
            self.window_start.1 += scaled - self.scaled;
            self.scaled = scaled;
        }
    }

    /// Sets the measured round trip to the client.
    pub fn set_rtt(&mut self, rtt_ns: u64) {
        self.rtt_ns = rtt_ns;
    }

    /// The burn rate as (scaled consumption, nanoseconds): the faster of the current and the
    /// previous credit window, so a speed-up is seen at once and a lull does not hide the rate
    /// the client will need again.
    ///
    /// `n` charges seen in a window of `t` nanoseconds are counted as `n - 1/2` charges: the
    /// first one came some way into the window, half an interval on average. Counted whole,
    /// one message 1.5 ms after a voucher landed made the demo's stream (one message every
    /// 4 ms) look 2.7 times faster than it was, and the meter asked for credit before the
    /// client could honour the ask. Time charges (no events) are counted as they are.
    fn burn_rate(&self, now: Nanos) -> (U256, u64) {
        let unbias = |burned: U256, events: u64| {
            if events == 0 {
                burned
            } else {
                burned.saturating_mul(U256::from(2 * events - 1)) / U256::from(2 * events)
            }
        };
        let (start, scaled_at_start) = self.window_start;
        let current = (
            unbias(self.scaled - scaled_at_start, self.window_events),
            now.saturating_sub(start),
        );
        let (burned, length, events) = self.previous_window;
        let previous = (unbias(burned, events), length);
        // a/b > c/d  <=>  a*d > c*b
        let faster = |(a, b): (U256, u64), (c, d): (U256, u64)| {
            a.saturating_mul(U256::from(d)) > c.saturating_mul(U256::from(b))
        };
        if current.1 == 0 {
            previous
        } else if previous.1 == 0 || faster(current, previous) {
            current
        } else {
            previous
        }
    }

    /// Whether to ask for a voucher now: once per accepted cumulative, when the credit left
    /// is less than what the burn rate uses over the client's round trip plus the margin, or
    /// less than the configured floor, or less than one more message.
    pub fn poll_need_voucher(&mut self, now: Nanos) -> Option<NeedVoucher> {
        self.accrue(now.max(self.accrued_to));
        if self.asked_at == Some(self.cumulative) {
            return None;
        }
        // Asks are spaced by two round trips (at least 100 ms) unless delivery is stopped: a
        // client whose window is smaller than the asking threshold would otherwise be asked
        // again the moment its voucher lands, and sign in a loop.
        let spacing = self
            .rtt_ns
            .max(MIN_RTT_NS)
            .saturating_mul(2)
            .max(MIN_ASK_SPACING_NS);
        if let Some(last) = self.last_ask
            && now < last.saturating_add(spacing)
            && !self.is_paused(PauseReason::Exhausted)
        {
            return None;
        }
        let room = self.limit - self.scaled;
        if now < self.recheck_at
            && room > self.skip_while_room_above
            && !self.is_paused(PauseReason::Exhausted)
        {
            return None;
        }
        let (burned, over_ns) = self.burn_rate(now);
        let horizon = self
            .rtt_ns
            .max(MIN_RTT_NS)
            .saturating_add(self.terms.config.margin_ns);
        let expected = if over_ns == 0 {
            U256::ZERO
        } else {
            burned.saturating_mul(U256::from(horizon)) / U256::from(over_ns)
        };
        // Whatever was measured, ask before the next message or the next horizon of time
        // could not be paid.
        let time_floor = if self.running() {
            self.terms
                .rates
                .nanosecond
                .saturating_mul(U256::from(horizon))
        } else {
            U256::ZERO
        };
        let floor = (U256::from(self.terms.config.min_threshold) * self.terms.rates.denominator)
            .max(self.terms.rates.message)
            .max(time_floor);
        let threshold = expected.max(floor);
        if room >= threshold && !self.is_paused(PauseReason::Exhausted) {
            // Check again when half the distance to the threshold is used, or in 10 ms.
            self.skip_while_room_above = threshold + (room - threshold) / U256::from(2u8);
            self.recheck_at = now.saturating_add(RECHECK_NS);
            return None;
        }
        self.asked_at = Some(self.cumulative);
        self.last_ask = Some(now);
        self.ask_step = expected.max(floor);
        Some(self.ask(burned, over_ns))
    }

    /// The ask for the current cumulative again (the session repeats it while delivery is
    /// paused for credit), with the consumption as it stands now.
    pub fn repeat_need_voucher(&mut self, now: Nanos) -> NeedVoucher {
        self.accrue(now.max(self.accrued_to));
        let (burned, over_ns) = self.burn_rate(now);
        self.last_ask = Some(now);
        self.ask(burned, over_ns)
    }

    fn ask(&self, burned: U256, over_ns: u64) -> NeedVoucher {
        let room = self.limit - self.scaled;
        let consumed = self.consumed();
        // The step is at least twice the asking threshold: a window smaller than what the
        // client uses in one round trip would have it signing again as soon as it signed.
        let d = self.terms.rates.denominator;
        let threshold = self.ask_step.saturating_mul(U256::from(2u8));
        let burn_step: u128 = threshold.div_ceil(d).try_into().unwrap_or(u128::MAX);
        let window = self.terms.config.credit_window.max(1).max(burn_step);
        let mut suggested = consumed.saturating_add(window);
        if suggested <= self.cumulative {
            suggested = self.cumulative.saturating_add(window);
        }
        let runs_out_in_ns = if burned.is_zero() || over_ns == 0 {
            None
        } else {
            let ns = room.saturating_mul(U256::from(over_ns)) / burned;
            Some(ns.try_into().unwrap_or(u64::MAX))
        };
        NeedVoucher {
            consumed,
            cumulative: self.cumulative,
            suggested,
            runs_out_in_ns,
        }
    }

    /// Consumption so far, rounded up to whole base units: what settling now would take.
    pub fn consumed(&self) -> u128 {
        let d = self.terms.rates.denominator;
        let whole = self.scaled / d;
        let ceil = if (self.scaled % d).is_zero() {
            whole
        } else {
            whole + U256::from(1u8)
        };
        ceil.to()
    }

    /// The exact consumption.
    pub fn exact_consumed(&self) -> Exact {
        Exact {
            numerator: self.scaled,
            denominator: self.terms.rates.denominator,
        }
    }

    /// Whole base units left under the cumulative (rounded down).
    pub fn remaining(&self) -> u128 {
        ((self.limit - self.scaled) / self.terms.rates.denominator).to()
    }

    /// The accepted cumulative.
    pub fn cumulative(&self) -> u128 {
        self.cumulative
    }

    /// The compiled tariff.
    pub fn rates(&self) -> &Rates {
        &self.terms.rates
    }

    /// A snapshot for the `usage` message.
    pub fn usage(&self) -> Usage {
        Usage {
            consumed: self.consumed(),
            cumulative: self.cumulative,
            remaining: self.remaining(),
            messages: self.messages,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            elapsed_ns: self.charged_ns,
        }
    }
}
