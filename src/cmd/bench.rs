//! `paystream bench signatures`: how many voucher signatures per second this engine verifies on
//! this machine, on the engine's own paths (the EIP-712 digest and the check, as the server
//! runs them): a single check with the payer's key cached (no table: "cold") and with its table
//! ("warm"), batches of 8, 32 and 128, on one core and on all cores; plus what a new payer's
//! first voucher costs (the key recovered) and the payer tables' size and build time.
//!
//! Prints one JSON object; its `answer` (also on standard error) is the one-line answer.
//! `docs/BENCHMARKS.md` has the criterion figures beside libsecp256k1, which this command cannot
//! link (it is a dev-dependency).

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use anyhow::{bail, ensure};
use clap::{Args, Subcommand};
use k256::ecdsa::SigningKey;
use paystream::channel::ecmult::{Key, KeyTable};
use paystream::channel::{ChannelDomain, ChannelState, PayerKeys, SignedState, signature};
use serde_json::{Map, Value, json};

/// The `bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Voucher signatures verified per second on this machine: single (cold key, warm key),
    /// batched (8, 32, 128), one core and all cores.
    Signatures(SignaturesArgs),
}

/// Options of `bench signatures`.
#[derive(Debug, Args)]
pub struct SignaturesArgs {
    /// Distinct payers in the working set (their keys and tables are cached first).
    #[arg(long, default_value_t = 64)]
    payers: usize,
    /// Seconds each figure is measured for.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Threads for the all-cores figures (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

/// Batch sizes measured.
const BATCHES: [usize; 3] = [8, 32, 128];

/// Runs a `bench` subcommand.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Signatures(args) => signatures(&args),
    }
}

/// Vouchers of a working set: voucher `k` is by payer `k % payers`, so consecutive vouchers
/// (a batch) are by distinct payers when there are enough of them.
struct Workload {
    domain: ChannelDomain,
    vouchers: Vec<(Address, SignedState)>,
    keys: Vec<SigningKey>,
}

impl Workload {
    fn new(payers: usize) -> anyhow::Result<Self> {
        let domain = ChannelDomain::new(8453, Address::repeat_byte(0xcc));
        let keys: Vec<SigningKey> = (0..payers)
            .map(|_| {
                loop {
                    let mut secret = [0u8; 32];
                    getrandom::fill(&mut secret).expect("the OS provides randomness");
                    if let Ok(key) = SigningKey::from_slice(&secret) {
                        break key;
                    }
                }
            })
            .collect();
        let count = payers.max(2 * BATCHES[BATCHES.len() - 1]);
        let vouchers = (0..count)
            .map(|k| {
                let key = &keys[k % payers];
                let state = ChannelState {
                    channelId: B256::from(alloy::primitives::U256::from(k % payers)),
                    nonce: 1 + k as u64,
                    cumulative: 1_000 * (k as u128 + 1),
                };
                let signature = signature::sign_digest(key, &domain.state_digest(&state));
                (
                    signature::address_of(key.verifying_key()),
                    SignedState { state, signature },
                )
            })
            .collect();
        Ok(Self {
            domain,
            vouchers,
            keys,
        })
    }

    /// A key cache holding every payer's key, and its table if `tables`.
    fn cache(&self, tables: bool) -> anyhow::Result<PayerKeys> {
        let payers = self.keys.len();
        let capacity = NonZeroUsize::new(2 * payers).expect("at least one payer");
        let budget = if tables {
            2 * payers * KeyTable::size_bytes() + (1 << 20)
        } else {
            0
        };
        let keys = PayerKeys::with_table_bytes(capacity, budget);
        // The first check recovers the key, the second builds the table.
        for _ in 0..2 {
            for (payer, voucher) in &self.vouchers[..payers.min(self.vouchers.len())] {
                keys.verify_state(&self.domain, *payer, voucher)?;
            }
        }
        ensure!(
            !tables || keys.tables() == payers,
            "the table cache should hold every payer"
        );
        Ok(keys)
    }
}

/// Calls `step` (which checks some vouchers and returns how many) from `offset` on for about
/// `seconds`; returns checks per second.
fn rate(
    seconds: f64,
    offset: usize,
    step: &(dyn Fn(usize) -> anyhow::Result<usize> + Sync),
) -> anyhow::Result<f64> {
    let until = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let (mut checked, mut i) = (0usize, offset);
    while started.elapsed() < until {
        let n = step(i)?;
        checked += n;
        i += n;
    }
    Ok(checked as f64 / started.elapsed().as_secs_f64())
}

