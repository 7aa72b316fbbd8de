//! Exactness of the variable-time verifier (issue 12): every path (the key alone, the payer's
//! table, `PayerKeys` cold and warm, the batch equation with its fallback) gives the answer of
//! the contract's `ecrecover` rule, computed here with libsecp256k1 (low-s, `v` the recovery
//! parity, the recovered address is the payer's), and of k256's constant-time check, on:
//! random valid signatures; each one tampered (digest, `r`, `s`, `v`, key); high-s twins; `r` or
//! `s` of 0, `n`, above `n`; x-reduced `r` (a point whose x is at or above `n`: plain ECDSA
//! accepts it, `ecrecover` cannot express it); `u1·G + u2·Q` at infinity; and batches with one
//! bad voucher at every position. The shared vectors go through every path too.
//!
//! The normal suite runs a few hundred signatures (a dozen checks each, in the debug build).
//! The long run is ignored by default:
//!
//! ```sh
//! PAYSTREAM_VERIFY_CASES=200000 cargo test --release --test verify_exact -- --ignored
//! ```
//!
//! `PAYSTREAM_VERIFY_SEED` replays a run (each run prints its seed).

mod common;

use alloy::primitives::{Address, B256, Signature, U256};
use k256::ecdsa::SigningKey;
use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::ops::{MulByGenerator, Reduce};
use k256::elliptic_curve::point::DecompressPoint;
use k256::elliptic_curve::sec1::ToEncodedPoint;
use k256::{AffinePoint, ProjectivePoint, Scalar};
use paystream::channel::PayerKeys;
use paystream::channel::ecmult::{Key, KeyTable};
use paystream::channel::signature::{self, SignatureCheck, SignatureError};
use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
use secp256k1::{Message, SECP256K1};
use std::num::NonZeroUsize;

/// The curve order.
const N: U256 = U256::from_limbs([
    0xBFD2_5E8C_D036_4141,
    0xBAAE_DCE6_AF48_A03B,
    0xFFFF_FFFF_FFFF_FFFE,
    0xFFFF_FFFF_FFFF_FFFF,
]);

/// A small, seedable generator (splitmix64): cases are reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn from_env() -> Self {
        let seed = std::env::var("PAYSTREAM_VERIFY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).unwrap();
                u64::from_le_bytes(b)
            });
        eprintln!("PAYSTREAM_VERIFY_SEED={seed}");
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        out
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn scalar(&mut self) -> Scalar {
        loop {
            if let Some(s) = Option::<Scalar>::from(Scalar::from_repr(self.bytes32().into()))
                && !bool::from(s.is_zero())
            {
                return s;
            }
        }
    }
}

/// A payer: its key in every form the paths take.
struct Payer {
    address: Address,
    point: AffinePoint,
    secp: secp256k1::PublicKey,
    table: KeyTable,
}

impl Payer {
    fn new(point: AffinePoint) -> Self {
        let encoded = point.to_encoded_point(false);
        Self {
            address: Address::from_raw_public_key(&encoded.as_bytes()[1..]),
            secp: secp256k1::PublicKey::from_slice(encoded.as_bytes()).unwrap(),
            table: KeyTable::new(&Key::new(&point).unwrap()),
            point,
        }
    }
}

/// The contract's rule, on libsecp256k1: `r`, `s` in `[1, n)`, `s <= n/2`, and `ecrecover`
/// with `v` as the recovery parity gives the payer's address.
fn contract_accepts(payer: &Payer, digest: &B256, sig: &Signature) -> bool {
    if sig.s() > (N >> 1) || sig.r().is_zero() || sig.s().is_zero() {
        return false;
    }
    let mut compact = [0u8; 64];
    compact[..32].copy_from_slice(&sig.r().to_be_bytes::<32>());
    compact[32..].copy_from_slice(&sig.s().to_be_bytes::<32>());
    let Ok(recoverable) = RecoverableSignature::from_compact(
        &compact,
        RecoveryId::try_from(i32::from(sig.v())).unwrap(),
    ) else {
        return false;
    };
    match SECP256K1.recover_ecdsa(Message::from_digest(digest.0), &recoverable) {
        Ok(key) => {
            Address::from_raw_public_key(&key.serialize_uncompressed()[1..]) == payer.address
        }
        Err(_) => false,
    }
}

