//! Differential fuzzing of the engine's signature checks against libsecp256k1.
//!
//! The input picks a key, a digest and a tampering: the target signs (a valid signature, which
//! random bytes would never be), applies the tampering (the digest, `r`, `s`, `v`, the key, the
//! high-s twin, arbitrary `r` and `s`, an x-reduced `r`, a batch with one bad voucher), then
//! asks every path of the engine (the key alone, the payer's table, k256's constant-time check,
//! `PayerKeys` cold and warm, the batch equation) and the contract's rule on libsecp256k1
//! (low-s, then `ecrecover` with `v` gives the payer). Any disagreement aborts.

#![no_main]

use alloy_primitives::{Address, B256, Signature, U256};
use k256::ecdsa::SigningKey;
use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::ops::{MulByGenerator, Reduce};
use k256::elliptic_curve::point::DecompressPoint;
use k256::elliptic_curve::sec1::ToEncodedPoint;
use k256::{AffinePoint, ProjectivePoint, Scalar};
use libfuzzer_sys::fuzz_target;
use paystream::channel::PayerKeys;
use paystream::channel::ecmult::{Key, KeyTable};
use paystream::channel::signature::{self, SignatureCheck};
use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
use secp256k1::{Message, SECP256K1};
use std::num::NonZeroUsize;

const N: U256 = U256::from_limbs([
    0xBFD2_5E8C_D036_4141,
    0xBAAE_DCE6_AF48_A03B,
    0xFFFF_FFFF_FFFF_FFFE,
    0xFFFF_FFFF_FFFF_FFFF,
]);

/// The contract's rule on libsecp256k1.
fn contract_accepts(payer: Address, digest: &B256, sig: &Signature) -> bool {
    if sig.s() > (N >> 1) || sig.r().is_zero() || sig.s().is_zero() {
        return false;
    }
    let mut compact = [0u8; 64];
    compact[..32].copy_from_slice(&sig.r().to_be_bytes::<32>());
    compact[32..].copy_from_slice(&sig.s().to_be_bytes::<32>());
    let Ok(recoverable) =
        RecoverableSignature::from_compact(&compact, RecoveryId::try_from(i32::from(sig.v())).unwrap())
    else {
        return false;
    };
    match SECP256K1.recover_ecdsa(Message::from_digest(digest.0), &recoverable) {
        Ok(key) => Address::from_raw_public_key(&key.serialize_uncompressed()[1..]) == payer,
        Err(_) => false,
    }
}

fn address(point: &AffinePoint) -> Address {
    Address::from_raw_public_key(&point.to_encoded_point(false).as_bytes()[1..])
}

