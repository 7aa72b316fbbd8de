//! Unit tests of the arithmetic against k256's constant-time implementation.

use super::point::{Affine, BETA, Jacobian, batch_to_affine, fe_invert};
use super::scalar::{GLV, invert as scalar_invert};
use super::table::SplitTable;
use super::*;
use k256::elliptic_curve::ops::{MulByGenerator, Reduce};
use k256::elliptic_curve::sec1::ToEncodedPoint;
use num_bigint::BigUint;

fn same(a: &Affine, b: &ProjectivePoint) -> bool {
    let b = b.to_affine().to_encoded_point(false);
    let a = a.normalize();
    a.x.to_bytes()[..] == b.x().unwrap()[..] && a.y.to_bytes()[..] == b.y().unwrap()[..]
}

fn same_jacobian(a: &Jacobian, b: &ProjectivePoint) -> bool {
    match a.to_affine() {
        Some(a) => same(&a, b),
        None => bool::from(b.is_identity()),
    }
}

fn point_of(k: &Scalar) -> (Affine, ProjectivePoint) {
    let p = ProjectivePoint::mul_by_generator(k);
    (Affine::from_k256(&p.to_affine()).unwrap(), p)
}

fn random_fe() -> FieldElement {
    loop {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).unwrap();
        if let Some(f) = Option::from(FieldElement::from_bytes(&bytes.into())) {
            return f;
        }
    }
}

use k256::elliptic_curve::group::Group;

#[test]
fn beta_and_lambda_agree() {
    let beta = *BETA;
    let one = (beta * &beta * &beta).normalize();
    assert_eq!(one.to_bytes(), FieldElement::ONE.to_bytes());
    let g = Affine::generator();
    let lambda_g = ProjectivePoint::mul_by_generator(&GLV.lambda);
    assert!(same(&g.endo(), &lambda_g));
}

#[test]
fn glv_rounding_constants() {
    let n = BigUint::parse_bytes(
        b"fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
        16,
    )
    .unwrap();
    let minus_b1 = BigUint::parse_bytes(b"e4437ed6010e88286f547fa90abfe4c3", 16).unwrap();
    let b2 = BigUint::parse_bytes(b"3086d221a7d46bcde86c90e49284eb15", 16).unwrap();
    let shift = BigUint::from(1u8) << 384;
    let round = |num: BigUint| (num * 2u8 + &n) / (&n * 2u8);
    let g1 = round(&shift * &b2);
    let g2 = round(&shift * &minus_b1);
    assert_eq!(
        format!("{g1:x}"),
        "3086d221a7d46bcde86c90e49284eb153daa8a1471e8ca7fe893209a45dbb031"
    );
    assert_eq!(
        format!("{g2:x}"),
        "e4437ed6010e88286f547fa90abfe4c4221208ac9df506c61571b4ae8ac47f71"
    );
    // The basis vectors are in the lattice: a + b·λ ≡ 0 with a1 = b2, a2 = -b1 + b2
    // (Hankerson, Menezes and Vanstone's construction for secp256k1).
    let lambda = BigUint::from_bytes_be(&GLV.lambda.to_bytes());
    let a1 = b2.clone();
    let b1 = &n - &minus_b1;
    assert_eq!((&a1 + &b1 * &lambda) % &n, BigUint::from(0u8));
}

#[test]
fn field_inverse_matches_k256() {
    for _ in 0..2000 {
        let a = random_fe();
        let fast = fe_invert(&a).unwrap().normalize();
        let slow = a.invert().unwrap().normalize();
        assert_eq!(fast.to_bytes(), slow.to_bytes());
    }
    assert!(fe_invert(&FieldElement::ZERO).is_none());
    let one = fe_invert(&FieldElement::ONE).unwrap().normalize();
    assert_eq!(one.to_bytes(), FieldElement::ONE.to_bytes());
}

#[test]
fn scalar_inverse_matches_k256() {
    for _ in 0..2000 {
        let s = random_scalar();
        assert_eq!(scalar_invert(&s).unwrap(), s.invert().unwrap());
    }
    assert!(scalar_invert(&Scalar::ZERO).is_none());
    assert_eq!(scalar_invert(&-Scalar::ONE).unwrap(), -Scalar::ONE);
}

#[test]
fn point_formulas_match_k256() {
    for _ in 0..300 {
        let (a, pa) = point_of(&random_scalar());
        let (b, pb) = point_of(&random_scalar());
        let ja = Jacobian::from_affine(&a).double().add_affine(&b); // 2A + B, Z != 1
        assert!(same_jacobian(&ja, &(pa.double() + pb)));
        let jb = Jacobian::from_affine(&b).double();
        assert!(same_jacobian(
            &ja.add(&jb),
            &(pa.double() + pb + pb.double())
        ));
        assert!(same_jacobian(&ja.double(), &(pa.double() + pb).double()));
        // The special cases of the mixed addition: P + P, P + (-P), O + P.
        let two_a = Jacobian::from_affine(&a).double();
        let two_a_affine = two_a.to_affine().unwrap();
        assert!(same_jacobian(
            &two_a.add_affine(&two_a_affine),
            &pa.double().double()
        ));
        assert!(two_a.add_affine(&two_a_affine.neg()).is_infinity());
        assert!(same_jacobian(&Jacobian::INFINITY.add_affine(&b), &pb));
        assert!(same_jacobian(&two_a.add(&two_a), &pa.double().double()));
        assert!(
            two_a
                .add(&Jacobian::from_affine(&two_a_affine.neg()))
                .is_infinity()
        );
        assert!(a.is_on_curve() && two_a_affine.is_on_curve());
    }
    assert!(Jacobian::INFINITY.double().is_infinity());
}

