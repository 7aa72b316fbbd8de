//! What can go wrong at the chain boundary.

use alloy::primitives::{B256, Bytes};
use alloy::sol_types::SolInterface;

use super::bindings::PaymentChannels::PaymentChannelsErrors;

/// `Result` with [`ChainError`] as the default error.
pub type Result<T, E = ChainError> = std::result::Result<T, E>;

/// A failed chain operation. [`ChainError::retriable`] says whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The contract refused the call with one of its custom errors. Fix the input; retrying the
    /// same call fails the same way.
    #[error("the contract reverted: {0:?}")]
    Reverted(PaymentChannelsErrors),
    /// The call reverted with data that is not one of the contract's errors.
    #[error("the call reverted with unrecognized data {0}")]
    RevertedOther(Bytes),
    /// The transaction was mined but failed (status 0), with no revert data available.
    #[error("transaction {0} failed on-chain")]
    Failed(B256),
    /// The node could not be reached or answered with an error. Retry with backoff.
    #[error("RPC error: {0}")]
    Rpc(String),
    /// The in-process EVM refused the transaction itself (not a revert).
    #[error("EVM error: {0}")]
    Evm(String),
    /// The node's answer could not be decoded.
    #[error("undecodable answer: {0}")]
    Decode(String),
}

impl ChainError {
    /// Decodes revert data into the contract's error, or keeps the raw bytes.
    pub fn from_revert(data: Bytes) -> Self {
        match PaymentChannelsErrors::abi_decode(&data) {
            Ok(error) => Self::Reverted(error),
            Err(_) => Self::RevertedOther(data),
        }
    }

    /// Whether the same operation may succeed later (a transport failure), as opposed to a
    /// refusal by the contract.
    pub fn retriable(&self) -> bool {
        matches!(self, Self::Rpc(_))
    }
}
