//! Fast, variable-time ECDSA verification over secp256k1 for voucher checks, on k256's field
//! and scalar types.
//!
//! # Variable time, and why that is safe here
//!
//! Everything in this module branches and indexes tables on the values it computes with: its
//! time depends on the signature, the digest and the key. That is what makes it fast (no masked
//! table scans, no dummy additions, inversions that stop early), and it is safe because a
//! voucher check handles no secret: the digest is computed from the public channel state, the
//! signature travels in the clear and ends up on-chain, and the payer's public key is recovered
//! from such signatures. A timing observer learns nothing it does not already have. Signing
//! (`signature::sign_digest`, the payer's private key) never comes here: it stays on k256's
//! constant-time code.
//!
//! # What is computed
//!
//! For a signature `(r, s, v)` over the digest `z` by the key `Q`: `u1 = z/s`, `u2 = r/s`,
//! `R = u1·G + u2·Q`, accepted iff `R` is not the identity, `x(R) = r` exactly and the parity
//! of `y(R)` is `v` (the rules of `signature`, which also range-checks `r` and `s`).
//!
//! - [`verify`]: the key alone. `u2` is split by the GLV endomorphism (`λ·(x, y) = (β·x, y)`)
//!   into two 128-bit halves on odd multiples of `Q` built on the spot; `u1` goes to the
//!   generator's split table (eight 32-bit pieces, shared by every check).
//! - [`verify_with_table`]: with the payer's [`KeyTable`] (odd multiples of `2^(32i)·Q`,
//!   `i < 4`), the GLV halves are cut in 32-bit pieces too, so the chain of doublings is 33 long
//!   instead of 129.
//! - [`verify_batch`]: many signatures with one randomized equation (see `batch.rs`).
//!
//! Every path gives the same answer as k256's constant-time check (`tests/verify_exact.rs`
//! compares them on millions of cases, and the fuzz target against libsecp256k1). Where a
//! bound this code relies on would fail (it cannot: proved for the GLV split, the divsteps
//! count), the constant-time computation answers instead.

// Products are written `a * &b`: k256 marks its by-reference multiplication
// `#[inline(always)]` (the whole 5x52 product is inlined here), the by-value one is a call.
#![allow(clippy::op_ref, clippy::assign_op_pattern)]

mod batch;
mod count;
mod modinv;
mod point;
mod scalar;
mod single;
mod table;

use std::sync::LazyLock;

use k256::elliptic_curve::ops::LinearCombination;
use k256::elliptic_curve::point::AffineCoordinates;
use k256::{AffinePoint, FieldElement, ProjectivePoint, Scalar};

use point::Affine;
use table::SplitTable;

/// Pieces of the generator's split table: eight 32-bit pieces cover a 256-bit `u1`.
const G_PIECES: usize = 8;
/// Bits between the generator table's pieces.
const G_SPACING: u32 = 32;
/// NAF width on the generator: 2^(w-2) odd multiples per piece. 10 gives 256 per piece, 8
/// pieces of 80-byte points: 160 KiB shared by every check (in the core's L2 beside the
/// payers' tables; a check reads only the few dozen points its digits select).
const G_WINDOW: u32 = 10;

/// Pieces of a payer's table: four 32-bit pieces of each 128-bit GLV half.
pub(crate) const KEY_PIECES: usize = 4;
/// Bits between a payer table's pieces.
pub(crate) const KEY_SPACING: u32 = 32;
/// NAF width on a payer's table: 16 odd multiples per piece, 64 points, 5 KiB per payer.
pub(crate) const KEY_WINDOW: u32 = 6;

/// NAF width on a key without a table (8 odd multiples of `Q`, built for the one check).
const COLD_WINDOW: u32 = 5;

/// NAF width on each `R` of a batch (8 odd multiples, built for the batch).
const R_WINDOW: u32 = 5;

/// The generator's split table, built on first use (a few milliseconds).
fn generator_table() -> &'static SplitTable {
    static TABLE: LazyLock<SplitTable> = LazyLock::new(|| {
        SplitTable::build(&Affine::generator(), G_PIECES, G_SPACING, G_WINDOW)
            .expect("multiples of the generator are not the identity")
    });
    &TABLE
}

/// Builds the generator's table now rather than on the first check (servers call this at start
/// so no voucher pays for it).
pub fn warm_up() {
    let _ = generator_table();
}

/// `r` (below `n`, hence below `p`) as a field element.
fn r_field(r: &Scalar) -> FieldElement {
    Option::from(FieldElement::from_bytes(&r.to_bytes())).expect("r < n < p")
}

/// A payer's public key in the form the fast paths use.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    point: Affine,
    k256: AffinePoint,
}

impl Key {
    /// The key; `None` for the identity (not a public key).
    pub fn new(key: &AffinePoint) -> Option<Self> {
        Some(Self {
            point: Affine::from_k256(key)?,
            k256: *key,
        })
    }

    /// k256's form of the key.
    pub fn as_affine(&self) -> &AffinePoint {
        &self.k256
    }
}

/// A payer's precomputed table: the odd multiples `1, 3, ..., 31` of `2^(32i)·Q` for `i < 4`,
/// in affine form (the multiples of `λ·2^(32i)·Q` are read off them as `(β·x, y)`).
///
/// 64 points of 80 bytes: 5 KiB. Building one costs 96 doublings, 60 additions and two batched
/// inversions (about half of one check without it); `docs/BENCHMARKS.md` has the figures.
#[derive(Clone, Debug)]
pub struct KeyTable {
    key: Key,
    table: SplitTable,
}

