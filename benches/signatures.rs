//! Channel-state verifications per second: the engine's check against a payer's cached key,
//! recovery to an address, and libsecp256k1 (the `secp256k1` crate) as the reference, all in
//! one run. `scripts/bench` prints them as a table of ratios to libsecp256k1.
//!
//! Every function hashes the EIP-712 digest of the state and checks its signature, cycling
//! through distinct vouchers by distinct payers so no result is reused.

use alloy::primitives::{Address, B256, Signature};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use k256::ecdsa::SigningKey;
use paystream::channel::{ChannelDomain, ChannelState, PayerKeys, signature};
use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
use secp256k1::{Message, PublicKey, SECP256K1};
use std::hint::black_box;
use std::num::NonZeroUsize;

const VOUCHERS: usize = 64;

struct Voucher {
    payer: Address,
    state: ChannelState,
    signature: Signature,
    secp_key: PublicKey,
    secp_sig: secp256k1::ecdsa::Signature,
    secp_recoverable: RecoverableSignature,
}

fn domain() -> ChannelDomain {
    ChannelDomain::new(8453, Address::repeat_byte(0xcc))
}

fn vouchers() -> Vec<Voucher> {
    let domain = domain();
    (0..VOUCHERS)
        .map(|i| {
            let mut secret = [0x5au8; 32];
            secret[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            let key = SigningKey::from_slice(&secret).unwrap();
            let state = ChannelState {
                channelId: B256::repeat_byte(i as u8),
                nonce: 1 + i as u64,
                cumulative: 1_000_000 * (i as u128 + 1),
            };
            let digest = domain.state_digest(&state);
            let sig = signature::sign_digest(&key, &digest);
            let compact: [u8; 64] = signature::to_bytes(&sig)[..64].try_into().unwrap();
            let secp_key =
                PublicKey::from_slice(key.verifying_key().to_encoded_point(false).as_bytes())
                    .unwrap();
            Voucher {
                payer: signature::address_of(key.verifying_key()),
                state,
                signature: sig,
                secp_key,
                secp_sig: secp256k1::ecdsa::Signature::from_compact(&compact).unwrap(),
                secp_recoverable: RecoverableSignature::from_compact(
                    &compact,
                    RecoveryId::try_from(sig.v() as i32).unwrap(),
                )
                .unwrap(),
            }
        })
        .collect()
}

/// The engine's path: digest, then the check against the payer's cached key.
fn check_cached(keys: &PayerKeys, domain: &ChannelDomain, v: &Voucher) -> bool {
    let digest = domain.state_digest(&v.state);
    keys.verify(v.payer, &digest, &v.signature).is_ok()
}

fn check_recover(domain: &ChannelDomain, v: &Voucher) -> bool {
    let digest = domain.state_digest(&v.state);
    signature::recover_address(&digest, &v.signature) == Ok(v.payer)
}

fn check_secp_verify(domain: &ChannelDomain, v: &Voucher) -> bool {
    let digest = domain.state_digest(&v.state);
    SECP256K1
        .verify_ecdsa(Message::from_digest(digest.0), &v.secp_sig, &v.secp_key)
        .is_ok()
}

fn check_secp_recover(domain: &ChannelDomain, v: &Voucher) -> bool {
    let digest = domain.state_digest(&v.state);
    let key = SECP256K1
        .recover_ecdsa(Message::from_digest(digest.0), &v.secp_recoverable)
        .unwrap();
    let address = Address::from_raw_public_key(&key.serialize_uncompressed()[1..]);
    address == v.payer
}

fn warm_cache(vouchers: &[Voucher]) -> PayerKeys {
    let keys = PayerKeys::new(NonZeroUsize::new(VOUCHERS * 2).unwrap());
    let domain = domain();
    for v in vouchers {
        assert!(check_cached(&keys, &domain, v));
    }
    keys
}

fn one_core(c: &mut Criterion) {
    let vouchers = vouchers();
    let domain = domain();
    let keys = warm_cache(&vouchers);
    for v in &vouchers {
        assert!(check_recover(&domain, v) && check_secp_verify(&domain, v));
        assert!(check_secp_recover(&domain, v));
    }

    let mut group = c.benchmark_group("channel_state_verify");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("k256_cached_key", |b| {
        b.iter(|| {
            i = (i + 1) % VOUCHERS;
            black_box(check_cached(&keys, &domain, black_box(&vouchers[i])))
        })
    });
    group.bench_function("k256_recover_address", |b| {
        b.iter(|| {
            i = (i + 1) % VOUCHERS;
            black_box(check_recover(&domain, black_box(&vouchers[i])))
        })
    });
    group.bench_function("libsecp256k1_verify", |b| {
        b.iter(|| {
            i = (i + 1) % VOUCHERS;
            black_box(check_secp_verify(&domain, black_box(&vouchers[i])))
        })
    });
    group.bench_function("libsecp256k1_recover_address", |b| {
        b.iter(|| {
            i = (i + 1) % VOUCHERS;
            black_box(check_secp_recover(&domain, black_box(&vouchers[i])))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("eip712_digest");
    group.throughput(Throughput::Elements(1));
    group.bench_function("channel_state", |b| {
        b.iter(|| {
            i = (i + 1) % VOUCHERS;
            black_box(domain.state_digest(black_box(&vouchers[i].state)))
        })
    });
    group.finish();
}

/// The engine's check on every core: the threads share one key cache (as the server's
/// verification threads do; its shard locks are never held across the curve arithmetic), and
/// one iteration checks every voucher once per thread.
fn all_cores(c: &mut Criterion) {
    let vouchers = vouchers();
    let domain = domain();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group("channel_state_verify_all_cores");
    group.throughput(Throughput::Elements((VOUCHERS * threads) as u64));
    group.sample_size(20);
    let keys = warm_cache(&vouchers);
    group.bench_function(BenchmarkId::new("k256_cached_key", threads), |b| {
        b.iter(|| {
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    let (keys, vouchers) = (&keys, &vouchers);
                    scope.spawn(move || vouchers.iter().all(|v| check_cached(keys, &domain, v)));
                }
            })
        })
    });
    // How the server held the cache before issue 9: one mutex around the cache and the
    // check, so checks on every core ran one at a time.
    let locked = std::sync::Mutex::new(warm_cache(&vouchers));
    group.bench_function(BenchmarkId::new("k256_behind_one_mutex", threads), |b| {
        b.iter(|| {
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    let (locked, vouchers) = (&locked, &vouchers);
                    scope.spawn(move || {
                        vouchers
                            .iter()
                            .all(|v| check_cached(&locked.lock().unwrap(), &domain, v))
                    });
                }
            })
        })
    });
    group.bench_function(BenchmarkId::new("libsecp256k1_verify", threads), |b| {
        b.iter(|| {
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    let vouchers = &vouchers;
                    scope.spawn(move || vouchers.iter().all(|v| check_secp_verify(&domain, v)));
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, one_core, all_cores);
criterion_main!(benches);
