//! The meter against a reference model in big rationals, and its headline behaviours: exact
//! micro-cent pricing over millions of events, time charged to the nanosecond, never
//! delivering past the accepted cumulative, and asking early enough that a prompt client is
//! never paused.

use alloy::primitives::U256;
use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{Signed, ToPrimitive, Zero};
use paystream::meter::{Meter, MeterConfig, MeterError, Nanos, PauseReason, Price, Tariff};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

fn big(v: u128) -> BigInt {
    BigInt::from(v)
}

fn ratio(p: Option<Price>, extra_per: u128) -> BigRational {
    p.map_or_else(BigRational::zero, |p| {
        BigRational::new(big(p.amount), big(p.per) * big(extra_per))
    })
}

fn exact(meter: &Meter) -> BigRational {
    let e = meter.exact_consumed();
    let (n, d) = (e.numerator, e.denominator);
    let to_big = |v: U256| BigInt::parse_bytes(v.to_string().as_bytes(), 10).unwrap();
    BigRational::new(to_big(n), to_big(d))
}

fn ceil(r: &BigRational) -> u128 {
    r.ceil().to_integer().to_u128().unwrap()
}

/// The reference: the same rules, in big rationals and plain code.
#[derive(Debug, Clone)]
struct Model {
    msg: BigRational,
    ns: BigRational,
    out: BigRational,
    inn: BigRational,
    total: BigRational,
    cumulative: BigRational,
    connected: bool,
    backpressure: bool,
    requested: bool,
    exhausted: bool,
    accrued_to: u64,
    live_until: u64,
    liveness: u64,
    messages: u64,
    elapsed: u64,
}

impl Model {
    fn new(t: &Tariff, cumulative: u128, liveness: u64) -> Self {
        Self {
            msg: ratio(t.per_message, 1),
            ns: ratio(t.per_second, 1_000_000_000),
            out: ratio(t.per_byte_out, 1),
            inn: ratio(t.per_byte_in, 1),
            total: BigRational::zero(),
            cumulative: BigRational::from_integer(big(cumulative)),
            connected: false,
            backpressure: false,
            requested: false,
            exhausted: false,
            accrued_to: 0,
            live_until: 0,
            liveness,
            messages: 0,
            elapsed: 0,
        }
    }

    fn running(&self) -> bool {
        self.connected && !self.backpressure && !self.requested && !self.exhausted
    }

    fn accrue(&mut self, now: u64) {
        if !self.running() {
            return;
        }
        let end = now.min(self.live_until);
        if end <= self.accrued_to {
            return;
        }
        let dt = end - self.accrued_to;
        let cost = &self.ns * BigRational::from_integer(BigInt::from(dt));
        if &self.total + &cost <= self.cumulative {
            self.total += cost;
            self.elapsed += dt;
            self.accrued_to = end;
        } else {
            let room = &self.cumulative - &self.total;
            let affordable = (room / &self.ns).floor().to_integer().to_u64().unwrap();
            self.total += &self.ns * BigRational::from_integer(BigInt::from(affordable));
            self.elapsed += affordable;
            self.accrued_to += affordable;
            self.exhausted = true;
        }
    }

    fn transition(&mut self, now: u64, change: impl FnOnce(&mut Self)) {
        self.accrue(now);
        let was = self.running();
        change(self);
        if !was && self.running() {
            self.accrued_to = now;
        }
    }
}

#[derive(Debug, Clone)]
enum Event {
    Advance(u64),
    Message(u64),
    BytesIn(u64),
    Pause(bool),
    Resume(bool),
    Heartbeat,
    Connect,
    Disconnect,
    Voucher(u128),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0u64..3 * SEC).prop_map(Event::Advance),
        6 => (0u64..4_000).prop_map(Event::Message),
        1 => (0u64..4_000).prop_map(Event::BytesIn),
        1 => any::<bool>().prop_map(Event::Pause),
        1 => any::<bool>().prop_map(Event::Resume),
        2 => Just(Event::Heartbeat),
        1 => Just(Event::Connect),
        1 => Just(Event::Disconnect),
        2 => (0u128..2_000).prop_map(Event::Voucher),
    ]
}