#[test]
fn lift_finds_both_parities_or_none() {
    let mut found = 0;
    for _ in 0..200 {
        let x = random_fe();
        match (Affine::lift(&x, false), Affine::lift(&x, true)) {
            (Some(even), Some(odd)) => {
                found += 1;
                assert!(even.is_on_curve() && odd.is_on_curve());
                assert!(!bool::from(even.y.is_odd()) && bool::from(odd.y.is_odd()));
            }
            (None, None) => {}
            _ => panic!("one parity without the other"),
        }
    }
    assert!(found > 50);
}

#[test]
fn split_table_holds_odd_multiples_of_each_piece() {
    let k = random_scalar();
    let (p, pp) = point_of(&k);
    let table = SplitTable::build(&p, 3, 32, 5).unwrap();
    let two32 = Scalar::from(1u64 << 32);
    let mut base = pp;
    for i in 0..3 {
        for (j, point) in table.piece(i).iter().enumerate() {
            assert!(
                same(point, &(base * Scalar::from(2 * j as u64 + 1))),
                "piece {i} multiple {j}"
            );
        }
        base *= two32;
    }
    let jac: Vec<Jacobian> = table.piece(0).iter().map(Jacobian::from_affine).collect();
    assert_eq!(batch_to_affine(&jac).unwrap().len(), 8);
    assert!(batch_to_affine(&[Jacobian::INFINITY]).is_none());
}

struct Case {
    key: Key,
    table: KeyTable,
    z: Scalar,
    r: Scalar,
    s: Scalar,
    v: bool,
}

fn signed_case() -> Case {
    let secret = k256::NonZeroScalar::new(random_scalar()).unwrap();
    let signing = k256::ecdsa::SigningKey::from(secret);
    let mut digest = [0u8; 32];
    getrandom::fill(&mut digest).unwrap();
    let (sig, recid) = signing.sign_prehash_recoverable(&digest).unwrap();
    let sig = sig.normalize_s().unwrap_or(sig);
    // normalize_s flips R's parity only through s's sign, not R: recompute v.
    let (r, s) = sig.split_scalars();
    let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&digest.into());
    let key = Key::new(signing.verifying_key().as_affine()).unwrap();
    let v = recid.is_y_odd();
    let case = Case {
        table: KeyTable::new(&key),
        key,
        z,
        r: *r,
        s: *s,
        v,
    };
    // Signing normalized s already; if not, v would be wrong, and the reference says which.
    assert!(constant_time(
        &case.key.k256,
        &case.z,
        &case.r,
        &case.s,
        case.v
    ));
    case
}

#[test]
fn single_paths_agree_with_the_constant_time_check() {
    for _ in 0..200 {
        let c = signed_case();
        assert!(verify(&c.key, &c.z, &c.r, &c.s, c.v));
        assert!(verify_with_table(&c.table, &c.z, &c.r, &c.s, c.v));
        // Tampered: flipped parity, digest, r, s, key.
        let other = signed_case();
        let bad = [
            (c.z, c.r, c.s, !c.v, &c.table),
            (c.z + Scalar::ONE, c.r, c.s, c.v, &c.table),
            (c.z, c.r + Scalar::ONE, c.s, c.v, &c.table),
            (c.z, c.r, c.s + Scalar::ONE, c.v, &c.table),
            (c.z, c.r, -c.s, c.v, &c.table),
            (c.z, c.r, c.s, c.v, &other.table),
        ];
        for (z, r, s, v, table) in bad {
            let expected = constant_time(&table.key.k256, &z, &r, &s, v);
            assert_eq!(verify(&table.key, &z, &r, &s, v), expected);
            assert_eq!(verify_with_table(table, &z, &r, &s, v), expected);
        }
    }
}

