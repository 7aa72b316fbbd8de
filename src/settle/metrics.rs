//! The settler's counters for `/metrics` (Prometheus text format): what is pending (claims,
//! value, oldest age), what went out (batches, claims per batch, gas per claim), what the
//! contract skipped and what failed, by cause, and how long confirmations took.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The settler's counters.
#[derive(Debug, Default)]
pub struct SettleMetrics {
    /// Claims queued and not settled, at the last pass.
    pub pending_claims: AtomicU64,
    /// Their unsettled value (base units, saturating), at the last pass.
    pub pending_value: AtomicU64,
    /// Age of the oldest of them (seconds), at the last pass.
    pub oldest_pending_secs: AtomicU64,
    /// Transactions waiting for confirmations, at the last pass.
    pub in_flight: AtomicU64,
    /// Settlement transactions sent (replacements not counted).
    pub batches: AtomicU64,
    /// Claims in them.
    pub batch_claims: AtomicU64,
    /// Claims the chain shows paid, with the configured confirmations.
    pub claims_settled: AtomicU64,
    /// Gas used by confirmed settlement transactions.
    pub gas_used: AtomicU64,
    /// Confirmed settlement transactions (the denominator of the gas and wait figures).
    pub confirmed_batches: AtomicU64,
    /// Seconds from a batch's first broadcast to its confirmation, summed.
    pub confirm_seconds: AtomicU64,
    /// Transactions re-sent with a higher fee (stuck) or again (dropped).
    pub replacements: AtomicU64,
    /// Cooperative closes done for a server without a key.
    pub closes: AtomicU64,
    skips: Mutex<BTreeMap<String, u64>>,
    failures: Mutex<BTreeMap<String, u64>>,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str, n: u64) {
    *map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.to_string())
        .or_default() += n;
}

impl SettleMetrics {
    /// Counts a claim the contract skipped, by reason.
    pub fn skipped(&self, reason: &str) {
        bump(&self.skips, reason, 1);
    }

    /// Counts a failed pass or step, by cause (`rpc`, `store`).
    pub fn failed(&self, cause: &str) {
        bump(&self.failures, cause, 1);
    }

    /// The skips, by reason.
    pub fn skips(&self) -> BTreeMap<String, u64> {
        self.skips.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, &AtomicU64); 12] = [
            (
                "paystream_settle_pending_claims",
                "Claims queued and not settled.",
                "gauge",
                &self.pending_claims,
            ),
            (
                "paystream_settle_pending_value_base_units",
                "Unsettled value of the queued claims.",
                "gauge",
                &self.pending_value,
            ),
            (
                "paystream_settle_oldest_pending_seconds",
                "Age of the oldest queued claim.",
                "gauge",
                &self.oldest_pending_secs,
            ),
            (
                "paystream_settle_in_flight",
                "Settlement transactions waiting for confirmations.",
                "gauge",
                &self.in_flight,
            ),
            (
                "paystream_settle_batches_total",
                "Settlement transactions sent.",
                "counter",
                &self.batches,
            ),
            (
                "paystream_settle_batch_claims_total",
                "Claims in the settlement transactions sent.",
                "counter",
                &self.batch_claims,
            ),
            (
                "paystream_settle_claims_settled_total",
                "Claims the chain shows paid, confirmed.",
                "counter",
                &self.claims_settled,
            ),
            (
                "paystream_settle_gas_used_total",
                "Gas used by confirmed settlement transactions.",
                "counter",
                &self.gas_used,
            ),
            (
                "paystream_settle_confirmed_batches_total",
                "Confirmed settlement transactions.",
                "counter",
                &self.confirmed_batches,
            ),
            (
                "paystream_settle_confirm_seconds_total",
                "Seconds from first broadcast to confirmation, summed.",
                "counter",
                &self.confirm_seconds,
            ),
            (
                "paystream_settle_replacements_total",
                "Transactions sent again with a higher fee or after being dropped.",
                "counter",
                &self.replacements,
            ),
            (
                "paystream_settle_closes_total",
                "Cooperative closes done for a server without a key.",
                "counter",
                &self.closes,
            ),
        ];
        for (name, help, kind, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                load(value)
            );
        }
        for (name, help, map) in [
            (
                "paystream_settle_skips_total",
                "Claims the contract skipped, by reason.",
                &self.skips,
            ),
            (
                "paystream_settle_failures_total",
                "Failed settler steps, by cause.",
                &self.failures,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (key, n) in map.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let label = if name.ends_with("skips_total") {
                    "reason"
                } else {
                    "cause"
                };
                let _ = writeln!(out, "{name}{{{label}=\"{key}\"}} {n}");
            }
        }
        out
    }
}
