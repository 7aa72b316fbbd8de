//! Variable-time modular inversion by Bernstein and Yang's divsteps ("safegcd"), 62 steps at a
//! time on machine words, for the field prime `p` and the group order `n`.
//!
//! The state is `(delta, f, g)` with `f` odd, starting at `(1, modulus, x)`. One divstep is
//! - `delta > 0` and `g` odd: `(1 - delta, g, (g - f) / 2)`;
//! - `g` odd: `(1 + delta, f, (g + f) / 2)`;
//! - `g` even: `(1 + delta, f, g / 2)`.
//!
//! `g` reaches 0 after at most 741 divsteps for 256-bit inputs (their paper, theorem 11.2), and
//! then `f = ±gcd(modulus, x)`. The divsteps only look at the low bits of `f` and `g`, so 62 of
//! them are done on the low 62 bits alone, collected in a 2x2 matrix `T` (entries below 2^62 in
//! absolute value, scaled by 2^62), which is then applied to the full `f` and `g`, and to `d` and
//! `e` with `d·x ≡ f` and `e·x ≡ g (mod m)`, where the division by 2^62 is exact after adding the
//! right multiple of the modulus. At the end `x⁻¹ ≡ ±d`.
//!
//! Variable time: runs of zero bits are skipped at once and the loop ends as soon as `g` is 0.
//! Nothing secret is inverted here (see the module docs of `ecmult`).

/// The low 62 bits.
const M62: u64 = u64::MAX >> 2;

/// Safety bound on rounds of 62 divsteps: 741 divsteps need 12; past this bound the caller
/// falls back to constant-time inversion (it never happens; it keeps a bug from looping).
const MAX_ROUNDS: usize = 20;

/// A signed integer as five limbs of 62 bits, least significant first: limbs 0 to 3 are in
/// `[0, 2^62)`, limb 4 carries the sign.
type Signed62 = [i64; 5];

/// An odd modulus below 2^256 and its inverse modulo 2^62.
#[derive(Debug)]
pub(crate) struct Modulus {
    m: Signed62,
    m_inv62: u64,
}

impl Modulus {
    /// `limbs` is the modulus, little-endian 64-bit limbs; it must be odd.
    pub(crate) const fn new(limbs: [u64; 4]) -> Self {
        // Newton's iteration for the inverse modulo 2^64: each step doubles the correct bits,
        // and an odd m is its own inverse modulo 8.
        let m0 = limbs[0];
        let mut inv = m0;
        let mut i = 0;
        while i < 5 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(m0.wrapping_mul(inv)));
            i += 1;
        }
        Self {
            m: to_signed62(&limbs),
            m_inv62: inv & M62,
        }
    }
}

/// The field prime `p = 2^256 - 2^32 - 977`.
pub(crate) const FIELD: Modulus = Modulus::new([
    0xFFFF_FFFE_FFFF_FC2F,
    0xFFFF_FFFF_FFFF_FFFF,
    0xFFFF_FFFF_FFFF_FFFF,
    0xFFFF_FFFF_FFFF_FFFF,
]);

/// The group order `n`.
pub(crate) const ORDER: Modulus = Modulus::new([
    0xBFD2_5E8C_D036_4141,
    0xBAAE_DCE6_AF48_A03B,
    0xFFFF_FFFF_FFFF_FFFE,
    0xFFFF_FFFF_FFFF_FFFF,
]);

const fn to_signed62(a: &[u64; 4]) -> Signed62 {
    [
        (a[0] & M62) as i64,
        (((a[0] >> 62) | (a[1] << 2)) & M62) as i64,
        (((a[1] >> 60) | (a[2] << 4)) & M62) as i64,
        (((a[2] >> 58) | (a[3] << 6)) & M62) as i64,
        (a[3] >> 56) as i64,
    ]
}

/// A non-negative value below 2^256 in canonical signed-62 form back to 64-bit limbs.
fn from_signed62(a: &Signed62) -> [u64; 4] {
    let l = a.map(|x| x as u64);
    [
        l[0] | (l[1] << 62),
        (l[1] >> 2) | (l[2] << 60),
        (l[2] >> 4) | (l[3] << 58),
        (l[3] >> 6) | (l[4] << 56),
    ]
}

