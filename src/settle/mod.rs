//! The batch settler (DESIGN.md section 7): bounded queue, batch size and delay, retries and
//! reconciliation with on-chain `claimed` values. Arrives with the settlement work.
