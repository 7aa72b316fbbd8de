//! The WebSocket messages of DESIGN.md section 4.2: JSON text frames with a `type` field.
//! Money is a decimal string of whole base units; counters are JSON numbers; signatures are
//! 0x-hex.

use alloy::primitives::{B256, Bytes};
use serde::{Deserialize, Serialize};

use super::error::ProtocolError;
use super::{MAX_MESSAGE_BYTES, money};
use crate::meter::Tariff;

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Starts a session on a channel with a signed state.
    Open(SignedStateMsg),
    /// Resumes a session with its JWT.
    Resume {
        /// The `resumeToken` of the `session` message.
        token: String,
    },
    /// A newer signed state, extending credit.
    Voucher(SignedStateMsg),
    /// An application request (e.g. a prompt) for the resource.
    Request {
        /// Whatever the resource takes.
        body: serde_json::Value,
    },
    /// Ends the session; with `closeChannel`, the channel is closed cooperatively.
    Close {
        /// Close the channel and refund the rest of the deposit at once.
        #[serde(rename = "closeChannel", default)]
        close_channel: bool,
    },
}

/// The fields of `open` and `voucher`: a channel state and the payer's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignedStateMsg {
    /// The channel.
    pub channel_id: B256,
    /// The state's nonce (a JSON number; a decimal string is accepted too).
    #[serde(with = "money::u64_number")]
    pub nonce: u64,
    /// The cumulative amount authorized, in base units (a decimal string).
    #[serde(with = "money::u128_string")]
    pub cumulative: u128,
    /// The payer's signature: 65 bytes (r, s, v) or 64 bytes (EIP-2098).
    pub signature: Bytes,
}

impl SignedStateMsg {
    /// Signs `ChannelState(channel, nonce, cumulative)` under `domain` with the payer's `key`
    /// (RFC 6979, low-s): the `open` or `voucher` a client sends.
    pub fn sign(
        domain: &crate::channel::ChannelDomain,
        key: &k256::ecdsa::SigningKey,
        channel: B256,
        nonce: u64,
        cumulative: u128,
    ) -> Self {
        use crate::channel::{ChannelState, signature};
        let state = ChannelState {
            channelId: channel,
            nonce,
            cumulative,
        };
        let sig = signature::sign_digest(key, &domain.state_digest(&state));
        Self {
            channel_id: channel,
            nonce,
            cumulative,
            signature: signature::to_bytes(&sig).to_vec().into(),
        }
    }
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The session is open (or resumed).
    #[serde(rename_all = "camelCase")]
    Session {
        /// The session's id.
        session_id: String,
        /// A JWT to resume this session after a disconnect (one use).
        resume_token: String,
        /// The channel.
        channel_id: B256,
        /// The accepted nonce.
        nonce: u64,
        /// The accepted cumulative.
        #[serde(with = "money::u128_string")]
        cumulative: u128,
        /// Consumption so far (rounded up).
        #[serde(with = "money::u128_string")]
        consumed: u128,
        /// What the session charges (boxed: the other messages are small).
        tariff: Box<Tariff>,
        /// Interval of the server's Ping frames.
        heartbeat_ms: u64,
    },
    /// A voucher was durably stored and its credit is usable.
    VoucherAck {
        /// Its nonce.
        nonce: u64,
        /// Its cumulative.
        #[serde(with = "money::u128_string")]
        cumulative: u128,
        /// Consumption so far.
        #[serde(with = "money::u128_string")]
        consumed: u128,
    },
    /// Credit is running low: sign a state for `suggested` before `deadlineMs`.
    #[serde(rename_all = "camelCase")]
    NeedVoucher {
        /// Consumption so far.
        #[serde(with = "money::u128_string")]
        consumed: u128,
        /// The accepted cumulative.
        #[serde(with = "money::u128_string")]
        cumulative: u128,
        /// The cumulative to sign next.
        #[serde(with = "money::u128_string")]
        suggested: u128,
        /// Milliseconds until the session closes with 4408 if no voucher arrives.
        deadline_ms: u64,
    },
    /// Delivery stopped; it never overruns the credit.
    Paused {
        /// Why (`credit_exhausted`, `store_unavailable`, ...).
        reason: String,
    },
    /// Delivery goes on.
    Resumed {},
    /// Periodic usage.
    #[serde(rename_all = "camelCase")]
    Usage {
        /// Consumption so far.
        #[serde(with = "money::u128_string")]
        consumed: u128,
        /// The accepted cumulative.
        #[serde(with = "money::u128_string")]
        cumulative: u128,
        /// Credit left.
        #[serde(with = "money::u128_string")]
        remaining: u128,
        /// Messages delivered.
        messages: u64,
        /// Bytes received.
        bytes_in: u64,
        /// Bytes delivered.
        bytes_out: u64,
        /// Nanoseconds charged.
        elapsed_ns: u64,
    },
    /// One unit of the resource (e.g. one AI token).
    App {
        /// Sequence number, from 0.
        seq: u64,
        /// The unit.
        data: serde_json::Value,
    },
    /// Something was refused; `data` helps the client re-sync.
    Error {
        /// snake_case error code.
        code: String,
        /// Human-readable explanation.
        message: String,
        /// Whether the client can fix it and go on.
        retriable: bool,
        /// The accepted nonce, cumulative and consumed where they help.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<ErrorData>,
    },
    /// The stream of one `request` ended (DESIGN.md 4.2): every outcome is a message, never
    /// silence.
    End {
        /// The `seq` of the request's last `app` unit; `null` when it delivered none.
        seq: Option<u64>,
        /// `completed`, `max_tokens`, `upstream_failed`, `cancelled` or `interrupted`.
        reason: String,
    },
    /// The session ended: what was consumed, settled and refunded.
    #[serde(rename_all = "camelCase")]
    Receipt {
        /// The last accepted nonce.
        nonce: u64,
        /// The last accepted cumulative.
        #[serde(with = "money::u128_string")]
        cumulative: u128,
        /// Consumption (rounded up).
        #[serde(with = "money::u128_string")]
        consumed: u128,
        /// What the channel's claimed total will be after settlement.
        #[serde(with = "money::u128_string")]
        settled_amount: u128,
        /// What returns to the payer (deposit minus the settled amount).
        #[serde(with = "money::u128_string")]
        refund: u128,
        /// `closeChannel` was asked and the close is not done yet (a separate settler does it,
        /// or its transaction failed and the claim was queued instead): the refund comes when
        /// the close lands, or by withdrawing after the channel's delay. Absent otherwise.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        close_pending: bool,
    },
}

