//! `paystream load <url>`: a load generator against a running server on this machine. It opens
//! the channels it needs (many payers, transactions broadcast without waiting for each
//! receipt), then holds N concurrent paid sessions, each streaming at a set rate and answering
//! `need_voucher`, for a bounded time; it ramps up, holds, shows its progress every second, and
//! prints one JSON report: sessions held, setups per second, messages and vouchers per second,
//! the voucher round trip (p50, p99, max, and its distribution), errors by code, and the
//! server's resident memory per session (before and after, when given its PID).
//!
//! Bounded: at most 20,000 sessions and 10 minutes; loopback servers only. The payers are
//! anvil's well-known development accounts unless `PAYSTREAM_LOAD_KEYS` names funded keys.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use k256::ecdsa::SigningKey;
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{Backend, Channels, Fees, TxParams, TxSender};
use paystream::channel::{ChannelDomain, ChannelKey};
use paystream::client::fetch_challenge;
use paystream::protocol::{
    ClientMessage, ServerMessage, SignedStateMsg, decode_server, encode_client,
};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The most sessions one run holds.
pub const MAX_SESSIONS: usize = 20_000;
/// The longest a run holds its sessions.
pub const MAX_HOLD_SECS: u64 = 600;
/// anvil's first ten development keys (its default mnemonic): funded on a local anvil only.
const ANVIL_KEYS: [&str; 10] = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4ac591d0ca4c2f4e2c6aaa2f3f2a2ff",
];

/// Flags of `paystream load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The resource URL on 127.0.0.1 (answers 402 with the terms).
    url: String,
    /// JSON-RPC endpoint of the chain the server reads.
    #[arg(long, env = "PAYSTREAM_RPC_URL")]
    rpc_url: String,
    /// Concurrent paid sessions to hold.
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Tokens a second each session's stream asks for (`tokensPerSec`; the server's rate caps it).
    #[arg(long, default_value_t = 1)]
    rate: u32,
    /// Seconds to hold every session once they are all open.
    #[arg(long, default_value_t = 10)]
    hold: u64,
    /// Each streaming session starts its stream after a delay drawn uniformly from this many
    /// milliseconds (by its channel id, a hash), so that the vouchers of sessions opened in the
    /// same instant arrive at a steady rate rather than in bursts of all the sessions at once
    /// (0: every stream starts as soon as its session opens).
    #[arg(long, default_value_t = 1_000)]
    stagger_ms: u64,
    /// Sessions opening at once during the ramp.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Deposit per channel (base units).
    #[arg(long, default_value_t = 1_000_000_000)]
    deposit: u128,
    /// The server's PID: its resident memory is read before and after.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Funded payer keys, comma-separated (default: anvil's development accounts).
    #[arg(long, env = "PAYSTREAM_LOAD_KEYS", hide_env_values = true)]
    keys: Option<String>,
    /// A file of funded payer keys, one a line (for thousands of payers: more than an
    /// environment variable holds). With as many keys as sessions, every session has its own
    /// payer, whose first check the server makes on a key it has never seen.
    #[arg(long, conflicts_with = "keys")]
    keys_file: Option<std::path::PathBuf>,
}

/// What the sessions saw, shared.
#[derive(Debug, Default)]
struct Stats {
    open: AtomicU64,
    opened: AtomicU64,
    /// Sessions that ended without opening.
    failed: AtomicU64,
    messages: AtomicU64,
    vouchers: AtomicU64,
    /// Setup times (connect to `session`), µs.
    setups: Mutex<Vec<u32>>,
    /// Voucher round trips (sent to `voucher_ack`), µs.
    rtts: Mutex<Vec<u32>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn error(&self, code: impl Into<String>) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code.into())
            .or_default() += 1;
    }

    fn sample(list: &Mutex<Vec<u32>>, d: Duration) {
        let us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        list.lock().unwrap_or_else(|p| p.into_inner()).push(us);
    }
}

/// The quantile `q` of `samples` (µs) in milliseconds.
fn quantile_ms(samples: &mut [u32], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    f64::from(samples[i]) / 1_000.0
}

