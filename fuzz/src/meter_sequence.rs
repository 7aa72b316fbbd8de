//! `meter_sequence`: one session's meter (`paystream::meter::Meter`) under any tariff (rational
//! prices, from 0 to 2^128 over denominators up to the limit) and any sequence of events:
//! connect, disconnect, heartbeats, pauses and resumes for each reason, messages, bytes in,
//! requests, new cumulatives, asks for credit, carried consumption, clock steps (a few of them
//! backwards: a caller's stale instant).
//!
//! The target keeps its own account of the session in exact big rationals (no common
//! denominator, no 256-bit words), following the meter's documented rules: time is charged
//! only while connected, unpaused and within the last heartbeat's liveness, up to the exact
//! nanosecond the credit allows; a unit is charged whole within the cumulative or refused. Then
//! it checks after every event:
//! - the consumption never exceeds the accepted cumulative (no overdelivery), and equals the
//!   target's account exactly, as do the counters (messages, bytes, nanoseconds charged), the
//!   rounded values (`consumed` up, `remaining` down) and the pause reasons;
//! - every refusal changed nothing but what the rules say (time accrued, the exhaustion pause);
//! - time charged never exceeds the time that passed, and never decreases;
//! - the tariff compiles (`Rates`) to the least common denominator, or is refused exactly when
//!   that is above 2^120;
//! - `exhausted_at` is the exact nanosecond credit runs out (a copy advanced to it is not
//!   exhausted, one nanosecond later it is), never in the past;
//! - `need_voucher` is asked at most once per cumulative, always while exhausted, and suggests
//!   more than the cumulative.

use alloy::primitives::U256;
use num_bigint::{BigInt, Sign};
use num_rational::BigRational;
use num_traits::{One, Signed, Zero};
use paystream::meter::{
    Exact, MAX_DENOMINATOR, Meter, MeterConfig, NANOS_PER_SEC, Nanos, PauseReason, Price, Tariff,
};

use crate::input::Input;

const EXHAUSTED: u8 = PauseReason::Exhausted as u8;
const REASONS: [PauseReason; 6] = [
    PauseReason::Exhausted,
    PauseReason::Backpressure,
    PauseReason::Requested,
    PauseReason::StoreUnavailable,
    PauseReason::Unresponsive,
    PauseReason::LeaseLapsed,
];

fn int(v: u128) -> BigInt {
    BigInt::from(v)
}

fn int256(v: U256) -> BigInt {
    BigInt::from_bytes_be(Sign::Plus, &v.to_be_bytes::<32>())
}

fn frac(n: BigInt, d: BigInt) -> BigRational {
    BigRational::new(n, d)
}

fn whole(v: u128) -> BigRational {
    BigRational::from_integer(int(v))
}

fn price_of(p: Option<Price>, scale: u128) -> BigRational {
    p.map_or_else(BigRational::zero, |p| {
        frac(int(p.amount), int(p.per) * int(scale))
    })
}

/// `floor(x * d) / d`: `x` on the grid of `1/d`, rounded down.
fn floor_to(x: &BigRational, d: &BigInt) -> BigRational {
    frac(
        (x * BigRational::from_integer(d.clone()))
            .floor()
            .to_integer(),
        d.clone(),
    )
}

fn gcd(mut a: BigInt, mut b: BigInt) -> BigInt {
    while !b.is_zero() {
        let r = &a % &b;
        a = b;
        b = r;
    }
    a
}

/// The tariff's least common denominator, or `None` if it cannot be compiled.
fn denominator(t: &Tariff) -> Option<BigInt> {
    let mut d = BigInt::one();
    let pers = [
        t.per_message.map(|p| Some(p.per)),
        t.per_second.map(|p| p.per.checked_mul(NANOS_PER_SEC)),
        t.per_byte_out.map(|p| Some(p.per)),
        t.per_byte_in.map(|p| Some(p.per)),
    ];
    for per in pers.into_iter().flatten() {
        let per = int(per?);
        d = &d / gcd(d.clone(), per.clone()) * per;
    }
    (d <= int256(MAX_DENOMINATOR)).then_some(d)
}

/// The target's own account of the session.
#[derive(Clone, Debug)]
struct Model {
    message: BigRational,
    nanosecond: BigRational,
    byte_out: BigRational,
    byte_in: BigRational,
    d: BigInt,
    liveness: u64,
    cumulative: u128,
    consumed: BigRational,
    messages: u128,
    bytes_in: u128,
    bytes_out: u128,
    elapsed: u128,
    connected: bool,
    pauses: u8,
    /// Time is accounted up to here.
    acc: Nanos,
    live: Nanos,
    asked: bool,
}

impl Model {
    fn running(&self) -> bool {
        self.connected && self.pauses == 0
    }