/// Why the stream of a `request` ended: the `reason` of `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// The resource finished its answer.
    Completed,
    /// The request's own limit (`maxTokens`) was reached.
    MaxTokens,
    /// The upstream refused or failed (an `error` with code `upstream_failed` says why).
    UpstreamFailed,
    /// The client replaced it with a new request, or closed the session.
    Cancelled,
    /// The engine restarted, or the session moved, under it; it is not replayed.
    Interrupted,
}

impl EndReason {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::MaxTokens => "max_tokens",
            Self::UpstreamFailed => "upstream_failed",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
        }
    }
}

/// The channel's accepted state, sent with errors so a client can re-sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorData {
    /// The accepted nonce.
    pub nonce: u64,
    /// The accepted cumulative.
    #[serde(with = "money::u128_string")]
    pub cumulative: u128,
    /// Consumption so far.
    #[serde(with = "money::u128_string")]
    pub consumed: u128,
    /// The payer's signature over (`nonce`, `cumulative`), when the server holds one: a
    /// client that lost its place re-syncs only to a state it can check it signed, so a lying
    /// server cannot make it sign for credit it never gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Bytes>,
}

/// Decodes a text frame, telling a malformed message from an unknown type.
pub fn decode_client(text: &str) -> Result<ClientMessage, ProtocolError> {
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge {
            len: text.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return Err(ProtocolError::Malformed("no string field `type`".into()));
    };
    if !matches!(kind, "open" | "resume" | "voucher" | "request" | "close") {
        return Err(ProtocolError::UnknownType(kind.chars().take(64).collect()));
    }
    serde_json::from_value(value).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Encodes an `app` message without copying its data: the same bytes as
/// `encode_server(&ServerMessage::App { seq, data })`.
pub fn encode_app(seq: u64, data: &serde_json::Value) -> String {
    #[derive(Serialize)]
    struct App<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        seq: u64,
        data: &'a serde_json::Value,
    }
    serde_json::to_string(&App {
        kind: "app",
        seq,
        data,
    })
    .expect("JSON values always serialize")
}

/// Encodes a server message as a text frame.
pub fn encode_server(message: &ServerMessage) -> String {
    serde_json::to_string(message).expect("server messages always serialize")
}

