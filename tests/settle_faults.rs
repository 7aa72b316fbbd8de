//! The settler under faults (issue 10): anvil stopped mid-batch and started again from its saved
//! state, a proxy that drops the RPC connection, and the settler SIGKILLed between submission and
//! receipt: in each, nothing is settled twice, nothing is lost, and the queue drains.

mod common;
