//! The binary's subcommands. Each prints one JSON object on standard output.

pub mod deploy;
pub mod serve;
pub mod state;
