//! One signature at a time: `u1·G + u2·Q` by interleaved width-w NAF (Strauss–Shamir) with one
//! shared chain of doublings, the generator's split table, and either the payer's split table
//! or, without one, a small table of `Q` built on the spot and the GLV split of `u2`.

use k256::Scalar;

use super::count::count;
use super::point::{Affine, Jacobian};
use super::scalar::{self, Signed128};
use super::table::SplitTable;
use super::{
    COLD_WINDOW, G_PIECES, G_SPACING, G_WINDOW, KEY_PIECES, KEY_SPACING, KEY_WINDOW,
    generator_table, r_field,
};

/// A table some digits select from.
#[derive(Clone, Copy)]
struct Source<'a> {
    points: &'a [Affine],
    /// The points are multiples of `λ·P`: use `(β·x, y)`.
    endo: bool,
    /// The whole scalar is negated.
    neg: bool,
}

/// One non-zero digit: its bit position, its table, its value.
#[derive(Clone, Copy)]
struct Digit {
    pos: u8,
    source: u16,
    d: i16,
}

/// Scalars recoded in width-w NAF against their tables: the non-zero digits of all of them.
pub(super) struct Recoding<'a> {
    sources: Vec<Source<'a>>,
    digits: Vec<Digit>,
    /// One past the highest position used.
    top: usize,
}

impl<'a> Recoding<'a> {
    /// Room for `scalars` scalars of about `digits` non-zero digits in all.
    pub(super) fn with_capacity(scalars: usize, digits: usize) -> Self {
        Self {
            sources: Vec::with_capacity(scalars),
            digits: Vec::with_capacity(digits),
            top: 0,
        }
    }

    /// Adds `±value·P` (`λ·P` with `endo`) for `value` below 2^`bits`, on `points`, the odd
    /// multiples `1, 3, ..., 2^(w-1) - 1` of `P`.
    pub(super) fn push(
        &mut self,
        points: &'a [Affine],
        endo: bool,
        neg: bool,
        value: u128,
        bits: u32,
        w: u32,
    ) {
        debug_assert!(points.len() >= 1 << (w - 2));
        let source = u16::try_from(self.sources.len()).expect("fewer than 65,536 scalars");
        self.sources.push(Source { points, endo, neg });
        let (digits, top) = (&mut self.digits, &mut self.top);
        scalar::wnaf_sparse(value, bits, w, |pos, d| {
            digits.push(Digit {
                pos: pos as u8,
                source,
                d,
            });
            *top = (*top).max(pos as usize + 1);
        });
    }

    /// Prefetches the points the digits from the `from`-th on select (the generator's table is
    /// too big to stay in the core's cache beside thousands of payers' tables).
    pub(super) fn prefetch_from(&self, from: usize) {
        for digit in &self.digits[from..] {
            let source = &self.sources[usize::from(digit.source)];
            let i = usize::from(digit.d.unsigned_abs() >> 1);
            super::table::prefetch(&source.points[i..=i]);
        }
    }

    /// The point a digit selects.
    #[inline]
    fn point(&self, digit: &Digit) -> Affine {
        count!(points_read);
        let source = &self.sources[usize::from(digit.source)];
        let p = source.points[usize::from(digit.d.unsigned_abs() >> 1)];
        let p = if source.endo { p.endo() } else { p };
        if (digit.d < 0) != source.neg {
            p.neg()
        } else {
            p
        }
    }
}

/// The points the digits select, grouped by bit position, lowest first. Gathered before any
/// arithmetic, so the loads from tables (cache misses, with many payers) overlap instead of
/// stalling a chain of dependent additions one by one.
#[derive(Default)]
pub(super) struct Buckets {
    pub(super) points: Vec<Affine>,
    /// Position `p`'s points are `points[starts[p]..starts[p] + lens[p]]`.
    pub(super) starts: Vec<usize>,
    pub(super) lens: Vec<usize>,
}

impl Buckets {
    /// Gathers the points of `recoding` (a counting sort by position).
    pub(super) fn gather(&mut self, recoding: &Recoding<'_>) {
        let top = recoding.top;
        self.lens.clear();
        self.lens.resize(top, 0);
        for digit in &recoding.digits {
            self.lens[usize::from(digit.pos)] += 1;
        }
        self.starts.clear();
        self.starts.reserve(top);
        let mut at = 0;
        for len in &self.lens {
            self.starts.push(at);
            at += len;
        }
        self.points.clear();
        self.points.resize(at, Affine::PLACEHOLDER);
        let mut next = self.starts.clone();
        for digit in &recoding.digits {
            let slot = &mut next[usize::from(digit.pos)];
            self.points[*slot] = recoding.point(digit);
            *slot += 1;
        }
    }