fn price() -> impl Strategy<Value = Option<Price>> {
    prop_oneof![
        1 => Just(None),
        3 => (0u128..1_000, prop::sample::select(vec![1u128, 3, 7, 100, 1_000, 1_000_000, 999_983]))
            .prop_map(|(amount, per)| Some(Price { amount, per })),
    ]
}

fn tariff() -> impl Strategy<Value = Tariff> {
    (price(), price(), price(), price()).prop_map(|(m, s, o, i)| Tariff {
        per_message: m,
        per_second: s,
        per_byte_out: o,
        per_byte_in: i,
    })
}

fn config(liveness_ns: u64) -> MeterConfig {
    MeterConfig {
        liveness_ns,
        ..MeterConfig::with_credit_window(100)
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/proptest-regressions/meter.txt"))),
        ..ProptestConfig::default()
    })]

    /// For any tariff and event sequence: the meter's exact consumption equals the model's, it
    /// refuses exactly the units the model refuses, and consumption never passes the cumulative.
    #[test]
    fn the_meter_matches_the_exact_model(
        t in tariff(),
        start_credit in 0u128..3_000,
        liveness in prop::sample::select(vec![SEC, 5 * SEC, 10 * SEC]),
        events in prop::collection::vec(event(), 1..80),
    ) {
        let mut meter = Meter::new(&t, config(liveness), start_credit, 0).unwrap();
        let mut model = Model::new(&t, start_credit, liveness);
        let mut now: u64 = 0;
        for e in events {
            match e {
                Event::Advance(dt) => {
                    now += dt;
                    meter.advance(now);
                    model.accrue(now);
                }
                Event::Message(bytes) => {
                    model.accrue(now);
                    let cost = &model.msg + &model.out * BigRational::from_integer(BigInt::from(bytes));
                    let fits = !model.exhausted && &model.total + &cost <= model.cumulative;
                    let got = meter.try_message(bytes, now);
                    prop_assert_eq!(got.is_ok(), fits, "message of {} bytes", bytes);
                    if fits {
                        model.total += cost;
                        model.messages += 1;
                    } else {
                        model.exhausted = true;
                        let exhausted = matches!(got, Err(MeterError::Exhausted { .. }));
                        prop_assert!(exhausted);
                    }
                }
                Event::BytesIn(bytes) => {
                    model.accrue(now);
                    let cost = &model.inn * BigRational::from_integer(BigInt::from(bytes));
                    let fits = &model.total + &cost <= model.cumulative;
                    prop_assert_eq!(meter.try_bytes_in(bytes, now).is_ok(), fits);
                    if fits {
                        model.total += cost;
                    }
                }
                Event::Pause(bp) => {
                    let reason = if bp { PauseReason::Backpressure } else { PauseReason::Requested };
                    meter.pause(reason, now);
                    model.transition(now, |m| if bp { m.backpressure = true } else { m.requested = true });
                }
                Event::Resume(bp) => {
                    let reason = if bp { PauseReason::Backpressure } else { PauseReason::Requested };
                    meter.resume(reason, now);
                    model.transition(now, |m| if bp { m.backpressure = false } else { m.requested = false });
                }
                Event::Heartbeat => {
                    meter.heartbeat(now);
                    model.accrue(now);
                    if model.running() && now > model.live_until {
                        model.accrued_to = now;
                    }
                    model.live_until = now + model.liveness;
                }
                Event::Connect => {
                    meter.connect(now);
                    let l = model.liveness;
                    model.transition(now, |m| {
                        m.connected = true;
                        m.live_until = now + l;
                    });
                }
                Event::Disconnect => {
                    meter.disconnect(now);
                    model.transition(now, |m| m.connected = false);
                }
                Event::Voucher(extra) => {
                    let c = meter.cumulative() + extra;
                    meter.set_cumulative(c, now).unwrap();
                    if extra > 0 {
                        model.transition(now, |m| {
                            m.cumulative = BigRational::from_integer(big(c));
                            m.exhausted = false;
                        });
                    } else {
                        model.accrue(now);
                    }
                }
            }
            prop_assert_eq!(exact(&meter), model.total.clone(), "exact consumption");
            prop_assert_eq!(meter.consumed(), ceil(&model.total), "consumed is the ceiling");
            prop_assert!(meter.consumed() <= meter.cumulative(), "never past the cumulative");
            prop_assert_eq!(meter.is_paused(PauseReason::Exhausted), model.exhausted);
            let u = meter.usage();
            prop_assert_eq!((u.messages, u.elapsed_ns), (model.messages, model.elapsed));
            prop_assert!(!(&model.cumulative - &model.total).is_negative());
        }
    }

    /// Splitting a running interval into many pieces charges the same as one piece.
    #[test]
    fn splitting_time_changes_nothing(
        amount in 1u128..1_000,
        per in prop::sample::select(vec![1u128, 3, 7, 1_000, 999_983]),
        cuts in prop::collection::vec(0u64..2 * SEC, 1..40),
    ) {
        let t = Tariff { per_second: Some(Price { amount, per }), ..Tariff::default() };
        let total: u64 = cuts.iter().sum();
        let mut whole = Meter::new(&t, config(u64::MAX / 4), u128::MAX / 2, 0).unwrap();
        let mut split = whole.clone();
        whole.connect(0);
        split.connect(0);
        whole.advance(total);
        let mut now = 0;
        for c in cuts {
            now += c;
            split.advance(now);
        }
        prop_assert_eq!(whole.exact_consumed(), split.exact_consumed());
        prop_assert_eq!(whole.usage().elapsed_ns, total);
    }

    /// Paused time costs nothing: a pause of any length between two running stretches charges
    /// exactly the two stretches.
    #[test]
    fn paused_time_costs_nothing(a in 0u64..5 * SEC, paused in 0u64..100 * SEC, b in 0u64..5 * SEC, reason in any::<bool>()) {
        let t = Tariff { per_second: Some(Price { amount: 7, per: 3 }), ..Tariff::default() };
        let reason = if reason { PauseReason::Backpressure } else { PauseReason::Requested };
        let mut m = Meter::new(&t, config(u64::MAX / 4), u128::MAX / 2, 0).unwrap();
        m.connect(0);
        m.advance(a);
        m.pause(reason, a);
        m.advance(a + paused);
        m.resume(reason, a + paused);
        m.advance(a + paused + b);
        let mut reference = Meter::new(&t, config(u64::MAX / 4), u128::MAX / 2, 0).unwrap();
        reference.connect(0);
        reference.advance(a + b);
        prop_assert_eq!(m.exact_consumed(), reference.exact_consumed());
        prop_assert_eq!(m.usage().elapsed_ns, a + b);
    }
}

