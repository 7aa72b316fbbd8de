//! Why a frame was refused.

use super::CloseCode;

/// A frame that could not be decoded. The session is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not JSON, a missing or wrong field, a wrong type. Fix the message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A `type` this server does not know.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// Above the size limit.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A binary frame from the client (the protocol's client messages are text).
    #[error("binary frames from the client are not part of the protocol")]
    Binary,
}

impl ProtocolError {
    /// The protocol error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) | Self::Binary => "malformed_message",
            Self::UnknownType(_) => "unknown_type",
            Self::TooLarge { .. } => "frame_too_large",
        }
    }

    /// The close code when this ends the session: an oversized frame does (1009); the others
    /// are answered with an `error` and the session goes on.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            Self::TooLarge { .. } => Some(CloseCode::TooLarge),
            _ => None,
        }
    }
}
