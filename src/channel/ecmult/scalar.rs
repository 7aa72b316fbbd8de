//! Scalars modulo the group order `n`: conversions to machine words, variable-time inversion,
//! the GLV split `k = k1 + k2·λ` with `|k1|, |k2| < 2^128`, and width-w NAF recoding.

use std::sync::LazyLock;

use k256::Scalar;
use k256::elliptic_curve::PrimeField;

use super::count::count;
use super::modinv;

/// Little-endian 64-bit limbs of a scalar.
pub(crate) fn to_limbs(s: &Scalar) -> [u64; 4] {
    let bytes = s.to_bytes();
    std::array::from_fn(|i| {
        u64::from_be_bytes(bytes[24 - 8 * i..32 - 8 * i].try_into().expect("8 bytes"))
    })
}

/// A scalar from limbs below `n`.
fn from_limbs(limbs: &[u64; 4]) -> Option<Scalar> {
    let mut bytes = [0u8; 32];
    for (i, limb) in limbs.iter().enumerate() {
        bytes[24 - 8 * i..32 - 8 * i].copy_from_slice(&limb.to_be_bytes());
    }
    Scalar::from_repr(bytes.into()).into()
}

/// `s⁻¹ mod n`, variable time; `None` for zero.
pub(crate) fn invert(s: &Scalar) -> Option<Scalar> {
    count!(scalar_inversions);
    match modinv::invert(&to_limbs(s), &modinv::ORDER) {
        Some(limbs) => from_limbs(&limbs),
        // Zero, or (never seen) the divsteps bound: the constant-time inversion decides.
        None => s.invert().into(),
    }
}

/// Inverts every scalar in place with one inversion (Montgomery's trick). Returns false, and
/// leaves `values` unspecified, if one of them is zero.
pub(crate) fn batch_invert(values: &mut [Scalar]) -> bool {
    let mut prefix = Vec::with_capacity(values.len());
    let mut acc = Scalar::ONE;
    for v in values.iter() {
        prefix.push(acc);
        acc *= v;
    }
    let Some(mut inv) = invert(&acc) else {
        return false;
    };
    for (v, before) in values.iter_mut().zip(prefix).rev() {
        let this = inv * before;
        inv *= *v;
        *v = this;
    }
    true
}

/// The constants of the GLV endomorphism `λ·(x, y) = (β·x, y)`.
pub(crate) struct Glv {
    /// `-λ mod n`.
    minus_lambda: Scalar,
    /// `λ`.
    pub(crate) lambda: Scalar,
    /// `-b1` and `-b2 mod n` of the short lattice basis.
    minus_b1: Scalar,
    minus_b2: Scalar,
    /// `round(2^384·b2 / n)` and `round(2^384·(-b1) / n)`.
    g1: [u64; 4],
    g2: [u64; 4],
}

fn scalar_hex(hex: &str) -> Scalar {
    let mut bytes = [0u8; 32];
    let digits = hex.as_bytes();
    let offset = 64 - digits.len();
    for (i, pair) in digits.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).expect("ascii");
        bytes[offset / 2 + i] = u8::from_str_radix(text, 16).expect("hex");
    }
    Option::from(Scalar::from_repr(bytes.into())).expect("below n")
}

/// The curve's GLV constants (the lattice basis of Hankerson, Menezes and Vanstone's algorithm
/// 3.74 for secp256k1's `λ`; the tests check every property they must have).
pub(crate) static GLV: LazyLock<Glv> = LazyLock::new(|| {
    let lambda = scalar_hex("5363ad4cc05c30e0a5261c028812645a122e22ea20816678df02967c1b23bd72");
    Glv {
        minus_lambda: -lambda,
        lambda,
        minus_b1: scalar_hex("e4437ed6010e88286f547fa90abfe4c3"),
        minus_b2: -scalar_hex("3086d221a7d46bcde86c90e49284eb15"),
        g1: to_limbs(&scalar_hex(
            "3086d221a7d46bcde86c90e49284eb153daa8a1471e8ca7fe893209a45dbb031",
        )),
        g2: to_limbs(&scalar_hex(
            "e4437ed6010e88286f547fa90abfe4c4221208ac9df506c61571b4ae8ac47f71",
        )),
    }
});

/// `round(k·g / 2^384)` for `k` below `n`; below 2^128 for the GLV constants.
fn mul_shift_384(k: &[u64; 4], g: &[u64; 4]) -> u128 {
    let mut product = [0u64; 8];
    for i in 0..4 {
        let mut carry = 0u128;
        for j in 0..4 {
            let t = u128::from(k[i]) * u128::from(g[j]) + u128::from(product[i + j]) + carry;
            product[i + j] = t as u64;
            carry = t >> 64;
        }
        product[i + 4] = carry as u64;
    }
    let high = u128::from(product[6]) | (u128::from(product[7]) << 64);
    high + u128::from(product[5] >> 63)
}

/// A scalar as a sign and a magnitude below 2^128, if it or its negation is that small.
fn signed_small(s: &Scalar) -> Option<(bool, u128)> {
    let limbs = to_limbs(s);
    if limbs[2] == 0 && limbs[3] == 0 {
        return Some((false, u128::from(limbs[0]) | (u128::from(limbs[1]) << 64)));
    }
    let neg = to_limbs(&-*s);
    (neg[2] == 0 && neg[3] == 0).then(|| (true, u128::from(neg[0]) | (u128::from(neg[1]) << 64)))
}

/// A signed magnitude: `(negative, |k|)`.
pub(crate) type Signed128 = (bool, u128);

