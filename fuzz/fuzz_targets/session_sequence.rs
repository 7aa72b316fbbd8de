//! `session_sequence`: see `fuzz/src/session_sequence.rs` for the properties.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| paystream_fuzz::session_sequence::run(data));
