//! The binary's subcommands. Each prints one JSON object on standard output.

pub mod bench;
pub mod demo;
pub mod deploy;
pub mod load;
pub mod pay;
pub mod serve;
pub mod settle;
pub mod state;
