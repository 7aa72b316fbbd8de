//! `payment_required`: the 402 challenge (`PaymentRequired::from_header`, the JSON body) and
//! the client's check of its terms against a budget (`client::Policy`).
//!
//! Properties:
//! - decoding a header or a body never panics;
//! - a decoded (or built) challenge round-trips: `from_header(header_value())` and the body
//!   parsed from `to_json()` give it back, and the header is padded base64;
//! - `Policy::check` accepts exactly the terms an independent reading of the policy accepts:
//!   the first `channel-stream`/`paystream/1` option, on an allowed `eip155` chain, to an
//!   allowed payee, each priced kind at most the policy's price for it (compared as exact
//!   fractions in big integers; a kind the policy does not price must be free), and a minimum
//!   deposit within the policy's total. So it never accepts a price above its budget, and
//!   never refuses terms within it;
//! - `Policy::check_tariff` agrees with the same reading.

use alloy::primitives::Address;
use base64::Engine;
use num_bigint::BigUint;
use paystream::client::Policy;
use paystream::meter::{Price, Tariff};
use paystream::protocol::{
    ChannelStreamTerms, DomainTerms, PROTOCOL, PaymentRequired, PaymentRequirements, Resource,
    SCHEME,
};

use crate::client_message::tariff;
use crate::input::Input;

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 6 {
        0 => {
            // Any text, as the header and as the body.
            let text = String::from_utf8_lossy(input.rest()).into_owned();
            if let Ok(c) = PaymentRequired::from_header(&text) {
                check_challenge(&c, &mut Input::new(text.as_bytes()));
            }
            if let Ok(c) = serde_json::from_str::<PaymentRequired>(&text) {
                check_challenge(&c, &mut Input::new(text.as_bytes()));
            }
        }
        1 => {
            // Any bytes, base64-encoded: past the header's first layer.
            let raw = input.rest();
            let header = base64::engine::general_purpose::STANDARD.encode(raw);
            if let Ok(c) = PaymentRequired::from_header(&header) {
                check_challenge(&c, &mut Input::new(raw));
            }
        }
        2 | 3 => {
            let c = challenge(&mut input);
            check_challenge(&c, &mut input);
        }
        _ => {
            // A tariff against a policy near it.
            let t = tariff(&mut input);
            let policy = policy_near(&mut input, &t, &[], Address::ZERO);
            let expected = tariff_within(&policy, &t);
            assert_eq!(
                policy.check_tariff(&t).is_ok(),
                expected,
                "{t:?} against {policy:?}"
            );
        }
    }
}

/// Round trips, then the policy check against a policy drawn from `input`.
pub fn check_challenge(c: &PaymentRequired, input: &mut Input<'_>) {
    let header = c.header_value();
    assert!(header.len().is_multiple_of(4), "unpadded header {header}");
    assert_eq!(
        PaymentRequired::from_header(&header).as_ref(),
        Ok(c),
        "header {header}"
    );
    let body = c.to_json();
    let parsed: PaymentRequired = serde_json::from_str(&body).expect("the body parses");
    assert_eq!(&parsed, c, "body {body}");

    let offer = c.channel_stream();
    let (chains, payee, t) = match offer {
        Some(o) => (
            chain_of(&o.network).into_iter().collect::<Vec<_>>(),
            o.pay_to,
            o.extra.tariff,
        ),
        None => (Vec::new(), Address::ZERO, Tariff::default()),
    };
    let policy = policy_near(input, &t, &chains, payee);
    let result = policy.check(c);
    let expected = acceptable(&policy, c);
    match (result, expected) {
        (Ok(got), Some(want)) => assert!(std::ptr::eq(got, want), "accepted another option"),
        (Err(_), None) => {}
        (got, want) => panic!("check gave {got:?}, expected {want:?}, for {c:?} under {policy:?}"),
    }
}

/// The chain id of an `eip155:<id>` network.
fn chain_of(network: &str) -> Option<u64> {
    network.strip_prefix("eip155:")?.parse().ok()
}

/// `p <= max` as exact fractions.
fn at_most(p: &Price, max: &Price) -> bool {
    BigUint::from(p.amount) * BigUint::from(max.per)
        <= BigUint::from(max.amount) * BigUint::from(p.per)
}

/// Every priced kind of `t` is free or within the policy's price for it.
fn tariff_within(policy: &Policy, t: &Tariff) -> bool {
    [
        (t.per_message, policy.max_per_message),
        (t.per_second, policy.max_per_second),
        (t.per_byte_out, policy.max_per_byte_out),
        (t.per_byte_in, policy.max_per_byte_in),
    ]
    .iter()
    .all(|(price, max)| match (price, max) {
        (None, _) => true,
        (Some(p), _) if p.amount == 0 => true,
        (Some(p), Some(m)) => at_most(p, m),
        (Some(_), None) => false,
    })
}