/// Every single-signature path's answer; asserts they all agree with the contract's rule and
/// returns it.
fn check_every_single_path(payer: &Payer, digest: &B256, sig: &Signature, what: &str) -> bool {
    let expected = contract_accepts(payer, digest, sig);
    let ct = signature::verify_with_key_constant_time(&payer.point, digest, sig);
    let fast = signature::verify_with_key(&payer.point, digest, sig);
    let table = signature::verify_with_table(&payer.table, digest, sig);
    assert_eq!(
        ct, expected,
        "constant-time check vs contract rule: {what} {sig:?}"
    );
    assert_eq!(fast, expected, "key alone vs contract rule: {what} {sig:?}");
    assert_eq!(
        table, expected,
        "payer table vs contract rule: {what} {sig:?}"
    );
    // PayerKeys: cold (recovery), then the cached key without a table, then with one.
    let cold = PayerKeys::new(NonZeroUsize::new(4).unwrap());
    assert_eq!(
        cold.verify(payer.address, digest, sig).is_ok(),
        expected,
        "PayerKeys, unknown payer: {what}"
    );
    expected
}

/// A `PayerKeys` that knows `payer`'s key and, with `table`, its table.
fn keys_knowing(payer: &Payer, sk: &SigningKey, table: bool) -> PayerKeys {
    let keys = PayerKeys::with_table_bytes(
        NonZeroUsize::new(16).unwrap(),
        if table { 1 << 20 } else { 0 },
    );
    let digest = B256::repeat_byte(0x77);
    let sig = signature::sign_digest(sk, &digest);
    keys.verify(payer.address, &digest, &sig).unwrap();
    keys.verify(payer.address, &digest, &sig).unwrap();
    assert_eq!(keys.has_table(&payer.address), table);
    keys
}

fn with_s(sig: &Signature, s: U256) -> Signature {
    Signature::new(sig.r(), s, sig.v())
}

fn with_r(sig: &Signature, r: U256) -> Signature {
    Signature::new(r, sig.s(), sig.v())
}

fn flip_bit(value: U256, bit: usize) -> U256 {
    value ^ (U256::from(1u8) << bit)
}

/// One random key and digest, signed, then each tampering of it; every path must agree with the
/// contract's rule. Returns the number of checks made.
fn one_case(rng: &mut Rng, warm: Option<(&PayerKeys, &PayerKeys, &Payer, &SigningKey)>) -> usize {
    let owned;
    let (sk, payer) = match warm {
        Some((_, _, payer, sk)) => (sk.clone(), payer),
        None => {
            let sk = SigningKey::from_bytes(&rng.scalar().to_bytes()).unwrap();
            owned = Payer::new(*sk.verifying_key().as_affine());
            (sk, &owned)
        }
    };
    let mut digest = B256::from(rng.bytes32());
    match rng.below(16) {
        0 => digest = B256::ZERO,
        1 => digest = B256::from(N.to_be_bytes::<32>()),
        2 => digest = B256::from((N + U256::from(rng.below(1000))).to_be_bytes::<32>()),
        _ => {}
    }
    let sig = signature::sign_digest(&sk, &digest);
    let other = SigningKey::from_bytes(&rng.scalar().to_bytes()).unwrap();
    let other_payer = Payer::new(*other.verifying_key().as_affine());
    let mut bad_digest = digest;
    bad_digest.0[rng.below(32)] ^= 1 << rng.below(8);
    let high_s = with_s(&sig, N - sig.s());
    let variants: Vec<(&Payer, B256, Signature, &str)> = vec![
        (payer, digest, sig, "valid"),
        (payer, bad_digest, sig, "tampered digest"),
        (
            payer,
            digest,
            with_r(&sig, flip_bit(sig.r(), rng.below(256))),
            "tampered r",
        ),
        (
            payer,
            digest,
            with_s(&sig, flip_bit(sig.s(), rng.below(255))),
            "tampered s",
        ),
        (payer, digest, sig.with_parity(!sig.v()), "flipped v"),
        (&other_payer, digest, sig, "another key"),
        (payer, digest, high_s.with_parity(!sig.v()), "high-s twin"),
        (payer, digest, high_s, "high-s twin, same v"),
    ];
    let mut checks = 0;
    for (who, d, s, what) in &variants {
        let accepted = check_every_single_path(who, d, s, what);
        assert_eq!(accepted, *what == "valid", "{what}");
        checks += 1;
    }
    if let Some((keyed, tabled, _, _)) = warm {
        for (who, d, s, what) in &variants {
            if who.address != payer.address {
                continue;
            }
            let expected = *what == "valid";
            assert_eq!(
                keyed.verify(payer.address, d, s).is_ok(),
                expected,
                "cached key: {what}"
            );
            assert_eq!(
                tabled.verify(payer.address, d, s).is_ok(),
                expected,
                "cached table: {what}"
            );
            checks += 2;
        }
    }
    checks
}

