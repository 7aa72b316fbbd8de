//! Exact, nanosecond-precise usage accounting and pricing (DESIGN.md section 5); time is
//! passed in, never read. Arrives with the metering issue.
