//! Points of secp256k1 (`y² = x³ + 7`) on k256's field elements: affine points and Jacobian
//! points `(X, Y, Z)` standing for `(X/Z², Y/Z³)`, with variable-time formulas that branch on
//! the special cases (the identity, doubling inside an addition) instead of masking them.
//!
//! Magnitudes: k256's lazily reduced field elements carry a magnitude that multiplications
//! need at most 8 (debug builds check it). Affine coordinates have magnitude 1; Jacobian ones
//! the bounds documented on [`Jacobian`].

use std::sync::LazyLock;

use k256::FieldElement as Fe;
use k256::elliptic_curve::sec1::ToEncodedPoint;

use super::count::count;
use super::modinv;

/// The curve constant `b = 7`.
const B: Fe = Fe::from_u64(7);

/// `β`, the cube root of unity with `λ·(x, y) = (β·x, y)`.
pub(crate) static BETA: LazyLock<Fe> = LazyLock::new(|| {
    fe_from_hex("7ae96a2b657c07106e64479eac3434e99cf0497512f58995c1396c28719501ee")
});

fn fe_from_hex(hex: &str) -> Fe {
    let mut bytes = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        bytes[i] = u8::from_str_radix(std::str::from_utf8(pair).expect("ascii"), 16).expect("hex");
    }
    Option::from(Fe::from_bytes(&bytes.into())).expect("below p")
}

/// Little-endian limbs of a field element.
fn fe_limbs(a: &Fe) -> [u64; 4] {
    let bytes = a.normalize().to_bytes();
    std::array::from_fn(|i| {
        u64::from_be_bytes(bytes[24 - 8 * i..32 - 8 * i].try_into().expect("8 bytes"))
    })
}

/// `a⁻¹`, variable time; `None` for zero.
pub(crate) fn fe_invert(a: &Fe) -> Option<Fe> {
    count!(field_inversions);
    match modinv::invert(&fe_limbs(a), &modinv::FIELD) {
        Some(limbs) => {
            let mut bytes = [0u8; 32];
            for (i, limb) in limbs.iter().enumerate() {
                bytes[24 - 8 * i..32 - 8 * i].copy_from_slice(&limb.to_be_bytes());
            }
            Fe::from_bytes(&bytes.into()).into()
        }
        None => a.invert().into(),
    }
}

/// Inverts every element in place with one inversion (Montgomery's trick). Returns false if
/// one of them is zero (the values are then unspecified).
pub(crate) fn fe_batch_invert(values: &mut [Fe], scratch: &mut Vec<Fe>) -> bool {
    scratch.clear();
    let mut acc = Fe::ONE;
    for v in values.iter() {
        scratch.push(acc);
        acc = acc * v;
    }
    let Some(mut inv) = fe_invert(&acc) else {
        return false;
    };
    for (v, before) in values.iter_mut().zip(scratch.iter()).rev() {
        let this = inv * before;
        inv = inv * &*v;
        *v = this;
    }
    true
}

/// A point of the curve other than the identity, in affine coordinates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Affine {
    pub(crate) x: Fe,
    pub(crate) y: Fe,
}

impl Affine {
    /// A value that is not a point, to fill buffers before they are written.
    pub(crate) const PLACEHOLDER: Self = Self {
        x: Fe::ZERO,
        y: Fe::ZERO,
    };

    /// The generator.
    pub(crate) fn generator() -> Self {
        Self::from_k256(&k256::AffinePoint::GENERATOR).expect("not the identity")
    }

    /// From k256's affine point; `None` for the identity.
    pub(crate) fn from_k256(point: &k256::AffinePoint) -> Option<Self> {
        let encoded = point.to_encoded_point(false);
        let (x, y) = (encoded.x()?, encoded.y()?);
        Some(Self {
            x: Option::from(Fe::from_bytes(x))?,
            y: Option::from(Fe::from_bytes(y))?,
        })
    }

    /// The point with `x` whose `y` has the given parity, if `x³ + 7` is a square.
    pub(crate) fn lift(x: &Fe, y_odd: bool) -> Option<Self> {
        count!(sqrts);
        let x = x.normalize();
        let y2 = x.square() * &x + &B;
        let y: Fe = Option::from(y2.sqrt())?;
        let y = y.normalize();
        let y = if bool::from(y.is_odd()) == y_odd {
            y
        } else {
            y.negate(1).normalize()
        };
        Some(Self { x, y })
    }

    /// `-P`.
    pub(crate) fn neg(&self) -> Self {
        Self {
            x: self.x,
            y: self.y.negate(1).normalize_weak(),
        }
    }

    /// `λ·P = (β·x, y)`.
    pub(crate) fn endo(&self) -> Self {
        count!(endo_muls);
        Self {
            x: self.x * &*BETA,
            y: self.y,
        }
    }

    /// Both coordinates fully reduced (for comparisons and encoding).
    #[cfg(test)]
    pub(crate) fn normalize(&self) -> Self {
        Self {
            x: self.x.normalize(),
            y: self.y.normalize(),
        }
    }

    /// Whether the point satisfies the curve equation.
    #[cfg(test)]
    pub(crate) fn is_on_curve(&self) -> bool {
        let lhs = self.y.square();
        let rhs = self.x.square() * &self.x + &B;
        bool::from((lhs + &rhs.negate(2)).normalizes_to_zero())
    }
}

/// A point in Jacobian coordinates, or the identity. Magnitudes: `x` at most 6, `y` at most 4,
/// `z` 1 (a mixed addition leaves its sums unreduced; everything else reduces to 1).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Jacobian {
    x: Fe,
    y: Fe,
    z: Fe,
    infinity: bool,
}

