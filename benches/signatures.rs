//! Channel-state verifications per second on every path of the engine, beside libsecp256k1
//! (the `secp256k1` crate) measured in the same run. `scripts/bench signatures` prints them as
//! tables of ratios to libsecp256k1's single verify on one core.
//!
//! Every function hashes the EIP-712 digest of each state and checks its signature, cycling
//! through distinct vouchers by distinct payers so no result is reused: 64 payers (their tables
//! stay in the core's cache) and 10,000 payers (50 MB of tables: most lookups miss the cache).
//!
//! - `k256_constant_time`: the check before issue 12 (k256's constant-time `lincomb`);
//! - `single_cold_key`: the payer's key cached, no table (variable-time, GLV, chain of 129);
//! - `single_warm_key`: the payer's table (chain of 33);
//! - `batch_N`: `PayerKeys::verify_batch` on N vouchers of N payers with tables;
//! - `*_all_cores`: the same on every core, one thread each, sharing one key cache, beside one
//!   thread, in wall-clock time.
//!
//! The one-core groups are measured in the thread's CPU time (see [`ThreadTime`]): the
//! development machine is shared, and wall-clock time there counts other processes' slices.

use alloy::primitives::{Address, B256, Signature};
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use k256::ecdsa::SigningKey;
use paystream::channel::ecmult::{Key, KeyTable};
use paystream::channel::signature::{self, SignatureCheck};
use paystream::channel::{ChannelDomain, ChannelState, PayerKeys};
use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
use secp256k1::{Message, PublicKey, SECP256K1};
use std::hint::black_box;
use std::num::NonZeroUsize;

/// Payers whose tables fit in a core's cache.
const FEW: usize = 64;
/// A working set of payers far beyond the caches.
const MANY: usize = 10_000;

struct Voucher {
    payer: Address,
    key: k256::AffinePoint,
    state: ChannelState,
    signature: Signature,
    secp_key: PublicKey,
    secp_sig: secp256k1::ecdsa::Signature,
    secp_recoverable: RecoverableSignature,
}

fn domain() -> ChannelDomain {
    ChannelDomain::new(8453, Address::repeat_byte(0xcc))
}