/// The quantiles a latency distribution is drawn from (`scripts/bench` plots them).
const DISTRIBUTION: [f64; 19] = [
    0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998,
    0.999, 1.0,
];

/// `[[quantile, ms], ...]` at [`DISTRIBUTION`]'s quantiles.
fn distribution_ms(samples: &mut [u32]) -> Vec<[f64; 2]> {
    DISTRIBUTION
        .iter()
        .map(|&q| [q, quantile_ms(samples, q)])
        .collect()
}

/// The resident memory of `pid`, KiB (Linux).
/// Seconds since the Unix epoch (to match the hold with other tools' records, such as Redis's
/// latency monitor).
fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The server's `/metrics` text, if it answers.
async fn server_metrics(resource_url: &str) -> Option<String> {
    let base = resource_url
        .split('/')
        .take(3)
        .collect::<Vec<_>>()
        .join("/");
    reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// An unlabelled metric of the server's `/metrics`, if it answers.
async fn server_metric(resource_url: &str, name: &str) -> Option<u64> {
    server_metrics(resource_url)
        .await?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A latency histogram of the server's `/metrics` text: the count, the mean (ms), and the
/// bucket bounds (ms) the median and the 99th percentile fall under.
fn histogram_ms(text: &str, name: &str) -> Option<serde_json::Value> {
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let (mut sum, mut count) = (0.0, 0u64);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{le=\"")) {
            let (le, n) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            buckets.push((le * 1_000.0, n.trim().parse().ok()?));
        } else if let Some(v) = line.strip_prefix(&format!("{name}_sum ")) {
            sum = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix(&format!("{name}_count ")) {
            count = v.trim().parse().ok()?;
        }
    }
    if count == 0 {
        return None;
    }
    let under = |q: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n as f64 >= q * count as f64)
            .map(|(le, _)| if le.is_finite() { Some(*le) } else { None })
    };
    Some(serde_json::json!({
        "count": count,
        "mean": 1_000.0 * sum / count as f64,
        "p50Under": under(0.5),
        "p99Under": under(0.99),
    }))
}

/// The CPU time `pid` has used, seconds (Linux: user and system time from `/proc/PID/stat`).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command (which may hold spaces) start after its closing ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks as f64 / 100.0)
}

/// Everything a session needs to open and pay.
struct Ctx {
    ws_url: String,
    domain: ChannelDomain,
    window: u128,
    deposit: u128,
    rate: u32,
    stagger: Duration,
}

/// A session not open this long after it began connecting has failed (`setup timeout`): its
/// place in the ramp goes to the next one, so a server that hangs cannot hang the run.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Small buffers on the load side too: the generator holds as many sockets as the server.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// One paid session: open, stream, answer `need_voucher`, until `stop`; then close. The ramp's
/// permit is given back once the session is open (or has failed).
async fn session(
    ctx: Arc<Ctx>,
    key: SigningKey,
    channel: B256,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
    ramp: tokio::sync::OwnedSemaphorePermit,
) {
    let mut ramp = Some(ramp);
    let opened = run_session(&ctx, &key, channel, &stats, &mut stop, &mut ramp).await;
    if !opened {
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }
}

