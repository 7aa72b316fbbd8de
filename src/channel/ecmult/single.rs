//! One signature at a time: `u1·G + u2·Q` by interleaved width-w NAF (Strauss–Shamir) with one
//! shared chain of doublings, the generator's split table, and either the payer's split table
//! or, without one, a small table of `Q` built on the spot and the GLV split of `u2`.

use k256::Scalar;

use super::point::{Affine, Jacobian};
use super::scalar::{self, Signed128};
use super::table::SplitTable;
use super::{
    COLD_WINDOW, G_PIECES, G_SPACING, G_WINDOW, KEY_PIECES, KEY_SPACING, KEY_WINDOW,
    generator_table, r_field,
};

/// Digits of the longest term (a 128-bit GLV half, plus its carry position).
const MAX_DIGITS: usize = 129;

/// One scalar's recoding against one table.
pub(super) struct Term<'a> {
    points: &'a [Affine],
    /// The points are multiples of `λ·P`: use `(β·x, y)`.
    endo: bool,
    /// The whole term is negated.
    neg: bool,
    digits: [i8; MAX_DIGITS],
    len: usize,
}

impl<'a> Term<'a> {
    pub(super) fn new(
        points: &'a [Affine],
        endo: bool,
        neg: bool,
        value: u128,
        bits: u32,
        w: u32,
    ) -> Self {
        let mut digits = [0i8; MAX_DIGITS];
        let len = scalar::wnaf(value, bits, w, &mut digits);
        Self {
            points,
            endo,
            neg,
            digits,
            len,
        }
    }

    /// The point for digit `d` (non-zero).
    #[inline]
    pub(super) fn point(&self, d: i8) -> Affine {
        let p = self.points[usize::from(d.unsigned_abs() >> 1)];
        let p = if self.endo { p.endo() } else { p };
        if (d < 0) != self.neg { p.neg() } else { p }
    }

    /// The recoded digits.
    pub(super) fn digits(&self) -> &[i8] {
        &self.digits[..self.len]
    }
}

/// Terms of `u1·G` on the generator's split table.
pub(super) fn generator_terms<'a>(u1: &Scalar, terms: &mut Vec<Term<'a>>) {
    let table = generator_table();
    let limbs = scalar::to_limbs(u1);
    for i in 0..G_PIECES {
        let bit = i as u32 * G_SPACING;
        let piece = (limbs[(bit / 64) as usize] >> (bit % 64)) & ((1u64 << G_SPACING) - 1);
        terms.push(Term::new(
            table.piece(i),
            false,
            false,
            u128::from(piece),
            G_SPACING,
            G_WINDOW,
        ));
    }
}

/// Terms of `k·Q` for `k = k1 + k2·λ` on a payer's split table.
pub(super) fn key_terms<'a>(
    split: &[Signed128; 2],
    table: &'a SplitTable,
    terms: &mut Vec<Term<'a>>,
) {
    for (half, &(neg, magnitude)) in split.iter().enumerate() {
        for i in 0..KEY_PIECES {
            let piece = (magnitude >> (i as u32 * KEY_SPACING)) & ((1u128 << KEY_SPACING) - 1);
            terms.push(Term::new(
                table.piece(i),
                half == 1,
                neg,
                piece,
                KEY_SPACING,
                KEY_WINDOW,
            ));
        }
    }
}

/// `Σ terms` by one chain of doublings from the highest digit down.
pub(super) fn strauss(terms: &[Term<'_>]) -> Jacobian {
    let top = terms.iter().map(|t| t.len).max().unwrap_or(0);
    let mut acc = Jacobian::INFINITY;
    for pos in (0..top).rev() {
        acc = acc.double();
        for t in terms {
            if pos < t.len {
                let d = t.digits[pos];
                if d != 0 {
                    acc = acc.add_affine(&t.point(d));
                }
            }
        }
    }
    acc
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
    let u2 = *r * w;
    let split = scalar::glv_split(&u2)?;
    let cold;
    let mut terms = Vec::with_capacity(G_PIECES + 2 * KEY_PIECES);
    generator_terms(&u1, &mut terms);
    match table {
        Some(table) => key_terms(&split, table, &mut terms),
        None => {
            cold = SplitTable::build(key, 1, 0, COLD_WINDOW)?;
            for (half, &(neg, magnitude)) in split.iter().enumerate() {
                terms.push(Term::new(
                    cold.piece(0),
                    half == 1,
                    neg,
                    magnitude,
                    128,
                    COLD_WINDOW,
                ));
            }
        }
    }
    Some(accept(&strauss(&terms), r, y_odd))
}
