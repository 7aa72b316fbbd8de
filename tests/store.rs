//! The store contract (compare-and-set on the nonce and the cumulative, consumption only rises
//! and is kept exactly, a close consent is kept, claims keep the larger amount) on a real redis-server, and the same on the memory store; a stopped Redis
//! reports `store_unavailable` and a restarted one is used again.

mod common;

use alloy::primitives::{B256, Signature, U256};
use common::redis::Redis;
use k256::ecdsa::SigningKey;
use paystream::channel::signature;
use paystream::meter::Exact;
use paystream::store::memory::MemoryStore;
use paystream::store::redis::RedisStore;
use paystream::store::{ChannelStore, PendingClaim, StoreError, StoredVoucher};

fn sig(n: u8) -> Signature {
    let key = SigningKey::from_slice(&[7u8; 32]).unwrap();
    signature::sign_digest(&key, &B256::repeat_byte(n))
}

fn voucher(nonce: u64, cumulative: u128) -> StoredVoucher {
    StoredVoucher {
        nonce,
        cumulative,
        signature: sig(nonce as u8),
    }
}

async fn contract<S: ChannelStore>(store: &S) {
    let id = B256::repeat_byte(1);
    assert_eq!(store.load(id).await.unwrap(), None);
    store.save_voucher(id, voucher(5, 100)).await.unwrap();
    // Compare-and-set: equal and lower nonces are refused and change nothing.
    assert_eq!(
        store.save_voucher(id, voucher(5, 200)).await,
        Err(StoreError::StaleNonce { got: 5, stored: 5 })
    );
    assert_eq!(
        store.save_voucher(id, voucher(4, 300)).await,
        Err(StoreError::StaleNonce { got: 4, stored: 5 })
    );
    // ... and so is a higher nonce with a lower cumulative (a state signed out of order).
    assert_eq!(
        store.save_voucher(id, voucher(6, 99)).await,
        Err(StoreError::CumulativeDecreased {
            got: 99,
            stored: 100
        })
    );
    let loaded = store.load(id).await.unwrap().unwrap();
    assert_eq!(loaded.voucher, voucher(5, 100));
    assert_eq!(loaded.closing, None);
    // Nonces compare as numbers, also across digit counts and above 2^53.
    store.save_voucher(id, voucher(10, 100)).await.unwrap();
    store
        .save_voucher(id, voucher(u64::MAX - 1, u128::MAX))
        .await
        .unwrap();
    assert!(
        store
            .save_voucher(id, voucher(9_007_199_254_740_993, 1))
            .await
            .is_err()
    );
    assert_eq!(
        store.load(id).await.unwrap().unwrap().voucher,
        voucher(u64::MAX - 1, u128::MAX)
    );
    // Consumption only rises, kept exactly: by its rounded-up value, then by its exact value
    // under one denominator.
    let exact = |n: u128, d: u128| Exact {
        numerator: U256::from(n),
        denominator: U256::from(d),
    };
    let consumed = |loaded: Option<paystream::store::StoredChannel>| loaded.unwrap().consumed;
    store.save_consumed(id, exact(40, 1)).await.unwrap();
    store.save_consumed(id, exact(30, 1)).await.unwrap();
    assert_eq!(consumed(store.load(id).await.unwrap()), exact(40, 1));
    store.save_consumed(id, exact(40_001, 1_000)).await.unwrap();
    store.save_consumed(id, exact(40_000, 1_000)).await.unwrap();
    assert_eq!(
        consumed(store.load(id).await.unwrap()),
        exact(40_001, 1_000)
    );
    store.save_consumed(id, exact(40_002, 1_000)).await.unwrap();
    assert_eq!(
        consumed(store.load(id).await.unwrap()),
        exact(40_002, 1_000)
    );
    let huge = Exact {
        numerator: U256::MAX >> 8,
        denominator: U256::from(1u128 << 120),
    };
    store.save_consumed(id, huge).await.unwrap();
    assert_eq!(consumed(store.load(id).await.unwrap()), huge);
    // The payee's consent to close is recorded once and kept.
    store.mark_closing(id, 77).await.unwrap();
    store.mark_closing(id, 88).await.unwrap();
    assert_eq!(store.load(id).await.unwrap().unwrap().closing, Some(77));
    // Claims keep the larger amount per channel.
    let claim = |amount| PendingClaim {
        channel_id: id,
        voucher: voucher(5, 100),
        amount,
    };
    store.queue_claim(claim(50)).await.unwrap();
    store.queue_claim(claim(9)).await.unwrap();
    let other = PendingClaim {
        channel_id: B256::repeat_byte(2),
        voucher: voucher(1, 7),
        amount: 7,
    };
    store.queue_claim(other).await.unwrap();
    let mut pending = store.pending_claims(10).await.unwrap();
    pending.sort_by_key(|c| c.channel_id);
    assert_eq!(pending, vec![claim(50), other]);
    assert_eq!(store.pending_claims(1).await.unwrap().len(), 1);
    store.ping().await.unwrap();
}

#[tokio::test]
async fn redis_store_keeps_the_contract() {
    let redis = Redis::start();
    let store = RedisStore::connect(&redis.url, "ps:").await.unwrap();
    contract(&store).await;
    // A second prefix is a separate namespace.
    let other = RedisStore::connect(&redis.url, "other:").await.unwrap();
    assert_eq!(other.load(B256::repeat_byte(1)).await.unwrap(), None);
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    contract(&MemoryStore::new()).await;
}

#[tokio::test]
async fn a_redis_outage_is_reported_and_survived() {
    let mut redis = Redis::start();
    let port = redis.port;
    let store = RedisStore::connect(&redis.url, "ps:").await.unwrap();
    let id = B256::repeat_byte(3);
    store.save_voucher(id, voucher(1, 10)).await.unwrap();
    redis.stop();
    let err = store.save_voucher(id, voucher(2, 20)).await.unwrap_err();
    assert_eq!(err.code(), "store_unavailable");
    assert!(store.ping().await.is_err());
    // Back on the same port (empty: no persistence in tests); the store reconnects by itself.
    let _back = Redis::try_start(port).expect("redis restarts on its port");
    let mut ok = false;
    for _ in 0..50 {
        if store.ping().await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "the store reconnects once Redis is back");
    store.save_voucher(id, voucher(2, 20)).await.unwrap();
}
