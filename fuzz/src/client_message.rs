//! `client_message`: the WebSocket message codec (`paystream::protocol`) on arbitrary text and
//! on arbitrary messages.
//!
//! Properties:
//! - `decode_client` and `decode_server` never panic;
//! - text above [`MAX_MESSAGE_BYTES`] is `TooLarge` with its length, and nothing else is;
//! - a decoded client message has the variant its `type` names, and an unknown `type` is
//!   reported (cut to 64 characters);
//! - whatever decodes re-encodes (`encode_client`, `encode_server`) to text that decodes to
//!   the same value, and so does every message the fuzzer builds (what a client sends is what
//!   the server reads), unless the encoding is above the size limit;
//! - `encode_app` writes exactly what `encode_server` writes for an `app` message.

use alloy::primitives::{B256, Bytes};
use paystream::meter::{Price, Tariff};
use paystream::protocol::{
    ClientMessage, ErrorData, MAX_MESSAGE_BYTES, ProtocolError, ServerMessage, SignedStateMsg,
    decode_client, decode_server, encode_app, encode_client, encode_server,
};
use serde_json::Value;

use crate::input::Input;
use crate::json;

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 8 {
        // Arbitrary text, as both a client and a server frame.
        0..=2 => {
            let text = String::from_utf8_lossy(input.rest());
            check_client_text(&text);
            check_server_text(&text);
        }
        // A client message written with the field syntax varied.
        3 | 4 => {
            let text = client_text(&mut input);
            check_client_text(&text);
        }
        // Around the size limit.
        5 => {
            let padding = usize::from(input.u8()) % 4;
            let body = json::value(&mut input, 2);
            let small = encode_client(&ClientMessage::Request { body });
            let filler = (MAX_MESSAGE_BYTES - 2 + padding).saturating_sub(small.len());
            let text = format!("{}{small}", " ".repeat(filler));
            check_client_text(&text);
        }
        // Values: what the encoders write, the decoders read back.
        6 => {
            let message = client_message(&mut input);
            round_trip_client(&message);
        }
        _ => {
            let message = server_message(&mut input);
            round_trip_server(&message);
        }
    }
}

fn variant(message: &ClientMessage) -> &'static str {
    match message {
        ClientMessage::Open(_) => "open",
        ClientMessage::Resume { .. } => "resume",
        ClientMessage::Voucher(_) => "voucher",
        ClientMessage::Request { .. } => "request",
        ClientMessage::Close { .. } => "close",
    }
}

/// The decoder's answer to any text.
pub fn check_client_text(text: &str) {
    let decoded = decode_client(text);
    if text.len() > MAX_MESSAGE_BYTES {
        assert_eq!(
            decoded,
            Err(ProtocolError::TooLarge {
                len: text.len(),
                max: MAX_MESSAGE_BYTES
            })
        );
        return;
    }
    match decoded {
        Ok(message) => {
            let value: Value = serde_json::from_str(text).expect("it decoded, so it is JSON");
            assert_eq!(
                value["type"],
                variant(&message),
                "{text:?} gave {message:?}"
            );
            round_trip_client(&message);
        }
        Err(ProtocolError::UnknownType(kind)) => {
            assert!(kind.chars().count() <= 64, "unknown type not cut: {kind:?}");
            let value: Value = serde_json::from_str(text).expect("it has a type, so it is JSON");
            let full = value["type"].as_str().expect("a string type");
            assert!(
                full.starts_with(&kind),
                "{kind:?} is not the start of {full:?}"
            );
            assert!(
                !matches!(full, "open" | "resume" | "voucher" | "request" | "close"),
                "a known type called unknown: {text:?}"
            );
        }
        Err(ProtocolError::Malformed(_)) => {}
        Err(e) => panic!("{text:?} (within the limit) refused with {e:?}"),
    }
}

/// Whether two JSON values are equal but for floats a few units in the last place apart.
///
/// serde_json is built without its `float_roundtrip` feature, so its parser is not correctly
/// rounded: the shortest text that names a float (what it writes) can read back as another
/// float (found by this target: `7.624062252979649e-11` is written `7.62406225297965e-11`,
/// which reads back one ULP lower; `1.3797690309094175e188` two ULPs higher). Only floats
/// inside request bodies and `app` data are affected; the protocol's own fields are integers
/// and strings.
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            x == y || (x.signum() == y.signum() && x.to_bits().abs_diff(y.to_bits()) <= FLOAT_ULPS)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// How far (in ULPs) serde_json's parser may land from the float its writer wrote.
pub const FLOAT_ULPS: u64 = 16;

