//! The store contract (compare-and-set on the nonce and the cumulative, consumption only rises
//! and is kept exactly, a close consent is kept, claims keep the larger amount; leases with
//! fencing, session records and one-time resume tokens) and the settler's records: one shared
//! suite, run on a real redis-server, on a real three-master Redis Cluster, and on the memory
//! store; a stopped Redis reports `store_unavailable` and a restarted one is used again.

mod common;

use alloy::primitives::{B256, Signature, U256};
use std::time::Duration;

use common::redis::{Redis, RedisCluster};
use k256::ecdsa::SigningKey;
use paystream::chain::Fees;
use paystream::channel::signature;
use paystream::meter::Exact;
use paystream::store::memory::MemoryStore;
use paystream::store::redis::RedisStore;
use paystream::store::{
    ChannelStore, Fence, InFlight, LeaseStatus, PendingClaim, Resumed, SessionRecord, SessionWrite,
    SettlementStore, SkippedClaim, StoreError, StoredVoucher,
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
    store
        .save_voucher(id, voucher(5, 100), Fence::NONE)
        .await
        .unwrap();
    // Compare-and-set: equal and lower nonces are refused and change nothing.
    assert_eq!(
        store.save_voucher(id, voucher(5, 200), Fence::NONE).await,
        Err(StoreError::StaleNonce { got: 5, stored: 5 })
    );
    assert_eq!(
        store.save_voucher(id, voucher(4, 300), Fence::NONE).await,
        Err(StoreError::StaleNonce { got: 4, stored: 5 })
    );
    // ... and so is a higher nonce with a lower cumulative (a state signed out of order).
    assert_eq!(
        store.save_voucher(id, voucher(6, 99), Fence::NONE).await,
        Err(StoreError::CumulativeDecreased {
            got: 99,
            stored: 100
        })
    );
    let loaded = store.load(id).await.unwrap().unwrap();
    assert_eq!(loaded.voucher, voucher(5, 100));
    assert_eq!(loaded.closing, None);
    // Nonces compare as numbers, also across digit counts and above 2^53.
    store
        .save_voucher(id, voucher(10, 100), Fence::NONE)
        .await
        .unwrap();
    store
        .save_voucher(id, voucher(u64::MAX - 1, u128::MAX), Fence::NONE)
        .await
        .unwrap();
    assert!(
        store
            .save_voucher(id, voucher(9_007_199_254_740_993, 1), Fence::NONE)
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
    store
        .save_consumed(id, exact(40, 1), Fence::NONE)
        .await
        .unwrap();
    store
        .save_consumed(id, exact(30, 1), Fence::NONE)
        .await
        .unwrap();
    assert_eq!(consumed(store.load(id).await.unwrap()), exact(40, 1));
    store
        .save_consumed(id, exact(40_001, 1_000), Fence::NONE)
        .await
        .unwrap();
    store
        .save_consumed(id, exact(40_000, 1_000), Fence::NONE)
        .await
        .unwrap();
    assert_eq!(
        consumed(store.load(id).await.unwrap()),
        exact(40_001, 1_000)
    );
    store
        .save_consumed(id, exact(40_002, 1_000), Fence::NONE)
        .await
        .unwrap();
    assert_eq!(
        consumed(store.load(id).await.unwrap()),
        exact(40_002, 1_000)
    );
    let huge = Exact {
        numerator: U256::MAX >> 8,
        denominator: U256::from(1u128 << 120),
    };
    store.save_consumed(id, huge, Fence::NONE).await.unwrap();
    assert_eq!(consumed(store.load(id).await.unwrap()), huge);
    // The payee's consent to close is recorded once and kept.
    store.mark_closing(id, 77, Fence::NONE).await.unwrap();
    store.mark_closing(id, 88, Fence::NONE).await.unwrap();
    assert_eq!(store.load(id).await.unwrap().unwrap().closing, Some(77));
    // Claims keep the larger amount per channel.
    let claim = |amount| PendingClaim {
        channel_id: id,
        voucher: voucher(5, 100),
        amount,
    };
    store.queue_claim(claim(50), Fence::NONE).await.unwrap();
    store.queue_claim(claim(9), Fence::NONE).await.unwrap();
    let other = PendingClaim {
        channel_id: B256::repeat_byte(2),
        voucher: voucher(1, 7),
        amount: 7,
    };
    store.queue_claim(other, Fence::NONE).await.unwrap();
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
    store
        .queue_claim(pending(0xa, 100), Fence::NONE)
        .await
        .unwrap();
    store
        .queue_claim(pending(0xb, 200), Fence::NONE)
        .await
        .unwrap();
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

fn record(sid: &str, jti: &str, holder: &str) -> SessionRecord {
    SessionRecord {
        sid: sid.into(),
        jti: jti.into(),
        next_seq: 0,
        request: None,
        holder: holder.into(),
        parked: false,
    }
}

/// Leases, fencing, session records and resumes: one holder per channel, a higher fence for
/// each new holder, every money write under an old fence refused with nothing changed, a lease
/// that lapses going to the next taker, and a resume token spent exactly once.
async fn lease_contract<S: ChannelStore>(store: &S) {
    let id = B256::repeat_byte(0x51);
    let ttl = Duration::from_secs(30);
    let window = Duration::from_secs(300);
    let (f0, stored) = store.take_lease(id, "a", ttl).await.unwrap();
    assert!(f0 > Fence::NONE);
    assert_eq!(stored, None, "no voucher stored yet");
    assert_eq!(
        store.take_lease(id, "b", ttl).await,
        Err(StoreError::LeaseHeld)
    );
    // Taken again by its holder (a new session of the same process): a new fence, and the
    // old one's writes are refused.
    let (f1, _) = store.take_lease(id, "a", ttl).await.unwrap();
    assert!(f1 > f0);
    assert!(matches!(
        store.save_voucher(id, voucher(1, 10), f0).await,
        Err(StoreError::Fenced { .. })
    ));
    store.save_voucher(id, voucher(1, 10), f1).await.unwrap();
    store
        .put_session(
            id,
            &record("s1", "j1", "a"),
            SessionWrite::Fresh,
            f1,
            window,
        )
        .await
        .unwrap();
    assert_eq!(
        store.renew_lease(id, "a", f1, ttl, window).await.unwrap(),
        LeaseStatus::Held
    );

    // a lets go; b takes the channel with a higher fence. a's writes are refused from then on,
    // and change nothing.
    store.release_lease(id, "a", f1).await.unwrap();
    let (f2, stored) = store.take_lease(id, "b", ttl).await.unwrap();
    assert_eq!(
        stored.map(|s| s.voucher),
        Some(voucher(1, 10)),
        "the channel is read in the step that takes the lease"
    );
    assert!(f2 > f1);
    let fenced = Err(StoreError::Fenced {
        fence: f1,
        current: f2,
    });
    assert_eq!(store.save_voucher(id, voucher(2, 20), f1).await, fenced);
    let consumed = Exact {
        numerator: U256::from(9u8),
        denominator: U256::from(1u8),
    };
    assert_eq!(store.save_consumed(id, consumed, f1).await, fenced);
    assert_eq!(store.mark_closing(id, 9, f1).await, fenced);
    let claim = PendingClaim {
        channel_id: id,
        voucher: voucher(1, 10),
        amount: 9,
    };
    assert_eq!(store.queue_claim(claim, f1).await, fenced);
    assert_eq!(
        store
            .put_session(
                id,
                &record("s9", "j9", "a"),
                SessionWrite::Fresh,
                f1,
                window
            )
            .await,
        fenced
    );
    assert_eq!(
        store.renew_lease(id, "a", f1, ttl, window).await.unwrap(),
        LeaseStatus::Lost
    );
    let stored = store.load(id).await.unwrap().unwrap();
    assert_eq!(stored.voucher, voucher(1, 10));
    assert_eq!(stored.consumed, Exact::whole(0));
    assert_eq!(stored.closing, None);
    assert!(
        !store
            .pending_claims(100)
            .await
            .unwrap()
            .iter()
            .any(|c| c.channel_id == id)
    );
    // b's own writes go through.
    store.save_voucher(id, voucher(2, 20), f2).await.unwrap();
    store.save_consumed(id, consumed, f2).await.unwrap();
    store.release_lease(id, "b", f2).await.unwrap();

    // A resume spends the token, takes the lease (a higher fence) and reads the channel, at once.
    let Resumed::Taken {
        record: taken,
        fence: f3,
        stored,
    } = store
        .resume_session(id, "s1", "j1", "j2", "c", ttl, window)
        .await
        .unwrap()
    else {
        panic!("the session's current token resumes it");
    };
    assert!(f3 > f2);
    assert_eq!(
        (
            taken.sid.as_str(),
            taken.jti.as_str(),
            taken.holder.as_str()
        ),
        ("s1", "j2", "a"),
        "the next token id, and the holder that served it last"
    );
    let stored = (*stored).unwrap();
    assert_eq!(
        (stored.voucher, stored.consumed),
        (voucher(2, 20), consumed)
    );
    // A spent token, another session's id, and a resume while c holds the channel.
    assert_eq!(
        store
            .resume_session(id, "s1", "j1", "jx", "d", ttl, window)
            .await
            .unwrap(),
        Resumed::Used
    );
    assert_eq!(
        store
            .resume_session(id, "s2", "j2", "jx", "d", ttl, window)
            .await
            .unwrap(),
        Resumed::Unknown
    );
    assert_eq!(
        store
            .resume_session(id, "s1", "j2", "j3", "d", ttl, window)
            .await
            .unwrap(),
        Resumed::Busy
    );
    // ... which c learns at its next renewal: it lets go, and d's retry takes the channel.
    assert_eq!(
        store.renew_lease(id, "c", f3, ttl, window).await.unwrap(),
        LeaseStatus::Wanted
    );
    store
        .put_session(
            id,
            &SessionRecord {
                next_seq: 7,
                request: Some(5),
                ..record("s1", "", "c")
            },
            SessionWrite::Progress,
            f3,
            window,
        )
        .await
        .unwrap();
    store.release_lease(id, "c", f3).await.unwrap();
    let Resumed::Taken {
        record: taken,
        fence: f4,
        ..
    } = store
        .resume_session(id, "s1", "j2", "j3", "d", ttl, window)
        .await
        .unwrap()
    else {
        panic!("the channel was let go");
    };
    assert!(f4 > f3);
    assert_eq!(
        (taken.next_seq, taken.request, taken.holder.as_str()),
        (7, Some(5), "c"),
        "progress is kept"
    );
    assert_eq!(
        store.renew_lease(id, "d", f4, ttl, window).await.unwrap(),
        LeaseStatus::Held,
        "the resume's ask was answered"
    );
    store.release_lease(id, "d", f4).await.unwrap();

    // Two resumes with one token at once: exactly one takes the session.
    let (x, y) = tokio::join!(
        store.resume_session(id, "s1", "j3", "j4", "x", ttl, window),
        store.resume_session(id, "s1", "j3", "j5", "y", ttl, window),
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    let taken = [&x, &y]
        .iter()
        .filter(|r| matches!(r, Resumed::Taken { .. }))
        .count();
    assert_eq!(taken, 1, "{x:?} {y:?}");
    assert!(
        matches!(x, Resumed::Used | Resumed::Busy) || matches!(y, Resumed::Used | Resumed::Busy)
    );
    let (winner, fence) = match (&x, &y) {
        (Resumed::Taken { fence, .. }, _) => ("x", *fence),
        (_, Resumed::Taken { fence, .. }) => ("y", *fence),
        _ => unreachable!(),
    };

    // The session ends: its record goes, and no token of it resumes anything.
    store
        .put_session(
            id,
            &record("s1", "", winner),
            SessionWrite::End,
            fence,
            window,
        )
        .await
        .unwrap();
    store.release_lease(id, winner, fence).await.unwrap();
    for jti in ["j4", "j5"] {
        assert_eq!(
            store
                .resume_session(id, "s1", jti, "j6", "z", ttl, window)
                .await
                .unwrap(),
            Resumed::Unknown
        );
    }

    // A new session replaces the record: the old one's tokens die with it.
    let (g, _) = store.take_lease(id, "a", ttl).await.unwrap();
    store
        .put_session(id, &record("s2", "k1", "a"), SessionWrite::Fresh, g, window)
        .await
        .unwrap();
    store.release_lease(id, "a", g).await.unwrap();
    assert_eq!(
        store
            .resume_session(id, "s1", "j4", "j6", "z", ttl, window)
            .await
            .unwrap(),
        Resumed::Unknown
    );

    // A lease not renewed lapses: the next taker gets the channel with a higher fence. The
    // wait is the scenario (a holder that stopped renewing), not a synchronization.
    let lapsing = B256::repeat_byte(0x52);
    let short = Duration::from_millis(150);
    let (h1, _) = store.take_lease(lapsing, "a", short).await.unwrap();
    assert_eq!(
        store.take_lease(lapsing, "b", ttl).await,
        Err(StoreError::LeaseHeld)
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Lapsed but not taken: the holder renews it as before.
    assert_eq!(
        store
            .renew_lease(lapsing, "a", h1, short, window)
            .await
            .unwrap(),
        LeaseStatus::Held
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (h2, _) = store.take_lease(lapsing, "b", ttl).await.unwrap();
    assert!(h2 > h1);
    assert_eq!(
        store
            .renew_lease(lapsing, "a", h1, short, window)
            .await
            .unwrap(),
        LeaseStatus::Lost
    );
}

#[tokio::test]
async fn redis_store_keeps_the_contract() {
    let redis = Redis::start();
    let store = RedisStore::connect(&redis.url, "ps:").await.unwrap();
    contract(&store).await;
    lease_contract(&store).await;
    settlement_contract(&RedisStore::connect(&redis.url, "settle:").await.unwrap()).await;
    // A second prefix is a separate namespace.
    let other = RedisStore::connect(&redis.url, "other:").await.unwrap();
    assert_eq!(other.load(B256::repeat_byte(1)).await.unwrap(), None);
}

#[tokio::test]
async fn redis_cluster_store_keeps_the_contract() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect_cluster(&cluster.urls(), "ps:")
        .await
        .unwrap();
    contract(&store).await;
    lease_contract(&store).await;
    settlement_contract(
        &RedisStore::connect_cluster(&cluster.urls(), "settle:")
            .await
            .unwrap(),
    )
    .await;
    // The channels' keys spread over the three masters (their hash tags differ), and each
    // channel's keys share one slot: the scripts ran above without a CROSSSLOT error.
    let mut masters = std::collections::BTreeSet::new();
    for url in cluster.urls() {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let keys: i64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
        if keys > 0 {
            masters.insert(url);
        }
    }
    assert!(masters.len() >= 2, "keys on {masters:?}");
}

#[tokio::test]
async fn memory_store_keeps_the_contract() {
    contract(&MemoryStore::new()).await;
    lease_contract(&MemoryStore::new()).await;
    settlement_contract(&MemoryStore::new()).await;
}

#[tokio::test]
async fn a_redis_outage_is_reported_and_survived() {
    let mut redis = Redis::start();
    let port = redis.port;
    let store = RedisStore::connect(&redis.url, "ps:").await.unwrap();
    let id = B256::repeat_byte(3);
    store
        .save_voucher(id, voucher(1, 10), Fence::NONE)
        .await
        .unwrap();
    redis.stop();
    let err = store
        .save_voucher(id, voucher(2, 20), Fence::NONE)
        .await
        .unwrap_err();
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
    store
        .save_voucher(id, voucher(2, 20), Fence::NONE)
        .await
        .unwrap();
}

/// 10,000 sessions opening at once, each with the store calls of an `open` (read, lease,
/// voucher, record): every one succeeds. The calls queue for their turn on the connection
/// (at most 512 in flight) instead of timing out: a busy store is back-pressure, not failed
/// opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_opens_at_once_all_land() {
    let redis = Redis::start();
    let store = RedisStore::connect(&redis.url, "ps:").await.unwrap();
    let ttl = Duration::from_secs(60);
    let window = Duration::from_secs(300);
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10_000u64 {
        let store = store.clone();
        tasks.spawn(async move {
            let id = B256::from(U256::from(i + 1));
            let _ = store.load(id).await?;
            let (fence, _) = store.take_lease(id, "p", ttl).await?;
            store.save_voucher(id, voucher(1, 100), fence).await?;
            store
                .put_session(
                    id,
                    &record(&format!("s{i}"), "j", "p"),
                    SessionWrite::Fresh,
                    fence,
                    window,
                )
                .await
        });
    }
    let mut failed = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.unwrap() {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    eprintln!(
        "10,000 opens' store calls in {:.2} s",
        started.elapsed().as_secs_f64()
    );
}