#[test]
fn batches_accept_good_and_refuse_any_bad() {
    let cases: Vec<Case> = (0..12).map(|_| signed_case()).collect();
    let random: Vec<u128> = (0..cases.len())
        .map(|_| {
            let mut b = [0u8; 16];
            getrandom::fill(&mut b).unwrap();
            u128::from_le_bytes(b)
        })
        .collect();
    let items: Vec<BatchItem<'_>> = cases
        .iter()
        .map(|c| BatchItem {
            table: &c.table,
            z: c.z,
            r: c.r,
            s: c.s,
            y_odd: c.v,
        })
        .collect();
    assert!(verify_batch(&items, &random));
    assert!(verify_batch(&items[..1], &random[..1]));
    assert!(verify_batch(&[], &[]));
    for bad in 0..items.len() {
        let mut tampered = items.clone();
        tampered[bad].z += Scalar::ONE;
        assert!(!verify_batch(&tampered, &random), "bad at {bad}");
        let mut flipped = items.clone();
        flipped[bad].y_odd = !flipped[bad].y_odd;
        assert!(!verify_batch(&flipped, &random), "flipped at {bad}");
    }
    // The same voucher many times (equal points meet in the buckets), and the same payer.
    let repeated: Vec<BatchItem<'_>> = (0..9).map(|_| items[0]).collect();
    assert!(verify_batch(&repeated, &[random[0]; 9]));
    assert!(verify_batch(&repeated, &random[..9]));
    // Adversarial randomizers (all ones, all zero) still check correctly.
    assert!(verify_batch(&items, &vec![u128::MAX; items.len()]));
    assert!(verify_batch(&items, &vec![0; items.len()]));
}

#[test]
fn table_sizes() {
    let c = signed_case();
    assert_eq!(c.table.bytes(), 64 * std::mem::size_of::<Affine>());
    assert!(KeyTable::size_bytes() >= c.table.bytes());
}

/// Point operations per signature on each path, averaged over random signatures (the figures
/// of docs/BENCHMARKS.md): `cargo test --lib operation_counts -- --nocapture`.
#[test]
fn operation_counts() {
    use super::count::{Counts, take};
    let cases: Vec<Case> = (0..64).map(|_| signed_case()).collect();
    let per = |c: Counts, n: u64| {
        let f = |v: u64| v as f64 / n as f64;
        // Field multiplications and squarings, inversions and square roots apart.
        let mults =
            11.0 * f(c.mixed_adds) + 7.0 * f(c.doublings) + 9.0 * f(c.affine_adds) + f(c.endo_muls);
        format!(
            "doublings {:.1}, mixed additions {:.1}, affine additions {:.1}, β-multiplications {:.1}, \
             field inversions {:.2}, scalar inversions {:.2}, square roots {:.2}, table points read {:.1}; \
             ≈ {mults:.0} field multiplications and squarings besides the inversions and roots",
            f(c.doublings),
            f(c.mixed_adds),
            f(c.affine_adds),
            f(c.endo_muls),
            f(c.field_inversions),
            f(c.scalar_inversions),
            f(c.sqrts),
            f(c.points_read),
        )
    };
    let _ = generator_table();
    take();
    for c in &cases {
        assert!(verify_with_table(&c.table, &c.z, &c.r, &c.s, c.v));
    }
    let warm = take();
    eprintln!("single, payer table: {}", per(warm, 64));
    assert!(warm.doublings <= 64 * 33);
    for c in &cases {
        assert!(verify(&c.key, &c.z, &c.r, &c.s, c.v));
    }
    eprintln!("single, key alone:   {}", per(take(), 64));
    for size in [8usize, 32, 64] {
        let items: Vec<BatchItem<'_>> = cases[..size]
            .iter()
            .map(|c| BatchItem {
                table: &c.table,
                z: c.z,
                r: c.r,
                s: c.s,
                y_odd: c.v,
            })
            .collect();
        let random: Vec<u128> = (0..size as u128)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834))
            .collect();
        take();
        assert!(verify_batch(&items, &random));
        eprintln!("batch of {size:>3}:        {}", per(take(), size as u64));
    }
}

#[test]
fn recovery_matches_k256() {
    use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};
    let (mut agreed, mut none) = (0, 0);
    for i in 0..300 {
        let z = random_scalar();
        let (r, s, y_odd) = if i % 2 == 0 {
            // A real signature by a random key.
            let key = k256::ecdsa::SigningKey::from_bytes(&random_scalar().to_bytes()).unwrap();
            let (sig, id) = key.sign_prehash_recoverable(&z.to_bytes()).unwrap();
            (*sig.r(), *sig.s(), id.is_y_odd())
        } else {
            // Random scalars: about half have no point at x = r.
            (random_scalar(), random_scalar(), i % 4 == 1)
        };
        let ours = recover(&z, &r, &s, y_odd);
        let sig = Signature::from_scalars(r, s).unwrap();
        let theirs =
            VerifyingKey::recover_from_prehash(&z.to_bytes(), &sig, RecoveryId::new(y_odd, false))
                .ok();
        match (ours, theirs) {
            (Some(q), Some(key)) => {
                assert_eq!(q, *key.as_affine(), "case {i}");
                agreed += 1;
            }
            // k256 refuses high-s (it verifies what it recovered, and its verify refuses high
            // s); the engine refuses high-s before it recovers. Otherwise both say none.
            (Some(_), None) => assert!(
                bool::from(k256::elliptic_curve::scalar::IsHigh::is_high(&s)),
                "case {i}: only ours recovered"
            ),
            (None, Some(_)) => panic!("case {i}: only k256 recovered"),
            (None, None) => none += 1,
        }
    }
    assert!(agreed >= 150 && none > 20, "{agreed} agreed, {none} none");
}