#[test]
fn ten_million_tokens_at_three_tenths_of_a_micro_cent_cost_exactly_30000() {
    // USDC base units are 10^-6 dollars: 0.3 micro-cents is 0.003 base units.
    let t = Tariff::from_json(r#"{"perMessage":{"amount":"3","per":"1000"}}"#).unwrap();
    let mut m = Meter::new(&t, MeterConfig::with_credit_window(1_000), 30_000, 0).unwrap();
    m.connect(0);
    for i in 0..10_000_000u64 {
        m.try_message(4, i).unwrap();
    }
    assert_eq!(m.consumed(), 30_000);
    assert_eq!(
        m.exact_consumed().numerator / m.exact_consumed().denominator,
        U256::from(30_000)
    );
    assert!(
        (m.exact_consumed().numerator % m.exact_consumed().denominator).is_zero(),
        "no fraction left"
    );
    // The credit is exactly used up: the next token does not fit.
    assert_eq!(
        m.try_message(4, 10_000_000),
        Err(MeterError::Exhausted { remaining: 0 })
    );
    assert_eq!(m.usage().messages, 10_000_000);
}

#[test]
fn sub_unit_fractions_are_carried_and_settled_rounded_up() {
    let t = Tariff::from_json(r#"{"perMessage":{"amount":"1","per":"3"}}"#).unwrap();
    let mut m = Meter::new(&t, MeterConfig::with_credit_window(10), 10, 0).unwrap();
    m.try_message(0, 0).unwrap();
    assert_eq!(m.consumed(), 1, "1/3 settles as 1");
    m.try_message(0, 0).unwrap();
    m.try_message(0, 0).unwrap();
    assert_eq!(m.consumed(), 1, "3/3 is exactly 1");
    m.try_message(0, 0).unwrap();
    assert_eq!(m.consumed(), 2);
}

#[test]
fn time_stops_at_the_exact_nanosecond_credit_runs_out() {
    // 3 base units per second; credit 10: runs out after 3.333333333 s.
    let t = Tariff::from_json(r#"{"perSecond":{"amount":"3","per":"1"}}"#).unwrap();
    let mut m = Meter::new(
        &t,
        MeterConfig {
            liveness_ns: 60 * SEC,
            ..MeterConfig::with_credit_window(10)
        },
        10,
        0,
    )
    .unwrap();
    m.connect(0);
    assert_eq!(m.exhausted_at(), Some(3_333_333_333));
    assert!(!m.advance(3_333_333_333));
    assert!(
        m.advance(3_333_333_334),
        "one nanosecond later the credit is gone"
    );
    assert_eq!(m.usage().elapsed_ns, 3_333_333_333);
    assert!(m.consumed() <= 10);
    // Nothing more accrues while exhausted; a voucher restarts the clock from its arrival.
    m.advance(20 * SEC);
    assert_eq!(m.usage().elapsed_ns, 3_333_333_333);
    m.set_cumulative(13, 20 * SEC).unwrap();
    m.advance(21 * SEC);
    assert_eq!(m.usage().elapsed_ns, 4_333_333_333);
}

#[test]
fn a_missed_heartbeat_stops_the_clock() {
    let t = Tariff::from_json(r#"{"perSecond":{"amount":"1","per":"1"}}"#).unwrap();
    let mut m = Meter::new(
        &t,
        MeterConfig {
            liveness_ns: 10 * SEC,
            ..MeterConfig::with_credit_window(10)
        },
        1_000,
        0,
    )
    .unwrap();
    m.connect(0);
    m.heartbeat(5 * SEC);
    m.advance(60 * SEC);
    assert_eq!(
        m.usage().elapsed_ns,
        15 * SEC,
        "charged until the liveness lapsed"
    );
    m.heartbeat(70 * SEC);
    m.advance(71 * SEC);
    assert_eq!(m.usage().elapsed_ns, 16 * SEC, "the gap is not charged");
}

/// A client answering `need_voucher` after its round trip, at a steady rate, is never paused.
/// Returns (pauses, vouchers signed, messages delivered).
fn simulate(
    rate_per_sec: u64,
    rtt: u64,
    answer_after: u64,
    credit_window: u128,
    seconds: u64,
) -> (u64, u64, u64) {
    // 0.3 micro-cents per token plus 0.1 base units per second of connection.
    let t = Tariff::from_json(
        r#"{"perMessage":{"amount":"3","per":"1000"},"perSecond":{"amount":"1","per":"10"}}"#,
    )
    .unwrap();
    let mut cfg = MeterConfig::with_credit_window(credit_window);
    cfg.rtt_ns = rtt;
    let mut m = Meter::new(&t, cfg, credit_window, 0).unwrap();
    m.connect(0);
    let interval = SEC / rate_per_sec;
    let (mut pauses, mut vouchers, mut messages) = (0, 0, 0);
    let mut pending: Option<(Nanos, u128)> = None;
    let mut now = 0;
    while now < seconds * SEC {
        if let Some((at, cumulative)) = pending
            && at <= now
        {
            m.set_cumulative(cumulative, at).unwrap();
            vouchers += 1;
            pending = None;
        }
        if now % (5 * SEC) == 0 {
            m.heartbeat(now);
        }
        match m.try_message(24, now) {
            Ok(()) => messages += 1,
            Err(_) => pauses += 1,
        }
        if let Some(ask) = m.poll_need_voucher(now) {
            assert!(pending.is_none(), "asked twice for the same credit");
            pending = Some((now + answer_after, ask.suggested));
        }
        now += interval;
    }
    (pauses, vouchers, messages)
}

#[test]
fn a_client_answering_within_its_round_trip_is_never_paused() {
    for (rate, rtt, window) in [
        (50, 100 * MS, 5),
        (200, 250 * MS, 10),
        (1_000, 400 * MS, 20),
        (20, 50 * MS, 2),
    ] {
        let (pauses, vouchers, messages) = simulate(rate, rtt, rtt, window, 120);
        assert_eq!(pauses, 0, "rate {rate}/s, rtt {rtt} ns, window {window}");
        assert!(vouchers > 0);
        let per_10k = vouchers as f64 * 10_000.0 / messages as f64;
        println!(
            "rate {rate}/s rtt {} ms window {window}: {messages} messages, {vouchers} vouchers, {per_10k:.2} signatures per 10,000 messages",
            rtt / MS
        );
    }
}

#[test]
fn a_client_answering_much_later_than_its_round_trip_is_paused() {
    // The same simulation is able to fail: a client that takes 5 s against a 100 ms estimate
    // runs dry, and the meter pauses instead of delivering on credit.
    let (pauses, _, _) = simulate(1_000, 100 * MS, 5 * SEC, 2, 30);
    assert!(pauses > 0);
}

#[test]
fn a_client_that_stops_paying_gets_nothing_unpaid() {
    let t = Tariff::from_json(r#"{"perMessage":{"amount":"1","per":"1"}}"#).unwrap();
    let mut m = Meter::new(&t, MeterConfig::with_credit_window(10), 10, 0).unwrap();
    m.connect(0);
    let delivered = (0..100).filter(|i| m.try_message(0, *i).is_ok()).count();
    assert_eq!(delivered, 10);
    assert_eq!(m.consumed(), 10);
    assert!(m.is_paused(PauseReason::Exhausted));
    assert!(m.poll_need_voucher(100).is_some());
    assert!(
        m.poll_need_voucher(101).is_none(),
        "asked once per cumulative"
    );
    assert_eq!(
        m.set_cumulative(9, 102),
        Err(MeterError::CumulativeDecreased {
            got: 9,
            current: 10
        })
    );
}

/// The demo's stream (0.3 micro-cents per token, 250 tokens per second, a 2-unit window): the
/// first message after a voucher lands 1.5 ms into the new credit window. One message over
/// 1.5 ms is no measure of a rate; extrapolated over the asking horizon it looked like 2 base
/// units per second (2.7 times the real rate), and the meter asked for the next voucher at
/// message 1, with less than a third of a base unit used, when the client's own count (the
/// cap on what it signs) could not honour it yet.
#[test]
fn one_message_right_after_a_voucher_is_not_a_burn_rate() {
    let t = Tariff::from_json(r#"{"perMessage":{"amount":"3","per":"1000"}}"#).unwrap();
    let mut m = Meter::new(&t, MeterConfig::with_credit_window(2), 0, 0).unwrap();
    m.connect(0);
    m.set_cumulative(2, 10 * MS).unwrap();
    let first = 10 * MS + 1_500_000;
    m.try_message(56, first).unwrap();
    assert_eq!(
        m.poll_need_voucher(first),
        None,
        "asked at the first message"
    );
    // At the real rate (one token every 4 ms) the ask comes once the credit left is less than
    // a horizon's worth (about 0.75 base units over the default 1 s): after about 417 tokens.
    let mut asked_at = None;
    for i in 1..667u64 {
        let now = first + i * 4 * MS;
        m.try_message(56, now).unwrap();
        if m.poll_need_voucher(now).is_some() {
            asked_at = Some(i + 1);
            break;
        }
    }
    let asked_at = asked_at.expect("asked before the credit ran out");
    assert!(
        (300..667).contains(&asked_at),
        "asked after {asked_at} tokens"
    );
}
