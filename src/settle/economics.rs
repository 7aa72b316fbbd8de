//! When a claim is worth settling (DESIGN.md section 7, issue 10 item 2): micro-cent claims are
//! worth less than the gas to settle them one by one, so a claim waits and grows until its value
//! pays for its marginal gas by a configured factor, or until it must go: its payer asked to
//! withdraw (the payee loses it at the deadline), it is older than the configured age, or the
//! operator forces it.
//!
//! Pure arithmetic on integers: the gas price and the value of one base unit of the token in
//! wei are configuration (a fixed rate the operator sets and revisits; documented in
//! docs/SETTLER.md), and every comparison is exact (cross-multiplied in 512 bits).

use alloy::primitives::U512;

use crate::meter::Price;

/// Why a claim is submitted now, or that it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Due {
    /// Its payer asked to withdraw: settle before the deadline, whatever it costs.
    Withdrawal,
    /// The operator forces every claim out.
    Forced,
    /// Older than the configured age.
    Age,
    /// Its value pays for its marginal gas by the configured factor.
    Worth,
    /// Not yet: it waits and grows.
    Waits,
}

impl Due {
    /// Whether the claim goes in the next batch.
    pub fn now(self) -> bool {
        self != Self::Waits
    }

    /// The name used in `/metrics` and the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Withdrawal => "withdrawal",
            Self::Forced => "forced",
            Self::Age => "age",
            Self::Worth => "worth",
            Self::Waits => "waits",
        }
    }
}

/// The economic rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Economics {
    /// Gas price the decision assumes (wei per gas): what the chain usually charges, not the
    /// cap a transaction may pay.
    pub gas_price_wei: u128,
    /// Value of one base unit of the channels' token, in wei (exact rational; 1/1 for native
    /// ETH channels).
    pub wei_per_base_unit: Price,
    /// Gas one more claim adds to a batch.
    pub marginal_gas_per_claim: u64,
    /// Gas of a batch beside its claims (the transaction, the loop, one transfer).
    pub batch_base_gas: u64,
    /// A claim is worth settling when its value is at least this many times its marginal gas
    /// cost.
    pub factor: Price,
    /// A claim queued longer than this (seconds) goes anyway.
    pub max_age_secs: u64,
    /// Every claim goes now (the operator's `--force`).
    pub force: bool,
}

impl Economics {
    /// The marginal gas cost of one claim, in wei.
    pub fn claim_cost_wei(&self) -> u128 {
        self.gas_price_wei
            .saturating_mul(u128::from(self.marginal_gas_per_claim))
    }

    /// Whether a claim of `value` base units (what it would add to the payee's balance),
    /// queued `age_secs` ago, goes now; `withdrawing` when its payer asked to withdraw.
    pub fn due(&self, value: u128, age_secs: u64, withdrawing: bool) -> Due {
        if withdrawing {
            Due::Withdrawal
        } else if self.force {
            Due::Forced
        } else if age_secs >= self.max_age_secs {
            Due::Age
        } else if self.worth(value) {
            Due::Worth
        } else {
            Due::Waits
        }
    }

    /// `value × wei_per_unit ≥ factor × cost`, exactly:
    /// `value × w.amount × f.per ≥ f.amount × cost × w.per`.
    fn worth(&self, value: u128) -> bool {
        let w = self.wei_per_base_unit;
        let f = self.factor;
        let left = U512::from(value) * U512::from(w.amount) * U512::from(f.per);
        let right = U512::from(f.amount) * U512::from(self.claim_cost_wei()) * U512::from(w.per);
        value > 0 && left >= right
    }

    /// Whether `count` claims that go on their value alone, worth `value` base units together,
    /// pay for their whole transaction (its base gas and theirs) by the factor:
    /// `value × wei_per_unit ≥ factor × (base + count × marginal) × gas_price`, exactly.
    pub fn batch_worth(&self, value: u128, count: usize) -> bool {
        let w = self.wei_per_base_unit;
        let f = self.factor;
        let gas = U512::from(self.batch_base_gas)
            + U512::from(count) * U512::from(self.marginal_gas_per_claim);
        let left = U512::from(value) * U512::from(w.amount) * U512::from(f.per);
        let right = U512::from(f.amount) * gas * U512::from(self.gas_price_wei) * U512::from(w.per);
        value > 0 && left >= right
    }