impl KeyTable {
    /// Builds the table of `key`.
    pub fn new(key: &Key) -> Self {
        Self {
            key: *key,
            table: SplitTable::build(&key.point, KEY_PIECES, KEY_SPACING, KEY_WINDOW)
                .expect("small multiples of a point of prime order are not the identity"),
        }
    }

    /// The key the table is for.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Bytes of precomputed points.
    pub fn bytes(&self) -> usize {
        self.table.bytes()
    }

    /// Bytes a table takes, points and bookkeeping, for sizing caches.
    pub fn size_bytes() -> usize {
        std::mem::size_of::<Self>()
            + KEY_PIECES * (1 << (KEY_WINDOW - 2)) * std::mem::size_of::<Affine>()
    }
}

/// The constant-time computation (k256's `lincomb`), for the never-taken branches.
fn constant_time(key: &AffinePoint, z: &Scalar, r: &Scalar, s: &Scalar, y_odd: bool) -> bool {
    let Some(w) = Option::<Scalar>::from(s.invert()) else {
        return false;
    };
    let point = ProjectivePoint::lincomb(
        &ProjectivePoint::GENERATOR,
        &(*z * w),
        &ProjectivePoint::from(*key),
        &(*r * w),
    )
    .to_affine();
    point.x() == r.to_bytes() && bool::from(point.y_is_odd()) == y_odd
}

/// Checks a signature against a key: `R = (z/s)·G + (r/s)·Q` is not the identity, `x(R) = r`
/// and `y(R)` is odd iff `y_odd`. `r` and `s` must be non-zero (the caller range-checks them,
/// with the low-s rule).
pub fn verify(key: &Key, z: &Scalar, r: &Scalar, s: &Scalar, y_odd: bool) -> bool {
    single::verify(&key.point, None, z, r, s, y_odd)
        .unwrap_or_else(|| constant_time(&key.k256, z, r, s, y_odd))
}

/// The public key a signature recovers (see the module docs for why variable time is safe
/// here: the signature, the message and the key are all public), or `None` when the fast path
/// cannot say: the caller then recovers with k256's constant-time code, which gives the same
/// key or the reason there is none. `r` and `s` must be non-zero (the caller range-checks them,
/// with the low-s rule).
pub fn recover(z: &Scalar, r: &Scalar, s: &Scalar, y_odd: bool) -> Option<AffinePoint> {
    let q = single::recover(z, r, s, y_odd)?;
    let (x, y) = (q.x.normalize().to_bytes(), q.y.normalize().to_bytes());
    let encoded = k256::EncodedPoint::from_affine_coordinates(&x, &y, false);
    Option::from(<AffinePoint as k256::elliptic_curve::sec1::FromEncodedPoint<
        k256::Secp256k1,
    >>::from_encoded_point(&encoded))
}

/// [`verify`] with the payer's precomputed table.
pub fn verify_with_table(
    table: &KeyTable,
    z: &Scalar,
    r: &Scalar,
    s: &Scalar,
    y_odd: bool,
) -> bool {
    // The table's points load while the scalars are inverted and recoded.
    table.table.prefetch();
    single::verify(&table.key.point, Some(&table.table), z, r, s, y_odd)
        .unwrap_or_else(|| constant_time(&table.key.k256, z, r, s, y_odd))
}

/// One signature of a batch: the payer's table, the digest as a scalar, the signature's
/// non-zero scalars and `v`.
#[derive(Clone, Copy, Debug)]
pub struct BatchItem<'a> {
    /// The payer's table.
    pub table: &'a KeyTable,
    /// The digest, reduced modulo `n`.
    pub z: Scalar,
    /// `r`, non-zero.
    pub r: Scalar,
    /// `s`, non-zero.
    pub s: Scalar,
    /// `v`: whether `y(R)` is odd.
    pub y_odd: bool,
}

/// Checks every signature of a batch at once. `true` means all are good (a bad one passes with
/// probability at most 2^-127); `false` means at least one is bad: check them one at a time to
/// find which. `randomizers` must hold one value per item from a CSPRNG, unknown to whoever made
/// the signatures.
pub fn verify_batch(items: &[BatchItem<'_>], randomizers: &[u128]) -> bool {
    let entries: Vec<batch::Entry<'_>> = items
        .iter()
        .map(|i| batch::Entry {
            table: &i.table.table,
            z: i.z,
            r: i.r,
            s: i.s,
            y_odd: i.y_odd,
        })
        .collect();
    batch::verify(&entries, randomizers).unwrap_or_else(|| {
        items
            .iter()
            .all(|i| verify_with_table(i.table, &i.z, &i.r, &i.s, i.y_odd))
    })
}

/// A uniformly random scalar (tests).
#[cfg(test)]
pub(crate) fn random_scalar() -> Scalar {
    use k256::elliptic_curve::PrimeField;
    loop {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("OS randomness");
        if let Some(s) = Option::<Scalar>::from(Scalar::from_repr(bytes.into())) {
            return s;
        }
    }
}

#[cfg(test)]
mod tests;
