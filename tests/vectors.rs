//! Every field of every case in the shared EIP-712 vectors (made with viem, checked against
//! ethers) is reproduced here: channel id, domain separator, struct hash, digest, the payer's
//! 65-byte signature byte for byte, its compact form, the payee's `Close` signature; the high-s
//! twins and each tampered field are rejected.

mod common;

use alloy::primitives::{Address, B256};
use common::vectors::{Case, load};
use k256::ecdsa::SigningKey;
use paystream::channel::{
    CHANNEL_STATE_TYPEHASH, CLOSE_TYPEHASH, ChannelDomain, ChannelError, ChannelInfo, ChannelState,
    Close, OpenChannel, PayerKeys, SignatureError, SignedState, close_struct_hash, signature,
    state_digest_via_alloy, state_struct_hash,
};

fn state_of(case: &Case) -> ChannelState {
    ChannelState {
        channelId: case.channel_id,
        nonce: case.nonce,
        cumulative: case.cumulative,
    }
}

fn open_channel(case: &Case) -> OpenChannel {
    let info = ChannelInfo {
        id: case.channel_id,
        payer: case.payer,
        payee: case.payee,
        token: case.token,
        deposit: u128::MAX,
        claimed: 0,
        claimed_nonce: 0,
        withdraw_delay: 3600,
        withdraw_at: 0,
        closed: false,
    };
    OpenChannel::open(case.domain(), info, case.payee, case.token).unwrap()
}

#[test]
fn the_vectors_file_has_cases_and_type_hashes() {
    let file = load();
    assert_eq!(file.cases.len(), 8);
    assert_eq!(file.type_hashes.channel_state, CHANNEL_STATE_TYPEHASH);
    assert_eq!(file.type_hashes.close, CLOSE_TYPEHASH);
}

#[test]
fn the_committed_copy_matches_shared_when_present() {
    // Where `cargo test` runs this from, not the path compiled in (a shared target directory
    // reuses the binary across checkouts).
    let root = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        std::path::PathBuf::from,
    );
    let shared = root.join("../shared/vectors/channel_state.json");
    if let Ok(text) = std::fs::read_to_string(shared) {
        assert_eq!(
            text,
            common::vectors::TEXT,
            "tests/vectors is out of date with shared/"
        );
    }
}

#[test]
fn channel_id_domain_struct_hash_and_digest() {
    for case in load().cases {
        assert_eq!(
            case.key().channel_id(),
            case.channel_id,
            "channel id of {}",
            case.payer
        );
        let domain = case.domain();
        assert_eq!(domain.separator(), case.domain_separator);
        let state = state_of(&case);
        assert_eq!(state_struct_hash(&state), case.struct_hash);
        assert_eq!(domain.state_digest(&state), case.digest);
        let eip712 = ChannelDomain::eip712(case.chain_id, case.verifying_contract);
        assert_eq!(state_digest_via_alloy(&eip712, &state), case.digest);
        let close = Close {
            channelId: case.channel_id,
            amount: case.close_amount,
        };
        assert_ne!(close_struct_hash(&close), case.struct_hash);
        assert_eq!(domain.close_digest(&close), case.close_digest);
    }
}

#[test]
fn signatures_are_reproduced_byte_for_byte() {
    for case in load().cases {
        let payer_key = SigningKey::from_slice(case.private_key.as_slice()).unwrap();
        assert_eq!(signature::address_of(payer_key.verifying_key()), case.payer);
        let sig = signature::sign_digest(&payer_key, &case.digest);
        assert_eq!(signature::to_bytes(&sig).as_slice(), &case.signature[..]);
        let (r, vs) = signature::to_compact(&sig);
        assert_eq!((r, vs), (case.compact.r, case.compact.vs));
        // The compact form parses back to the same signature.
        let compact = [r.as_slice(), vs.as_slice()].concat();
        assert_eq!(signature::parse_signature(&compact).unwrap(), sig);

        let payee_key = SigningKey::from_slice(case.payee_private_key.as_slice()).unwrap();
        let close_sig = signature::sign_digest(&payee_key, &case.close_digest);
        assert_eq!(
            signature::to_bytes(&close_sig).as_slice(),
            &case.close_signature[..]
        );
        assert_eq!(
            signature::recover_address(&case.close_digest, &close_sig).unwrap(),
            case.payee
        );
    }
}