/// `r` or `s` of 0, `n`, `n + 1`, `2^256 - 1`: refused by every path.
fn out_of_range(rng: &mut Rng) -> usize {
    let sk = SigningKey::from_bytes(&rng.scalar().to_bytes()).unwrap();
    let payer = Payer::new(*sk.verifying_key().as_affine());
    let digest = B256::from(rng.bytes32());
    let sig = signature::sign_digest(&sk, &digest);
    let mut checks = 0;
    for bad in [U256::ZERO, N, N + U256::from(1u8), U256::MAX, N + sig.r()] {
        assert!(!check_every_single_path(
            &payer,
            &digest,
            &with_r(&sig, bad),
            "r out of range"
        ));
        assert!(!check_every_single_path(
            &payer,
            &digest,
            &with_s(&sig, bad),
            "s out of range"
        ));
        checks += 2;
    }
    checks
}

/// A signature whose point has x at or above `n`, with `r = x - n`: plain ECDSA (comparing
/// modulo `n`) accepts it, `ecrecover` cannot express it, the engine refuses it.
fn x_reduced(rng: &mut Rng) -> usize {
    let p_minus_n = U256::from_str_radix("14551231950b75fc4402da1722fc9baee", 16).unwrap();
    let (point, x) = loop {
        let x = N + U256::from_be_bytes(rng.bytes32()) % p_minus_n;
        let odd = rng.below(2) == 1;
        if let Some(point) = Option::<AffinePoint>::from(AffinePoint::decompress(
            &x.to_be_bytes::<32>().into(),
            k256::elliptic_curve::subtle::Choice::from(u8::from(odd)),
        )) {
            break (point, x);
        }
    };
    let r = x - N;
    let r_scalar = Scalar::from_repr(r.to_be_bytes::<32>().into()).unwrap();
    let s_scalar = rng.scalar();
    let s_scalar = if s_scalar.to_bytes()[0] >= 0x80 {
        -s_scalar
    } else {
        s_scalar
    };
    let digest = B256::from(rng.bytes32());
    let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&digest.0.into());
    // Q = r⁻¹·(s·R − z·G), so that (z/s)·G + (r/s)·Q = R exactly.
    let q = (ProjectivePoint::from(point) * s_scalar - ProjectivePoint::mul_by_generator(&z))
        * r_scalar.invert().unwrap();
    let payer = Payer::new(q.to_affine());
    let y_odd = point.to_encoded_point(false).y().unwrap()[31] & 1 == 1;
    let sig = Signature::new(
        r,
        U256::from_be_bytes::<32>(s_scalar.to_bytes().into()),
        y_odd,
    );
    // Plain ECDSA accepts it: the case is what it claims to be.
    let secp_sig = secp256k1::ecdsa::Signature::from_compact(&sig.as_bytes()[..64]).unwrap();
    assert!(
        SECP256K1
            .verify_ecdsa(Message::from_digest(digest.0), &secp_sig, &payer.secp)
            .is_ok()
    );
    assert!(!check_every_single_path(
        &payer,
        &digest,
        &sig,
        "x-reduced r"
    ));
    1
}

