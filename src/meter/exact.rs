//! [`Exact`]: an amount of base units as a fraction, so consumption can leave one session and
//! enter the next on the same channel without being rounded (DESIGN.md 5: only settlement
//! rounds, up, once).

use std::cmp::Ordering;

use alloy::primitives::{U256, U512};

/// Exactly `numerator / denominator` base units (the denominator is never zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exact {
    /// The amount times `denominator`.
    pub numerator: U256,
    /// A tariff's common denominator (1 for whole base units).
    pub denominator: U256,
}

impl Exact {
    /// Zero.
    pub const ZERO: Self = Self {
        numerator: U256::ZERO,
        denominator: U256::from_limbs([1, 0, 0, 0]),
    };

    /// A whole number of base units.
    pub fn whole(units: u128) -> Self {
        Self {
            numerator: U256::from(units),
            denominator: U256::from(1u8),
        }
    }

    /// Rounded up to whole base units (what settling it would take), saturating at
    /// `u128::MAX`.
    pub fn ceil(&self) -> u128 {
        self.numerator
            .div_ceil(self.denominator)
            .try_into()
            .unwrap_or(u128::MAX)
    }

    /// The amount in units of `denominator`, rounded down: exact when `denominator` is a
    /// multiple of this one's (the same tariff), otherwise short by less than one
    /// `1/denominator` of a base unit, in the payer's favour.
    pub fn scaled_to(&self, denominator: U256) -> U256 {
        if self.denominator == denominator {
            return self.numerator;
        }
        let scaled =
            U512::from(self.numerator) * U512::from(denominator) / U512::from(self.denominator);
        U256::saturating_from(scaled)
    }

    /// The larger of two amounts.
    pub fn max(self, other: Self) -> Self {
        if other > self { other } else { self }
    }
}

impl PartialOrd for Exact {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Exact {
    /// By value (`1/2 == 2/4`), then by denominator so the order is total and agrees with `Eq`.
    fn cmp(&self, other: &Self) -> Ordering {
        let left = U512::from(self.numerator) * U512::from(other.denominator);
        let right = U512::from(other.numerator) * U512::from(self.denominator);
        left.cmp(&right)
            .then_with(|| self.denominator.cmp(&other.denominator))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: u64, d: u64) -> Exact {
        Exact {
            numerator: U256::from(n),
            denominator: U256::from(d),
        }
    }

    #[test]
    fn compares_by_value_and_rounds_up_once() {
        assert!(e(1, 3) < e(1, 2));
        assert_eq!(e(1, 2).max(e(2, 3)), e(2, 3));
        assert_eq!(e(2_001, 1_000).ceil(), 3);
        assert_eq!(e(2_000, 1_000).ceil(), 2);
        assert_eq!(Exact::whole(7).ceil(), 7);
        assert_eq!(Exact::ZERO.ceil(), 0);
        // Same tariff: exact. Another: rounded down, short by less than 1/denominator.
        assert_eq!(
            e(2_001, 1_000).scaled_to(U256::from(1_000)),
            U256::from(2_001)
        );
        assert_eq!(e(2_001, 1_000).scaled_to(U256::from(10)), U256::from(20));
        assert_eq!(e(1, 3).scaled_to(U256::from(6)), U256::from(2));
    }
}