#[test]
fn vector_signatures_verify_against_the_payer() {
    let keys = PayerKeys::default();
    for case in load().cases {
        let sig = signature::parse_signature(&case.signature).unwrap();
        assert_eq!(
            signature::recover_address(&case.digest, &sig).unwrap(),
            case.payer
        );
        // First call recovers and caches, second uses the cached key.
        keys.verify(case.payer, &case.digest, &sig).unwrap();
        assert!(keys.contains(&case.payer));
        keys.verify(case.payer, &case.digest, &sig).unwrap();
        // The engine's rules accept it on a fresh channel.
        let mut channel = open_channel(&case);
        let voucher = SignedState {
            state: state_of(&case),
            signature: sig,
        };
        let accepted = *channel.accept(&voucher, &keys).unwrap();
        assert_eq!(
            (accepted.nonce, accepted.cumulative),
            (case.nonce, case.cumulative)
        );
    }
}

#[test]
fn high_s_twins_are_rejected() {
    for case in load().cases {
        assert_eq!(
            signature::parse_signature(&case.high_s_signature),
            Err(SignatureError::HighS),
            "high-s twin of {}",
            case.payer
        );
        // Even if a caller skips parsing, the check paths refuse it.
        let twin = alloy::primitives::Signature::from_bytes_and_parity(
            &case.high_s_signature[..64],
            case.high_s_signature[64] == 28,
        );
        assert_eq!(
            twin.normalized_s(),
            signature::parse_signature(&case.signature).unwrap()
        );
        assert_eq!(
            signature::recover_address(&case.digest, &twin),
            Err(SignatureError::HighS)
        );
        let key = SigningKey::from_slice(case.private_key.as_slice()).unwrap();
        assert!(!signature::verify_with_key(
            key.verifying_key().as_affine(),
            &case.digest,
            &twin
        ));
        let keys = PayerKeys::default();
        let sig = signature::parse_signature(&case.signature).unwrap();
        keys.verify(case.payer, &case.digest, &sig).unwrap();
        assert_eq!(
            keys.verify(case.payer, &case.digest, &twin),
            Err(SignatureError::HighS)
        );
    }
}

/// Each field the signature covers, changed by one bit, makes it fail: with a cold cache
/// (recovery) and a warm one (the cached key), and through the channel rules.
#[test]
fn tampered_fields_are_rejected() {
    for case in load().cases {
        let sig = signature::parse_signature(&case.signature).unwrap();
        let flip = |b: B256| {
            let mut b = b;
            b.0[31] ^= 1;
            b
        };
        let state = state_of(&case);
        let tampered_states = [
            (
                "channel id",
                case.domain(),
                ChannelState {
                    channelId: flip(case.channel_id),
                    ..state.clone()
                },
            ),
            (
                "nonce",
                case.domain(),
                ChannelState {
                    nonce: case.nonce ^ 1,
                    ..state.clone()
                },
            ),
            (
                "cumulative",
                case.domain(),
                ChannelState {
                    cumulative: case.cumulative ^ 1,
                    ..state.clone()
                },
            ),
            (
                "chain id",
                ChannelDomain::new(case.chain_id ^ 1, case.verifying_contract),
                state.clone(),
            ),
            (
                "contract",
                ChannelDomain::new(
                    case.chain_id,
                    Address::from_slice(
                        flip(case.verifying_contract.into_word()).as_slice()[12..].as_ref(),
                    ),
                ),
                state.clone(),
            ),
        ];
        let warm = PayerKeys::default();
        warm.verify(case.payer, &case.digest, &sig).unwrap();
        for (field, domain, tampered) in tampered_states {
            let digest = domain.state_digest(&tampered);
            assert_ne!(digest, case.digest, "{field}");
            let wrong = Err(SignatureError::WrongSigner {
                expected: case.payer,
            });
            let cold = PayerKeys::default().verify(case.payer, &digest, &sig);
            assert!(
                matches!(
                    cold,
                    Err(SignatureError::WrongSigner { .. } | SignatureError::Unrecoverable)
                ),
                "{field}: cold {cold:?}"
            );
            assert_eq!(
                warm.verify(case.payer, &digest, &sig),
                wrong,
                "{field}: warm"
            );
        }
        // Through the rules: a tampered cumulative on the right channel is an invalid signature,
        // and the channel keeps its state.
        if case.cumulative > 0 {
            let mut channel = open_channel(&case);
            let before = channel.clone();
            let voucher = SignedState {
                state: ChannelState {
                    cumulative: case.cumulative - 1,
                    ..state.clone()
                },
                signature: sig,
            };
            let err = channel.accept(&voucher, &warm).unwrap_err();
            assert!(matches!(err, ChannelError::InvalidSignature(_)), "{err:?}");
            assert_eq!(err.code(), "invalid_signature");
            assert_eq!(channel, before);
        }
    }
}