/// Decodes a server message (used by the client).
pub fn decode_server(text: &str) -> Result<ServerMessage, ProtocolError> {
    serde_json::from_str(text).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Encodes a client message (used by the client).
pub fn encode_client(message: &ClientMessage) -> String {
    serde_json::to_string(message).expect("client messages always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_client_message() {
        let sig = format!("0x{}", "11".repeat(65));
        let id = format!("0x{}", "ab".repeat(32));
        let open = format!(
            r#"{{"type":"open","channelId":"{id}","nonce":3,"cumulative":"1000","signature":"{sig}"}}"#
        );
        match decode_client(&open).unwrap() {
            ClientMessage::Open(s) => {
                assert_eq!((s.nonce, s.cumulative, s.signature.len()), (3, 1000, 65));
            }
            other => panic!("{other:?}"),
        }
        // A nonce as a decimal string is accepted too.
        let v = format!(
            r#"{{"type":"voucher","channelId":"{id}","nonce":"18446744073709551615","cumulative":"1","signature":"{sig}"}}"#
        );
        assert!(
            matches!(decode_client(&v).unwrap(), ClientMessage::Voucher(s) if s.nonce == u64::MAX)
        );
        assert_eq!(
            decode_client(r#"{"type":"close","closeChannel":true}"#).unwrap(),
            ClientMessage::Close {
                close_channel: true
            }
        );
        assert_eq!(
            decode_client(r#"{"type":"close"}"#).unwrap(),
            ClientMessage::Close {
                close_channel: false
            }
        );
        assert!(matches!(
            decode_client(r#"{"type":"request","body":{"prompt":"hi"}}"#).unwrap(),
            ClientMessage::Request { .. }
        ));
        assert!(matches!(
            decode_client(r#"{"type":"resume","token":"x.y.z"}"#).unwrap(),
            ClientMessage::Resume { .. }
        ));
    }

    #[test]
    fn refuses_bad_frames_with_the_right_code() {
        let cases = [
            ("not json", "malformed_message"),
            (r#"{"no":"type"}"#, "malformed_message"),
            (r#"{"type":"dance"}"#, "unknown_type"),
            (
                r#"{"type":"open","channelId":"0x12","nonce":1,"cumulative":"1","signature":"0x"}"#,
                "malformed_message",
            ),
            (
                r#"{"type":"voucher","channelId":"0x0000000000000000000000000000000000000000000000000000000000000000","nonce":1,"cumulative":"-5","signature":"0x"}"#,
                "malformed_message",
            ),
            (
                r#"{"type":"voucher","channelId":"0x0000000000000000000000000000000000000000000000000000000000000000","nonce":1,"cumulative":5,"signature":"0x"}"#,
                "malformed_message",
            ),
        ];
        for (text, code) in cases {
            assert_eq!(decode_client(text).unwrap_err().code(), code, "{text}");
        }
        let big = "x".repeat(MAX_MESSAGE_BYTES + 1);
        assert_eq!(decode_client(&big).unwrap_err().code(), "frame_too_large");
    }

    #[test]
    fn encode_app_matches_the_enum_encoding() {
        let data = serde_json::json!({ "token": "hello ", "n": [1, 2] });
        assert_eq!(
            encode_app(7, &data),
            encode_server(&ServerMessage::App { seq: 7, data })
        );
    }

    #[test]
    fn server_messages_use_the_design_names() {
        let m = ServerMessage::NeedVoucher {
            consumed: 5,
            cumulative: 10,
            suggested: 20,
            deadline_ms: 3000,
        };
        assert_eq!(
            encode_server(&m),
            r#"{"type":"need_voucher","consumed":"5","cumulative":"10","suggested":"20","deadlineMs":3000}"#
        );
        let m = ServerMessage::VoucherAck {
            nonce: 2,
            cumulative: 10,
            consumed: 4,
        };
        assert_eq!(
            encode_server(&m),
            r#"{"type":"voucher_ack","nonce":2,"cumulative":"10","consumed":"4"}"#
        );
        let m = ServerMessage::Resumed {};
        assert_eq!(encode_server(&m), r#"{"type":"resumed"}"#);
        let m = ServerMessage::Receipt {
            nonce: 1,
            cumulative: 2,
            consumed: 2,
            settled_amount: 2,
            refund: 8,
            close_pending: false,
        };
        assert_eq!(
            encode_server(&m),
            r#"{"type":"receipt","nonce":1,"cumulative":"2","consumed":"2","settledAmount":"2","refund":"8"}"#
        );
        assert_eq!(decode_server(&encode_server(&m)).unwrap(), m);
    }
}
