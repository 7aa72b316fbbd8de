//! `voucher_accept`: the acceptance rules of an open channel (`channel::OpenChannel`) under a
//! sequence of signed states: validly signed by the payer, by another of four fixed keys,
//! under another domain, for another channel, with fields or signature tampered after signing,
//! stale, decreasing, above the deposit; through `accept` and through the session's path
//! (`PayerKeys::verify_state`, `check_verified`, `apply_checked`); with top-ups and restores.
//!
//! Properties:
//! - `open` refuses exactly a closed or closing channel, another payee, another token;
//! - each voucher gets the verdict of the rules read independently, in their order (channel,
//!   nonce, cumulative, deposit, then the signature: valid iff the payer's key signed exactly
//!   this state under this channel's domain and the signature was not altered): no wrong
//!   signer, channel or domain is ever accepted, and no valid voucher refused;
//! - the accepted nonce strictly increases, the cumulative never decreases and never exceeds
//!   the deposit, and the accepted state carries the voucher's signature;
//! - a refused voucher changes nothing (the channel compares equal to its copy from before);
//! - `verify_state` succeeds iff the named payer signed the state under the named domain, and
//!   `check_verified` refuses a check made for another payer or domain;
//! - `restore` takes a stored state iff it is not behind the accepted one; `restore_floor`
//!   never moves the accepted state back.

use alloy::primitives::{Address, B256, Signature, U256};
use paystream::channel::{
    AcceptedState, ChannelDomain, ChannelError, ChannelInfo, OpenChannel, SignedState, signature,
};

use crate::input::Input;
use crate::keys::{self, KEYS};

const PAYEE: Address = Address::repeat_byte(0xbb);
const TOKEN: Address = Address::ZERO;
const CHANNEL: B256 = B256::repeat_byte(0xc1);

/// The curve order.
const N: U256 = U256::from_limbs([
    0xBFD2_5E8C_D036_4141,
    0xBAAE_DCE6_AF48_A03B,
    0xFFFF_FFFF_FFFF_FFFE,
    0xFFFF_FFFF_FFFF_FFFF,
]);

/// The channel's signing domain.
pub fn domain() -> ChannelDomain {
    ChannelDomain::new(8453, Address::repeat_byte(0xcc))
}

/// A voucher and what is true of it.
struct Made {
    voucher: SignedState,
    /// Who signed it, under which domain, and whether it is exactly what was signed.
    signer: usize,
    domain: ChannelDomain,
    intact: bool,
}

fn other_domain(input: &mut Input<'_>) -> ChannelDomain {
    let d = domain();
    match input.below(3) {
        0 => ChannelDomain::new(d.chain_id ^ 1, d.contract),
        1 => ChannelDomain::new(d.chain_id, Address::repeat_byte(0xcd)),
        _ => ChannelDomain::new(input.u64(), Address::from(input.array::<20>())),
    }
}

/// A nonce near `current`.
fn nonce_near(input: &mut Input<'_>, current: u64) -> u64 {
    match input.below(8) {
        0..=2 => current.saturating_add(1),
        3 => current.saturating_add(1 + u64::from(input.u8())),
        4 => current,
        5 => current.saturating_sub(1 + u64::from(input.u8() % 4)),
        6 => u64::MAX - u64::from(input.u8() % 2),
        _ => input.scaled_u64(),
    }
}

/// A cumulative near `current` and `deposit`.
fn cumulative_near(input: &mut Input<'_>, current: u128, deposit: u128) -> u128 {
    match input.below(10) {
        0..=2 => current.saturating_add(u128::from(input.u8())),
        3 => current.saturating_add(input.scaled_u128()),
        4 => current,
        5 => current.saturating_sub(1),
        6 => deposit,
        7 => deposit.saturating_add(1),
        8 => u128::MAX,
        _ => input.scaled_u128(),
    }
}