/// `rate` on `threads` threads at once, each from its own offset; the sum of their rates.
fn rate_on(
    threads: usize,
    seconds: f64,
    len: usize,
    step: &(dyn Fn(usize) -> anyhow::Result<usize> + Sync),
) -> anyhow::Result<f64> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| scope.spawn(move || rate(seconds, t * len / threads, step)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .sum()
    })
}

fn signatures(args: &SignaturesArgs) -> anyhow::Result<()> {
    if args.payers == 0 || args.seconds.is_nan() || args.seconds <= 0.0 {
        bail!("--payers and --seconds must be positive");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or(cores).max(1);
    eprintln!(
        "signing vouchers for {} payers, building their tables, then {} figures of {} s each",
        args.payers,
        2 + BATCHES.len(),
        args.seconds
    );
    let work = &Workload::new(args.payers)?;
    let n = work.vouchers.len();
    paystream::channel::ecmult::warm_up();

    // Table size and build time.
    let points: Vec<Key> = work
        .keys
        .iter()
        .take(256)
        .map(|k| Key::new(k.verifying_key().as_affine()).expect("a public key"))
        .collect();
    let started = Instant::now();
    let built: Vec<KeyTable> = points.iter().map(KeyTable::new).collect();
    let build_us = started.elapsed().as_secs_f64() * 1e6 / built.len() as f64;

    let cold = work.cache(false)?;
    let warm = work.cache(true)?;
    let cold_step = |i: usize| -> anyhow::Result<usize> {
        let (payer, voucher) = &work.vouchers[i % n];
        cold.verify_state(&work.domain, *payer, voucher)?;
        Ok(1)
    };
    let warm_step = |i: usize| -> anyhow::Result<usize> {
        let (payer, voucher) = &work.vouchers[i % n];
        warm.verify_state(&work.domain, *payer, voucher)?;
        Ok(1)
    };
    let batch = |size: usize| {
        let warm = &warm;
        move |i: usize| -> anyhow::Result<usize> {
            let start = i % (n - size + 1);
            let items: Vec<(ChannelDomain, Address, SignedState)> = work.vouchers
                [start..start + size]
                .iter()
                .map(|(payer, voucher)| (work.domain, *payer, voucher.clone()))
                .collect();
            let (results, fell_back) = warm.verify_states(&items);
            ensure!(!fell_back, "a batch of valid vouchers fell back");
            for result in results {
                result?;
            }
            Ok(size)
        }
    };
    let recover = |i: usize| -> anyhow::Result<usize> {
        let (payer, voucher) = &work.vouchers[i % n];
        let digest = work.domain.state_digest(&voucher.state);
        ensure!(signature::recover_address(&digest, &voucher.signature)? == *payer);
        Ok(1)
    };

    let mut one = Map::new();
    let mut all = Map::new();
    let s = args.seconds;
    for (name, step) in [
        (
            "single_cold_key",
            &cold_step as &(dyn Fn(usize) -> anyhow::Result<usize> + Sync),
        ),
        ("single_warm_key", &warm_step),
    ] {
        one.insert(name.into(), json!(rate(s, 0, step)?.round()));
        all.insert(name.into(), json!(rate_on(threads, s, n, step)?.round()));
    }
    let mut best = ("single_warm_key".to_string(), 0.0f64);
    for size in BATCHES {
        let step = batch(size);
        let name = format!("batch_{size}");
        let on_all = rate_on(threads, s, n, &step)?;
        one.insert(name.clone(), json!(rate(s, 0, &step)?.round()));
        all.insert(name.clone(), json!(on_all.round()));
        if on_all > best.1 {
            best = (name, on_all);
        }
    }
    one.insert(
        "recover_new_payer".into(),
        json!(rate(s, 0, &recover)?.round()),
    );

    let figure = |m: &Map<String, Value>, k: &str| m[k].as_f64().unwrap_or(0.0);
    let answer = format!(
        "{} voucher signatures/s on {threads} threads ({}), {} on one core; a single check: {} (warm key), {} (cold key) on one core",
        thousands(best.1),
        best.0.replace('_', " of ").replace("batch", "batches"),
        thousands(figure(&one, &best.0)),
        thousands(figure(&one, "single_warm_key")),
        thousands(figure(&one, "single_cold_key")),
    );
    eprintln!("{answer}");
    let report = json!({
        "answer": answer,
        "unit": "verifications per second (EIP-712 digest and signature check)",
        "payers": args.payers,
        "threads": threads,
        "cores": cores,
        "seconds_per_figure": s,
        "one_core": one,
        "all_cores": all,
        "table_bytes_per_payer": KeyTable::size_bytes(),
        "table_build_us": (build_us * 10.0).round() / 10.0,
    });
    println!("{report}");
    Ok(())
}

/// `12345.6` as `12,346`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234.0), "1,234");
        assert_eq!(thousands(1234567.0), "1,234,567");
    }
}
