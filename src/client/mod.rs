//! The paying client library used by `paystream pay`, the demo and the tests (DESIGN.md
//! section 8). Arrives with the client issue.
