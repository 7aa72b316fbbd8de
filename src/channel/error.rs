//! Why a channel or a state was refused.

use alloy::primitives::{Address, B256};

use super::signature::SignatureError;
use crate::protocol::CloseCode;

/// `Result` with [`ChannelError`] as the default error.
pub type Result<T, E = ChannelError> = std::result::Result<T, E>;

/// A refused channel or channel state. Each variant names the protocol error code the client
/// receives; a refused state never changes the channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The signature is not the payer's over this state (wrong key, wrong domain, tampered
    /// field, high-s, flipped parity). Re-sign the state with the payer's key.
    #[error("invalid signature: {0}")]
    InvalidSignature(#[from] SignatureError),
    /// The state's nonce is not above the accepted one. Sign a new state with a higher nonce.
    #[error("stale nonce {got}: the accepted nonce is {current}")]
    StaleNonce {
        /// The nonce received.
        got: u64,
        /// The accepted nonce.
        current: u64,
    },
    /// The state authorizes less than an earlier one. Cumulative amounts only grow.
    #[error("cumulative {got} is below the accepted {current}")]
    CumulativeDecreased {
        /// The cumulative received.
        got: u128,
        /// The accepted cumulative.
        current: u128,
    },
    /// The state authorizes more than the channel holds. Top up the channel first.
    #[error("cumulative {got} exceeds the deposit {deposit}")]
    ExceedsDeposit {
        /// The cumulative received.
        got: u128,
        /// The channel's deposit.
        deposit: u128,
    },
    /// The state is for another channel than the session's.
    #[error("state is for channel {got}, the session is on {expected}")]
    WrongChannel {
        /// The channel id in the state.
        got: B256,
        /// The session's channel.
        expected: B256,
    },
    /// The channel is closed, closing, or unknown to the contract. Open a new channel.
    #[error("channel {channel_id} is not open: {reason}")]
    ChannelNotOpen {
        /// The channel.
        channel_id: B256,
        /// What the chain says.
        reason: &'static str,
    },
    /// The channel pays someone else than this server.
    #[error("channel pays {got}, this server is {expected}")]
    WrongPayee {
        /// The channel's payee.
        got: Address,
        /// This server's payee.
        expected: Address,
    },
    /// The channel holds another token than the one this server charges in.
    #[error("channel holds token {got}, this server charges in {expected}")]
    WrongToken {
        /// The channel's token.
        got: Address,
        /// This server's token.
        expected: Address,
    },
}

impl ChannelError {
    /// The snake_case protocol error code (DESIGN.md section 4.2).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidSignature(_) => "invalid_signature",
            Self::StaleNonce { .. } => "stale_nonce",
            Self::CumulativeDecreased { .. } => "cumulative_decreased",
            Self::ExceedsDeposit { .. } => "exceeds_deposit",
            Self::WrongChannel { .. } => "wrong_channel",
            Self::ChannelNotOpen { .. } => "channel_not_open",
            Self::WrongPayee { .. } => "wrong_payee",
            Self::WrongToken { .. } => "wrong_token",
        }
    }

    /// Whether the client can fix this on the same channel by sending another state.
    pub fn retriable(&self) -> bool {
        matches!(
            self,
            Self::InvalidSignature(_)
                | Self::StaleNonce { .. }
                | Self::CumulativeDecreased { .. }
                | Self::ExceedsDeposit { .. }
                | Self::WrongChannel { .. }
        )
    }

    /// The WebSocket close code when this error ends the session, or `None` when the session
    /// goes on under the last accepted state. A refused voucher is answered with an `error`
    /// message; a channel this server cannot be paid through ends the session with 4402.
    pub fn close_code(&self) -> Option<CloseCode> {
        if self.retriable() {
            None
        } else {
            Some(CloseCode::PaymentRequired)
        }
    }
}