fn same_client(a: &ClientMessage, b: &ClientMessage) -> bool {
    match (a, b) {
        (ClientMessage::Request { body: x }, ClientMessage::Request { body: y }) => same_json(x, y),
        _ => a == b,
    }
}

fn same_server(a: &ServerMessage, b: &ServerMessage) -> bool {
    match (a, b) {
        (ServerMessage::App { seq: s, data: x }, ServerMessage::App { seq: t, data: y }) => {
            s == t && same_json(x, y)
        }
        _ => a == b,
    }
}

/// Encoding `message` and decoding the text gives `message` back.
pub fn round_trip_client(message: &ClientMessage) {
    let text = encode_client(message);
    match decode_client(&text) {
        Ok(again) => assert!(
            same_client(&again, message),
            "{message:?} encoded as {text:?} decodes to {again:?}"
        ),
        Err(ProtocolError::TooLarge { .. }) if text.len() > MAX_MESSAGE_BYTES => {}
        Err(e) => panic!("{message:?} encodes to {text:?}, which decodes to {e:?}"),
    }
}

/// The client's decoder of server frames on any text.
pub fn check_server_text(text: &str) {
    if let Ok(message) = decode_server(text) {
        round_trip_server(&message);
    }
}

/// Encoding `message` and decoding the text gives `message` back.
pub fn round_trip_server(message: &ServerMessage) {
    let text = encode_server(message);
    match decode_server(&text) {
        Ok(again) => assert!(
            same_server(&again, message),
            "{message:?} encoded as {text:?} decodes to {again:?}"
        ),
        Err(e) => panic!("{message:?} encodes to {text:?}, which decodes to {e:?}"),
    }
    if let ServerMessage::App { seq, data } = message {
        assert_eq!(encode_app(*seq, data), text);
    }
}

fn hex(bytes: &[u8], upper: bool) -> String {
    let s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if upper { s.to_uppercase() } else { s }
}

/// A JSON number, or a string of one, or something close to one.
fn number_text(input: &mut Input<'_>, value: u128) -> String {
    match input.below(10) {
        0 | 1 => value.to_string(),
        2 | 3 => format!("\"{value}\""),
        4 => format!("\"0{value}\""),
        5 => format!("-{value}"),
        6 => format!("\"{value}.0\""),
        7 => format!("{value}e0"),
        8 => format!("\" {value}\""),
        _ => format!("\"+{value}\""),
    }
}

/// A client message as text, each field written one of several ways (some invalid).
fn client_text(input: &mut Input<'_>) -> String {
    let kinds = [
        "open", "voucher", "resume", "request", "close", "Open", "dance", "",
    ];
    let kind = kinds[input.below(kinds.len())];
    let mut fields = vec![format!("\"type\":\"{kind}\"")];
    let n_fields = 1 + input.below(6);
    for _ in 0..n_fields {
        let field = match input.below(9) {
            0 => {
                let len = if input.bool() { 32 } else { input.below(40) };
                let id = input.bytes(len).to_vec();
                let prefix = if input.below(4) == 0 { "" } else { "0x" };
                format!("\"channelId\":\"{prefix}{}\"", hex(&id, input.bool()))
            }
            1 => {
                let v = u128::from(input.scaled_u64()) << (input.below(4) * 32);
                format!("\"nonce\":{}", number_text(input, v))
            }
            2 => {
                let v = input.scaled_u128();
                let v = if input.below(8) == 0 {
                    v.saturating_add(v)
                } else {
                    v
                };
                format!("\"cumulative\":{}", number_text(input, v))
            }
            3 => {
                let len = [65, 64, 65, 0, 63, 66][input.below(6)];
                let sig = input.bytes(len).to_vec();
                let odd = if input.below(8) == 0 { "a" } else { "" };
                format!("\"signature\":\"0x{}{odd}\"", hex(&sig, input.bool()))
            }
            4 => format!("\"token\":{}", Value::String(input.string(40))),
            5 => format!("\"body\":{}", json::value(input, 3)),
            6 => format!(
                "\"closeChannel\":{}",
                ["true", "false", "null", "1"][input.below(4)]
            ),
            7 => format!("\"type\":\"{}\"", kinds[input.below(kinds.len())]),
            _ => format!(
                "{}:{}",
                Value::String(input.string(10)),
                json::value(input, 1)
            ),
        };
        fields.push(field);
    }
    if input.bool() {
        let i = input.below(fields.len());
        let j = input.below(fields.len());
        fields.swap(i, j);
    }
    format!("{{{}}}", fields.join(","))
}

