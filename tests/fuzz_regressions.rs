//! The fuzz targets' properties on stable: every input the fuzzers found (a crash, before its
//! fix) replayed from `fuzz/regressions/<target>/`, the targets run on a few fixed inputs, and
//! the defects the fuzzers found, each as a plain test.
//!
//! The property code is the fuzz crate's own (`fuzz/src/`, one module per target), compiled
//! here as modules of this test: a property changed for the fuzzer is changed here too. Run the
//! fuzzers with `scripts/fuzz`.

#[allow(dead_code)]
#[path = "../fuzz/src/input.rs"]
mod input;
#[allow(dead_code)]
#[path = "../fuzz/src/json.rs"]
mod json;
#[allow(dead_code)]
#[path = "../fuzz/src/keys.rs"]
mod keys;

#[allow(dead_code)]
#[path = "../fuzz/src/client_message.rs"]
mod client_message;
#[allow(dead_code)]
#[path = "../fuzz/src/meter_sequence.rs"]
mod meter_sequence;
#[allow(dead_code)]
#[path = "../fuzz/src/payment_required.rs"]
mod payment_required;
#[allow(dead_code)]
#[path = "../fuzz/src/resume_token.rs"]
mod resume_token;
#[allow(dead_code)]
#[path = "../fuzz/src/session_sequence.rs"]
mod session_sequence;
#[allow(dead_code)]
#[path = "../fuzz/src/voucher_accept.rs"]
mod voucher_accept;

use std::path::PathBuf;

/// The checkout's root: where `cargo test` runs this from (it sets `CARGO_MANIFEST_DIR` for the
/// run as well as for the build). The path compiled in is only the fallback: a test binary is
/// reused from a shared target directory by another checkout of the same sources (CI's clone
/// beside the working copy), and the compiled path may no longer exist.
fn checkout() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// Runs `run` on every file of `fuzz/regressions/<target>/`; returns how many.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = checkout().join("fuzz/regressions").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).expect("a regression input");
        eprintln!("{target}: {}", file.display());
        run(&data);
    }
    files.len()
}

/// Fixed inputs: a few shapes, then pseudo-random bytes from a fixed seed (xorshift).
fn fixed_inputs(count: usize, max_len: usize) -> Vec<Vec<u8>> {
    let mut inputs = vec![
        Vec::new(),
        vec![0u8; 64],
        vec![0xff; 64],
        (0..=255u8).collect(),
        (0..=255u8).rev().cycle().take(max_len).collect(),
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..count {
        let len = (next() as usize) % max_len;
        inputs.push((0..len).map(|_| next() as u8).collect());
    }
    inputs
}

fn properties(run: fn(&[u8]), count: usize, max_len: usize) {
    for input in fixed_inputs(count, max_len) {
        run(&input);
    }
}

#[test]
fn client_message_regressions_and_properties() {
    assert!(replay("client_message", client_message::run) > 0);
    properties(client_message::run, 200, 512);
}

#[test]
fn payment_required_regressions_and_properties() {
    replay("payment_required", payment_required::run);
    properties(payment_required::run, 200, 512);
}

#[test]
fn voucher_accept_regressions_and_properties() {
    replay("voucher_accept", voucher_accept::run);
    properties(voucher_accept::run, 24, 512);
}

#[test]
fn meter_sequence_regressions_and_properties() {
    replay("meter_sequence", meter_sequence::run);
    properties(meter_sequence::run, 200, 1024);
}

#[test]
fn session_sequence_regressions_and_properties() {
    assert!(replay("session_sequence", session_sequence::run) > 0);
    properties(session_sequence::run, 24, 1024);
}

#[test]
fn resume_token_regressions_and_properties() {
    assert!(replay("resume_token", resume_token::run) > 0);
    properties(resume_token::run, 100, 256);
}

/// Found by `client_message`: serde_json (without its `float_roundtrip` feature) reads the
/// shortest text of a float, which it writes itself, as a float a few ULPs away. A request
/// body's `0.7` is safe; some floats are not. The fuzz target tolerates
/// [`client_message::FLOAT_ULPS`] for floats inside JSON bodies, and nothing anywhere else.
#[test]
fn a_float_in_a_request_body_reads_back_within_a_few_ulps() {
    use paystream::protocol::{ClientMessage, decode_client, encode_client};
    for text in [
        "7.624062252979649e-11",
        "1.3797690309094175e188",
        "0.7",
        "1e-320",
    ] {
        let x: f64 = text.parse().unwrap();
        let message = ClientMessage::Request {
            body: serde_json::json!({ "temperature": x }),
        };
        let again = decode_client(&encode_client(&message)).unwrap();
        let ClientMessage::Request { body } = &again else {
            panic!("{again:?}");
        };
        let y = body["temperature"].as_f64().unwrap();
        assert!(
            x.to_bits().abs_diff(y.to_bits()) <= client_message::FLOAT_ULPS,
            "{x} read back as {y}"
        );
    }
}

/// A charge whose scaled cost does not fit in 256 bits (an extreme but valid tariff: prices up
/// to 2^128 base units, a common denominator up to 2^120) is refused, not wrapped around to
/// almost nothing: `weight * count` was a wrapping multiplication.
#[test]
fn a_cost_beyond_256_bits_is_refused_not_wrapped() {
    use paystream::meter::{Meter, MeterConfig, Price, Tariff};
    let tariff = Tariff {
        // The denominator 2^100 (from this price) scales every weight.
        per_message: Some(Price {
            amount: 1,
            per: 1 << 100,
        }),
        // 2^127 base units a byte: a byte weighs 2^227, and 2^29 bytes 2^256.
        per_byte_out: Some(Price::whole(1 << 127)),
        per_byte_in: Some(Price::whole(1 << 127)),
        ..Tariff::default()
    };
    let mut meter = Meter::new(&tariff, MeterConfig::with_credit_window(1), 1, 0).unwrap();
    assert!(
        meter.try_message(1 << 29, 0).is_err(),
        "2^29 bytes at 2^127 each"
    );
    assert!(meter.try_bytes_in(1 << 29, 0).is_err());
    assert!(meter.try_request(1 << 29, 0).is_err());
    assert_eq!(meter.usage().bytes_out, 0);
    assert_eq!(meter.consumed(), 0);

    // Time: 2^127 base units a second over a denominator of 10^9 * 2^81 weighs 2^208 a
    // nanosecond; 2^48 ns (3.3 days of liveness) costs 2^256.
    let tariff = Tariff {
        per_message: Some(Price {
            amount: 1,
            per: 1 << 90,
        }),
        per_second: Some(Price::whole(1 << 127)),
        ..Tariff::default()
    };
    let config = MeterConfig {
        liveness_ns: 1 << 49,
        ..MeterConfig::with_credit_window(1)
    };
    let mut meter = Meter::new(&tariff, config, 1, 0).unwrap();
    meter.connect(0);
    assert!(
        meter.advance(1 << 48),
        "the credit runs out within the first nanoseconds"
    );
    assert!(meter.usage().elapsed_ns < 1 << 20);
}