/// A key for which `u1·G + u2·Q` is the identity: refused.
fn at_infinity(rng: &mut Rng) -> usize {
    let digest = B256::from(rng.bytes32());
    let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&digest.0.into());
    let r = rng.scalar();
    let s = rng.scalar();
    let s = if s.to_bytes()[0] >= 0x80 { -s } else { s };
    // Q = −(z/r)·G: (z/s)·G + (r/s)·Q = 0.
    let q = ProjectivePoint::mul_by_generator(&(-(z * r.invert().unwrap())));
    if bool::from(k256::elliptic_curve::group::Group::is_identity(&q)) {
        return 0;
    }
    let payer = Payer::new(q.to_affine());
    let mut checks = 0;
    for v in [false, true] {
        let sig = Signature::new(
            U256::from_be_bytes::<32>(r.to_bytes().into()),
            U256::from_be_bytes::<32>(s.to_bytes().into()),
            v,
        );
        assert!(!check_every_single_path(
            &payer,
            &digest,
            &sig,
            "at infinity"
        ));
        checks += 1;
    }
    checks
}

/// A batch of `size` valid vouchers (some payers twice), then with one bad voucher at every
/// position: the batch fails over to single checks and names exactly the bad one.
fn batches(rng: &mut Rng, size: usize) -> usize {
    let payers: Vec<(SigningKey, Payer)> = (0..size.div_ceil(2).max(1))
        .map(|_| {
            let sk = SigningKey::from_bytes(&rng.scalar().to_bytes()).unwrap();
            let payer = Payer::new(*sk.verifying_key().as_affine());
            (sk, payer)
        })
        .collect();
    let keys = PayerKeys::new(NonZeroUsize::new(4096).unwrap());
    let items: Vec<(Address, B256, Signature)> = (0..size)
        .map(|i| {
            let (sk, payer) = &payers[i % payers.len()];
            let digest = B256::from(rng.bytes32());
            (payer.address, digest, signature::sign_digest(sk, &digest))
        })
        .collect();
    // Warm: keys, then tables.
    for _ in 0..2 {
        for (payer, digest, sig) in &items {
            keys.verify(*payer, digest, sig).unwrap();
        }
    }
    let run = |items: &[(Address, B256, Signature)]| {
        let checks: Vec<SignatureCheck<'_>> = items
            .iter()
            .map(|(payer, digest, signature)| SignatureCheck {
                payer: *payer,
                digest: *digest,
                signature,
            })
            .collect();
        keys.verify_batch(&checks)
    };
    let good = run(&items);
    assert!(good.results.iter().all(Result::is_ok));
    assert_eq!(good.batched, if size >= 2 { size } else { 0 });
    assert!(!good.fell_back);
    let mut checks = size;
    for bad in 0..size {
        let mut tampered = items.clone();
        let (payer, digest, sig) = tampered[bad];
        tampered[bad] = match rng.below(5) {
            0 => (payer, B256::from(rng.bytes32()), sig),
            1 => (payer, digest, sig.with_parity(!sig.v())),
            2 => (
                payer,
                digest,
                with_s(&sig, flip_bit(sig.s(), rng.below(255))),
            ),
            3 => (
                payer,
                digest,
                with_r(&sig, flip_bit(sig.r(), rng.below(256))),
            ),
            _ => {
                // Another payer's valid signature over the same digest.
                let other = &payers[(bad + 1) % payers.len()].0;
                (payer, digest, signature::sign_digest(other, &digest))
            }
        };
        let outcome = run(&tampered);
        for (i, result) in outcome.results.iter().enumerate() {
            let (payer, digest, sig) = &tampered[i];
            let who = &payers.iter().find(|(_, p)| p.address == *payer).unwrap().1;
            assert_eq!(
                result.is_ok(),
                contract_accepts(who, digest, sig),
                "batch of {size}, bad at {bad}, item {i}"
            );
            assert_eq!(result.is_ok(), i != bad || tampered[bad] == items[bad]);
        }
        // The batch equation was tried and failed, unless the tampered signature never got
        // into it (out of range: refused up front).
        if outcome.results[bad].is_err() && outcome.batched == size && size >= 2 {
            assert!(outcome.fell_back, "batch of {size}, bad at {bad}");
        }
        checks += size;
    }
    checks
}