    /// The smallest claim (base units) worth settling on its own value.
    pub fn threshold(&self) -> u128 {
        // value ≥ f.amount × cost × w.per / (w.amount × f.per), rounded up.
        let w = self.wei_per_base_unit;
        let f = self.factor;
        let num = U512::from(f.amount) * U512::from(self.claim_cost_wei()) * U512::from(w.per);
        let den = U512::from(w.amount) * U512::from(f.per);
        if den.is_zero() {
            return u128::MAX;
        }
        let t = num.div_ceil(den).max(U512::from(1u8));
        u128::try_from(t).unwrap_or(u128::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Base-like: 0.006 gwei per gas, USDC (6 decimals) at $3,000 per ETH: one base unit
    /// ($0.000001) is 1e-6 / 3000 ETH = 333,333,333.33 wei.
    fn base_usdc() -> Economics {
        Economics {
            gas_price_wei: 6_000_000,
            wei_per_base_unit: Price {
                amount: 1_000_000_000_000,
                per: 3_000,
            },
            marginal_gas_per_claim: 12_000,
            batch_base_gas: 42_000,
            factor: Price { amount: 2, per: 1 },
            max_age_secs: 86_400,
            force: false,
        }
    }

    #[test]
    fn a_claim_waits_until_it_pays_for_its_gas_twice() {
        let e = base_usdc();
        // 12,000 gas at 0.006 gwei: 72,000,000,000 wei ($0.000216 at $3,000 per ETH), that is
        // 216 base units of USDC; twice that is 432: 144,000 tokens at the demo's 0.003.
        assert_eq!(e.claim_cost_wei(), 72_000_000_000);
        assert_eq!(e.threshold(), 432);
        assert_eq!(e.due(0, 0, false), Due::Waits);
        assert_eq!(e.due(431, 0, false), Due::Waits);
        assert_eq!(e.due(432, 0, false), Due::Worth);
        assert_eq!(e.due(431, 86_400, false), Due::Age);
        assert_eq!(e.due(1, 0, true), Due::Withdrawal);
        assert_eq!(Economics { force: true, ..e }.due(1, 0, false), Due::Forced);
        // At 0.1 gwei it is 7,200 base units.
        let dear = Economics {
            gas_price_wei: 100_000_000,
            ..e
        };
        assert_eq!(dear.threshold(), 7_200);
    }

    #[test]
    fn native_eth_claims_compare_wei_to_wei() {
        let e = Economics {
            gas_price_wei: 1_000_000_000,
            wei_per_base_unit: Price { amount: 1, per: 1 },
            marginal_gas_per_claim: 11_616,
            batch_base_gas: 42_000,
            factor: Price { amount: 3, per: 2 },
            max_age_secs: 3_600,
            force: false,
        };
        let threshold = 11_616 * 1_000_000_000 * 3 / 2;
        assert_eq!(e.threshold(), threshold);
        assert_eq!(e.due(threshold - 1, 0, false), Due::Waits);
        assert_eq!(e.due(threshold, 0, false), Due::Worth);
    }

    #[test]
    fn a_batch_on_value_alone_pays_for_its_whole_gas() {
        let e = base_usdc();
        // One claim: (42,000 + 12,000) gas at 0.006 gwei is 324,000,000,000 wei, 972 base
        // units; twice that is 1,944.
        assert!(!e.batch_worth(1_943, 1));
        assert!(e.batch_worth(1_944, 1));
        // A hundred: 1,242,000 gas, 22,356 base units; twice that is 44,712 (447.12 each,
        // against the 432 a claim needs for its own part).
        assert!(!e.batch_worth(44_711, 100));
        assert!(e.batch_worth(44_712, 100));
        assert!(!e.batch_worth(0, 0));
    }
}
