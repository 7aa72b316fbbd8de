//! The persistence boundary for accepted channel states (DESIGN.md section 6): a
//! `ChannelStore` trait with Redis and in-memory implementations. Arrives with the session work.
