//! Property tests of the acceptance rules (DESIGN.md section 2) against a plain model: nonces
//! strictly increase, cumulative never decreases and never exceeds the deposit, only the
//! payer's signature is accepted, and a refused state leaves the channel unchanged.

use alloy::primitives::{Address, B256};
use k256::ecdsa::SigningKey;
use paystream::channel::{
    ChannelDomain, ChannelError, ChannelInfo, ChannelState, OpenChannel, PayerKeys, SignedState,
    signature,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const PAYEE: Address = Address::repeat_byte(0xbb);
const TOKEN: Address = Address::repeat_byte(0x70);

fn payer_key() -> SigningKey {
    SigningKey::from_slice(&[0x11; 32]).unwrap()
}

fn other_key() -> SigningKey {
    SigningKey::from_slice(&[0x22; 32]).unwrap()
}

fn channel(deposit: u128, claimed_nonce: u64, claimed: u128) -> OpenChannel {
    let domain = ChannelDomain::new(31337, Address::repeat_byte(0xcc));
    let info = ChannelInfo {
        id: B256::repeat_byte(0x0c),
        payer: signature::address_of(payer_key().verifying_key()),
        payee: PAYEE,
        token: TOKEN,
        deposit,
        claimed,
        claimed_nonce,
        withdraw_delay: 3600,
        withdraw_at: 0,
        closed: false,
    };
    OpenChannel::open(domain, info, PAYEE, TOKEN).unwrap()
}

/// One proposed voucher.
#[derive(Debug, Clone)]
struct Proposal {
    nonce: u64,
    cumulative: u128,
    by_payer: bool,
    other_channel: bool,
}

fn proposal(deposit: u128) -> impl Strategy<Value = Proposal> {
    (
        0u64..24,
        0..=deposit + deposit / 4 + 2,
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(nonce, cumulative, by_payer, other_channel)| Proposal {
            nonce,
            cumulative,
            by_payer,
            other_channel,
        })
}

fn sign(channel: &OpenChannel, p: &Proposal) -> SignedState {
    let mut id = channel.info().id;
    if p.other_channel {
        id.0[0] ^= 0xff;
    }
    let state = ChannelState {
        channelId: id,
        nonce: p.nonce,
        cumulative: p.cumulative,
    };
    let key = if p.by_payer { payer_key() } else { other_key() };
    let digest = channel.domain().state_digest(&state);
    SignedState {
        state,
        signature: signature::sign_digest(&key, &digest),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/proptest-regressions/channel_rules.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn accepts_exactly_what_the_model_accepts(
        (deposit, proposals) in (1u128..5_000).prop_flat_map(|d| (Just(d), prop::collection::vec(proposal(d), 1..24)))
    ) {
        let mut ch = channel(deposit, 0, 0);
        let keys = PayerKeys::default();
        let (mut nonce, mut cumulative) = (0u64, 0u128);
        let mut history = vec![(nonce, cumulative)];
        for p in &proposals {
            let before = ch.clone();
            let voucher = sign(&ch, p);
            let expected = if p.other_channel {
                Some("wrong_channel")
            } else if p.nonce <= nonce {
                Some("stale_nonce")
            } else if p.cumulative < cumulative {
                Some("cumulative_decreased")
            } else if p.cumulative > deposit {
                Some("exceeds_deposit")
            } else if !p.by_payer {
                Some("invalid_signature")
            } else {
                None
            };
            match (ch.accept(&voucher, &keys), expected) {
                (Ok(accepted), None) => {
                    prop_assert_eq!((accepted.nonce, accepted.cumulative), (p.nonce, p.cumulative));
                    prop_assert_eq!(accepted.signature, Some(voucher.signature));
                    nonce = p.nonce;
                    cumulative = p.cumulative;
                    history.push((nonce, cumulative));
                }
                (Err(err), Some(code)) => {
                    prop_assert_eq!(err.code(), code);
                    prop_assert!(err.retriable());
                    prop_assert_eq!(&ch, &before, "a refused state changed the channel");
                }
                (got, want) => prop_assert!(false, "got {:?}, model says {:?}", got.copied(), want),
            }
        }
        // The accepted history is strictly increasing in nonce, non-decreasing in cumulative,
        // and never above the deposit.
        for pair in history.windows(2) {
            prop_assert!(pair[1].0 > pair[0].0);
            prop_assert!(pair[1].1 >= pair[0].1);
            prop_assert!(pair[1].1 <= deposit);
        }
    }

    #[test]
    fn restore_never_goes_behind_the_chain(
        claimed_nonce in 0u64..100, claimed in 0u128..1_000, nonce in 0u64..100, cumulative in 0u128..1_000,
    ) {
        let ch = channel(1_000, claimed_nonce, claimed);
        let stored = paystream::channel::AcceptedState { nonce, cumulative, signature: None };
        match ch.clone().restore(stored) {
            Ok(restored) => {
                prop_assert!(nonce >= claimed_nonce && cumulative >= claimed);
                prop_assert_eq!(*restored.accepted(), stored);
            }
            Err(ChannelError::StaleNonce { .. }) => prop_assert!(nonce < claimed_nonce),
            Err(ChannelError::CumulativeDecreased { .. }) => prop_assert!(cumulative < claimed),
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }
}

#[test]
fn a_top_up_raises_the_ceiling_and_a_stale_read_does_not_lower_it() {
    let mut ch = channel(100, 0, 0);
    let keys = PayerKeys::default();
    let over = Proposal {
        nonce: 1,
        cumulative: 150,
        by_payer: true,
        other_channel: false,
    };
    let voucher = sign(&ch, &over);
    assert_eq!(
        ch.accept(&voucher, &keys).unwrap_err().code(),
        "exceeds_deposit"
    );
    ch.raise_deposit(200);
    ch.accept(&voucher, &keys).unwrap();
    ch.raise_deposit(50);
    assert_eq!(ch.deposit(), 200);
}

#[test]
fn channels_this_server_cannot_be_paid_through_are_refused() {
    let base = *channel(100, 0, 0).info();
    let domain = ChannelDomain::new(31337, Address::repeat_byte(0xcc));
    let cases = [
        (
            ChannelInfo {
                payee: Address::repeat_byte(1),
                ..base
            },
            "wrong_payee",
        ),
        (
            ChannelInfo {
                token: Address::ZERO,
                ..base
            },
            "wrong_token",
        ),
        (
            ChannelInfo {
                closed: true,
                ..base
            },
            "channel_not_open",
        ),
        (
            ChannelInfo {
                withdraw_at: 1,
                ..base
            },
            "channel_not_open",
        ),
    ];
    for (info, code) in cases {
        let err = OpenChannel::open(domain, info, PAYEE, TOKEN).unwrap_err();
        assert_eq!(err.code(), code);
        assert!(!err.retriable());
        assert_eq!(err.close_code().map(|c| c.as_u16()), Some(4402));
    }
}
