//! `payment_required`: see `fuzz/src/payment_required.rs` for the properties.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| paystream_fuzz::payment_required::run(data));
