//! Many signatures at once: with `v` known, each `R` is recovered from `r`, and one randomized
//! equation checks them all:
//!
//! ```text
//! Σ aᵢ·(u1ᵢ·G + u2ᵢ·Qᵢ − Rᵢ) = 0,   aᵢ = a1ᵢ + a2ᵢ·λ,  a1ᵢ odd, a1ᵢ and a2ᵢ below 2^64
//! ```
//!
//! If every signature is good each bracket is 0. If one is bad its bracket `D` is not 0 and,
//! the group having prime order, the sum is 0 for exactly one value of its `a` given the
//! others: `(a1, a2) ↦ a1 + a2·λ mod n` is one-to-one on `[0, 2^64)²` (two pairs with the same
//! image would give a non-zero lattice vector `(x, y)`, `x + y·λ ≡ 0`, shorter than 2^64,
//! while the shortest is about 2^128 long), so with `a1` odd and random the chance a bad batch
//! passes is at most 2^-127. Splitting `a` this way puts 64-bit scalars on `R` and `λ·R`
//! (`(β·x, y)`, free), the cheap side, since `R` has no precomputed table.
//!
//! The sum is one multi-scalar multiplication: the generator's coefficient `Σ aᵢ·u1ᵢ` on its
//! split table, each payer's `Σ aᵢ·u2ᵢ` (payers with several vouchers in the batch are summed
//! first) on the payer's split table, and `-aᵢ` on odd multiples of `Rᵢ` built here. Every point
//! a digit selects is dropped into its bit position's bucket; the buckets are summed in affine
//! coordinates as trees, pairs first, one shared inversion for each layer of every tree at once
//! (an affine addition is then about 5M + 1S instead of 8M + 3S); a last chain of doublings
//! adds the buckets up, highest position first.

use k256::FieldElement as Fe;
use k256::Scalar;

use super::count::count;
use super::point::{Affine, fe_batch_invert};
use super::scalar::{self, GLV};
use super::single::{Buckets, Recoding, generator_terms, key_terms};
use super::table::SplitTable;
use super::{R_WINDOW, r_field};

/// One signature of a batch, scalars already range-checked (`r`, `s` in `[1, n)`).
pub(super) struct Entry<'a> {
    /// The payer's split table.
    pub(super) table: &'a SplitTable,
    /// The digest as a scalar.
    pub(super) z: Scalar,
    /// The signature.
    pub(super) r: Scalar,
    /// The signature.
    pub(super) s: Scalar,
    /// `v`: the parity of `y(R)`.
    pub(super) y_odd: bool,
}

/// Bits of each half of a randomizer.
const RANDOMIZER_BITS: u32 = 64;

