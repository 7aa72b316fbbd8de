//! `resume_token`: see `fuzz/src/resume_token.rs` for the properties.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| paystream_fuzz::resume_token::run(data));
