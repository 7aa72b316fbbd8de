//! Operation counts, in test builds only (release code compiles the counting away): what each
//! path costs in point operations and field inversions, for `docs/BENCHMARKS.md`
//! (`cargo test --lib operation_counts -- --nocapture`).

#[cfg(test)]
use std::cell::Cell;

/// Operations counted on this thread.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Jacobian doublings (3M + 4S).
    pub(crate) doublings: u64,
    /// Jacobian + affine additions (8M + 3S).
    pub(crate) mixed_adds: u64,
    /// Affine additions with a shared inversion (2M + 1S, plus 3M for their share of it).
    pub(crate) affine_adds: u64,
    /// Multiplications by β for points of `λ·P` (1M).
    pub(crate) endo_muls: u64,
    /// Field inversions (variable time).
    pub(crate) field_inversions: u64,
    /// Scalar inversions (variable time).
    pub(crate) scalar_inversions: u64,
    /// Square roots (253S + 13M).
    pub(crate) sqrts: u64,
    /// Table points read.
    pub(crate) points_read: u64,
}

#[cfg(test)]
thread_local! {
    static COUNTS: Cell<Counts> = Cell::new(Counts::default());
}

/// Adds one to a counter (test builds).
#[cfg(test)]
pub(crate) fn bump(f: impl FnOnce(&mut Counts)) {
    COUNTS.with(|c| {
        let mut counts = c.get();
        f(&mut counts);
        c.set(counts);
    });
}

/// Takes this thread's counts and resets them.
#[cfg(test)]
pub(crate) fn take() -> Counts {
    COUNTS.with(|c| c.replace(Counts::default()))
}

/// `count!(field)`: one more of an operation, in test builds; nothing otherwise.
macro_rules! count {
    ($field:ident) => {
        #[cfg(test)]
        $crate::channel::ecmult::count::bump(|c| c.$field += 1);
    };
}
pub(crate) use count;
