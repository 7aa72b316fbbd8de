//! Fault injection for the settler's tests: an anvil that can be stopped and started again
//! from its saved state, and a TCP proxy that can drop the RPC connections.