/// `count` vouchers by `payers` payers, voucher `k` by payer `k % payers`: consecutive vouchers
/// are by distinct payers.
fn vouchers(count: usize, payers: usize) -> Vec<Voucher> {
    let domain = domain();
    (0..count)
        .map(|k| {
            let i = k % payers;
            let mut secret = [0x5au8; 32];
            secret[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            let key = SigningKey::from_slice(&secret).unwrap();
            let state = ChannelState {
                channelId: B256::from(alloy::primitives::U256::from(i)),
                nonce: 1 + k as u64,
                cumulative: 1_000_000 * (k as u128 + 1),
            };
            let digest = domain.state_digest(&state);
            let sig = signature::sign_digest(&key, &digest);
            let compact: [u8; 64] = signature::to_bytes(&sig)[..64].try_into().unwrap();
            let secp_key =
                PublicKey::from_slice(key.verifying_key().to_encoded_point(false).as_bytes())
                    .unwrap();
            Voucher {
                payer: signature::address_of(key.verifying_key()),
                key: *key.verifying_key().as_affine(),
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

/// The engine's path: digest, then the check against the payer's cached key (and table).
fn check_cached(keys: &PayerKeys, domain: &ChannelDomain, v: &Voucher) -> bool {
    let digest = domain.state_digest(&v.state);
    keys.verify(v.payer, &digest, &v.signature).is_ok()
}

/// The engine's batch path on `batch`: digests, then one `verify_batch`.
fn check_batch(keys: &PayerKeys, domain: &ChannelDomain, batch: &[Voucher]) -> bool {
    let digests: Vec<B256> = batch
        .iter()
        .map(|v| domain.state_digest(&v.state))
        .collect();
    let checks: Vec<SignatureCheck<'_>> = batch
        .iter()
        .zip(&digests)
        .map(|(v, digest)| SignatureCheck {
            payer: v.payer,
            digest: *digest,
            signature: &v.signature,
        })
        .collect();
    let outcome = keys.verify_batch(&checks);
    outcome.results.iter().all(Result::is_ok) && !outcome.fell_back
}

fn check_constant_time(domain: &ChannelDomain, v: &Voucher) -> bool {
    let digest = domain.state_digest(&v.state);
    signature::verify_with_key_constant_time(&v.key, &digest, &v.signature)
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

/// A key cache holding every payer's key and, with `tables`, its table.
fn warm_cache(vouchers: &[Voucher], payers: usize, tables: bool) -> PayerKeys {
    let capacity = NonZeroUsize::new(payers * 4).unwrap();
    let keys = if tables {
        PayerKeys::with_table_bytes(capacity, 4 * payers * KeyTable::size_bytes())
    } else {
        PayerKeys::with_table_bytes(capacity, 0)
    };
    let domain = domain();
    // Twice: the first check recovers the key, the second builds the table.
    for _ in 0..2 {
        for v in vouchers {
            assert!(check_cached(&keys, &domain, v));
        }
    }
    assert_eq!(keys.tables() == payers, tables);
    keys
}

struct Set {
    name: &'static str,
    vouchers: Vec<Voucher>,
    cold: PayerKeys,
    warm: PayerKeys,
}

/// The voucher sets and their caches, made once for both groups (the 10,000 payers' keys take
/// seconds to sign for and recover).
fn sets() -> &'static [Set] {
    static SETS: std::sync::OnceLock<Vec<Set>> = std::sync::OnceLock::new();
    SETS.get_or_init(make_sets)
}

fn make_sets() -> Vec<Set> {
    // 256 vouchers of 64 payers (a batch of 128 holds each payer twice, summed into one term
    // of the batch equation), 10,000 vouchers of 10,000 payers.
    [("64_payers", 4 * FEW, FEW), ("10000_payers", MANY, MANY)]
        .into_iter()
        .map(|(name, count, payers)| {
            let vouchers = vouchers(count, payers);
            Set {
                name,
                cold: warm_cache(&vouchers, payers, false),
                warm: warm_cache(&vouchers, payers, true),
                vouchers,
            }
        })
        .collect()
}

fn one_core(c: &mut Criterion<ThreadTime>) {
    let domain = domain();
    let sets = sets();
    for set in sets {
        for v in &set.vouchers[..FEW] {
            assert!(check_recover(&domain, v) && check_secp_verify(&domain, v));
            assert!(check_secp_recover(&domain, v) && check_constant_time(&domain, v));
        }
    }

    let mut group = c.benchmark_group("channel_state_verify");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    for set in sets {
        let (vs, n) = (&set.vouchers, set.vouchers.len());
        group.bench_function(BenchmarkId::new("libsecp256k1_verify", set.name), |b| {
            b.iter(|| {
                i = (i + 1) % n;
                black_box(check_secp_verify(&domain, black_box(&vs[i])))
            })
        });
        group.bench_function(BenchmarkId::new("single_warm_key", set.name), |b| {
            b.iter(|| {
                i = (i + 1) % n;
                black_box(check_cached(&set.warm, &domain, black_box(&vs[i])))
            })
        });
        group.bench_function(BenchmarkId::new("single_cold_key", set.name), |b| {
            b.iter(|| {
                i = (i + 1) % n;
                black_box(check_cached(&set.cold, &domain, black_box(&vs[i])))
            })
        });
    }
    let vs = &sets[0].vouchers[..FEW];
    group.bench_function("k256_constant_time", |b| {
        b.iter(|| {
            i = (i + 1) % FEW;
            black_box(check_constant_time(&domain, black_box(&vs[i])))
        })
    });
    group.bench_function("k256_recover_address", |b| {
        b.iter(|| {
            i = (i + 1) % FEW;
            black_box(check_recover(&domain, black_box(&vs[i])))
        })
    });
    group.bench_function("libsecp256k1_recover_address", |b| {
        b.iter(|| {
            i = (i + 1) % FEW;
            black_box(check_secp_recover(&domain, black_box(&vs[i])))
        })
    });
    group.finish();

    // The reference again, measured just before the batches it is compared with (the machine's
    // speed drifts over the minutes of a run).
    let mut group = c.benchmark_group("channel_state_verify_batch");
    for set in sets {
        let (vs, n) = (&set.vouchers, set.vouchers.len());
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("libsecp256k1_verify", set.name), |b| {
            b.iter(|| {
                i = (i + 1) % n;
                black_box(check_secp_verify(&domain, black_box(&vs[i])))
            })
        });
        for size in [8usize, 32, 128] {
            group.throughput(Throughput::Elements(size as u64));
            let mut start = 0;
            group.bench_function(BenchmarkId::new(format!("batch_{size}"), set.name), |b| {
                b.iter(|| {
                    start = (start + size) % (n - size + 1);
                    black_box(check_batch(
                        &set.warm,
                        &domain,
                        black_box(&vs[start..start + size]),
                    ))
                })
            });
        }
    }
    group.finish();

    // What the operation counts of docs/BENCHMARKS.md cost: k256's field arithmetic.
    let mut group = c.benchmark_group("field_k256");
    group.throughput(Throughput::Elements(1));
    let a = k256::FieldElement::from_u64(0x1234_5678_9abc_def1)
        .invert()
        .unwrap();
    let b = a.square().normalize();
    // By reference, as the verifier multiplies (k256 inlines that form).
    #[allow(clippy::op_ref)]
    group.bench_function("mul", |bench| {
        bench.iter(|| black_box(black_box(a) * &black_box(b)))
    });
    group.bench_function("square", |bench| {
        bench.iter(|| black_box(black_box(a).square()))
    });
    group.bench_function("sqrt", |bench| {
        bench.iter(|| black_box(black_box(b).sqrt().unwrap()))
    });
    group.bench_function("invert_constant_time", |bench| {
        bench.iter(|| black_box(black_box(a).invert().unwrap()))
    });
    group.finish();

    let mut group = c.benchmark_group("key_table");
    group.throughput(Throughput::Elements(1));
    let keys: Vec<Key> = vs.iter().map(|v| Key::new(&v.key).unwrap()).collect();
    group.bench_function("build", |b| {
        b.iter(|| {
            i = (i + 1) % FEW;
            black_box(KeyTable::new(black_box(&keys[i])))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("eip712_digest");
    group.throughput(Throughput::Elements(1));
    group.bench_function("channel_state", |b| {
        b.iter(|| {
            i = (i + 1) % FEW;
            black_box(domain.state_digest(black_box(&vs[i].state)))
        })
    });
    group.finish();
}

/// Every path on every core: one thread per core, sharing one key cache (as the server's
/// verification threads do; its shard locks are never held across the curve arithmetic), beside
/// the same with one thread, both in wall-clock time. One iteration checks 256 vouchers per
/// thread, each thread from its own offset in the vouchers.
fn all_cores(c: &mut Criterion) {
    const PER_THREAD: usize = 256;
    let domain = domain();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sets = sets();
    let mut group = c.benchmark_group("channel_state_verify_all_cores");
    group.sample_size(20);
    let mut counts = vec![1, cores];
    counts.dedup();
    for set in sets {
        let vs = &set.vouchers;
        let n = vs.len();
        // Each function on one thread, then on every core, one after the other: the pair is
        // measured under the same conditions.
        let cycle = |offset: usize, f: &dyn Fn(&Voucher) -> bool| {
            (0..PER_THREAD).all(|k| f(&vs[(offset + k) % n]))
        };
        type Job<'a> = Box<dyn Fn(usize) -> bool + Sync + 'a>;
        let mut jobs: Vec<(String, Job<'_>)> = vec![
            (
                "libsecp256k1_verify".into(),
                Box::new(|offset| cycle(offset, &|v| check_secp_verify(&domain, v))),
            ),
            (
                "single_warm_key".into(),
                Box::new(|offset| cycle(offset, &|v| check_cached(&set.warm, &domain, v))),
            ),
            (
                "single_cold_key".into(),
                Box::new(|offset| cycle(offset, &|v| check_cached(&set.cold, &domain, v))),
            ),
        ];
        for size in [8usize, 32, 128] {
            jobs.push((
                format!("batch_{size}"),
                Box::new(move |offset| {
                    (0..PER_THREAD / size).all(|k| {
                        let start = (offset + k * size) % (n - size + 1);
                        check_batch(&set.warm, &domain, &vs[start..start + size])
                    })
                }),
            ));
        }
        for (name, job) in &jobs {
            for &threads in &counts {
                group.throughput(Throughput::Elements((PER_THREAD * threads) as u64));
                let id = BenchmarkId::new(name, format!("{}/{threads}_threads", set.name));
                // Thread t starts from its own offset in the vouchers.
                group.bench_function(id, |b| {
                    b.iter(|| {
                        std::thread::scope(|scope| {
                            for t in 0..threads {
                                scope.spawn(move || job(t * n / threads));
                            }
                        })
                    })
                });
            }
        }
    }
    group.finish();
}

/// Thread CPU time (`CLOCK_THREAD_CPUTIME_ID`): the one-core figures count only the time the
/// benchmark's own thread ran, so other processes on this shared machine (time-sliced onto the
/// same core) do not inflate them. Caches are still shared.
struct ThreadTime;

fn thread_cpu_now() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadTime {
    type Intermediate = std::time::Duration;
    type Value = std::time::Duration;

    fn start(&self) -> Self::Intermediate {
        thread_cpu_now()
    }
    fn end(&self, start: Self::Intermediate) -> Self::Value {
        thread_cpu_now() - start
    }
    fn add(&self, a: &Self::Value, b: &Self::Value) -> Self::Value {
        *a + *b
    }
    fn zero(&self) -> Self::Value {
        std::time::Duration::ZERO
    }
    fn to_f64(&self, value: &Self::Value) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

criterion_group! {
    name = one_core_benches;
    config = Criterion::default().with_measurement(ThreadTime);
    targets = one_core
}
criterion_group!(all_cores_benches, all_cores);
criterion_main!(one_core_benches, all_cores_benches);
