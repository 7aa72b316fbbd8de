//! The on-chain boundary (DESIGN.md section 3): contract bindings from the committed artifact,
//! an alloy JSON-RPC implementation and an in-process EVM one. Arrives with the contract issue.
