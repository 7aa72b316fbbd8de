//! Precomputed odd multiples: split tables for the generator (shared, built once) and for a
//! payer's key (built when the payer is seen again, kept in the key cache).
//!
//! A split table for a base `P` with `pieces` pieces `spacing` bits apart holds, for each piece
//! `i`, the odd multiples `1, 3, ..., 2^(w-1) - 1` of `2^(spacing·i)·P` in affine form. A
//! scalar below `2^(spacing·pieces)` is cut into `spacing`-bit pieces, each recoded in
//! width-`w` NAF against its own table, so the chain of doublings is `spacing + 1` long
//! instead of the scalar's length.

use super::point::{Affine, Jacobian, batch_to_affine};

/// Asks the CPU to bring `points` into its cache (a hint; a no-op off x86_64).
#[inline]
pub(crate) fn prefetch(points: &[Affine]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = points.as_ptr().cast::<u8>();
        let len = std::mem::size_of_val(points);
        // Every cache line the points touch, the last one included.
        for offset in (0..len).step_by(64).chain(len.checked_sub(1)) {
            // SAFETY: a prefetch is a hint that never faults and changes no memory (the
            // address is inside `points` anyway); its only requirement, SSE, is part of the
            // x86_64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = points;
}

/// Odd multiples of the pieces of a base point.
#[derive(Clone)]
pub(crate) struct SplitTable {
    points: Box<[Affine]>,
    per_piece: usize,
}

impl std::fmt::Debug for SplitTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitTable")
            .field("points", &self.points.len())
            .field("per_piece", &self.per_piece)
            .finish()
    }
}

impl SplitTable {
    /// Builds the table of `base` (`None` only if a multiple were the identity, which cannot
    /// happen for a point of prime order `n` and multiples below `n`).
    pub(crate) fn build(base: &Affine, pieces: usize, spacing: u32, w: u32) -> Option<Self> {
        let per_piece = 1usize << (w - 2);
        // Each piece's base 2^(spacing·i)·P and its double, made affine together.
        let mut bases = Vec::with_capacity(2 * pieces);
        let mut p = Jacobian::from_affine(base);
        for i in 0..pieces {
            bases.push(p);
            bases.push(p.double());
            if i + 1 < pieces {
                for _ in 0..spacing {
                    p = p.double();
                }
            }
        }
        let bases = batch_to_affine(&bases)?;
        let mut multiples = Vec::with_capacity(pieces * per_piece);
        for pair in bases.chunks_exact(2) {
            let (one, two) = (&pair[0], &pair[1]);
            let mut acc = Jacobian::from_affine(one);
            multiples.push(acc);
            for _ in 1..per_piece {
                acc = acc.add_affine(two);
                multiples.push(acc);
            }
        }
        Some(Self {
            points: batch_to_affine(&multiples)?.into_boxed_slice(),
            per_piece,
        })
    }

    /// The odd multiples of piece `i`.
    #[inline]
    pub(crate) fn piece(&self, i: usize) -> &[Affine] {
        &self.points[i * self.per_piece..(i + 1) * self.per_piece]
    }

    /// Asks the CPU to bring the table into its cache (a hint: it returns at once, and the
    /// loads overlap with the work the caller does next). With thousands of payers the tables
    /// are far beyond the caches, and a check that waited for each point in turn would stall
    /// some 60 times on memory.
    #[inline]
    pub(crate) fn prefetch(&self) {
        prefetch(&self.points);
    }

    /// Bytes held by the points.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of_val(&*self.points)
    }
}