fn signed_state(input: &mut Input<'_>) -> SignedStateMsg {
    let len = [65, 64, 0, 1, 70][input.below(5)];
    SignedStateMsg {
        channel_id: B256::from(input.array::<32>()),
        nonce: input.scaled_u64(),
        cumulative: input.scaled_u128(),
        signature: Bytes::from(input.bytes(len).to_vec()),
    }
}

/// Any client message.
fn client_message(input: &mut Input<'_>) -> ClientMessage {
    match input.below(5) {
        0 => ClientMessage::Open(signed_state(input)),
        1 => ClientMessage::Voucher(signed_state(input)),
        2 => ClientMessage::Resume {
            token: input.string(64),
        },
        3 => ClientMessage::Request {
            body: json::value(input, 4),
        },
        _ => ClientMessage::Close {
            close_channel: input.bool(),
        },
    }
}

fn price(input: &mut Input<'_>) -> Option<Price> {
    input.bool().then(|| Price {
        amount: input.scaled_u128(),
        per: input.scaled_u128().max(1),
    })
}

/// A tariff with any prices (`per` never zero: no server can send one, and the decoder refuses
/// it).
pub fn tariff(input: &mut Input<'_>) -> Tariff {
    Tariff {
        per_message: price(input),
        per_second: price(input),
        per_byte_out: price(input),
        per_byte_in: price(input),
    }
}

/// Any server message.
fn server_message(input: &mut Input<'_>) -> ServerMessage {
    match input.below(12) {
        0 => ServerMessage::Session {
            session_id: input.string(20),
            resume_token: input.string(40),
            channel_id: B256::from(input.array::<32>()),
            nonce: input.scaled_u64(),
            cumulative: input.scaled_u128(),
            consumed: input.scaled_u128(),
            tariff: Box::new(tariff(input)),
            heartbeat_ms: input.scaled_u64(),
        },
        1 => ServerMessage::VoucherAck {
            nonce: input.scaled_u64(),
            cumulative: input.scaled_u128(),
            consumed: input.scaled_u128(),
        },
        2 => ServerMessage::NeedVoucher {
            consumed: input.scaled_u128(),
            cumulative: input.scaled_u128(),
            suggested: input.scaled_u128(),
            deadline_ms: input.scaled_u64(),
        },
        3 => ServerMessage::Paused {
            reason: input.string(20),
        },
        4 => ServerMessage::Resumed {},
        5 => ServerMessage::Usage {
            consumed: input.scaled_u128(),
            cumulative: input.scaled_u128(),
            remaining: input.scaled_u128(),
            messages: input.scaled_u64(),
            bytes_in: input.scaled_u64(),
            bytes_out: input.scaled_u64(),
            elapsed_ns: input.scaled_u64(),
        },
        6 | 7 => ServerMessage::App {
            seq: input.scaled_u64(),
            data: json::value(input, 4),
        },
        8 => ServerMessage::Error {
            code: input.string(20),
            message: input.string(40),
            retriable: input.bool(),
            data: input.bool().then(|| ErrorData {
                nonce: input.scaled_u64(),
                cumulative: input.scaled_u128(),
                consumed: input.scaled_u128(),
                signature: input.bool().then(|| Bytes::from(input.bytes(65).to_vec())),
            }),
        },
        9 => ServerMessage::End {
            seq: input.bool().then(|| input.scaled_u64()),
            reason: input.string(16),
        },
        _ => ServerMessage::Receipt {
            nonce: input.scaled_u64(),
            cumulative: input.scaled_u128(),
            consumed: input.scaled_u128(),
            settled_amount: input.scaled_u128(),
            refund: input.scaled_u128(),
            close_pending: input.bool(),
        },
    }
}