/// Checks a batch. `randomizers` holds one 128-bit value from a CSPRNG per entry. `None` if
/// the GLV split failed its bound (never; the caller checks one at a time then). `false` also
/// covers an `r` with no point (such a signature fails alone too).
pub(super) fn verify(entries: &[Entry<'_>], randomizers: &[u128]) -> Option<bool> {
    assert_eq!(entries.len(), randomizers.len(), "one randomizer per entry");
    let n = entries.len();
    if n == 0 {
        return Some(true);
    }
    // Rᵢ from rᵢ and vᵢ (a square root each: the time the payers' tables take to load, each
    // asked for two entries ahead).
    const AHEAD: usize = 2;
    for e in entries.iter().take(AHEAD) {
        e.table.prefetch();
    }
    let mut rs = Vec::with_capacity(n);
    for (i, e) in entries.iter().enumerate() {
        if let Some(later) = entries.get(i + AHEAD) {
            later.table.prefetch();
        }
        match Affine::lift(&r_field(&e.r), e.y_odd) {
            Some(point) => rs.push(point),
            None => return Some(false),
        }
    }
    // wᵢ = sᵢ⁻¹ with one inversion.
    let mut ws: Vec<Scalar> = entries.iter().map(|e| e.s).collect();
    if !scalar::batch_invert(&mut ws) {
        return Some(false);
    }
    // Odd multiples of each Rᵢ.
    let r_tables = odd_multiples(&rs)?;
    let per = 1usize << (R_WINDOW - 2);

    // Payers with several entries are summed first: order entries by table.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_unstable_by_key(|&i| std::ptr::from_ref(entries[i].table) as usize);

    let lambda = GLV.lambda;
    let mut g_coefficient = Scalar::ZERO;
    let mut terms = Recoding::with_capacity(2 * n + 8 * n + 8, 64 * n + 32);
    let mut current: Option<(&SplitTable, Scalar)> = None;
    for &i in &order {
        let e = &entries[i];
        let a1 = (randomizers[i] as u64) | 1;
        let a2 = (randomizers[i] >> 64) as u64;
        let a = Scalar::from(a1) + Scalar::from(a2) * lambda;
        let aw = a * ws[i];
        g_coefficient += aw * e.z;
        let q_coefficient = aw * e.r;
        current = match current {
            Some((table, sum)) if std::ptr::eq(table, e.table) => {
                Some((table, sum + q_coefficient))
            }
            Some((table, sum)) => {
                key_terms(&scalar::glv_split(&sum)?, table, &mut terms);
                Some((e.table, q_coefficient))
            }
            None => Some((e.table, q_coefficient)),
        };
        let points = &r_tables[i * per..(i + 1) * per];
        terms.push(
            points,
            false,
            true,
            u128::from(a1),
            RANDOMIZER_BITS,
            R_WINDOW,
        );
        terms.push(
            points,
            true,
            true,
            u128::from(a2),
            RANDOMIZER_BITS,
            R_WINDOW,
        );
    }
    if let Some((table, sum)) = current {
        key_terms(&scalar::glv_split(&sum)?, table, &mut terms);
    }
    generator_terms(&g_coefficient, &mut terms);

    let mut buckets = Buckets::default();
    buckets.gather(&terms);
    sum_buckets(&mut buckets)?;
    Some(buckets.horner().is_infinity())
}

/// The odd multiples `1, 3, ..., 2^(R_WINDOW-1) - 1` of each point, affine, `per` per point,
/// built side by side so each step shares one inversion. `None` if a step met equal x
/// coordinates (impossible for a point of prime order and these small multiples).
fn odd_multiples(points: &[Affine]) -> Option<Vec<Affine>> {
    let n = points.len();
    let per = 1usize << (R_WINDOW - 2);
    let mut scratch = Vec::with_capacity(n);
    // 2P: λ = 3x² / 2y.
    let mut denominators: Vec<Fe> = points.iter().map(|p| p.y.double()).collect();
    if !fe_batch_invert(&mut denominators, &mut scratch) {
        return None;
    }
    let doubles: Vec<Affine> = points
        .iter()
        .zip(&denominators)
        .map(|(p, inv)| {
            let l = p.x.square().mul_single(3) * inv;
            affine_from_slope(&l, p, &p.x)
        })
        .collect();
    let mut table = vec![points[0]; n * per];
    for (i, p) in points.iter().enumerate() {
        table[i * per] = *p;
    }
    for j in 1..per {
        for i in 0..n {
            let prev = &table[i * per + j - 1];
            denominators[i] = doubles[i].x + &prev.x.negate(1);
        }
        if !fe_batch_invert(&mut denominators, &mut scratch) {
            return None;
        }
        for i in 0..n {
            let prev = table[i * per + j - 1];
            let d = &doubles[i];
            let l = (d.y + &prev.y.negate(1)) * &denominators[i];
            table[i * per + j] = affine_from_slope(&l, &prev, &d.x);
        }
    }
    Some(table)
}

/// `P + Q` from the slope `l` of the line through them: `x3 = l² - x_P - x_Q`,
/// `y3 = l·(x_P - x3) - y_P`.
#[inline]
fn affine_from_slope(l: &Fe, p: &Affine, other_x: &Fe) -> Affine {
    count!(affine_adds);
    let x3 = (l.square() + &p.x.negate(1) + &other_x.negate(1)).normalize_weak();
    let y3 = (*l * &(p.x + &x3.negate(1)) + &p.y.negate(2)).normalize_weak();
    Affine { x: x3, y: y3 }
}

/// What a pair of a bucket's points adds up to.
#[derive(Clone, Copy)]
enum Pair {
    /// Distinct x: the denominator is `x_Q - x_P`.
    Add,
    /// The same point: the denominator is `2·y_P`.
    Double,
    /// `Q = -P`: nothing.
    Cancel,
}

/// Sums each bucket to at most one point, layer by layer, one inversion per layer. `None`
/// never happens for points of the curve (a zero denominator is ruled out before inverting).
fn sum_buckets(buckets: &mut Buckets) -> Option<()> {
    let mut denominators: Vec<Fe> = Vec::new();
    let mut kinds: Vec<Pair> = Vec::new();
    let mut scratch = Vec::new();
    let Buckets {
        points,
        starts,
        lens,
    } = buckets;
    loop {
        denominators.clear();
        kinds.clear();
        for (start, len) in starts.iter().zip(lens.iter()) {
            for pair in points[*start..start + len].chunks_exact(2) {
                let (p, q) = (&pair[0], &pair[1]);
                let dx = q.x + &p.x.negate(1);
                if !bool::from(dx.normalizes_to_zero()) {
                    kinds.push(Pair::Add);
                    denominators.push(dx);
                } else if bool::from((p.y + &q.y).normalizes_to_zero()) {
                    kinds.push(Pair::Cancel);
                } else {
                    kinds.push(Pair::Double);
                    denominators.push(p.y.double());
                }
            }
        }
        if kinds.is_empty() {
            return Some(());
        }
        if !fe_batch_invert(&mut denominators, &mut scratch) {
            return None;
        }
        let mut kind = kinds.iter();
        let mut inverse = denominators.iter();
        for (start, len) in starts.iter().zip(lens.iter_mut()) {
            if *len < 2 {
                continue;
            }
            let bucket = &mut points[*start..*start + *len];
            let mut out = 0;
            for k in (0..bucket.len() - 1).step_by(2) {
                let (p, q) = (bucket[k], bucket[k + 1]);
                let sum = match kind.next()? {
                    Pair::Add => {
                        let l = (q.y + &p.y.negate(1)) * inverse.next()?;
                        affine_from_slope(&l, &p, &q.x)
                    }
                    Pair::Double => {
                        let l = p.x.square().mul_single(3) * inverse.next()?;
                        affine_from_slope(&l, &p, &p.x)
                    }
                    Pair::Cancel => continue,
                };
                bucket[out] = sum;
                out += 1;
            }
            if bucket.len() % 2 == 1 {
                bucket[out] = bucket[bucket.len() - 1];
                out += 1;
            }
            *len = out;
        }
    }
}