/// A voucher near the channel's accepted state, signed and possibly altered.
fn make(input: &mut Input<'_>, channel: &OpenChannel, payer: usize) -> Made {
    let accepted = channel.accepted();
    let signer = if input.below(6) == 0 {
        input.below(KEYS)
    } else {
        payer
    };
    let domain = if input.below(8) == 0 {
        other_domain(input)
    } else {
        domain()
    };
    let id = if input.below(10) == 0 {
        B256::from(input.array::<32>())
    } else {
        CHANNEL
    };
    let state = keys::state(
        id,
        nonce_near(input, accepted.nonce),
        cumulative_near(input, accepted.cumulative, channel.deposit()),
    );
    let signed = keys::sign_state(signer, &domain, &state);
    let mut voucher = SignedState {
        state: keys::state(state.channelId, state.nonce, state.cumulative),
        signature: signed,
    };
    let sig = signed;
    match input.below(16) {
        0 => voucher.state.nonce ^= 1 << input.below(64),
        1 => voucher.state.cumulative ^= 1 << input.below(128),
        2 => voucher.state.channelId.0[input.below(32)] ^= 1 << input.below(8),
        3 => voucher.signature = sig.with_parity(!sig.v()),
        // The high-s twin: a valid ECDSA signature that the rules refuse (and the contract).
        4 => voucher.signature = Signature::new(sig.r(), N - sig.s(), !sig.v()),
        5 => {
            let mask = U256::from_be_bytes(input.array::<32>());
            voucher.signature = Signature::new(sig.r() ^ mask, sig.s(), sig.v());
        }
        6 => {
            let mask = U256::from_be_bytes(input.array::<32>());
            voucher.signature = Signature::new(sig.r(), sig.s() ^ mask, sig.v());
        }
        7 => {
            // Through the wire's 64-byte form: the same signature.
            let compact = sig.as_erc2098();
            voucher.signature = signature::parse_signature(&compact).expect("a signature");
        }
        _ => {}
    }
    let intact = voucher.state == state && voucher.signature == sig;
    Made {
        voucher,
        signer,
        domain,
        intact,
    }
}

/// The verdict of the rules, read independently: `None` to accept, or the error's code.
fn expected(channel: &OpenChannel, made: &Made, payer: usize) -> Option<&'static str> {
    let state = &made.voucher.state;
    let accepted = channel.accepted();
    if state.channelId != channel.info().id {
        Some("wrong_channel")
    } else if state.nonce <= accepted.nonce {
        Some("stale_nonce")
    } else if state.cumulative < accepted.cumulative {
        Some("cumulative_decreased")
    } else if state.cumulative > channel.deposit() {
        Some("exceeds_deposit")
    } else if !(made.intact && made.signer == payer && made.domain == domain()) {
        Some("invalid_signature")
    } else {
        None
    }
}

/// A move of the accepted state from `before` to `after`, by `voucher`.
fn check_moved(before: &OpenChannel, after: &OpenChannel, voucher: &SignedState) {
    let (b, a) = (before.accepted(), after.accepted());
    assert!(a.nonce > b.nonce, "nonce {} -> {}", b.nonce, a.nonce);
    assert!(a.cumulative >= b.cumulative, "cumulative decreased");
    assert!(
        a.cumulative <= after.deposit(),
        "cumulative above the deposit"
    );
    assert_eq!(
        (a.nonce, a.cumulative, a.signature),
        (
            voucher.state.nonce,
            voucher.state.cumulative,
            Some(voucher.signature)
        )
    );
    assert_eq!(before.info(), after.info());
}