/// The option a client within `policy` may take, read independently of `Policy::check`.
fn acceptable<'a>(policy: &Policy, c: &'a PaymentRequired) -> Option<&'a PaymentRequirements> {
    let offer = c
        .accepts
        .iter()
        .find(|a| a.scheme == SCHEME && a.extra.protocol == PROTOCOL)?;
    let chain = chain_of(&offer.network)?;
    let ok = policy.allowed_chains.contains(&chain)
        && (policy.allowed_payees.is_empty() || policy.allowed_payees.contains(&offer.pay_to))
        && tariff_within(policy, &offer.extra.tariff)
        && offer.extra.min_deposit <= policy.max_total;
    ok.then_some(offer)
}

/// A policy price near `p`: the same, a little above or below (as fractions), or unrelated.
fn max_near(input: &mut Input<'_>, p: Option<Price>) -> Option<Price> {
    let p = p.unwrap_or(Price { amount: 1, per: 1 });
    match input.below(8) {
        0 => None,
        1 | 2 => Some(p),
        3 => Some(Price {
            amount: p.amount.saturating_add(1),
            per: p.per,
        }),
        4 => Some(Price {
            amount: p.amount.saturating_sub(1),
            per: p.per,
        }),
        5 => Some(Price {
            amount: p.amount,
            per: p.per.saturating_add(1),
        }),
        6 => {
            // The same fraction written over another denominator (when it fits).
            let k = 1 + u128::from(input.u8());
            Some(match (p.amount.checked_mul(k), p.per.checked_mul(k)) {
                (Some(amount), Some(per)) => Price { amount, per },
                _ => p,
            })
        }
        _ => Some(Price {
            amount: input.scaled_u128(),
            per: input.scaled_u128().max(1),
        }),
    }
}

/// A policy that accepts about half of what is near `t`, `chains` and `payee`.
fn policy_near(input: &mut Input<'_>, t: &Tariff, chains: &[u64], payee: Address) -> Policy {
    let mut allowed_chains = chains.to_vec();
    if input.below(4) == 0 {
        allowed_chains.clear();
    }
    if input.bool() {
        allowed_chains.push(input.scaled_u64());
    }
    let allowed_payees = match input.below(4) {
        0 | 1 => Vec::new(),
        2 => vec![payee],
        _ => vec![Address::repeat_byte(input.u8())],
    };
    Policy {
        max_per_message: max_near(input, t.per_message),
        max_per_second: max_near(input, t.per_second),
        max_per_byte_out: max_near(input, t.per_byte_out),
        max_per_byte_in: max_near(input, t.per_byte_in),
        max_total: input.scaled_u128(),
        max_credit_window: input.scaled_u128(),
        allowed_payees,
        allowed_chains,
    }
}

fn terms(input: &mut Input<'_>) -> ChannelStreamTerms {
    let protocol = if input.below(8) == 0 {
        input.string(12)
    } else {
        PROTOCOL.into()
    };
    ChannelStreamTerms {
        protocol,
        ws_endpoint: input.string(30),
        contract: Address::from(input.array::<20>()),
        domain: if input.bool() {
            DomainTerms::default()
        } else {
            DomainTerms {
                name: input.string(10),
                version: input.string(3),
            }
        },
        tariff: tariff(input),
        credit_window: input.scaled_u128(),
        min_deposit: input.scaled_u128(),
        heartbeat_ms: input.scaled_u64(),
        resume_window_seconds: input.scaled_u64(),
        min_withdraw_delay_seconds: input.scaled_u64() as u32,
    }
}

fn network(input: &mut Input<'_>) -> String {
    match input.below(6) {
        0..=2 => format!("eip155:{}", input.scaled_u64()),
        3 => format!("eip155:+{}", input.scaled_u64()),
        4 => format!("eip155:0{}", input.scaled_u64()),
        _ => input.string(16),
    }
}

/// A challenge: as a server builds it, or with any options.
fn challenge(input: &mut Input<'_>) -> PaymentRequired {
    let resource = Resource {
        url: input.string(30),
        description: input.string(20),
        mime_type: input.string(16),
    };
    if input.bool() {
        return PaymentRequired::new(
            resource,
            input.scaled_u64(),
            Address::from(input.array::<20>()),
            Address::from(input.array::<20>()),
            terms(input),
        );
    }
    let n = input.below(4);
    let accepts = (0..n)
        .map(|_| PaymentRequirements {
            scheme: if input.below(4) == 0 {
                input.string(16)
            } else {
                SCHEME.into()
            },
            network: network(input),
            amount: input.scaled_u128(),
            asset: Address::from(input.array::<20>()),
            pay_to: Address::from(input.array::<20>()),
            max_timeout_seconds: input.scaled_u64(),
            extra: terms(input),
        })
        .collect();
    PaymentRequired {
        x402_version: input.scaled_u64() as u32,
        error: input.string(20),
        resource,
        accepts,
    }
}