async fn run_session(
    ctx: &Ctx,
    key: &SigningKey,
    channel: B256,
    stats: &Stats,
    stop: &mut watch::Receiver<bool>,
    ramp: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> bool {
    let started = Instant::now();
    let setup_deadline = tokio::time::Instant::from_std(started + SETUP_TIMEOUT);
    let ws = tokio::time::timeout_at(
        setup_deadline,
        tokio_tungstenite::connect_async_with_config(
            ctx.ws_url.as_str(),
            Some(client_config()),
            true,
        ),
    )
    .await;
    let mut ws = match ws {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            stats.error(format!("connect: {e}"));
            return false;
        }
        Err(_) => {
            stats.error("setup timeout");
            return false;
        }
    };
    let send = |m: &ClientMessage| Message::Text(encode_client(m).into());
    let mut nonce = 1;
    let mut cumulative = ctx.window.min(ctx.deposit);
    let open = SignedStateMsg::sign(&ctx.domain, key, channel, nonce, cumulative);
    if ws.send(send(&ClientMessage::Open(open))).await.is_err() {
        stats.error("send failed");
        return false;
    }
    let mut open = false;
    let mut sent_at: Option<Instant> = None;
    loop {
        let frame = tokio::select! {
            frame = ws.next() => frame,
            _ = stop.changed() => break,
            () = tokio::time::sleep_until(setup_deadline), if !open => {
                stats.error("setup timeout");
                break;
            }
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(0, |f| u16::from(f.code));
                stats.error(format!("closed {code}"));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                stats.error(format!("websocket: {e}"));
                break;
            }
            None => {
                stats.error("connection ended");
                break;
            }
        };
        let Ok(message) = decode_server(&text) else {
            stats.error("undecodable frame");
            continue;
        };
        match message {
            ServerMessage::Session { .. } if !open => {
                open = true;
                ramp.take();
                Stats::sample(&stats.setups, started.elapsed());
                stats.opened.fetch_add(1, Ordering::Relaxed);
                stats.open.fetch_add(1, Ordering::Relaxed);
                let body = if ctx.rate == 0 {
                    serde_json::json!({ "maxTokens": 5 })
                } else {
                    // This session's place in the stagger, from its channel id (uniform).
                    let at = u64::from_be_bytes(channel[..8].try_into().expect("8 bytes"));
                    let nanos = ctx.stagger.as_nanos() as u64;
                    if nanos > 0 {
                        let wait = Duration::from_nanos(at % nanos);
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stop.changed() => break,
                        }
                    }
                    serde_json::json!({ "maxTokens": u64::MAX / 2, "tokensPerSec": ctx.rate })
                };
                if ws
                    .send(send(&ClientMessage::Request { body }))
                    .await
                    .is_err()
                {
                    stats.error("send failed");
                    break;
                }
            }
            ServerMessage::App { .. } => {
                stats.messages.fetch_add(1, Ordering::Relaxed);
            }
            ServerMessage::NeedVoucher { suggested, .. } if sent_at.is_none() => {
                let target = suggested.min(ctx.deposit);
                if target > cumulative {
                    nonce += 1;
                    cumulative = target;
                    let v = SignedStateMsg::sign(&ctx.domain, key, channel, nonce, cumulative);
                    sent_at = Some(Instant::now());
                    if ws.send(send(&ClientMessage::Voucher(v))).await.is_err() {
                        stats.error("send failed");
                        break;
                    }
                }
            }
            ServerMessage::VoucherAck { .. } => {
                if let Some(at) = sent_at.take() {
                    Stats::sample(&stats.rtts, at.elapsed());
                    stats.vouchers.fetch_add(1, Ordering::Relaxed);
                }
            }
            ServerMessage::Error { code, .. } => {
                // Whatever the error, the voucher in flight (if any) got no ack: it is counted
                // here, not in the round trips, and the next `need_voucher` is answered again
                // (a session that stopped answering would count as held while not paying).
                sent_at = None;
                stats.error(code);
            }
            _ => {}
        }
    }
    if open {
        stats.open.fetch_sub(1, Ordering::Relaxed);
        let close = ClientMessage::Close {
            close_channel: false,
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = ws.send(send(&close)).await;
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
    }
    open
}

/// Payers opening their channels at once (each with its own connection to the node).
const OPENING_PAYERS: usize = 64;

/// Broadcasts `count` channel opens from `chain`'s sender to `payee`, each with its own nonce;
/// the last one's hash (mined once it is: a sender's transactions are mined in nonce order).
async fn open_channels(
    chain: &Channels<RpcBackend>,
    payee: Address,
    salts: &[B256],
    deposit: u128,
    delay: u32,
) -> anyhow::Result<Option<B256>> {
    let backend = chain.backend();
    let first = backend.pending_nonce().await?;
    let probe = chain.open_tx(payee, Address::ZERO, salts[0], deposit, delay);
    let gas = backend.estimate_gas(&probe).await?;
    let base = backend.base_fee().await?;
    let fees = Fees {
        max_fee_per_gas: base.saturating_mul(2).saturating_add(1_000_000_000),
        max_priority_fee_per_gas: 1_000_000_000,
    };
    let mut hashes = Vec::with_capacity(salts.len());
    for (i, salt) in salts.iter().enumerate() {
        let tx = chain.open_tx(payee, Address::ZERO, *salt, deposit, delay);
        let params = TxParams {
            nonce: first + i as u64,
            gas_limit: gas + gas / 4,
            fees,
        };
        hashes.push(backend.broadcast(tx, params).await?);
    }
    Ok(hashes.last().copied())
}