impl Jacobian {
    /// The identity.
    pub(crate) const INFINITY: Self = Self {
        x: Fe::ZERO,
        y: Fe::ONE,
        z: Fe::ZERO,
        infinity: true,
    };

    /// Whether this is the identity.
    pub(crate) fn is_infinity(&self) -> bool {
        self.infinity
    }

    /// An affine point with `Z = 1`.
    pub(crate) fn from_affine(a: &Affine) -> Self {
        Self {
            x: a.x,
            y: a.y.normalize_weak(),
            z: Fe::ONE,
            infinity: false,
        }
    }

    /// `2P` (3M + 4S). The curve has no point of order 2, so only the identity doubles to it.
    pub(crate) fn double(&self) -> Self {
        if self.infinity {
            return *self;
        }
        count!(doublings);
        let yy = self.y.square();
        let s = (self.x * &yy).mul_single(4); // S = 4·X·Y², magnitude 4
        let m = self.x.square().mul_single(3); // M = 3·X², magnitude 3
        let x3 = (m.square() + &s.negate(4).double()).normalize_weak(); // M² - 2S
        let yyyy8 = yy.square().mul_single(8);
        let y3 = (m * &(s + &x3.negate(1)) + &yyyy8.negate(8)).normalize_weak(); // M(S - X3) - 8Y⁴
        let z3 = (self.y * &self.z).double().normalize_weak(); // 2·Y·Z
        Self {
            x: x3,
            y: y3,
            z: z3,
            infinity: false,
        }
    }

    /// `P + A` for an affine `A` (8M + 3S), with the cases `A = P` (a doubling) and `A = -P`
    /// (the identity) handled.
    pub(crate) fn add_affine(&self, a: &Affine) -> Self {
        if self.infinity {
            return Self::from_affine(a);
        }
        count!(mixed_adds);
        let z1z1 = self.z.square();
        let u2 = a.x * &z1z1;
        let s2 = a.y * &(self.z * &z1z1);
        // Magnitudes: h 8, r 6 (at most 8 for the products).
        let h = u2 + &self.x.negate(6);
        let r = s2 + &self.y.negate(4);
        if bool::from(h.normalizes_to_zero()) {
            return if bool::from(r.normalizes_to_zero()) {
                self.double()
            } else {
                Self::INFINITY
            };
        }
        let hh = h.square();
        let hhh = h * &hh;
        let v = self.x * &hh;
        // Left unreduced: x3 has magnitude 6, y3 3 (the invariant allows 6 and 4).
        let x3 = r.square() + &hhh.negate(1) + &v.double().negate(2);
        let y3 = r * &(v + &x3.negate(6)) + &(self.y * &hhh).negate(1);
        let z3 = self.z * &h;
        Self {
            x: x3,
            y: y3,
            z: z3,
            infinity: false,
        }
    }

    /// `P + Q` for two Jacobian points (12M + 4S), all cases handled (tests).
    #[cfg(test)]
    pub(crate) fn add(&self, other: &Self) -> Self {
        if self.infinity {
            return *other;
        }
        if other.infinity {
            return *self;
        }
        let z1z1 = self.z.square();
        let z2z2 = other.z.square();
        let u1 = self.x * &z2z2;
        let u2 = other.x * &z1z1;
        let s1 = self.y * &(other.z * &z2z2);
        let s2 = other.y * &(self.z * &z1z1);
        let h = u2 + &u1.negate(1);
        let r = s2 + &s1.negate(1);
        if bool::from(h.normalizes_to_zero()) {
            return if bool::from(r.normalizes_to_zero()) {
                self.double()
            } else {
                Self::INFINITY
            };
        }
        let hh = h.square();
        let hhh = h * &hh;
        let v = u1 * &hh;
        let x3 = (r.square() + &hhh.negate(1) + &v.double().negate(2)).normalize_weak();
        let y3 = (r * &(v + &x3.negate(1)) + &(s1 * &hhh).negate(1)).normalize_weak();
        let z3 = self.z * &other.z * &h;
        Self {
            x: x3,
            y: y3,
            z: z3,
            infinity: false,
        }
    }

    /// Whether the affine x-coordinate equals `x` (fully reduced), without an inversion.
    pub(crate) fn has_x(&self, x: &Fe) -> bool {
        !self.infinity
            && bool::from((self.x + &(*x * &self.z.square()).negate(1)).normalizes_to_zero())
    }

    /// The affine point, `None` for the identity (one variable-time inversion).
    pub(crate) fn to_affine(self) -> Option<Affine> {
        if self.infinity {
            return None;
        }
        let zinv = fe_invert(&self.z)?;
        let zinv2 = zinv.square();
        Some(Affine {
            x: (self.x * &zinv2).normalize(),
            y: (self.y * &(zinv2 * &zinv)).normalize(),
        })
    }
}

/// The affine forms of Jacobian points with one inversion for all; `None` if one of them is
/// the identity.
pub(crate) fn batch_to_affine(points: &[Jacobian]) -> Option<Vec<Affine>> {
    if points.iter().any(Jacobian::is_infinity) {
        return None;
    }
    let mut zs: Vec<Fe> = points.iter().map(|p| p.z).collect();
    let mut scratch = Vec::with_capacity(zs.len());
    if !fe_batch_invert(&mut zs, &mut scratch) {
        return None;
    }
    Some(
        points
            .iter()
            .zip(zs)
            .map(|(p, zinv)| {
                let zinv2 = zinv.square();
                Affine {
                    x: (p.x * &zinv2).normalize(),
                    y: (p.y * &(zinv2 * &zinv)).normalize(),
                }
            })
            .collect(),
    )
}
