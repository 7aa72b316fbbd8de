//! The store contract (compare-and-set on the nonce and the cumulative, consumption only rises
//! and is kept exactly, a close consent is kept, claims keep the larger amount) and the
//! settler's records on a real redis-server, and the same on the memory store; a stopped Redis
//! reports `store_unavailable` and a restarted one is used again.

mod common;

use alloy::primitives::{B256, Signature, U256};
use common::redis::Redis;
use k256::ecdsa::SigningKey;
use paystream::chain::Fees;
use paystream::channel::signature;
use paystream::meter::Exact;
use paystream::store::memory::MemoryStore;
use paystream::store::redis::RedisStore;
use paystream::store::{
    ChannelStore, InFlight, PendingClaim, SettlementStore, SkippedClaim, StoreError, StoredVoucher,
};

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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn pending(channel: u8, amount: u128) -> PendingClaim {
    PendingClaim {
        channel_id: B256::repeat_byte(channel),
        voucher: voucher(amount as u64, amount),
        amount,
    }
}

/// The settler's records: the queue (settled claims leave it only up to what was paid, a larger
/// one stays with its age counted from the payment; claims looked up by channel), skips, the
/// transactions in flight, the watcher's cursor, withdrawals and handed-over closes.
async fn settlement_contract<S: ChannelStore + SettlementStore>(store: &S) {
    let (a, b, c) = (
        B256::repeat_byte(0xa),
        B256::repeat_byte(0xb),
        B256::repeat_byte(0xc),
    );
    let before = unix_now();
    store.queue_claim(pending(0xa, 100)).await.unwrap();
    store.queue_claim(pending(0xb, 200)).await.unwrap();
    let mut queued = store.queued_claims(10).await.unwrap();
    queued.sort_by_key(|q| q.claim.channel_id);
    assert_eq!(queued.len(), 2);
    assert_eq!(queued[0].claim, pending(0xa, 100));
    assert!(queued[0].since >= before && queued[0].since <= unix_now());
    // Looked up by channel: those without a claim are left out.
    let found = store.queued_claims_of(&[c, b]).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].claim, pending(0xb, 200));
    assert!(store.queued_claims_of(&[]).await.unwrap().is_empty());
    // Paid up to 100 on a, 150 on b (a claim for 200 was queued meanwhile): b stays.
    store.claims_settled(&[(a, 100), (b, 150)]).await.unwrap();
    let queued = store.queued_claims(10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].claim, pending(0xb, 200));
    assert!(queued[0].since >= before);
    // Skipped: recorded, and off the queue (at most the amount skipped).
    store
        .claim_skipped(SkippedClaim {
            channel_id: b,
            amount: 200,
            reason: "bad_signature".into(),
            at: 7,
        })
        .await
        .unwrap();
    assert!(store.queued_claims(10).await.unwrap().is_empty());
    assert_eq!(
        store.skipped_claims().await.unwrap(),
        vec![SkippedClaim {
            channel_id: b,
            amount: 200,
            reason: "bad_signature".into(),
            at: 7,
        }]
    );
    // In flight, by nonce.
    let tx = InFlight {
        nonce: 3,
        hashes: vec![B256::repeat_byte(9)],
        claims: vec![pending(0xc, 5)],
        fees: Fees {
            max_fee_per_gas: 20,
            max_priority_fee_per_gas: 2,
        },
        gas_limit: 100_000,
        first_sent: 1,
        last_sent: 2,
    };
    store.save_in_flight(&tx).await.unwrap();
    assert_eq!(store.in_flight().await.unwrap(), vec![tx.clone()]);
    store.remove_in_flight(3).await.unwrap();
    assert!(store.in_flight().await.unwrap().is_empty());
    // The cursor, withdrawals and closes.
    assert_eq!(store.watch_cursor().await.unwrap(), None);
    store.set_watch_cursor(42).await.unwrap();
    assert_eq!(store.watch_cursor().await.unwrap(), Some(42));
    store.add_withdrawal(c, 1_000).await.unwrap();
    assert_eq!(store.withdrawals().await.unwrap(), vec![(c, 1_000)]);
    store.remove_withdrawal(c).await.unwrap();
    assert!(store.withdrawals().await.unwrap().is_empty());
    store.queue_close(pending(0xc, 5)).await.unwrap();
    assert_eq!(store.closes().await.unwrap(), vec![pending(0xc, 5)]);
    store.remove_close(c).await.unwrap();
    assert!(store.closes().await.unwrap().is_empty());
}

#[tokio::test]
async fn redis_store_keeps_the_contract() {
    let redis = Redis::start();
    let store = RedisStore::connect(&redis.url, "ps:").await.unwrap();
    contract(&store).await;
    settlement_contract(&RedisStore::connect(&redis.url, "settle:").await.unwrap()).await;
    // A second prefix is a separate namespace.
    let other = RedisStore::connect(&redis.url, "other:").await.unwrap();
    assert_eq!(other.load(B256::repeat_byte(1)).await.unwrap(), None);
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    contract(&MemoryStore::new()).await;
    settlement_contract(&MemoryStore::new()).await;
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