    /// `Σ 2^p·(points of position p)` by one chain of doublings from the top.
    pub(super) fn horner(&self) -> Jacobian {
        let mut acc = Jacobian::INFINITY;
        for (start, len) in self.starts.iter().zip(&self.lens).rev() {
            acc = acc.double();
            for p in &self.points[*start..start + len] {
                acc = acc.add_affine(p);
            }
        }
        acc
    }
}

/// `u1·G` on the generator's split table.
pub(super) fn generator_terms(u1: &Scalar, recoding: &mut Recoding<'_>) {
    let table = generator_table();
    let limbs = scalar::to_limbs(u1);
    for i in 0..G_PIECES {
        let bit = i as u32 * G_SPACING;
        let piece = (limbs[(bit / 64) as usize] >> (bit % 64)) & ((1u64 << G_SPACING) - 1);
        recoding.push(
            table.piece(i),
            false,
            false,
            u128::from(piece),
            G_SPACING,
            G_WINDOW,
        );
    }
}

/// `k·Q` for `k = k1 + k2·λ` on a payer's split table.
pub(super) fn key_terms<'a>(
    split: &[Signed128; 2],
    table: &'a SplitTable,
    recoding: &mut Recoding<'a>,
) {
    for (half, &(neg, magnitude)) in split.iter().enumerate() {
        for i in 0..KEY_PIECES {
            let piece = (magnitude >> (i as u32 * KEY_SPACING)) & ((1u128 << KEY_SPACING) - 1);
            recoding.push(
                table.piece(i),
                half == 1,
                neg,
                piece,
                KEY_SPACING,
                KEY_WINDOW,
            );
        }
    }
}

/// The engine's acceptance of `R = u1·G + u2·Q`: not the identity, `x(R) = r` exactly (no
/// reduction modulo `n`), and the parity of `y(R)` is `v`.
pub(super) fn accept(point: &Jacobian, r: &Scalar, y_odd: bool) -> bool {
    if !point.has_x(&r_field(r)) {
        return false;
    }
    match point.to_affine() {
        Some(affine) => bool::from(affine.y.is_odd()) == y_odd,
        None => false,
    }
}

/// Checks one signature. `table` is the payer's split table when it has one. Returns `None`
/// when the GLV split failed its bound (never: the caller then takes the constant-time path).
pub(super) fn verify(
    key: &Affine,
    table: Option<&SplitTable>,
    z: &Scalar,
    r: &Scalar,
    s: &Scalar,
    y_odd: bool,
) -> Option<bool> {
    let Some(w) = scalar::invert(s) else {
        return Some(false);
    };
    let u1 = *z * w;
    let cold;
    let mut recoding = Recoding::with_capacity(G_PIECES + 2 * KEY_PIECES, 96);
    generator_terms(&u1, &mut recoding);
    // The generator's points load while u2 is split and recoded.
    recoding.prefetch_from(0);
    let u2 = *r * w;
    let split = scalar::glv_split(&u2)?;
    match table {
        Some(table) => key_terms(&split, table, &mut recoding),
        None => {
            cold = SplitTable::build(key, 1, 0, COLD_WINDOW)?;
            for (half, &(neg, magnitude)) in split.iter().enumerate() {
                recoding.push(cold.piece(0), half == 1, neg, magnitude, 128, COLD_WINDOW);
            }
        }
    }
    let mut buckets = Buckets::default();
    buckets.gather(&recoding);
    Some(accept(&buckets.horner(), r, y_odd))
}

/// The public key `Q = r⁻¹·(s·R − z·G)` that a signature `(r, s, v)` over `z` recovers, with `R`
/// the point of `x = r` whose `y` has the parity `v`: `u1·G + u2·R` for `u1 = −z/r`, `u2 = s/r`,
/// on the generator's table and a small table of `R` (the cold key's path with `R` as the key).
/// By construction `(z/s)·G + (r/s)·Q = R`, so the signature verifies under `Q`. `None` when no
/// point has `x = r`, when `Q` is the identity, or when the GLV split failed its bound (never:
/// the caller then takes the constant-time recovery, which tells the cases apart).
pub(super) fn recover(z: &Scalar, r: &Scalar, s: &Scalar, y_odd: bool) -> Option<Affine> {
    let big_r = Affine::lift(&r_field(r), y_odd)?;
    let w = scalar::invert(r)?;
    let u1 = -(*z * w);
    let u2 = *s * w;
    let cold = SplitTable::build(&big_r, 1, 0, COLD_WINDOW)?;
    let mut recoding = Recoding::with_capacity(G_PIECES + 2, 96);
    generator_terms(&u1, &mut recoding);
    recoding.prefetch_from(0);
    let split = scalar::glv_split(&u2)?;
    for (half, &(neg, magnitude)) in split.iter().enumerate() {
        recoding.push(cold.piece(0), half == 1, neg, magnitude, 128, COLD_WINDOW);
    }
    let mut buckets = Buckets::default();
    buckets.gather(&recoding);
    buckets.horner().to_affine()
}