    fn room(&self) -> BigRational {
        whole(self.cumulative) - &self.consumed
    }

    fn accrue(&mut self, now: Nanos) {
        if !self.running() {
            return;
        }
        let end = now.min(self.live);
        if end <= self.acc {
            return;
        }
        let dt = end - self.acc;
        let cost = &self.nanosecond * whole(u128::from(dt));
        let room = self.room();
        if cost <= room {
            self.consumed += cost;
            self.elapsed += u128::from(dt);
            self.acc = end;
        } else {
            let affordable = (room / &self.nanosecond).floor().to_integer();
            let affordable: u64 = affordable.try_into().expect("less than dt");
            self.consumed += &self.nanosecond * whole(u128::from(affordable));
            self.elapsed += u128::from(affordable);
            self.acc += affordable;
            self.pauses |= EXHAUSTED;
        }
    }

    fn transition(&mut self, now: Nanos, change: impl FnOnce(&mut Self)) {
        let now = now.max(self.acc);
        self.accrue(now);
        let was = self.running();
        change(self);
        if !was && self.running() {
            self.acc = now;
        }
    }

    fn consumed_ceil(&self) -> u128 {
        self.consumed
            .ceil()
            .to_integer()
            .try_into()
            .expect("at most the cumulative")
    }

    fn remaining(&self) -> u128 {
        self.room()
            .floor()
            .to_integer()
            .try_into()
            .expect("at most the cumulative")
    }
}

/// The meter agrees with the model in every observable.
fn check(meter: &Meter, model: &Model, clock_span: u128) {
    let exact = meter.exact_consumed();
    assert_eq!(int256(exact.denominator), model.d, "denominator");
    let consumed = frac(int256(exact.numerator), int256(exact.denominator));
    assert_eq!(consumed, model.consumed, "consumption");
    assert!(!model.consumed.is_negative());
    assert!(
        model.consumed <= whole(model.cumulative),
        "beyond the cumulative"
    );
    let u = meter.usage();
    assert_eq!(u.cumulative, model.cumulative);
    assert_eq!(u.consumed, model.consumed_ceil());
    assert_eq!(u.remaining, model.remaining());
    assert_eq!(meter.consumed(), u.consumed);
    assert_eq!(meter.remaining(), u.remaining);
    assert_eq!(meter.cumulative(), model.cumulative);
    assert_eq!(
        (
            u128::from(u.messages),
            u128::from(u.bytes_in),
            u128::from(u.bytes_out)
        ),
        (model.messages, model.bytes_in, model.bytes_out),
        "counters"
    );
    assert_eq!(u128::from(u.elapsed_ns), model.elapsed, "time charged");
    assert!(model.elapsed <= clock_span, "more time charged than passed");
    assert_eq!(meter.is_connected(), model.connected);
    for r in REASONS {
        assert_eq!(meter.is_paused(r), model.pauses & r as u8 != 0, "{r:?}");
    }
}

fn price(input: &mut Input<'_>) -> Option<Price> {
    if input.below(3) == 0 {
        return None;
    }
    // Powers of two too: a product that wraps around 2^256 is a random-looking (and so almost
    // surely refused) amount, except when its factors are powers of two: it is then zero.
    let amount = match input.below(6) {
        0 => 0,
        1 => u128::from(input.u8()),
        2 => u128::MAX >> input.below(16),
        3 => 1 << input.below(128),
        _ => input.scaled_u128(),
    };
    let per = match input.below(7) {
        0 => 1,
        1 => 1000,
        2 => 3,
        3 => NANOS_PER_SEC,
        4 => 1 << input.below(121),
        _ => input.scaled_u128().max(1),
    };
    Some(Price { amount, per })
}

/// A step of the clock: mostly forward, by anything from a nanosecond to hours.
fn step(input: &mut Input<'_>) -> u64 {
    match input.below(8) {
        0 => 0,
        1 => u64::from(input.u8()),
        2 => u64::from(input.u8()) * 1_000_000,
        3 => u64::from(input.u8()) * 100_000_000,
        4 => input.scaled_u64() % (1 << 44),
        5 => 1 << input.below(50),
        _ => input.scaled_u64() % (1 << 32),
    }
}

