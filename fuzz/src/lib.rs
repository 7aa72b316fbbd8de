//! The fuzz targets' properties, one module per target (`fuzz_targets/<name>.rs` calls its
//! `run`). The main crate's `tests/fuzz_regressions.rs` compiles these same files to replay the
//! inputs under `fuzz/regressions/`.

pub mod input;
pub mod json;
pub mod keys;

pub mod client_message;
pub mod meter_sequence;
pub mod payment_required;
pub mod resume_token;
pub mod session_sequence;
pub mod voucher_accept;