/// Waits until every transaction in `hashes` is mined (a reverted open shows later as a
/// session that cannot open, counted by its error).
async fn await_mined(backend: &RpcBackend, hashes: &[B256]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    for hash in hashes {
        loop {
            match backend.receipt(*hash).await? {
                Some(_) => break,
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None => bail!("the opens were not mined within 5 min ({hash})"),
            }
        }
    }
    Ok(())
}

/// Runs `paystream load`.
pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    if args.sessions == 0 || args.sessions > MAX_SESSIONS {
        bail!("--sessions must be 1 to {MAX_SESSIONS}");
    }
    if args.hold > MAX_HOLD_SECS {
        bail!("--hold is at most {MAX_HOLD_SECS} s");
    }
    let challenge = fetch_challenge(&args.url).await?;
    let offer = challenge
        .channel_stream()
        .context("the server offers no channel-stream terms")?
        .clone();
    let ws_url = offer.extra.ws_endpoint.clone();
    let host = ws_url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ':']).next())
        .unwrap_or_default();
    let host = if host == "[" {
        // An IPv6 literal: the whole of it, brackets included.
        ws_url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .map_or("", |h| h.trim_start_matches('['))
    } else {
        host
    };
    if !matches!(host, "127.0.0.1" | "localhost" | "::1") {
        bail!("paystream load runs against a server on this machine only (127.0.0.1), not {host}");
    }
    let listed = match &args.keys_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(","),
        ),
        None => args.keys.clone(),
    };
    let keys: Vec<PrivateKeySigner> = match &listed {
        Some(keys) => keys
            .split(',')
            .map(|k| {
                k.trim()
                    .parse()
                    .context("a payer key is not a 32-byte hex key")
            })
            .collect::<anyhow::Result<_>>()?,
        None => ANVIL_KEYS
            .iter()
            .map(|k| k.parse().expect("valid keys"))
            .collect(),
    };
    let contract = offer.extra.contract;
    let payee = offer.pay_to;
    let delay = 3_600u32.max(offer.extra.min_withdraw_delay_seconds);
    let mut run_id = [0u8; 8];
    getrandom::fill(&mut run_id).context("reading OS randomness")?;

    // The server's memory before it saw any of this run's channels (the "before" read later,
    // once they are open, includes what the server keeps per channel it saw opening).
    let rss_start = args.server_pid.and_then(rss_kib);

    // Channels, spread over the payers: each payer's opens go out back to back.
    let payers = keys.len().min(args.sessions);
    let per_key = args.sessions.div_ceil(keys.len());
    let started = Instant::now();
    let mut plan: Vec<(SigningKey, B256)> = Vec::with_capacity(args.sessions);
    let mut opens = Vec::new();
    let opening = Arc::new(Semaphore::new(OPENING_PAYERS));
    let mut chain_id = 0;
    for (k, signer) in keys.iter().enumerate() {
        let count = per_key.min(args.sessions - plan.len());
        if count == 0 {
            break;
        }
        let backend = RpcBackend::connect(&args.rpc_url, signer.clone())
            .await
            .with_context(|| format!("connecting to {}", args.rpc_url))?;
        chain_id = backend.chain_id();
        let chain = Channels::at(backend, contract);
        let salts: Vec<B256> = (0..count)
            .map(|i| {
                let mut salt = [0u8; 32];
                salt[..8].copy_from_slice(&run_id);
                salt[24..].copy_from_slice(&((k as u64) << 32 | i as u64).to_be_bytes());
                B256::from(salt)
            })
            .collect();
        let key = SigningKey::from_slice(signer.to_bytes().as_slice())?;
        for salt in &salts {
            let id = ChannelKey {
                chain_id,
                contract,
                payer: signer.address(),
                payee,
                token: Address::ZERO,
                salt: *salt,
            }
            .channel_id();
            plan.push((key.clone(), id));
        }
        let deposit = args.deposit;
        let permit = opening.clone().acquire_owned().await?;
        opens.push(tokio::spawn(async move {
            let last = open_channels(&chain, payee, &salts, deposit, delay).await;
            drop(permit);
            last
        }));
    }
    let mut lasts = Vec::with_capacity(opens.len());
    for open in opens {
        lasts.extend(open.await??);
    }
    let waiter = RpcBackend::connect(&args.rpc_url, keys[0].clone())
        .await
        .with_context(|| format!("connecting to {}", args.rpc_url))?;
    await_mined(&waiter, &lasts).await?;
    eprintln!(
        "[{} channels opened in {:.1} s]",
        plan.len(),
        started.elapsed().as_secs_f64()
    );

    let rss_before = args.server_pid.and_then(rss_kib);
    let ctx = Arc::new(Ctx {
        ws_url,
        domain: ChannelDomain::new(chain_id, contract),
        window: offer.extra.credit_window.max(1),
        deposit: args.deposit,
        rate: args.rate,
        stagger: Duration::from_millis(args.stagger_ms),
    });
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop) = watch::channel(false);
    // The ramp: at most `concurrency` sessions opening at once.
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let ramp_started = Instant::now();
    // Who spent the ramp's CPU: the server and this generator share the machine's cores.
    let ramp_cpu_before = (
        args.server_pid.and_then(cpu_secs),
        cpu_secs(std::process::id()),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for (key, channel) in plan {
        let (ctx, stats, stop) = (ctx.clone(), stats.clone(), stop.clone());
        let permit = gate.clone().acquire_owned().await?;
        tasks.spawn(session(ctx, key, channel, stats, stop, permit));
    }
    // Every session open (or failed): the ramp is over.
    let ramp_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let opened = stats.opened.load(Ordering::Relaxed);
        let failed = stats.failed.load(Ordering::Relaxed);
        if opened as usize + failed as usize >= args.sessions || Instant::now() > ramp_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp = ramp_started.elapsed();
    let opened = stats.opened.load(Ordering::Relaxed);
    let cpu_ms_per_setup =
        |before: Option<f64>, pid: Option<u32>| match (before, pid.and_then(cpu_secs)) {
            (Some(b), Some(a)) if opened > 0 => Some(1_000.0 * (a - b) / opened as f64),
            _ => None,
        };
    let server_setup_cpu_ms = cpu_ms_per_setup(ramp_cpu_before.0, args.server_pid);
    let load_setup_cpu_ms = cpu_ms_per_setup(ramp_cpu_before.1, Some(std::process::id()));
    eprintln!(
        "[{opened} sessions open in {:.1} s: {:.0} setups/s]",
        ramp.as_secs_f64(),
        opened as f64 / ramp.as_secs_f64()
    );

    // The hold: progress every second.
    let hold_started = Instant::now();
    let hold_started_unix = unix_secs();
    let cpu_before = args.server_pid.and_then(cpu_secs);
    let (m0, v0) = (
        stats.messages.load(Ordering::Relaxed),
        stats.vouchers.load(Ordering::Relaxed),
    );
    let mut held_min = u64::MAX;
    let mut last = (m0, v0, Instant::now());
    while hold_started.elapsed() < Duration::from_secs(args.hold) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (m, v) = (
            stats.messages.load(Ordering::Relaxed),
            stats.vouchers.load(Ordering::Relaxed),
        );
        let held = stats.open.load(Ordering::Relaxed);
        held_min = held_min.min(held);
        let dt = last.2.elapsed().as_secs_f64();
        let errors: u64 = stats.errors.lock().map_or(0, |e| e.values().sum::<u64>());
        eprintln!(
            "[held {held} | {:.0} msg/s | {:.1} vouchers/s | errors {errors}]",
            (m - last.0) as f64 / dt,
            (v - last.1) as f64 / dt,
        );
        last = (m, v, Instant::now());
    }
    let hold = hold_started.elapsed().as_secs_f64();
    let hold_ended_unix = unix_secs();
    let rss_after = args.server_pid.and_then(rss_kib);
    let cpu_share = match (cpu_before, args.server_pid.and_then(cpu_secs)) {
        (Some(b), Some(a)) => Some((a - b) / hold.max(1e-9)),
        _ => None,
    };
    let future_bytes = server_metric(&args.url, "paystream_connection_future_bytes").await;
    // The server's share of the voucher round trip: the whole step (message read to
    // acknowledgment sent), the signature check (queue wait included) and the store write.
    let metrics = server_metrics(&args.url).await.unwrap_or_default();
    let server_voucher = serde_json::json!({
        "step": histogram_ms(&metrics, "paystream_voucher_verification_seconds"),
        "signature": histogram_ms(&metrics, "paystream_signature_check_seconds"),
        "store": histogram_ms(&metrics, "paystream_voucher_store_seconds"),
    });
    let messages = stats.messages.load(Ordering::Relaxed) - m0;
    let vouchers = stats.vouchers.load(Ordering::Relaxed) - v0;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}

    let mut setups = std::mem::take(&mut *stats.setups.lock().unwrap_or_else(|p| p.into_inner()));
    let mut rtts = std::mem::take(&mut *stats.rtts.lock().unwrap_or_else(|p| p.into_inner()));
    let errors = stats
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let held = if held_min == u64::MAX {
        opened
    } else {
        held_min
    };
    let per_session = match (rss_before, rss_after) {
        (Some(b), Some(a)) if held > 0 => Some(a.saturating_sub(b) as f64 / held as f64),
        _ => None,
    };
    // The same over the memory from before the server saw any of the channels: a session and
    // what the server keeps of its channel.
    let per_session_and_channel = match (rss_start, rss_after) {
        (Some(b), Some(a)) if held > 0 => Some(a.saturating_sub(b) as f64 / held as f64),
        _ => None,
    };
    let report = serde_json::json!({
        "sessions": args.sessions,
        "payers": payers,
        "ratePerSession": args.rate,
        "staggerMs": args.stagger_ms,
        "opened": opened,
        "failed": stats.failed.load(Ordering::Relaxed),
        "held": held,
        "setupSecs": ramp.as_secs_f64(),
        "setupsPerSec": opened as f64 / ramp.as_secs_f64(),
        "serverCpuMsPerSetup": server_setup_cpu_ms,
        "loadCpuMsPerSetup": load_setup_cpu_ms,
        "setupMs": { "p50": quantile_ms(&mut setups, 0.5), "p99": quantile_ms(&mut setups, 0.99), "max": quantile_ms(&mut setups, 1.0) },
        "holdSecs": hold,
        "holdUnixSecs": [hold_started_unix, hold_ended_unix],
        "messagesPerSec": messages as f64 / hold.max(1e-9),
        "vouchersPerSec": vouchers as f64 / hold.max(1e-9),
        "voucherRttMs": { "p50": quantile_ms(&mut rtts, 0.5), "p99": quantile_ms(&mut rtts, 0.99), "max": quantile_ms(&mut rtts, 1.0) },
        "voucherRttDistributionMs": distribution_ms(&mut rtts),
        "serverVoucherMs": server_voucher,
        "setupDistributionMs": distribution_ms(&mut setups),
        "voucherRttSamples": rtts.len(),
        "errors": errors,
        "serverRssStartKiB": rss_start,
        "serverRssBeforeKiB": rss_before,
        "serverRssAfterKiB": rss_after,
        "serverKiBPerSession": per_session,
        "serverKiBPerSessionWithChannel": per_session_and_channel,
        "serverConnectionFutureBytes": future_bytes,
        "serverCpuWhileHolding": cpu_share,
    });
    println!("{report}");
    Ok(())
}