fn code(result: &Result<B256, ChannelError>) -> Option<&'static str> {
    result.as_ref().err().map(ChannelError::code)
}

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let payer = input.below(KEYS);
    let deposit = input.scaled_u128();
    let claimed = input.scaled_u128() % deposit.saturating_add(1).max(1);
    let flags = input.u8();
    let info = ChannelInfo {
        id: CHANNEL,
        payer: keys::address(payer),
        payee: if flags & 0x07 == 1 {
            Address::repeat_byte(1)
        } else {
            PAYEE
        },
        token: if flags & 0x38 == 0x08 {
            Address::repeat_byte(2)
        } else {
            TOKEN
        },
        deposit,
        claimed: claimed.min(deposit),
        claimed_nonce: if input.bool() { 0 } else { input.scaled_u64() },
        withdraw_delay: 3600,
        withdraw_at: u64::from(flags >> 6 == 1) * 1_700_000_000,
        closed: flags >> 6 == 2 && flags & 1 == 0,
    };
    let opened = OpenChannel::open(domain(), info, PAYEE, TOKEN);
    let refuse =
        info.closed || info.withdraw_requested() || info.payee != PAYEE || info.token != TOKEN;
    let mut channel = match opened {
        Ok(c) => {
            assert!(!refuse, "opened {info:?}");
            c
        }
        Err(e) => {
            assert!(refuse, "refused {info:?}: {e}");
            return;
        }
    };
    assert_eq!(
        (
            channel.accepted().nonce,
            channel.accepted().cumulative,
            channel.accepted().signature
        ),
        (info.claimed_nonce, info.claimed, None)
    );
    let keys = keys::payer_keys();
    for _ in 0..48 {
        if input.is_empty() {
            break;
        }
        let before = channel.clone();
        match input.below(8) {
            0..=2 => {
                let made = make(&mut input, &channel, payer);
                let want = expected(&channel, &made, payer);
                let fields = channel.check_fields(&made.voucher);
                let checked = channel.check(&made.voucher, keys);
                assert_eq!(channel, before, "a check changed the channel");
                let result = channel.accept(&made.voucher, keys).copied();
                match (&result, want) {
                    (Ok(_), None) => check_moved(&before, &channel, &made.voucher),
                    (Err(e), Some(code)) => {
                        assert_eq!(e.code(), code, "{:?}", made.voucher);
                        assert_eq!(channel, before, "a refused voucher changed the channel");
                    }
                    (got, want) => panic!(
                        "accept gave {got:?}, the rules {want:?}: {:?}",
                        made.voucher
                    ),
                }
                assert_eq!(code(&checked), want);
                let field_want = want.filter(|c| *c != "invalid_signature");
                assert_eq!(code(&fields), field_want);
                if want.is_none() {
                    assert_eq!(checked, Ok(domain().state_digest(&made.voucher.state)));
                }
            }
            3 | 4 => {
                // The session's path: the signature checked for a payer and a domain (usually
                // the channel's), then the rules, then applied once stored.
                let made = make(&mut input, &channel, payer);
                let (who, under) = match input.below(6) {
                    0 => (input.below(KEYS), domain()),
                    1 => (payer, other_domain(&mut input)),
                    _ => (payer, domain()),
                };
                let verified = keys.verify_state(&under, keys::address(who), &made.voucher);
                let signed_by = made.intact && made.signer == who && made.domain == under;
                assert_eq!(
                    verified.is_ok(),
                    signed_by,
                    "verify_state {:?}",
                    made.voucher
                );
                let Ok(verified) = verified else { continue };
                let result = channel.check_verified(&verified);
                assert_eq!(channel, before);
                let want = if who != payer || under != domain() {
                    // Checked for someone else: refused whatever the fields say.
                    Some("invalid_signature")
                } else {
                    expected(&channel, &made, payer)
                };
                assert_eq!(code(&result), want, "check_verified {:?}", made.voucher);
                if result.is_ok() {
                    channel.apply_checked(verified.signed());
                    check_moved(&before, &channel, &made.voucher);
                    // Applying it again is a no-op (no longer ahead).
                    let again = channel.clone();
                    channel.apply_checked(verified.signed());
                    assert_eq!(channel, again);
                }
            }
            5 => {
                let deposit = if input.bool() {
                    channel.deposit().saturating_add(input.scaled_u128())
                } else {
                    input.scaled_u128()
                };
                channel.raise_deposit(deposit);
                assert_eq!(channel.deposit(), before.deposit().max(deposit));
                assert_eq!(channel.accepted(), before.accepted());
            }
            _ => {
                let a = *channel.accepted();
                let stored = AcceptedState {
                    nonce: nonce_near(&mut input, a.nonce),
                    cumulative: cumulative_near(&mut input, a.cumulative, channel.deposit()),
                    signature: None,
                };
                let floor = channel.clone().restore_floor(stored);
                let fa = floor.accepted();
                assert!(fa.nonce >= a.nonce && fa.cumulative >= a.cumulative);
                match channel.clone().restore(stored) {
                    Ok(restored) => {
                        assert!(stored.nonce >= a.nonce && stored.cumulative >= a.cumulative);
                        assert_eq!(restored.accepted(), &stored);
                        assert_eq!(floor.accepted(), &stored);
                        if stored.cumulative <= channel.deposit() && input.bool() {
                            channel = restored;
                        }
                    }
                    Err(_) => {
                        assert!(stored.nonce < a.nonce || stored.cumulative < a.cumulative);
                    }
                }
            }
        }
        let a = channel.accepted();
        assert!(a.cumulative <= channel.deposit());
        assert!(a.nonce >= before.accepted().nonce);
        assert!(a.cumulative >= before.accepted().cumulative);
    }
}