/// The transition matrix of 62 divsteps: `2^62·(f', g') = (u·f + v·g, q·f + r·g)`.
#[derive(Clone, Copy)]
struct Matrix {
    u: i64,
    v: i64,
    q: i64,
    r: i64,
}

/// 62 divsteps on the low bits of `f` and `g` (`f` odd), from `delta`. Returns the new delta.
fn divsteps_62(mut delta: i64, f0: u64, g0: u64, t: &mut Matrix) -> i64 {
    let (mut u, mut v, mut q, mut r) = (1i64, 0i64, 0i64, 1i64);
    let (mut f, mut g) = (f0, g0);
    let mut left = 62u32;
    loop {
        // Halving steps, all the zero bits at once (a zero g gives 64: capped by what is left).
        let zeros = g.trailing_zeros().min(left);
        g >>= zeros;
        u <<= zeros;
        v <<= zeros;
        delta += i64::from(zeros);
        left -= zeros;
        if left == 0 {
            break;
        }
        // g is odd: the first half of an odd divstep; the halving comes round the loop (the
        // new g is even).
        if delta > 0 {
            let (nf, ng) = (g, g.wrapping_sub(f));
            let (nu, nv, nq, nr) = (q, r, q - u, r - v);
            (f, g, u, v, q, r) = (nf, ng, nu, nv, nq, nr);
            delta = -delta;
        } else {
            g = g.wrapping_add(f);
            q += u;
            r += v;
        }
    }
    *t = Matrix { u, v, q, r };
    delta
}

/// `(f, g) = T·(f, g) / 2^62`, exact.
fn update_fg(f: &mut Signed62, g: &mut Signed62, t: &Matrix) {
    let (u, v, q, r) = (
        i128::from(t.u),
        i128::from(t.v),
        i128::from(t.q),
        i128::from(t.r),
    );
    let mut cf = u * i128::from(f[0]) + v * i128::from(g[0]);
    let mut cg = q * i128::from(f[0]) + r * i128::from(g[0]);
    debug_assert!(cf as u64 & M62 == 0 && cg as u64 & M62 == 0);
    cf >>= 62;
    cg >>= 62;
    for i in 1..5 {
        cf += u * i128::from(f[i]) + v * i128::from(g[i]);
        cg += q * i128::from(f[i]) + r * i128::from(g[i]);
        f[i - 1] = (cf as u64 & M62) as i64;
        g[i - 1] = (cg as u64 & M62) as i64;
        cf >>= 62;
        cg >>= 62;
    }
    f[4] = cf as i64;
    g[4] = cg as i64;
}

/// `(d, e) = T·(d, e) / 2^62 mod m`, with `d` and `e` kept in `[0, m)`.
fn update_de(d: &mut Signed62, e: &mut Signed62, t: &Matrix, modulus: &Modulus) {
    let m = &modulus.m;
    // The multiples of m that make the low 62 bits of each sum zero.
    let low_d = (t.u as u64)
        .wrapping_mul(d[0] as u64)
        .wrapping_add((t.v as u64).wrapping_mul(e[0] as u64));
    let low_e = (t.q as u64)
        .wrapping_mul(d[0] as u64)
        .wrapping_add((t.r as u64).wrapping_mul(e[0] as u64));
    let md = i128::from((low_d.wrapping_mul(modulus.m_inv62).wrapping_neg() & M62) as i64);
    let me = i128::from((low_e.wrapping_mul(modulus.m_inv62).wrapping_neg() & M62) as i64);
    let (u, v, q, r) = (
        i128::from(t.u),
        i128::from(t.v),
        i128::from(t.q),
        i128::from(t.r),
    );
    let mut cd = u * i128::from(d[0]) + v * i128::from(e[0]) + md * i128::from(m[0]);
    let mut ce = q * i128::from(d[0]) + r * i128::from(e[0]) + me * i128::from(m[0]);
    debug_assert!(cd as u64 & M62 == 0 && ce as u64 & M62 == 0);
    cd >>= 62;
    ce >>= 62;
    for i in 1..5 {
        cd += u * i128::from(d[i]) + v * i128::from(e[i]) + md * i128::from(m[i]);
        ce += q * i128::from(d[i]) + r * i128::from(e[i]) + me * i128::from(m[i]);
        d[i - 1] = (cd as u64 & M62) as i64;
        e[i - 1] = (ce as u64 & M62) as i64;
        cd >>= 62;
        ce >>= 62;
    }
    d[4] = cd as i64;
    e[4] = ce as i64;
    // |u| + |v| <= 2^62 and d, e, md < 2^62-scaled bounds put the results in (-m, 2m).
    reduce_once(d, m);
    reduce_once(e, m);
}

