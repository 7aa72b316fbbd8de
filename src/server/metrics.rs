//! Counters for `/metrics` (Prometheus text format). Atomics: updating one costs a few
//! nanoseconds and never blocks a session.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (µs) of the latency histograms.
const LATENCY_BUCKETS_US: [u64; 11] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
];

/// A latency histogram in microseconds, written in seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation of `us` microseconds.
    pub fn observe(&self, us: u64) {
        for (bucket, bound) in self.buckets.iter().zip(LATENCY_BUCKETS_US) {
            if us <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Records the time since `started`.
    pub fn observe_since(&self, started: std::time::Instant) {
        self.observe(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bucket, bound) in self.buckets.iter().zip(LATENCY_BUCKETS_US) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {}",
                bound as f64 / 1e6,
                load(bucket)
            );
        }
        let count = load(&self.count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", load(&self.sum_us) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Sessions open now.
    pub sessions_active: AtomicU64,
    /// Sessions opened since start.
    pub sessions_total: AtomicU64,
    /// Vouchers stored and acknowledged.
    pub vouchers_accepted: AtomicU64,
    /// Refusals by error code (vouchers and other input).
    rejected: Mutex<BTreeMap<String, u64>>,
    /// Base units consumed, counted once each, when sessions are suspended or end.
    pub consumed_total: AtomicU64,
    /// Base units queued or closed for settlement, counted once each.
    pub settled_total: AtomicU64,
    /// Times delivery paused.
    pub pauses_total: AtomicU64,
    /// Application messages delivered.
    pub messages_total: AtomicU64,
    /// Connection timer wake-ups (a session's deadlines, usage, credit running out): what
    /// idle and paused sessions cost.
    pub wakeups_total: AtomicU64,
    /// Channel events the chain watcher read.
    pub chain_events: AtomicU64,
    /// Connections closed because a send did not complete within the send timeout.
    pub send_timeouts: AtomicU64,
    /// Connections refused at the connection limit (answered 503, or closed unanswered).
    pub refused_at_capacity: AtomicU64,
    /// The size of a connection's future (what its task holds across its awaits), bytes.
    pub connection_future_bytes: AtomicU64,
    /// Sessions resumed that this process served last (a reconnect to the same process).
    pub resumed_local: AtomicU64,
    /// Sessions resumed that another process (or this one before a restart) served last.
    pub resumed_remote: AtomicU64,
    /// Channel leases this process holds now (one per live session).
    pub leases_held: AtomicU64,
    /// Leases lost: found taken by another process at renewal, or by a write refused for its
    /// fence (delivery had stopped at the lease's deadline).
    pub leases_lost: AtomicU64,
    /// Leases handed over: a resume on another process asked for the channel, and this one
    /// let the session go.
    pub leases_handed_over: AtomicU64,
    /// Leases taken over: a session resumed here from another process (or a restart).
    pub leases_taken_over: AtomicU64,
    /// Money writes the store refused because their fencing token was stale.
    pub fencing_refusals: AtomicU64,
    /// A voucher's whole step in a session: from the message read to the acknowledgment (or
    /// the refusal) sent.
    pub voucher_latency: Histogram,
    /// Signature checks (queue wait included), every voucher and `open`.
    pub signature_latency: Histogram,
    /// Voucher writes to the store (the fenced compare-and-set).
    pub store_latency: Histogram,
}

impl Metrics {
    /// Counts one refusal with `code`.
    pub fn rejected(&self, code: &str) {
        let mut map = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(code.to_string()).or_default() += 1;
    }

    /// Adds to a counter, saturating at `u64::MAX` for huge amounts.
    pub fn add_amount(counter: &AtomicU64, amount: u128) {
        counter.fetch_add(u64::try_from(amount).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        counter(
            "paystream_sessions_active",
            "Sessions open now.",
            "gauge",
            load(&self.sessions_active),
        );
        counter(
            "paystream_sessions_total",
            "Sessions opened.",
            "counter",
            load(&self.sessions_total),
        );
        counter(
            "paystream_vouchers_accepted_total",
            "Vouchers stored and acknowledged.",
            "counter",
            load(&self.vouchers_accepted),
        );
        counter(
            "paystream_consumed_base_units_total",
            "Base units consumed, counted when sessions are suspended or end.",
            "counter",
            load(&self.consumed_total),
        );
        counter(
            "paystream_settled_base_units_total",
            "Base units queued or closed for settlement.",
            "counter",
            load(&self.settled_total),
        );
        counter(
            "paystream_pauses_total",
            "Times delivery paused for credit or the store.",
            "counter",
            load(&self.pauses_total),
        );
        counter(
            "paystream_messages_total",
            "Application messages delivered.",
            "counter",
            load(&self.messages_total),
        );
        counter(
            "paystream_wakeups_total",
            "Connection timer wake-ups.",
            "counter",
            load(&self.wakeups_total),
        );
        counter(
            "paystream_chain_events_total",
            "Channel events read from the contract.",
            "counter",
            load(&self.chain_events),
        );
        counter(
            "paystream_send_timeouts_total",
            "Connections closed because a send did not complete in time.",
            "counter",
            load(&self.send_timeouts),
        );
        counter(
            "paystream_refused_at_capacity_total",
            "Connections refused at the connection limit (503 with Retry-After).",
            "counter",
            load(&self.refused_at_capacity),
        );
        counter(
            "paystream_connection_future_bytes",
            "Bytes a connection's task holds across its awaits.",
            "gauge",
            load(&self.connection_future_bytes),
        );
        counter(
            "paystream_leases_held",
            "Channel leases held by this process (one per live session).",
            "gauge",
            load(&self.leases_held),
        );
        counter(
            "paystream_leases_lost_total",
            "Leases found taken by another process (at renewal, or by a fenced write).",
            "counter",
            load(&self.leases_lost),
        );
        counter(
            "paystream_leases_handed_over_total",
            "Sessions let go because a resume on another process asked for them.",
            "counter",
            load(&self.leases_handed_over),
        );
        counter(
            "paystream_leases_taken_over_total",
            "Sessions resumed here that another process (or this one before a restart) served.",
            "counter",
            load(&self.leases_taken_over),
        );
        counter(
            "paystream_fencing_refusals_total",
            "Money writes the store refused for a stale fencing token.",
            "counter",
            load(&self.fencing_refusals),
        );
        let _ = writeln!(
            out,
            "# HELP paystream_sessions_resumed_total Sessions resumed, by where they were served last.\n# TYPE paystream_sessions_resumed_total counter"
        );
        let _ = writeln!(
            out,
            "paystream_sessions_resumed_total{{from=\"local\"}} {}",
            load(&self.resumed_local)
        );
        let _ = writeln!(
            out,
            "paystream_sessions_resumed_total{{from=\"remote\"}} {}",
            load(&self.resumed_remote)
        );
        let _ = writeln!(
            out,
            "# HELP paystream_rejected_total Refused input by error code.\n# TYPE paystream_rejected_total counter"
        );
        for (code, n) in self
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "paystream_rejected_total{{code=\"{code}\"}} {n}");
        }
        self.voucher_latency.render(
            &mut out,
            "paystream_voucher_verification_seconds",
            "A voucher from its message read to its acknowledgment: checks, signature, store write.",
        );
        self.signature_latency.render(
            &mut out,
            "paystream_signature_check_seconds",
            "Signature checks of vouchers and opens, queue wait included.",
        );
        self.store_latency.render(
            &mut out,
            "paystream_voucher_store_seconds",
            "Voucher writes to the store (the fenced compare-and-set).",
        );
        out
    }
}
