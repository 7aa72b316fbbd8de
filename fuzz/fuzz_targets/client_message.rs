//! `client_message`: see `fuzz/src/client_message.rs` for the properties.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| paystream_fuzz::client_message::run(data));
