//! Per-connection logic, I/O-free: message and time in, effects out (DESIGN.md sections 4.2
//! and 6). Arrives with the server issue.
