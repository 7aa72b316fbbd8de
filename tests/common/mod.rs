//! Helpers shared by the integration tests.

#![allow(dead_code)]

pub mod anvil;
pub mod faults;
pub mod raw;
pub mod redis;
pub mod serve;
pub mod stack;
pub mod vectors;
