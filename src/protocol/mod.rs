//! The wire protocol (DESIGN.md section 4): the HTTP 402 challenge and the WebSocket message
//! types, as pure encode/decode. Nothing here touches a socket.

mod challenge;
mod error;
mod messages;
pub mod money;

pub use challenge::{
    ChannelStreamTerms, DomainTerms, PAYMENT_REQUIRED_HEADER, PROTOCOL, PaymentRequired,
    PaymentRequirements, Resource, SCHEME,
};
pub use error::ProtocolError;
pub use messages::{
    ClientMessage, EndReason, ErrorData, ServerMessage, SignedStateMsg, decode_client,
    decode_server, encode_app, encode_client, encode_server,
};

/// Largest client message accepted (64 KiB): vouchers are about 300 bytes, and requests
/// (prompts) larger than this belong in an upload, not a control frame.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// WebSocket close codes of DESIGN.md section 4.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// 1000: normal close.
    Normal = 1000,
    /// 1001: the server is going away; the session can be resumed.
    GoingAway = 1001,
    /// 1008: policy violation.
    Policy = 1008,
    /// 1009: a frame or message is too large.
    TooLarge = 1009,
    /// 1011: internal error.
    Internal = 1011,
    /// 4401: bad resume token.
    BadResumeToken = 4401,
    /// 4402: payment required or failed.
    PaymentRequired = 4402,
    /// 4408: voucher deadline missed.
    VoucherDeadline = 4408,
    /// 4409: session superseded by another connection.
    SessionSuperseded = 4409,
    /// 4429: rate limited.
    RateLimited = 4429,
}

impl CloseCode {
    /// The numeric code sent in the close frame.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}
