//! Exact, nanosecond-precise usage accounting and pricing (DESIGN.md sections 4.1 and 5).
//!
//! Pure: no clock, no I/O. Time is passed in as monotonic nanoseconds ([`Nanos`]).
//!
//! - [`Tariff`]: rational prices per message, per second, per byte out and per byte in, parsed
//!   from and written to the JSON of the 402 challenge; compiled to [`Rates`] over one common
//!   denominator so metering is integer additions.
//! - [`Meter`]: one session's consumption, kept exactly (sub-unit fractions carried), charged
//!   only within the accepted cumulative; it finds the exact nanosecond time-based credit runs
//!   out, and asks for a voucher early enough that a client answering within its round trip
//!   is never paused.

mod error;
mod exact;
#[allow(clippy::module_inception)]
mod meter;
mod tariff;

pub use error::{MeterError, TariffError};
pub use exact::Exact;
pub use meter::{
    DEFAULT_LIVENESS_NS, DEFAULT_MARGIN_NS, DEFAULT_RTT_NS, MIN_RTT_NS, Meter, MeterConfig, Nanos,
    NeedVoucher, PauseReason, Usage,
};
pub use tariff::{MAX_DENOMINATOR, NANOS_PER_SEC, Price, Rates, Tariff};
