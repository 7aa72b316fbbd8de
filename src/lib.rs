//! PayStream: an off-chain state-channel payment streaming engine.
//!
//! A service puts PayStream in front of a stream (an LLM's tokens, a data feed, any WebSocket
//! resource) and is paid for exactly what each client receives. The client signs nonce-ordered
//! EIP-712 channel states (vouchers) off-chain; the engine meters usage exactly, asks for a
//! fresh voucher before credit runs low, keeps channel state in a store, and a batch settler
//! redeems the vouchers on-chain against the `PaymentChannels` contract.
//!
//! # Layout
//!
//! - [`channel`]: the signed state, its EIP-712 hashing, signatures, and the pure acceptance rules.
//! - [`meter`]: pure, nanosecond-precision usage accounting and pricing; time is passed in.
//! - [`protocol`]: the HTTP 402 challenge and the WebSocket messages; pure encode/decode.
//! - [`session`]: per-connection logic, I/O-free: message in, effects out.
//! - [`store`]: the persistence boundary; Redis in production, in-memory for tests.
//! - [`chain`] and [`settle`]: the on-chain boundary and the batch settler.
//! - [`server`]: the only tokio, WebSocket and HTTP code.
//! - [`client`]: the paying client.
//! - [`config`]: configuration sections and their defaults.
//!
//! # Data flow
//!
//! ```text
//! client ──HTTP GET──▶ 402 challenge (x402 v2 PaymentRequired, scheme "channel-stream")
//! client ──on-chain──▶ PaymentChannels.open(payee, token, salt, amount, withdrawDelay)
//! client ══WebSocket══▶ server ─▶ session ─▶ meter ─▶ channel ─▶ store
//!                              ◀── app messages, usage, need_voucher ◀──┘
//! server: ended sessions ─▶ settle ─▶ PaymentChannels.settle(claims[]) on-chain, batched
//! ```
//!
//! Dependencies point one way: `server -> session -> {meter, channel, protocol}`; `channel`,
//! `meter` and `protocol` never touch tokio, Redis, WebSockets or an RPC provider.

#![warn(missing_docs)]

pub mod chain;
pub mod channel;
pub mod client;
pub mod config;
pub mod meter;
pub mod protocol;
pub mod server;
pub mod session;
pub mod settle;
mod shared;
pub mod store;