/// `a + sign·m`, in canonical form.
fn add_multiple(a: &mut Signed62, m: &Signed62, sign: i64) {
    let mut carry: i64 = 0;
    for i in 0..4 {
        let x = a[i] + sign * m[i] + carry;
        a[i] = x & M62 as i64;
        carry = x >> 62;
    }
    a[4] += sign * m[4] + carry;
}

/// Brings a value in `(-m, 2m)` into `[0, m)`.
fn reduce_once(a: &mut Signed62, m: &Signed62) {
    if a[4] < 0 {
        add_multiple(a, m, 1);
    } else {
        let mut b = *a;
        add_multiple(&mut b, m, -1);
        if b[4] >= 0 {
            *a = b;
        }
    }
}

/// `x⁻¹ mod m` for `x` in `[0, m)`, or `None` when `x` is 0 (or, never in practice, when the
/// divsteps did not finish within the safety bound: the caller then uses a constant-time
/// inversion).
pub(crate) fn invert(x: &[u64; 4], modulus: &Modulus) -> Option<[u64; 4]> {
    let mut f = modulus.m;
    let mut g = to_signed62(x);
    let mut d: Signed62 = [0; 5];
    let mut e: Signed62 = [1, 0, 0, 0, 0];
    let mut delta = 1i64;
    let mut t = Matrix {
        u: 1,
        v: 0,
        q: 0,
        r: 1,
    };
    let mut rounds = 0;
    while g != [0; 5] {
        if rounds == MAX_ROUNDS {
            return None;
        }
        rounds += 1;
        delta = divsteps_62(delta, f[0] as u64, g[0] as u64, &mut t);
        update_de(&mut d, &mut e, &t, modulus);
        update_fg(&mut f, &mut g, &t);
    }
    const MINUS_ONE: Signed62 = [M62 as i64, M62 as i64, M62 as i64, M62 as i64, -1];
    if f == [1, 0, 0, 0, 0] {
        Some(from_signed62(&d))
    } else if f == MINUS_ONE {
        // x⁻¹ = -d; d is not 0 since x is invertible.
        let mut neg = modulus.m;
        add_multiple(&mut neg, &d, -1);
        Some(from_signed62(&neg))
    } else {
        // gcd > 1: only x = 0 for a prime modulus.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_constants() {
        for m in [&FIELD, &ORDER] {
            assert_eq!((m.m[0] as u64).wrapping_mul(m.m_inv62) & M62, 1);
        }
    }

    #[test]
    fn signed62_round_trip() {
        let a = [u64::MAX, 0x1234_5678_9abc_def0, 1 << 63, u64::MAX - 5];
        assert_eq!(from_signed62(&to_signed62(&a)), a);
    }

    #[test]
    fn small_inverses() {
        // 1 and m - 1 are their own inverses; 2⁻¹ = (m + 1) / 2.
        for (m, limbs) in [
            (
                &FIELD,
                [0xFFFF_FFFE_FFFF_FC2Fu64, u64::MAX, u64::MAX, u64::MAX],
            ),
            (
                &ORDER,
                [
                    0xBFD2_5E8C_D036_4141,
                    0xBAAE_DCE6_AF48_A03B,
                    0xFFFF_FFFF_FFFF_FFFE,
                    0xFFFF_FFFF_FFFF_FFFF,
                ],
            ),
        ] {
            assert_eq!(invert(&[1, 0, 0, 0], m), Some([1, 0, 0, 0]));
            let mut minus_one = limbs;
            minus_one[0] -= 1;
            assert_eq!(invert(&minus_one, m), Some(minus_one));
            let half = [
                (limbs[0] >> 1) | (limbs[1] << 63),
                (limbs[1] >> 1) | (limbs[2] << 63),
                (limbs[2] >> 1) | (limbs[3] << 63),
                limbs[3] >> 1,
            ];
            let mut half_plus_one = half;
            half_plus_one[0] += 1;
            assert_eq!(invert(&[2, 0, 0, 0], m), Some(half_plus_one));
            assert_eq!(invert(&[0, 0, 0, 0], m), None);
        }
    }
}