fn bytes(input: &mut Input<'_>) -> u64 {
    match input.below(4) {
        0 | 1 => u64::from(input.u8()),
        2 => 1 << input.below(48),
        _ => input.scaled_u64() >> 16,
    }
}

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let tariff = Tariff {
        per_message: price(&mut input),
        per_second: price(&mut input),
        per_byte_out: price(&mut input),
        per_byte_in: price(&mut input),
    };
    let config = MeterConfig {
        rtt_ns: input.scaled_u64(),
        margin_ns: input.scaled_u64(),
        min_threshold: input.scaled_u128(),
        credit_window: input.scaled_u128(),
        liveness_ns: match input.below(4) {
            0 => input.scaled_u64(),
            1 => 1 << input.below(64),
            _ => 10_000_000_000,
        },
    };
    let start: Nanos = input.scaled_u64() % (1 << 50);
    let cumulative = input.scaled_u128();
    let carried = input.bool().then(|| Exact {
        numerator: U256::from(input.scaled_u128()),
        denominator: U256::from(match input.below(3) {
            0 => 1,
            1 => 1000,
            _ => input.scaled_u128().max(1),
        }),
    });
    let d = denominator(&tariff);
    let made = match carried {
        Some(c) => Meter::resume_from(&tariff, config, cumulative, c, start),
        None => Meter::new(&tariff, config, cumulative, start),
    };
    let (mut meter, d) = match (made, d) {
        (Ok(m), Some(d)) => (m, d),
        (Err(_), None) => return,
        (made, d) => panic!("{tariff:?}: the meter says {made:?}, the denominator is {d:?}"),
    };
    let rates = meter.rates();
    assert_eq!(int256(rates.denominator), d);
    let mut model = Model {
        message: price_of(tariff.per_message, 1),
        nanosecond: price_of(tariff.per_second, NANOS_PER_SEC),
        byte_out: price_of(tariff.per_byte_out, 1),
        byte_in: price_of(tariff.per_byte_in, 1),
        d: d.clone(),
        liveness: config.liveness_ns,
        cumulative,
        consumed: BigRational::zero(),
        messages: 0,
        bytes_in: 0,
        bytes_out: 0,
        elapsed: 0,
        connected: false,
        pauses: 0,
        acc: start,
        live: start,
        asked: false,
    };
    for (weight, price) in [
        (rates.message, &model.message),
        (rates.byte_out, &model.byte_out),
        (rates.byte_in, &model.byte_in),
        (rates.nanosecond, &model.nanosecond),
    ] {
        let scaled = price * BigRational::from_integer(d.clone());
        assert_eq!(
            BigRational::from_integer(int256(weight)),
            scaled,
            "a weight"
        );
    }
    if let Some(c) = carried {
        let c = frac(int256(c.numerator), int256(c.denominator));
        model.cumulative = cumulative.max(c.ceil().to_integer().try_into().expect("small"));
        model.consumed = floor_to(&c, &d).min(whole(model.cumulative));
    }
    let mut clock = start;
    check(&meter, &model, 0);
    for _ in 0..200 {
        if input.is_empty() {
            break;
        }
        clock = clock.saturating_add(step(&mut input));
        // Now and then an instant from before the last one (a caller's stale reading).
        let now = if input.below(16) == 0 {
            clock.saturating_sub(u64::from(input.u8()) * 1000)
        } else {
            clock
        };
        match input.below(20) {
            0 => {
                meter.connect(now);
                let live = now.saturating_add(model.liveness);
                model.transition(now, |m| {
                    m.connected = true;
                    m.live = live;
                });
            }
            1 => {
                meter.disconnect(now);
                model.transition(now, |m| m.connected = false);
            }
            2 | 3 => {
                meter.heartbeat(now);
                let now = now.max(model.acc);
                model.accrue(now);
                if model.running() && now > model.live {
                    model.acc = now;
                }
                model.live = now.saturating_add(model.liveness);
            }
            4 => {
                let r = REASONS[input.below(REASONS.len())];
                meter.pause(r, now);
                model.transition(now, |m| m.pauses |= r as u8);
            }
            5 => {
                let r = REASONS[1 + input.below(REASONS.len() - 1)];
                meter.resume(r, now);
                model.transition(now, |m| m.pauses &= !(r as u8));
            }
            6..=8 => {
                let n = bytes(&mut input);
                let result = meter.try_message(n, now);
                model.accrue(now.max(model.acc));
                let cost = &model.message + &model.byte_out * whole(u128::from(n));
                if model.pauses & EXHAUSTED != 0 {
                    assert!(result.is_err(), "a message while exhausted");
                } else if &model.consumed + &cost > whole(model.cumulative) {
                    assert!(
                        result.is_err(),
                        "a message beyond the cumulative was charged"
                    );
                    model.pauses |= EXHAUSTED;
                } else {
                    assert_eq!(result, Ok(()), "a message within the credit refused");
                    model.consumed += cost;
                    model.messages += 1;
                    model.bytes_out += u128::from(n);
                }
            }
            9 => {
                let n = bytes(&mut input);
                let result = meter.try_bytes_in(n, now);
                model.accrue(now.max(model.acc));
                let cost = &model.byte_in * whole(u128::from(n));
                if &model.consumed + &cost > whole(model.cumulative) {
                    assert!(result.is_err(), "bytes beyond the cumulative were charged");
                } else {
                    assert_eq!(result, Ok(()), "bytes within the credit refused");
                    model.consumed += cost;
                    model.bytes_in += u128::from(n);
                }
            }
            10 => {
                let n = bytes(&mut input);
                let result = meter.try_request(n, now);
                model.accrue(now.max(model.acc));
                let after = &model.consumed + &model.byte_in * whole(u128::from(n));
                let cumulative = whole(model.cumulative);
                if after >= cumulative || cumulative - &after < model.message {
                    assert!(result.is_err(), "a request that cannot pay its first unit");
                } else {
                    assert_eq!(result, Ok(()), "a request within the credit refused");
                    model.consumed = after;
                    model.bytes_in += u128::from(n);
                }
            }
            11 | 12 => {
                let c = match input.below(4) {
                    0 => model.cumulative.saturating_sub(u128::from(input.u8())),
                    1 => input.scaled_u128(),
                    _ => model
                        .cumulative
                        .saturating_add(input.scaled_u128() >> input.below(128)),
                };
                let result = meter.set_cumulative(c, now);
                if c < model.cumulative {
                    assert!(result.is_err(), "the cumulative went down");
                } else {
                    assert_eq!(result, Ok(()));
                    let now = now.max(model.acc);
                    model.accrue(now);
                    if c > model.cumulative {
                        model.transition(now, |m| {
                            m.cumulative = c;
                            m.pauses &= !EXHAUSTED;
                        });
                        model.asked = false;
                    }
                }
            }
            13 | 14 => {
                let exhausted = meter.advance(now);
                model.accrue(now.max(model.acc));
                assert_eq!(exhausted, model.pauses & EXHAUSTED != 0);
                check_exhausted_at(&meter, &model);
            }
            15 | 16 => {
                let ask = meter.poll_need_voucher(now);
                model.accrue(now.max(model.acc));
                if model.asked {
                    assert_eq!(ask, None, "asked twice for one cumulative");
                } else if model.pauses & EXHAUSTED != 0 {
                    assert!(ask.is_some(), "exhausted and not asking");
                }
                if let Some(ask) = ask {
                    model.asked = true;
                    check_ask(&ask, &model);
                }
            }
            17 => {
                let ask = meter.repeat_need_voucher(now);
                model.accrue(now.max(model.acc));
                check_ask(&ask, &model);
            }
            18 => {
                let c = Exact {
                    numerator: U256::from(input.scaled_u128()),
                    denominator: if input.bool() {
                        meter.rates().denominator
                    } else {
                        U256::from(input.scaled_u128().max(1))
                    },
                };
                meter.raise_consumed(c);
                let c = frac(int256(c.numerator), int256(c.denominator));
                let raised = floor_to(&c, &model.d).min(whole(model.cumulative));
                if raised > model.consumed {
                    model.consumed = raised;
                }
            }
            _ => {
                if input.bool() {
                    meter.reset_ask();
                    model.asked = false;
                } else {
                    meter.set_rtt(input.scaled_u64());
                }
            }
        }
        assert_eq!(meter.lapsed(now), model.connected && now > model.live);
        check(&meter, &model, u128::from(clock - start));
    }
}