/// `k = k1 + k2·λ (mod n)` with `|k1|, |k2| < 2^128` (proved in k256's `mul.rs`, checked by
/// the tests); `None` would mean the bound failed, and the caller then takes the constant-time
/// path.
pub(crate) fn glv_split(k: &Scalar) -> Option<[Signed128; 2]> {
    let glv = &*GLV;
    let limbs = to_limbs(k);
    let c1 = Scalar::from(mul_shift_384(&limbs, &glv.g1));
    let c2 = Scalar::from(mul_shift_384(&limbs, &glv.g2));
    let k2 = c1 * glv.minus_b1 + c2 * glv.minus_b2;
    let k1 = *k + k2 * glv.minus_lambda;
    Some([signed_small(&k1)?, signed_small(&k2)?])
}

/// Width-`w` NAF of `value` (below 2^`bits`, `bits <= 128`): `value = Σ d·2^pos` over the
/// `(pos, d)` given to `emit`, lowest first, every `d` odd with `|d| < 2^(w-1)`, each followed
/// by at least `w - 1` zero positions. Positions stop at `bits` (a carry can reach it, never
/// beyond).
pub(crate) fn wnaf_sparse(value: u128, bits: u32, w: u32, mut emit: impl FnMut(u32, i16)) {
    debug_assert!((2..=15).contains(&w) && bits <= 128);
    debug_assert!(bits == 128 || value >> bits == 0);
    let mask = (1u128 << w) - 1;
    let mut carry = 0u32;
    let mut bit = 0u32;
    while bit < bits {
        // Skip the run of bits equal to the carry (zeros, or ones under a carry) at once.
        let rest = value >> bit;
        let run = if carry == 0 {
            rest.trailing_zeros()
        } else {
            rest.trailing_ones()
        };
        if run > 0 {
            bit = (bit + run).min(bits);
            continue;
        }
        // carry + (value >> bit) is odd: take a signed digit off its low w bits.
        let word = ((value >> bit) & mask) as i32 + carry as i32;
        carry = ((word >> (w - 1)) & 1) as u32;
        emit(bit, (word - ((carry as i32) << w)) as i16);
        bit += w;
    }
    if carry != 0 {
        // Only when the last window ended exactly at `bits` or before it.
        debug_assert!(bit <= bits);
        emit(bit, 1);
    }
}

/// [`wnaf_sparse`] into `out[..=bits]`; returns the positions used (the highest non-zero
/// digit's position plus one, 0 for zero) and the number of non-zero digits.
#[cfg(test)]
pub(crate) fn wnaf(value: u128, bits: u32, w: u32, out: &mut [i16]) -> (usize, usize) {
    out[..=bits as usize].fill(0);
    let (mut used, mut nonzero) = (0, 0);
    wnaf_sparse(value, bits, w, |pos, d| {
        out[pos as usize] = d;
        used = pos as usize + 1;
        nonzero += 1;
    });
    (used, nonzero)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar_from_u128(neg: bool, m: u128) -> Scalar {
        let s = Scalar::from(m);
        if neg { -s } else { s }
    }

    fn wnaf_value(digits: &[i16]) -> Scalar {
        let mut power = Scalar::ONE;
        let mut sum = Scalar::ZERO;
        for &d in digits {
            let term = Scalar::from(u64::from(d.unsigned_abs())) * power;
            sum = if d < 0 { sum - term } else { sum + term };
            power = power + power;
        }
        sum
    }

    #[test]
    fn lambda_is_a_cube_root_of_one() {
        let l = GLV.lambda;
        assert_ne!(l, Scalar::ONE);
        assert_eq!(l * l * l, Scalar::ONE);
    }

    #[test]
    fn glv_splits_are_short_and_exact() {
        let mut cases: Vec<Scalar> = (0..2000).map(|_| super::super::random_scalar()).collect();
        cases.extend([
            Scalar::ZERO,
            Scalar::ONE,
            -Scalar::ONE,
            GLV.lambda,
            -GLV.lambda,
        ]);
        for k in cases {
            let [(n1, m1), (n2, m2)] = glv_split(&k).expect("short split");
            let k1 = scalar_from_u128(n1, m1);
            let k2 = scalar_from_u128(n2, m2);
            assert_eq!(k1 + k2 * GLV.lambda, k);
        }
    }

    #[test]
    fn wnaf_recodes_exactly() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for w in 2..=12 {
            for bits in [8u32, 32, 64, 127, 128] {
                for case in 0..500 {
                    let raw = (u128::from(next()) << 64) | u128::from(next());
                    let mask = if bits == 128 {
                        u128::MAX
                    } else {
                        (1u128 << bits) - 1
                    };
                    let value = mask
                        & match case {
                            0 => u128::MAX,
                            1 => 0,
                            2 => 1u128 << (bits - 1),
                            _ => raw,
                        };
                    let mut out = [0i16; 129];
                    let (used, nonzero) = wnaf(value, bits, w, &mut out);
                    assert!(used <= bits as usize + 1);
                    assert_eq!(nonzero, out.iter().filter(|&&d| d != 0).count());
                    assert_eq!(wnaf_value(&out[..used]), Scalar::from(value));
                    let mut last = None;
                    for (i, &d) in out.iter().enumerate() {
                        if d != 0 {
                            assert!(d % 2 != 0 && i32::from(d).abs() < 1 << (w - 1));
                            if let Some(j) = last {
                                assert!(i - j >= w as usize);
                            }
                            last = Some(i);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn batch_inverse_matches_single() {
        let mut values: Vec<Scalar> = (0..17).map(|_| super::super::random_scalar()).collect();
        let expected: Vec<Scalar> = values.iter().map(|v| v.invert().unwrap()).collect();
        assert!(batch_invert(&mut values));
        assert_eq!(values, expected);
        let mut with_zero = vec![Scalar::ONE, Scalar::ZERO];
        assert!(!batch_invert(&mut with_zero));
    }
}
