//! `meter_sequence`: see `fuzz/src/meter_sequence.rs` for the properties.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| paystream_fuzz::meter_sequence::run(data));