/// `exhausted_at` is the nanosecond the credit runs out at the current rate.
fn check_exhausted_at(meter: &Meter, model: &Model) {
    let at = meter.exhausted_at();
    if !model.running() || model.nanosecond.is_zero() {
        assert_eq!(at, None);
        return;
    }
    match at {
        Some(at) => {
            assert!(
                at >= model.acc,
                "exhausted_at {at} is in the past ({})",
                model.acc
            );
            assert!(at < model.live);
            let mut before = meter.clone();
            assert!(!before.advance(at), "exhausted before exhausted_at");
            let mut after = meter.clone();
            assert!(after.advance(at + 1), "not exhausted after exhausted_at");
        }
        None => {
            // The liveness lapses first: the credit lasts until then.
            let mut later = meter.clone();
            assert!(
                !later.advance(model.live),
                "exhausted before the liveness lapsed"
            );
        }
    }
}

fn check_ask(ask: &paystream::meter::NeedVoucher, model: &Model) {
    assert_eq!(ask.consumed, model.consumed_ceil());
    assert_eq!(ask.cumulative, model.cumulative);
    assert!(ask.suggested >= ask.consumed);
    assert!(
        ask.suggested > ask.cumulative || ask.cumulative == u128::MAX,
        "suggests {} at cumulative {}",
        ask.suggested,
        ask.cumulative
    );
}
