//! `voucher_accept`: see `fuzz/src/voucher_accept.rs` for the properties.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| paystream_fuzz::voucher_accept::run(data));