/// Runs `signatures` random cases and every crafted kind, on `threads` threads.
fn run(signatures: usize, threads: usize) -> usize {
    let seed = Rng::from_env().next();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut rng = Rng(seed.wrapping_add(t as u64 * 0x1234_5678_9abc));
                    let sk = SigningKey::from_bytes(&rng.scalar().to_bytes()).unwrap();
                    let payer = Payer::new(*sk.verifying_key().as_affine());
                    let keyed = keys_knowing(&payer, &sk, false);
                    let tabled = keys_knowing(&payer, &sk, true);
                    let mut checks = 0;
                    for i in (t..signatures).step_by(threads) {
                        let warm = (i % 4 == 0).then_some((&keyed, &tabled, &payer, &sk));
                        checks += one_case(&mut rng, warm);
                        if i % 16 == 0 {
                            checks += out_of_range(&mut rng)
                                + x_reduced(&mut rng)
                                + at_infinity(&mut rng);
                        }
                        if i % 64 == 0 {
                            checks += batches(&mut rng, [2, 3, 8, 33][(i / 64) % 4]);
                        }
                    }
                    checks
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

#[test]
fn every_path_agrees_with_the_contract_rule() {
    let checks = run(160, 2);
    eprintln!("{checks} checks");
    assert!(checks > 2_000);
}

#[test]
fn crafted_cases_are_refused_everywhere() {
    let mut rng = Rng::from_env();
    for _ in 0..8 {
        x_reduced(&mut rng);
        at_infinity(&mut rng);
        out_of_range(&mut rng);
    }
}

#[test]
fn a_bad_voucher_is_named_at_every_position() {
    let mut rng = Rng::from_env();
    for size in [2, 3, 5, 8, 32] {
        batches(&mut rng, size);
    }
}

/// The long run: `PAYSTREAM_VERIFY_CASES` random signatures (default 100,000: over a million
/// checks), on every core.
#[test]
#[ignore = "long: run in release, see the module docs"]
fn millions_of_cases() {
    let signatures = std::env::var("PAYSTREAM_VERIFY_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = std::time::Instant::now();
    let checks = run(signatures, threads);
    eprintln!(
        "{checks} checks on {signatures} signatures in {:.0} s, no disagreement",
        started.elapsed().as_secs_f64()
    );
}

/// The shared vectors through every path: each valid signature accepted (alone, on a table, by
/// `PayerKeys` cold and warm, in a batch with the others), each high-s twin refused.
#[test]
fn shared_vectors_pass_through_every_path() {
    let cases = common::vectors::load().cases;
    let keys = PayerKeys::default();
    let mut batch = Vec::new();
    for case in &cases {
        let sk = SigningKey::from_slice(case.private_key.as_slice()).unwrap();
        let payer = Payer::new(*sk.verifying_key().as_affine());
        assert_eq!(payer.address, case.payer);
        let sig = signature::parse_signature(&case.signature).unwrap();
        assert!(check_every_single_path(
            &payer,
            &case.digest,
            &sig,
            "vector"
        ));
        let twin = Signature::from_bytes_and_parity(
            &case.high_s_signature[..64],
            case.high_s_signature[64] == 28,
        );
        assert!(!check_every_single_path(
            &payer,
            &case.digest,
            &twin,
            "vector high-s twin"
        ));
        // Cold, key, table.
        for _ in 0..3 {
            keys.verify(case.payer, &case.digest, &sig).unwrap();
            assert_eq!(
                keys.verify(case.payer, &case.digest, &twin),
                Err(SignatureError::HighS)
            );
        }
        assert!(keys.has_table(&case.payer));
        batch.push((case.payer, case.digest, sig, twin));
    }
    let checks: Vec<SignatureCheck<'_>> = batch
        .iter()
        .map(|(payer, digest, sig, _)| SignatureCheck {
            payer: *payer,
            digest: *digest,
            signature: sig,
        })
        .collect();
    let outcome = keys.verify_batch(&checks);
    assert!(outcome.results.iter().all(Result::is_ok));
    assert_eq!(outcome.batched, cases.len());
    assert!(!outcome.fell_back);
    for bad in 0..batch.len() {
        let mut with_twin = checks.clone();
        with_twin[bad].signature = &batch[bad].3;
        let outcome = keys.verify_batch(&with_twin);
        for (i, result) in outcome.results.iter().enumerate() {
            if i == bad {
                assert_eq!(result, &Err(SignatureError::HighS));
            } else {
                assert!(result.is_ok());
            }
        }
    }
}

/// A signature by secret `d` over `digest` whose check `u1·G + u2·Q − R` comes out as `e·G`
/// instead of the identity (`e = 0`: a valid signature).
fn off_by(rng: &mut Rng, d: &Scalar, digest: &B256, e: Scalar) -> Signature {
    let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&digest.0.into());
    loop {
        let k = rng.scalar();
        let point = ProjectivePoint::mul_by_generator(&k).to_affine();
        let encoded = point.to_encoded_point(false);
        let x = U256::from_be_slice(encoded.x().unwrap());
        if x >= N {
            continue;
        }
        let r = Scalar::from_repr(x.to_be_bytes::<32>().into()).unwrap();
        let Some(inv) = Option::<Scalar>::from((k + e).invert()) else {
            continue;
        };
        // u1·G + u2·Q = (z + r·d)/s · G = (k + e)·G, and R = k·G.
        let s = (z + r * d) * inv;
        let s_int = U256::from_be_bytes::<32>(s.to_bytes().into());
        if s_int > (N >> 1) || s_int.is_zero() {
            continue;
        }
        let y_odd = encoded.y().unwrap()[31] & 1 == 1;
        return Signature::new(x, s_int, y_odd);
    }
}

/// Bad signatures whose errors cancel (`+e·G` and `−e·G`, one payer or two) fail the batch:
/// only per-signature randomizers tell them apart (with equal randomizers the equation holds,
/// shown below on the same batch). Several bad signatures in one batch are each named.
#[test]
fn errors_that_cancel_each_other_fail_the_batch() {
    let mut rng = Rng::from_env();
    for _ in 0..6 {
        let secrets: Vec<Scalar> = (0..2).map(|_| rng.scalar()).collect();
        let payers: Vec<Payer> = secrets
            .iter()
            .map(|d| Payer::new(ProjectivePoint::mul_by_generator(d).to_affine()))
            .collect();
        let keys = PayerKeys::new(NonZeroUsize::new(64).unwrap());
        for (d, payer) in secrets.iter().zip(&payers) {
            let sk = SigningKey::from_bytes(&d.to_bytes()).unwrap();
            for _ in 0..2 {
                let digest = B256::from(rng.bytes32());
                let sig = signature::sign_digest(&sk, &digest);
                keys.verify(payer.address, &digest, &sig).unwrap();
            }
            assert!(keys.has_table(&payer.address));
        }
        let e = rng.scalar();
        let digests: Vec<B256> = (0..4).map(|_| B256::from(rng.bytes32())).collect();
        let good = off_by(&mut rng, &secrets[0], &digests[0], Scalar::ZERO);
        let plus = off_by(&mut rng, &secrets[0], &digests[1], e);
        let minus_same = off_by(&mut rng, &secrets[0], &digests[2], -e);
        let minus_other = off_by(&mut rng, &secrets[1], &digests[3], -e);
        let (a, b) = (&payers[0], &payers[1]);
        let cases: [Vec<(&Payer, &B256, &Signature)>; 3] = [
            vec![(a, &digests[1], &plus), (a, &digests[2], &minus_same)],
            vec![(a, &digests[1], &plus), (b, &digests[3], &minus_other)],
            vec![
                (a, &digests[0], &good),
                (a, &digests[1], &plus),
                (b, &digests[3], &minus_other),
            ],
        ];
        for case in &cases {
            let checks: Vec<SignatureCheck<'_>> = case
                .iter()
                .map(|(payer, digest, signature)| SignatureCheck {
                    payer: payer.address,
                    digest: **digest,
                    signature,
                })
                .collect();
            let outcome = keys.verify_batch(&checks);
            assert!(outcome.fell_back);
            for ((payer, digest, sig), result) in case.iter().zip(&outcome.results) {
                assert_eq!(result.is_ok(), contract_accepts(payer, digest, sig));
            }
        }
        // The same pair passes an equation whose randomizers are equal: what the test above
        // would miss if the randomizers were not drawn per signature.
        let items: Vec<paystream::channel::ecmult::BatchItem<'_>> = cases[0]
            .iter()
            .map(
                |(payer, digest, sig)| paystream::channel::ecmult::BatchItem {
                    table: &payer.table,
                    z: <Scalar as Reduce<k256::U256>>::reduce_bytes(&digest.0.into()),
                    r: Scalar::from_repr(sig.r().to_be_bytes::<32>().into()).unwrap(),
                    s: Scalar::from_repr(sig.s().to_be_bytes::<32>().into()).unwrap(),
                    y_odd: sig.v(),
                },
            )
            .collect();
        assert!(paystream::channel::ecmult::verify_batch(&items, &[7, 7]));
        assert!(!paystream::channel::ecmult::verify_batch(&items, &[7, 9]));
    }
}

/// A batch of 40 with three bad vouchers: the fallback names each of them, and only them.
#[test]
fn several_bad_vouchers_in_one_batch_are_each_named() {
    let mut rng = Rng::from_env();
    let secrets: Vec<Scalar> = (0..10).map(|_| rng.scalar()).collect();
    let signers: Vec<SigningKey> = secrets
        .iter()
        .map(|d| SigningKey::from_bytes(&d.to_bytes()).unwrap())
        .collect();
    let payers: Vec<Payer> = signers
        .iter()
        .map(|sk| Payer::new(*sk.verifying_key().as_affine()))
        .collect();
    let keys = PayerKeys::new(NonZeroUsize::new(64).unwrap());
    for (sk, payer) in signers.iter().zip(&payers) {
        for _ in 0..2 {
            let digest = B256::from(rng.bytes32());
            keys.verify(payer.address, &digest, &signature::sign_digest(sk, &digest))
                .unwrap();
        }
    }
    for _ in 0..4 {
        let bad: Vec<usize> = (0..3).map(|_| rng.below(40)).collect();
        let items: Vec<(usize, B256, Signature)> = (0..40)
            .map(|i| {
                let p = i % payers.len();
                let digest = B256::from(rng.bytes32());
                let sig = if bad.contains(&i) {
                    // Signed by the next payer: a valid signature, not this payer's.
                    signature::sign_digest(&signers[(p + 1) % signers.len()], &digest)
                } else {
                    signature::sign_digest(&signers[p], &digest)
                };
                (p, digest, sig)
            })
            .collect();
        let checks: Vec<SignatureCheck<'_>> = items
            .iter()
            .map(|(p, digest, signature)| SignatureCheck {
                payer: payers[*p].address,
                digest: *digest,
                signature,
            })
            .collect();
        let outcome = keys.verify_batch(&checks);
        assert_eq!(outcome.batched, 40);
        assert!(outcome.fell_back);
        for (i, result) in outcome.results.iter().enumerate() {
            assert_eq!(
                result.is_err(),
                bad.contains(&i),
                "voucher {i}, bad {bad:?}"
            );
        }
    }
}