/// Takes `n` bytes from the input, zero-padded.
fn take<const L: usize>(data: &mut &[u8]) -> [u8; L] {
    let mut out = [0u8; L];
    let n = data.len().min(L);
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

fn scalar_from(bytes: [u8; 32]) -> Option<Scalar> {
    let s = <Scalar as Reduce<k256::U256>>::reduce_bytes(&bytes.into());
    (!bool::from(s.is_zero())).then_some(s)
}

fn xor(value: U256, mask: [u8; 32]) -> U256 {
    value ^ U256::from_be_bytes(mask)
}

/// Every single path must agree with the contract's rule.
fn check_single(point: &AffinePoint, digest: &B256, sig: &Signature) {
    let payer = address(point);
    let expected = contract_accepts(payer, digest, sig);
    let table = KeyTable::new(&Key::new(point).expect("not the identity"));
    assert_eq!(signature::verify_with_key(point, digest, sig), expected, "key alone {sig:?}");
    assert_eq!(signature::verify_with_table(&table, digest, sig), expected, "table {sig:?}");
    assert_eq!(
        signature::verify_with_key_constant_time(point, digest, sig),
        expected,
        "constant time {sig:?}"
    );
    let keys = PayerKeys::new(NonZeroUsize::new(4).unwrap());
    assert_eq!(keys.verify(payer, digest, sig).is_ok(), expected, "cold {sig:?}");
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let Some(secret) = scalar_from(take::<32>(&mut data)) else {
        return;
    };
    let digest = B256::from(take::<32>(&mut data));
    let [mode] = take::<1>(&mut data);
    let sk = SigningKey::from_bytes(&secret.to_bytes()).unwrap();
    let point = *sk.verifying_key().as_affine();
    let sig = signature::sign_digest(&sk, &digest);
    match mode % 12 {
        0 => check_single(&point, &digest, &sig),
        1 => {
            let mask = take::<32>(&mut data);
            check_single(&point, &B256::from(xor(U256::from_be_bytes(digest.0), mask)), &sig);
        }
        2 => check_single(&point, &digest, &Signature::new(xor(sig.r(), take::<32>(&mut data)), sig.s(), sig.v())),
        3 => check_single(&point, &digest, &Signature::new(sig.r(), xor(sig.s(), take::<32>(&mut data)), sig.v())),
        4 => check_single(&point, &digest, &sig.with_parity(!sig.v())),
        5 => {
            let r = U256::from_be_bytes(take::<32>(&mut data));
            let s = U256::from_be_bytes(take::<32>(&mut data));
            let [v] = take::<1>(&mut data);
            check_single(&point, &digest, &Signature::new(r, s, v & 1 == 1));
        }
        6 => {
            let twin = Signature::new(sig.r(), N - sig.s(), !sig.v());
            check_single(&point, &digest, &twin);
            check_single(&point, &digest, &twin.with_parity(sig.v()));
        }
        7 => {
            // Another key.
            if let Some(other) = scalar_from(take::<32>(&mut data)) {
                let q = ProjectivePoint::mul_by_generator(&other).to_affine();
                check_single(&q, &digest, &sig);
            }
        }
        8 => {
            // x-reduced: a point with x in [n, p), r = x - n, the key that makes the equation
            // hold exactly. Plain ECDSA would accept; the rule refuses.
            let p_minus_n = U256::from_str_radix("14551231950b75fc4402da1722fc9baee", 16).unwrap();
            let x = N + U256::from_be_bytes(take::<32>(&mut data)) % p_minus_n;
            let [odd] = take::<1>(&mut data);
            let Some(big) = Option::<AffinePoint>::from(AffinePoint::decompress(
                &x.to_be_bytes::<32>().into(),
                k256::elliptic_curve::subtle::Choice::from(odd & 1),
            )) else {
                return;
            };
            let r = x - N;
            let Some(r_scalar) = Option::<Scalar>::from(Scalar::from_repr(r.to_be_bytes::<32>().into())) else {
                return;
            };
            if bool::from(r_scalar.is_zero()) {
                return;
            }
            let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&digest.0.into());
            let s = secret;
            let s = if s.to_bytes()[0] >= 0x80 { -s } else { s };
            let q = (ProjectivePoint::from(big) * s - ProjectivePoint::mul_by_generator(&z))
                * r_scalar.invert().unwrap();
            let q = q.to_affine();
            if q == AffinePoint::IDENTITY {
                return;
            }
            let odd_y = big.to_encoded_point(false).y().unwrap()[31] & 1 == 1;
            let crafted = Signature::new(r, U256::from_be_bytes::<32>(s.to_bytes().into()), odd_y);
            check_single(&q, &digest, &crafted);
        }
        9 => {
            // u1·G + u2·Q at infinity: Q = -(z/r)·G.
            let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&digest.0.into());
            let r = Scalar::from_repr(sig.r().to_be_bytes::<32>().into()).unwrap();
            let q = ProjectivePoint::mul_by_generator(&(-(z * r.invert().unwrap()))).to_affine();
            if q != AffinePoint::IDENTITY {
                check_single(&q, &digest, &sig);
                check_single(&q, &digest, &sig.with_parity(!sig.v()));
            }
        }
        _ => {
            // A batch of up to 16 vouchers by up to 4 payers; one may be tampered.
            let [count, bad, how] = take::<3>(&mut data);
            let count = 2 + usize::from(count % 15);
            let bad = usize::from(bad) % (count + 1);
            let payers: Vec<SigningKey> = (0..4u8)
                .map(|i| {
                    let mut b = secret.to_bytes();
                    b[31] ^= i;
                    SigningKey::from_bytes(&b).unwrap_or_else(|_| sk.clone())
                })
                .collect();
            let keys = PayerKeys::new(NonZeroUsize::new(1024).unwrap());
            let mut items: Vec<(Address, B256, Signature)> = (0..count)
                .map(|i| {
                    let signer = &payers[i % payers.len()];
                    let mut d = digest;
                    d.0[0] ^= i as u8;
                    (address(signer.verifying_key().as_affine()), d, signature::sign_digest(signer, &d))
                })
                .collect();
            for _ in 0..2 {
                for (payer, d, s) in &items {
                    keys.verify(*payer, d, s).unwrap();
                }
            }
            if bad < count {
                let mask = take::<32>(&mut data);
                let (payer, d, s) = items[bad];
                items[bad] = match how % 4 {
                    0 => (payer, B256::from(xor(U256::from_be_bytes(d.0), mask)), s),
                    1 => (payer, d, s.with_parity(!s.v())),
                    2 => (payer, d, Signature::new(s.r(), xor(s.s(), mask), s.v())),
                    _ => (payer, d, Signature::new(xor(s.r(), mask), s.s(), s.v())),
                };
            }
            let checks: Vec<SignatureCheck<'_>> = items
                .iter()
                .map(|(payer, digest, signature)| SignatureCheck { payer: *payer, digest: *digest, signature })
                .collect();
            let outcome = keys.verify_batch(&checks);
            for ((payer, d, s), result) in items.iter().zip(&outcome.results) {
                assert_eq!(result.is_ok(), contract_accepts(*payer, d, s), "batch item {s:?}");
            }
        }
    }
});
