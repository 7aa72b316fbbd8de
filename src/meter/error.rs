//! Why a tariff or a metering step was refused.

/// A tariff that cannot be used. Fix the tariff's JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TariffError {
    /// A price with `per` zero.
    #[error("a price's per must not be zero")]
    ZeroPer,
    /// A negative amount or per.
    #[error("{field} is negative; prices are non-negative base units")]
    Negative {
        /// Which field.
        field: &'static str,
    },
    /// Not a string of decimal digits.
    #[error("{field} is not a decimal string of base units: {text:?}")]
    NotADecimal {
        /// Which field.
        field: &'static str,
        /// What was given.
        text: String,
    },
    /// Above what the field can hold.
    #[error("{field} is too large")]
    Overflow {
        /// Which field.
        field: &'static str,
    },
    /// The prices need a common denominator above 2^120.
    #[error("the tariff's prices need a common denominator above 2^120; use coarser `per` values")]
    TooFine,
    /// Malformed JSON (including unknown fields and wrong types).
    #[error("invalid tariff JSON: {0}")]
    Json(String),
}

/// A metering step that was refused; the meter is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeterError {
    /// The unit does not fit in the accepted cumulative: pause delivery and ask for a voucher.
    #[error("credit exhausted: the unit costs more than the {remaining} base units left")]
    Exhausted {
        /// Whole base units left under the accepted cumulative (rounded down).
        remaining: u128,
    },
    /// A new cumulative below the current one.
    #[error("cumulative {got} is below the current {current}")]
    CumulativeDecreased {
        /// The cumulative given.
        got: u128,
        /// The current one.
        current: u128,
    },
    /// A counter would overflow (not reachable with u128 amounts and u64 byte counts in
    /// practice; refused rather than wrapped).
    #[error("metering overflow")]
    Overflow,
}
