//! Fixed keys and a signing cache shared by the targets that need valid signatures (random
//! bytes never are one).

use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::OnceLock;

use alloy::primitives::{Address, B256, Signature};
use k256::ecdsa::SigningKey;
use paystream::channel::{ChannelDomain, ChannelState, PayerKeys, signature};

/// How many fixed keys there are.
pub const KEYS: usize = 4;

/// Fixed key `i` (`i < KEYS`): secrets 1 + i·2^200, far from each other.
pub fn key(i: usize) -> &'static SigningKey {
    static KEYS_CELL: OnceLock<Vec<SigningKey>> = OnceLock::new();
    &KEYS_CELL.get_or_init(|| {
        (0..KEYS)
            .map(|i| {
                let mut secret = [0u8; 32];
                secret[31] = 1;
                secret[6] = i as u8 + 1;
                SigningKey::from_bytes(&secret.into()).expect("a valid secret")
            })
            .collect()
    })[i % KEYS]
}

/// The address of fixed key `i`.
pub fn address(i: usize) -> Address {
    signature::address_of(key(i).verifying_key())
}

/// One `PayerKeys` for every run of the target: its cache only saves recoveries (the
/// differential target checks cold and warm agree).
pub fn payer_keys() -> &'static PayerKeys {
    static CELL: OnceLock<PayerKeys> = OnceLock::new();
    CELL.get_or_init(|| PayerKeys::new(NonZeroUsize::new(64).expect("non-zero")))
}

thread_local! {
    static SIGNED: RefCell<HashMap<(usize, B256), Signature>> = RefCell::new(HashMap::new());
}

/// Signs `digest` with fixed key `i` (RFC 6979, so the same signature each time: cached, as
/// libFuzzer replays near-identical inputs).
pub fn sign_digest(i: usize, digest: &B256) -> Signature {
    SIGNED.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.len() > 100_000 {
            cache.clear();
        }
        *cache
            .entry((i % KEYS, *digest))
            .or_insert_with(|| signature::sign_digest(key(i), digest))
    })
}

/// Key `i`'s signature over `state` under `domain`.
pub fn sign_state(i: usize, domain: &ChannelDomain, state: &ChannelState) -> Signature {
    sign_digest(i, &domain.state_digest(state))
}

/// The channel-state struct.
pub fn state(channel: B256, nonce: u64, cumulative: u128) -> ChannelState {
    ChannelState {
        channelId: channel,
        nonce,
        cumulative,
    }
}
