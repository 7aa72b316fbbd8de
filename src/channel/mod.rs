//! The signed channel state: EIP-712 types and hashing, signatures, and the pure rules for
//! accepting a new state on an open channel (DESIGN.md section 2).
//!
//! Nothing here does I/O: the chain's view of a channel comes in as a [`ChannelInfo`], and a
//! voucher is accepted or refused by [`OpenChannel::accept`] with a [`ChannelError`] that names
//! the protocol code.

pub mod ecmult;
mod error;
mod rules;
pub mod signature;
mod state;

pub use error::{ChannelError, Result};
pub use rules::{AcceptedState, ChannelInfo, OpenChannel, SignedState, VerifiedState};
pub use signature::{PayerKeys, SignatureError};
pub use state::{
    CHANNEL_STATE_TYPE, CHANNEL_STATE_TYPEHASH, CLOSE_TYPE, CLOSE_TYPEHASH, ChannelDomain,
    ChannelKey, ChannelState, Close, DOMAIN_NAME, DOMAIN_VERSION, close_struct_hash,
    state_digest_via_alloy, state_struct_hash,
};
