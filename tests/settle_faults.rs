//! The settler under faults (issue 10): anvil stopped mid-batch and started again from its saved
//! state, a proxy that drops the RPC connection, the settler SIGKILLed between submission and
//! receipt, and a reorg that undoes unconfirmed settlements: in each, nothing is settled twice,
//! nothing is lost, and the queue drains. Then what a review found (each test failed before its
//! fix): closes and batches from one key, a payee that refuses payment for a while, an operator
//! key revoked and granted again, the age of a claim left after a payment, and a batch that
//! goes on value alone paying for its whole gas.
//!
//! Each test runs a real anvil with the contract deployed and a real redis-server on 127.0.0.1
//! (ports chosen at run time). The payer (dev key 1) opens channels to the payee (dev key 2),
//! claims signed by the payer are queued in the store, and the settler sends as the payee's
//! operator (dev key 3), so the payee's balance moves by exactly what the chain pays it. After
//! the fault, each test checks the same things: every channel's on-chain `claimed` is its claim,
//! the payee got exactly the sum, the contract's `Settled` events name each claim once and add
//! up to that sum, the queue and the in-flight records are empty, nothing was skipped, and a
//! further pass sends nothing.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use alloy::sol_types::SolEvent;
use common::anvil::{Anvil, DEV_KEYS, dev_signer};
use common::faults::{Guard, Mode, Proxy, RestartableAnvil, TempDir, rpc};
use common::redis::Redis;
use common::stack::payer_key;
use paystream::chain::bindings::PaymentChannels as pc;
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{Backend, ChainError, ChannelChain, Channels};
use paystream::channel::{ChannelDomain, ChannelState, signature};
use paystream::settle::{Pass, SettleConfig, SettleError, Settler};
use paystream::store::redis::RedisStore;
use paystream::store::{ChannelStore, Fence, PendingClaim, SettlementStore, StoredVoucher};

const DEPOSIT: u128 = 1_000_000;
const PREFIX: &str = "ps:";

fn payee() -> Address {
    dev_signer(2).address()
}

fn operator() -> Address {
    dev_signer(3).address()
}

/// Deploys the contract (dev key 0) and lets the operator (dev key 3) claim for the payee.
async fn deploy(url: &str) -> Address {
    let deployer = RpcBackend::connect(url, dev_signer(0)).await.unwrap();
    let contract = Channels::deploy(deployer).await.unwrap().address();
    let payee_chain = Channels::at(
        RpcBackend::connect(url, dev_signer(2)).await.unwrap(),
        contract,
    );
    payee_chain.set_operator(operator(), true).await.unwrap();
    contract
}

/// The payer (dev key 1) on the contract.
async fn payer(url: &str, contract: Address) -> Channels<RpcBackend> {
    Channels::at(
        RpcBackend::connect(url, dev_signer(1)).await.unwrap(),
        contract,
    )
}

/// Opens `count` native-ETH channels from the payer to the payee (salts from `first`).
async fn open_channels(payer: &Channels<RpcBackend>, first: u8, count: u8) -> Vec<B256> {
    let mut ids = Vec::new();
    for salt in first..first + count {
        let (id, _) = payer
            .open(
                payee(),
                Address::ZERO,
                B256::repeat_byte(salt),
                DEPOSIT,
                3600,
            )
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

/// A claim of `amount` under a voucher the payer signed for `cumulative` at `nonce`.
fn claim(
    domain: &ChannelDomain,
    channel: B256,
    nonce: u64,
    cumulative: u128,
    amount: u128,
) -> PendingClaim {
    let state = ChannelState {
        channelId: channel,
        nonce,
        cumulative,
    };
    PendingClaim {
        channel_id: channel,
        voucher: StoredVoucher {
            nonce,
            cumulative,
            signature: signature::sign_digest(&payer_key(), &domain.state_digest(&state)),
        },
        amount,
    }
}

/// Queues a claim on each channel (distinct amounts, each under a voucher for a bit more: the
/// chain must pay the claim, not the voucher); returns what each channel should end up paid.
async fn queue_claims(
    store: &RedisStore,
    domain: &ChannelDomain,
    ids: &[B256],
    base: u128,
) -> HashMap<B256, u128> {
    let mut expected = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        let amount = base + 1_000 * (i as u128 + 1) + i as u128;
        store
            .queue_claim(claim(domain, *id, 1, amount + 100, amount), Fence::NONE)
            .await
            .unwrap();
        expected.insert(*id, amount);
    }
    expected
}

/// A settler sending as the payee's operator through `url`.
async fn settler(
    url: &str,
    contract: Address,
    redis_url: &str,
    config: SettleConfig,
) -> Settler<RpcBackend, RedisStore> {
    let backend = RpcBackend::connect(url, dev_signer(3)).await.unwrap();
    let store = RedisStore::connect(redis_url, PREFIX).await.unwrap();
    Settler::new(Channels::at(backend, contract), store, config)
}

fn config(confirmations: u64, stuck_after_secs: u64, max_batch_claims: usize) -> SettleConfig {
    let mut config = SettleConfig {
        confirmations,
        stuck_after_secs,
        max_batch_claims,
        ..SettleConfig::default()
    };
    config.economics.force = true;
    config
}

/// The queued claims, by channel.
async fn queued(store: &RedisStore) -> HashMap<B256, u128> {
    store
        .queued_claims(10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|q| (q.claim.channel_id, q.claim.amount))
        .collect()
}

async fn drained(store: &RedisStore) -> bool {
    store.queued_claims(1).await.unwrap().is_empty() && store.in_flight().await.unwrap().is_empty()
}

/// A pass, bounded (a transport that never answers must not hold the test).
async fn pass(settler: &mut Settler<RpcBackend, RedisStore>) -> Result<Pass, SettleError> {
    tokio::time::timeout(Duration::from_secs(20), settler.run_once())
        .await
        .expect("a settler pass ends within 20 s")
}

/// Passes, with a block mined after each (so confirmations come), until the queue and the
/// in-flight records are empty. A pass may fail on the chain (a connection the restarted node
/// closed); a store failure fails the test. Returns the passes and the chain errors.
async fn drain(
    settler: &mut Settler<RpcBackend, RedisStore>,
    node: &str,
    limit: Duration,
) -> (Vec<Pass>, Vec<ChainError>) {
    let deadline = Instant::now() + limit;
    let (mut passes, mut errors) = (Vec::new(), Vec::new());
    loop {
        match pass(settler).await {
            Ok(pass) => passes.push(pass),
            Err(SettleError::Chain(e)) => errors.push(e),
            Err(e) => panic!("a settler pass failed on the store: {e}"),
        }
        if drained(settler.store()).await {
            return (passes, errors);
        }
        assert!(
            Instant::now() < deadline,
            "the queue did not drain within {limit:?}: queued {:?}, in flight {:?}, passes \
             {passes:?}, errors {errors:?}",
            queued(settler.store()).await,
            settler.store().in_flight().await.unwrap()
        );
        let _ = common::faults::try_rpc(node, "evm_mine", serde_json::json!([])).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The contract's `Settled` events from `from`: per channel, how many runs named it, and the
/// total the runs paid.
async fn settled_events(chain: &Channels<RpcBackend>, from: u64) -> (HashMap<B256, usize>, U256) {
    let head = chain.backend().block_number().await.unwrap();
    let logs = chain
        .backend()
        .logs(chain.address(), &[pc::Settled::SIGNATURE_HASH], from, head)
        .await
        .unwrap();
    let mut named = HashMap::new();
    let mut total = U256::ZERO;
    for log in logs {
        let event = pc::Settled::decode_log_data(&log.log.data).expect("a Settled event");
        assert_eq!(event.payee, payee());
        total += event.amount;
        for id in event.channelIds {
            *named.entry(id).or_insert(0) += 1;
        }
    }
    (named, total)
}

/// Nothing settled twice, nothing lost: each channel's `claimed` is its claim, the payee got
/// exactly the sum, every `Settled` event since `from` names each channel `runs[id]` times
/// (once, unless a larger claim was queued while the first was in flight) and they pay the
/// sum, nothing was skipped, and the queue and the in-flight records are empty.
async fn assert_settled_once(
    chain: &Channels<RpcBackend>,
    store: &RedisStore,
    expected: &HashMap<B256, u128>,
    runs: &HashMap<B256, usize>,
    balance_before: U256,
    from: u64,
) {
    let sum: u128 = expected.values().sum();
    for (id, amount) in expected {
        let info = chain.read_channel(*id).await.unwrap().expect("the channel");
        assert_eq!(info.claimed, *amount, "channel {id}: claimed");
        assert!(!info.closed, "channel {id} closed");
    }
    let after = chain.backend().balance(payee()).await.unwrap();
    assert_eq!(
        after - balance_before,
        U256::from(sum),
        "the payee got exactly the claims"
    );
    let (named, total) = settled_events(chain, from).await;
    assert_eq!(total, U256::from(sum), "the Settled events pay the claims");
    for id in expected.keys() {
        let want = runs.get(id).copied().unwrap_or(1);
        assert_eq!(
            named.get(id).copied(),
            Some(want),
            "Settled runs naming {id}"
        );
    }
    assert_eq!(named.len(), expected.len(), "no other channel was paid");
    assert!(queued(store).await.is_empty(), "the queue drained");
    assert!(
        store.in_flight().await.unwrap().is_empty(),
        "nothing in flight"
    );
    assert!(
        store.skipped_claims().await.unwrap().is_empty(),
        "nothing skipped: {:?}",
        store.skipped_claims().await.unwrap()
    );
}

/// The operator's next nonce (its mined transactions: only settlement batches).
async fn operator_nonce(url: &str) -> u64 {
    let count = rpc(
        url,
        "eth_getTransactionCount",
        serde_json::json!([operator(), "latest"]),
    )
    .await;
    u64::from_str_radix(count.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

/// The transaction `hash` as the node knows it: `None` when unknown, else whether it is mined.
async fn tx_mined(url: &str, hash: B256) -> Option<bool> {
    let tx = rpc(url, "eth_getTransactionByHash", serde_json::json!([hash])).await;
    (!tx.is_null()).then(|| !tx["blockNumber"].is_null())
}

/// anvil stopped mid-batch and started again from its saved state. One batch is mined but not
/// yet confirmed, two more are broadcast but not mined (automine off) when anvil stops
/// (SIGTERM, `--dump-state`); it starts again on the same port from the file (`--load-state`),
/// without the two pending transactions. The settler confirms the first, sends the other two
/// again under their nonces (stuck after 1 s), and the queue drains: each claim paid once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anvil_stopped_mid_batch_and_restarted_from_its_state() {
    let started = Instant::now();
    let dir = TempDir::new("settle-anvil-restart");
    let mut anvil = RestartableAnvil::start(dir.path().join("state.json"));
    let redis = Redis::start();
    let contract = deploy(&anvil.url).await;
    let payer = payer(&anvil.url, contract).await;
    let domain = ChannelDomain::new(payer.backend().chain_id(), contract);
    let store = RedisStore::connect(&redis.url, PREFIX).await.unwrap();
    let ids = open_channels(&payer, 1, 6).await;
    let from = payer.backend().block_number().await.unwrap();
    let before = payer.backend().balance(payee()).await.unwrap();
    // Two batches of at most two claims; final after two blocks; resent after 1 s.
    let mut settler = settler(&anvil.url, contract, &redis.url, config(2, 1, 2)).await;

    // A first batch, mined at once (automine) and waiting for its second block.
    let mut expected = queue_claims(&store, &domain, &ids[..2], 0).await;
    let first = pass(&mut settler).await.unwrap();
    assert_eq!(first.submitted.len(), 1, "{first:?}");
    // Four more claims, sent while nothing is mined: two batches in the node's pool.
    anvil
        .rpc("evm_setAutomine", serde_json::json!([false]))
        .await;
    expected.extend(queue_claims(&store, &domain, &ids[2..], 10_000).await);
    let second = pass(&mut settler).await.unwrap();
    assert_eq!(second.confirming, 1, "the first batch waits: {second:?}");
    assert_eq!(second.submitted.len(), 2, "{second:?}");
    let in_flight = store.in_flight().await.unwrap();
    assert_eq!(in_flight.len(), 3, "{in_flight:?}");
    let mut pending = Vec::new();
    for tx in &in_flight {
        let hash = *tx
            .hashes
            .last()
            .expect("broadcast, so its hash is recorded");
        match tx_mined(&anvil.url, hash).await {
            Some(true) => {}
            Some(false) => pending.push(hash),
            None => panic!("the node does not know {hash}"),
        }
    }
    assert_eq!(pending.len(), 2, "two batches in the pool, unmined");
    let head_before = payer.backend().block_number().await.unwrap();

    // anvil stops (writing its state) and starts again from it on the same port.
    anvil.stop();
    assert!(
        common::faults::try_rpc(&anvil.url, "eth_blockNumber", serde_json::json!([]))
            .await
            .is_err(),
        "anvil is down"
    );
    // A pass while it is down fails on the chain, and changes nothing.
    assert_chain_transport_error(pass(&mut settler).await, "anvil down");
    assert_eq!(queued(&store).await, expected);
    assert_eq!(store.in_flight().await.unwrap(), in_flight);
    anvil.restart();
    let head_after = payer.backend().block_number().await.unwrap();
    assert!(head_after >= head_before, "the chain kept its blocks");
    for hash in &pending {
        // The pool is not part of the saved state (if a future anvil keeps it, the settler's
        // resend is harmless all the same).
        if let Some(mined) = tx_mined(&anvil.url, *hash).await {
            eprintln!("anvil kept pending {hash} across the restart (mined: {mined})");
        }
    }
    // Nothing was lost meanwhile: every claim is still queued, every batch still recorded.
    assert_eq!(queued(&store).await, expected);
    assert_eq!(store.in_flight().await.unwrap().len(), 3);

    let (passes, errors) = drain(&mut settler, &anvil.url, Duration::from_secs(30)).await;
    let resent: usize = passes.iter().map(|p| p.resent).sum();
    let submitted: usize = passes.iter().map(|p| p.submitted.len()).sum();
    eprintln!("after the restart: {passes:?}, chain errors {errors:?}");
    assert!(resent >= 2, "the two lost batches went again: {passes:?}");
    assert_eq!(
        submitted, 0,
        "no new batch: the lost ones went again under their nonces"
    );
    assert_settled_once(&payer, &store, &expected, &HashMap::new(), before, from).await;
    // Three batches, three nonces, whatever was resent under them.
    assert_eq!(operator_nonce(&anvil.url).await, 3);
    let after = pass(&mut settler).await.unwrap();
    assert!(
        after.submitted.is_empty(),
        "a further pass sends nothing: {after:?}"
    );
    eprintln!("anvil restart test: {:?}", started.elapsed());
}

/// Whether a failed pass is a transport failure of the chain (retried later), not a refusal.
fn assert_chain_transport_error(result: Result<Pass, SettleError>, what: &str) {
    match result {
        Err(SettleError::Chain(e)) => assert!(e.retriable(), "{what}: not retriable: {e}"),
        other => panic!("{what}: the pass should fail on the chain, got {other:?}"),
    }
}

/// A proxy between the settler and anvil drops the RPC connection: first it refuses
/// connections, then it cuts every one, then it lets the batch reach the node (mined at once)
/// but cuts the connection before the node's answer. Each pass fails with a chain error,
/// without a panic, and loses nothing (every claim stays queued until the chain shows it paid).
/// With the proxy restored, the settler finds the batch it could not see answered (its nonce
/// mined, the claims paid on the chain), sends nothing again, and the queue drains. A second
/// round loses the answer while the batch waits in the pool (automine off): restored, the
/// settler sends the identical transaction again (the node knows it), and it is paid once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_drops_the_rpc_connection() {
    let started = Instant::now();
    let anvil = Anvil::start();
    let redis = Redis::start();
    let upstream = anvil
        .url
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .expect("anvil's address");
    let proxy = Proxy::start(upstream).await;
    let contract = deploy(&anvil.url).await;
    let payer = payer(&anvil.url, contract).await;
    let domain = ChannelDomain::new(payer.backend().chain_id(), contract);
    let store = RedisStore::connect(&redis.url, PREFIX).await.unwrap();
    let ids = open_channels(&payer, 1, 6).await;
    let from = payer.backend().block_number().await.unwrap();
    let before = payer.backend().balance(payee()).await.unwrap();
    let mut expected = queue_claims(&store, &domain, &ids[..4], 0).await;
    let mut settler = settler(&proxy.url, contract, &redis.url, config(2, 1, 100)).await;

    // Refused, then cut: the passes fail on the chain, and nothing moves.
    for mode in [Mode::Refuse, Mode::Drop] {
        proxy.set(mode).await;
        for _ in 0..2 {
            assert_chain_transport_error(pass(&mut settler).await, &format!("{mode:?}"));
        }
        assert_eq!(queued(&store).await, expected, "{mode:?}: nothing lost");
        assert!(store.in_flight().await.unwrap().is_empty(), "{mode:?}");
        assert_eq!(
            operator_nonce(&anvil.url).await,
            0,
            "{mode:?}: nothing sent"
        );
    }
    assert!(proxy.cut() > 0, "the proxy cut connections");

    // The batch reaches the node and is mined, but its answer is lost.
    proxy.set(Mode::LoseSendAnswers).await;
    assert_chain_transport_error(pass(&mut settler).await, "the broadcast's answer lost");
    assert_eq!(proxy.lost_sends(), 1);
    assert_eq!(
        operator_nonce(&anvil.url).await,
        1,
        "the node has the batch"
    );
    for (id, amount) in &expected {
        let info = payer.read_channel(*id).await.unwrap().unwrap();
        assert_eq!(info.claimed, *amount, "mined at once (automine)");
    }
    // The settler cannot know it was sent: its record (written before the send) has no hash,
    // and every claim stays queued.
    let in_flight = store.in_flight().await.unwrap();
    assert_eq!(in_flight.len(), 1, "{in_flight:?}");
    assert!(in_flight[0].hashes.is_empty(), "{in_flight:?}");
    assert_eq!(
        queued(&store).await,
        expected,
        "nothing left the queue unconfirmed"
    );

    // Restored: the queue drains without sending anything again.
    proxy.set(Mode::Forward).await;
    let (passes, errors) = drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;
    eprintln!("after the proxy is restored: {passes:?}, chain errors {errors:?}");
    assert!(errors.is_empty(), "{errors:?}");
    let submitted: usize = passes.iter().map(|p| p.submitted.len()).sum();
    let resent: usize = passes.iter().map(|p| p.resent).sum();
    let settled: usize = passes.iter().map(|p| p.settled).sum();
    assert_eq!(submitted + resent, 0, "nothing sent again: {passes:?}");
    assert_eq!(settled, expected.len(), "{passes:?}");
    assert_settled_once(&payer, &store, &expected, &HashMap::new(), before, from).await;
    assert_eq!(
        operator_nonce(&anvil.url).await,
        1,
        "one transaction in all"
    );

    // Second round: the answer is lost while the batch waits in the pool.
    anvil
        .rpc("evm_setAutomine", serde_json::json!([false]))
        .await;
    let round_two = queue_claims(&store, &domain, &ids[4..], 20_000).await;
    expected.extend(round_two.clone());
    proxy.set(Mode::LoseSendAnswers).await;
    assert_chain_transport_error(pass(&mut settler).await, "the answer lost, unmined");
    assert_eq!(proxy.lost_sends(), 2);
    let pending = rpc(
        &anvil.url,
        "eth_getTransactionCount",
        serde_json::json!([operator(), "pending"]),
    )
    .await;
    assert_eq!(pending, "0x2", "the batch is in the node's pool");
    assert_eq!(operator_nonce(&anvil.url).await, 1, "and not mined");
    let in_flight = store.in_flight().await.unwrap();
    assert_eq!(in_flight.len(), 1, "{in_flight:?}");
    assert!(in_flight[0].hashes.is_empty(), "{in_flight:?}");
    assert_eq!(queued(&store).await, round_two, "nothing lost");
    proxy.set(Mode::Forward).await;
    // The record has no hash: the same transaction goes again, and the node already has it.
    let again = pass(&mut settler).await.unwrap();
    assert_eq!(again.resent, 1, "{again:?}");
    assert!(again.submitted.is_empty(), "{again:?}");
    let in_flight = store.in_flight().await.unwrap();
    assert_eq!(in_flight.len(), 1, "{in_flight:?}");
    assert_eq!(in_flight[0].hashes.len(), 1, "{in_flight:?}");
    assert_eq!(
        tx_mined(&anvil.url, in_flight[0].hashes[0]).await,
        Some(false),
        "the very transaction in the pool"
    );
    let (passes, errors) = drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;
    eprintln!("second round: {passes:?}, chain errors {errors:?}");
    assert!(errors.is_empty(), "{errors:?}");
    let submitted: usize = passes.iter().map(|p| p.submitted.len()).sum();
    assert_eq!(submitted, 0, "nothing new sent: {passes:?}");
    assert_settled_once(&payer, &store, &expected, &HashMap::new(), before, from).await;
    assert_eq!(
        operator_nonce(&anvil.url).await,
        2,
        "two transactions in all"
    );
    let after = pass(&mut settler).await.unwrap();
    assert!(
        after.submitted.is_empty(),
        "a further pass sends nothing: {after:?}"
    );
    eprintln!("proxy test: {:?}", started.elapsed());
}

/// Environment variables `paystream settle` would read beside the test's own.
const PAYSTREAM_ENV: [&str; 8] = [
    "PAYSTREAM_CONFIG",
    "PAYSTREAM_PAYEE_KEY",
    "PAYSTREAM_SETTLER_KEY",
    "PAYSTREAM_RPC_URL",
    "PAYSTREAM_CONTRACT",
    "PAYSTREAM_REDIS_URL",
    "PAYSTREAM_LISTEN",
    "PAYSTREAM_PUBLIC_URL",
];

/// `paystream settle --config CONFIG --force EXTRA...` with the operator's key, its log (stderr)
/// written to `log`.
fn settle_command(config: &std::path::Path, log: &std::path::Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_paystream"));
    for var in PAYSTREAM_ENV {
        command.env_remove(var);
    }
    command
        .args(["settle", "--config", config.to_str().unwrap(), "--force"])
        .args(extra)
        .env("PAYSTREAM_SETTLER_KEY", DEV_KEYS[3])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).expect("a log file"));
    command
}

/// One `paystream settle --once --force`: the pass it printed (bounded to 30 s).
fn settle_once(config: &std::path::Path, log: &std::path::Path) -> serde_json::Value {
    let mut child = Guard(
        settle_command(config, log, &["--once"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("paystream settle --once starts"),
    );
    let status = common::faults::wait_exit(&mut child.0, Duration::from_secs(30))
        .expect("paystream settle --once ends within 30 s");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.0.stdout.take().unwrap(), &mut out).unwrap();
    assert!(
        status.success(),
        "paystream settle --once: {status}; stdout {out}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("its pass as JSON ({e}): {out}"))
}

/// The settler SIGKILLed between submission and receipt. `paystream settle` (its own process)
/// broadcasts a batch that is not mined (automine off) and is killed (SIGKILL, by its id) once
/// the batch is recorded and in the node's pool. While it is down, one channel's claim grows (a
/// session went on). A restarted `paystream settle --once` while the batch is still pending
/// sends nothing (the record names it); once mined, restarted passes confirm it, send the grown
/// claim's difference alone, and the queue drains: each claim paid once, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settler_killed_between_submission_and_receipt() {
    let started = Instant::now();
    let dir = TempDir::new("settle-sigkill");
    let anvil = Anvil::start();
    let redis = Redis::start();
    let contract = deploy(&anvil.url).await;
    let payer = payer(&anvil.url, contract).await;
    let domain = ChannelDomain::new(payer.backend().chain_id(), contract);
    let store = RedisStore::connect(&redis.url, PREFIX).await.unwrap();
    let ids = open_channels(&payer, 1, 4).await;
    let from = payer.backend().block_number().await.unwrap();
    let before = payer.backend().balance(payee()).await.unwrap();
    let mut expected = queue_claims(&store, &domain, &ids, 0).await;
    let config = dir.path().join("paystream.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[chain]
rpc_url = "{rpc}"
contract = "{contract}"
[store]
kind = "redis"
redis_url = "{redis}"
prefix = "{PREFIX}"
[tariff]
perMessage = {{ amount = "7", per = "10" }}
[settle]
confirmations = 2
interval_ms = 50
[resources.tokens]
kind = "token_generator"
tokens_per_sec = 0
"#,
            rpc = anvil.url,
            redis = redis.url,
        ),
    )
    .unwrap();
    let log = dir.path().join("settle.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    anvil
        .rpc("evm_setAutomine", serde_json::json!([false]))
        .await;
    let mut settle = Guard(
        settle_command(&config, &log, &[])
            .stdout(Stdio::null())
            .spawn()
            .expect("paystream settle starts"),
    );
    // Wait until the batch is recorded and broadcast (its hash recorded).
    let deadline = Instant::now() + Duration::from_secs(30);
    let sent = loop {
        let in_flight = store.in_flight().await.unwrap();
        if let Some(tx) = in_flight.iter().find(|t| !t.hashes.is_empty()) {
            break tx.clone();
        }
        assert!(
            settle.running(),
            "paystream settle exited early; log:\n{}",
            log_text()
        );
        assert!(
            Instant::now() < deadline,
            "no batch broadcast within 30 s; log:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(sent.claims.len(), ids.len(), "one batch: {sent:?}");
    let hash = *sent.hashes.last().unwrap();
    assert_eq!(
        tx_mined(&anvil.url, hash).await,
        Some(false),
        "in the pool, not mined"
    );
    let status = settle.kill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "SIGKILLed: {status}"
    );
    // Between submission and receipt: the record is there, the claims are all still queued.
    assert_eq!(store.in_flight().await.unwrap(), vec![sent.clone()]);
    assert_eq!(queued(&store).await, expected);

    // Meanwhile a session on the first channel went on: its claim grows.
    let grown = expected[&ids[0]] + 5_000;
    store
        .queue_claim(claim(&domain, ids[0], 2, grown, grown), Fence::NONE)
        .await
        .unwrap();
    expected.insert(ids[0], grown);

    // Restarted while the batch is still pending: it sends nothing (the channels are busy in
    // the recorded batch; the batch itself is not stuck yet) and keeps the record.
    let once = settle_once(&config, &log);
    assert_eq!(once["submitted"], serde_json::json!([]), "{once}");
    assert_eq!(store.in_flight().await.unwrap().len(), 1);
    assert_eq!(operator_nonce(&anvil.url).await, 0);

    // The batch is mined; restarted passes (a block mined after each) drain the queue.
    anvil.rpc("evm_mine", serde_json::json!([])).await;
    assert_eq!(tx_mined(&anvil.url, hash).await, Some(true));
    anvil
        .rpc("evm_setAutomine", serde_json::json!([true]))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut passes = Vec::new();
    while !drained(&store).await {
        assert!(
            Instant::now() < deadline,
            "the queue did not drain within 30 s: {passes:?}; queued {:?}",
            queued(&store).await
        );
        passes.push(settle_once(&config, &log));
        anvil.rpc("evm_mine", serde_json::json!([])).await;
    }
    eprintln!("restarted passes: {passes:?}");
    let submitted: Vec<&serde_json::Value> = passes
        .iter()
        .flat_map(|p| p["submitted"].as_array().unwrap())
        .collect();
    assert_eq!(
        submitted.len(),
        1,
        "only the grown claim went again: {passes:?}"
    );
    assert_eq!(submitted[0][1], 1, "one claim in it: {passes:?}");
    // The first channel is named by two runs (its first claim, then the rest of the grown
    // one); every other channel by one. The totals are exact.
    let runs = HashMap::from([(ids[0], 2)]);
    assert_settled_once(&payer, &store, &expected, &runs, before, from).await;
    assert_eq!(operator_nonce(&anvil.url).await, 2, "two batches in all");
    let after = settle_once(&config, &log);
    assert_eq!(after["submitted"], serde_json::json!([]), "{after}");
    eprintln!("SIGKILL test: {:?}", started.elapsed());
}

/// A reorg undoes settlements the settler had seen mined but not yet confirmed (anvil's
/// `evm_snapshot` before them, `evm_revert` after: the blocks, and the transactions in them,
/// are gone). First, a batch whose answer the proxy lost: restored, the settler finds the
/// claims paid on the chain, but with `confirmations` 2 they stay queued while the payment is
/// one block deep; the reorg undoes it and the claims go again in a new batch under the freed
/// nonce. Second, a batch the settler sent and saw mined one block deep: the reorg drops it,
/// and it goes again under its nonce. Both end paid once, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_undoes_unconfirmed_settlements() {
    let started = Instant::now();
    let anvil = Anvil::start();
    let redis = Redis::start();
    let upstream = anvil
        .url
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .expect("anvil's address");
    let proxy = Proxy::start(upstream).await;
    let contract = deploy(&anvil.url).await;
    let payer = payer(&anvil.url, contract).await;
    let domain = ChannelDomain::new(payer.backend().chain_id(), contract);
    let store = RedisStore::connect(&redis.url, PREFIX).await.unwrap();
    let ids = open_channels(&payer, 1, 6).await;
    let from = payer.backend().block_number().await.unwrap();
    let before = payer.backend().balance(payee()).await.unwrap();
    let mut settler = settler(&proxy.url, contract, &redis.url, config(2, 1, 100)).await;
    let claimed = |id: B256| {
        let payer = &payer;
        async move { payer.read_channel(id).await.unwrap().unwrap().claimed }
    };

    // The batch is mined (automine), its answer lost.
    let mut expected = queue_claims(&store, &domain, &ids[..3], 0).await;
    let snapshot = anvil.rpc("evm_snapshot", serde_json::json!([])).await;
    proxy.set(Mode::LoseSendAnswers).await;
    assert_chain_transport_error(pass(&mut settler).await, "the broadcast's answer lost");
    assert_eq!(
        operator_nonce(&anvil.url).await,
        1,
        "the node has the batch"
    );
    for (id, amount) in &expected {
        assert_eq!(claimed(*id).await, *amount, "paid, one block deep");
    }
    // Restored, without a new block: the settler sees the claims paid, one block deep, and
    // keeps them queued.
    proxy.set(Mode::Forward).await;
    let seen = pass(&mut settler).await.unwrap();
    assert!(seen.submitted.is_empty(), "{seen:?}");
    assert_eq!(seen.settled, 0, "nothing confirmed yet: {seen:?}");
    assert_eq!(
        queued(&store).await,
        expected,
        "a payment one block deep does not take a claim off the queue"
    );
    // The reorg: the batch is gone, and so is its nonce.
    assert_eq!(
        anvil.rpc("evm_revert", serde_json::json!([snapshot])).await,
        serde_json::json!(true)
    );
    assert_eq!(operator_nonce(&anvil.url).await, 0, "the batch is undone");
    for id in expected.keys() {
        assert_eq!(claimed(*id).await, 0, "the payment is undone");
    }
    let (passes, errors) = drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;
    eprintln!("after the first reorg: {passes:?}, chain errors {errors:?}");
    assert!(errors.is_empty(), "{errors:?}");
    let submitted: Vec<(u64, usize)> = passes.iter().flat_map(|p| p.submitted.clone()).collect();
    assert_eq!(
        submitted,
        vec![(0, 3)],
        "the claims went again, under the freed nonce"
    );
    assert_settled_once(&payer, &store, &expected, &HashMap::new(), before, from).await;
    assert_eq!(operator_nonce(&anvil.url).await, 1);

    // A batch the settler saw mined, one block deep, then reorged away.
    let round_two = queue_claims(&store, &domain, &ids[3..], 20_000).await;
    expected.extend(round_two.clone());
    let snapshot = anvil.rpc("evm_snapshot", serde_json::json!([])).await;
    let sent = pass(&mut settler).await.unwrap();
    assert_eq!(sent.submitted, vec![(1, 3)], "{sent:?}");
    let confirming = pass(&mut settler).await.unwrap();
    assert_eq!(confirming.confirming, 1, "{confirming:?}");
    assert_eq!(queued(&store).await, round_two, "queued until confirmed");
    assert_eq!(
        anvil.rpc("evm_revert", serde_json::json!([snapshot])).await,
        serde_json::json!(true)
    );
    assert_eq!(operator_nonce(&anvil.url).await, 1, "the batch is undone");
    for id in round_two.keys() {
        assert_eq!(claimed(*id).await, 0, "the payment is undone");
    }
    let (passes, errors) = drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;
    eprintln!("after the second reorg: {passes:?}, chain errors {errors:?}");
    assert!(errors.is_empty(), "{errors:?}");
    let submitted: usize = passes.iter().map(|p| p.submitted.len()).sum();
    let resent: usize = passes.iter().map(|p| p.resent).sum();
    assert_eq!(
        submitted, 0,
        "the batch went again under its nonce: {passes:?}"
    );
    assert!(resent >= 1, "{passes:?}");
    assert_settled_once(&payer, &store, &expected, &HashMap::new(), before, from).await;
    assert_eq!(operator_nonce(&anvil.url).await, 2, "two batches in all");
    let after = pass(&mut settler).await.unwrap();
    assert!(
        after.submitted.is_empty(),
        "a further pass sends nothing: {after:?}"
    );
    eprintln!("reorg test: {:?}", started.elapsed());
}

/// The payee's key, to sign `Close` for handed-over closes.
fn payee_key() -> k256::ecdsa::SigningKey {
    k256::ecdsa::SigningKey::from_slice(dev_signer(2).to_bytes().as_slice()).unwrap()
}

/// Passes, mining a block after each, until nothing is in flight (the queue may keep claims).
async fn settle_in_flight(settler: &mut Settler<RpcBackend, RedisStore>, node: &str) -> Vec<Pass> {
    let mut passes = Vec::new();
    for _ in 0..50 {
        passes.push(pass(settler).await.unwrap());
        if settler.store().in_flight().await.unwrap().is_empty() {
            return passes;
        }
        rpc(node, "evm_mine", serde_json::json!([])).await;
    }
    panic!("still in flight after 50 passes: {passes:?}");
}

/// Handed-over closes and batches from one key: the close takes its nonce from the chain, not
/// from a count its provider kept since the last close (which the batches, sent with the
/// settler's own nonces, left behind). Before: the second close was sent under the nonce of the
/// first batch, the node refused it ("nonce too low"), and every pass failed before planning
/// anything, withdrawal-due claims included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_between_batches_take_the_next_nonce() {
    let anvil = Anvil::start();
    let redis = Redis::start();
    let contract = deploy(&anvil.url).await;
    let payer = payer(&anvil.url, contract).await;
    let domain = ChannelDomain::new(payer.backend().chain_id(), contract);
    let store = RedisStore::connect(&redis.url, PREFIX).await.unwrap();
    let ids = open_channels(&payer, 1, 5).await;
    // The payee's own key sends the batches and signs the closes.
    let backend = RpcBackend::connect(&anvil.url, dev_signer(2))
        .await
        .unwrap();
    let mut settler = Settler::new(
        Channels::at(backend, contract),
        RedisStore::connect(&redis.url, PREFIX).await.unwrap(),
        config(1, 1, 100),
    )
    .with_close_key(payee_key());

    store
        .queue_close(claim(&domain, ids[0], 1, 1_100, 1_000))
        .await
        .unwrap();
    let closed = pass(&mut settler).await.unwrap();
    assert_eq!(closed.closes, 1, "{closed:?}");
    let expected = queue_claims(&store, &domain, &ids[1..3], 0).await;
    let (passes, errors) = drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        passes.iter().map(|p| p.submitted.len()).sum::<usize>(),
        1,
        "{passes:?}"
    );
    for (id, amount) in &expected {
        assert_eq!(
            payer.read_channel(*id).await.unwrap().unwrap().claimed,
            *amount
        );
    }

    // A second close after the batch, and a claim beside it.
    store
        .queue_close(claim(&domain, ids[3], 1, 2_100, 2_000))
        .await
        .unwrap();
    let later = queue_claims(&store, &domain, &ids[4..], 5_000).await;
    let second = pass(&mut settler).await;
    let second = second.expect("the pass after a batch closes and plans");
    assert_eq!(second.closes, 1, "{second:?}");
    assert_eq!(second.submitted.len(), 1, "{second:?}");
    drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;
    for id in [ids[0], ids[3]] {
        let info = payer.read_channel(id).await.unwrap().unwrap();
        assert!(info.closed, "channel {id} closed");
    }
    for (id, amount) in &later {
        assert_eq!(
            payer.read_channel(*id).await.unwrap().unwrap().claimed,
            *amount
        );
    }
    assert!(store.closes().await.unwrap().is_empty());
    assert!(store.skipped_claims().await.unwrap().is_empty());
}

/// A payee that refuses payment for a while (its address reverts on receiving ETH: `anvil_setCode`)
/// is paid once it accepts again. A batch that would revert (the estimate), and one that
/// reverted on-chain (mined after the payee turned), keep their claims queued and go again
/// after a back-off. Before: both batches' claims were taken off the queue as `batch_reverted`,
/// and nothing ever settled them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payee_that_refuses_payment_for_a_while_is_paid_once_it_accepts() {
    let anvil = Anvil::start();
    let redis = Redis::start();
    let contract = deploy(&anvil.url).await;
    let payer = payer(&anvil.url, contract).await;
    let domain = ChannelDomain::new(payer.backend().chain_id(), contract);
    let store = RedisStore::connect(&redis.url, PREFIX).await.unwrap();
    let ids = open_channels(&payer, 1, 4).await;
    let from = payer.backend().block_number().await.unwrap();
    let before = payer.backend().balance(payee()).await.unwrap();
    let mut settle_config = config(2, 1, 100);
    // The settler counts whole seconds: a back-off of 1 s can end within a millisecond (the
    // next second begins), and "not again at once" failed when the two passes straddled one.
    settle_config.reverted_retry_secs = 3;
    let mut settler = settler(&anvil.url, contract, &redis.url, settle_config).await;
    // PUSH1 0 PUSH1 0 REVERT: every call to the payee reverts.
    let refuse = || {
        anvil.rpc(
            "anvil_setCode",
            serde_json::json!([payee(), "0x60006000fd"]),
        )
    };
    let accept = || anvil.rpc("anvil_setCode", serde_json::json!([payee(), "0x"]));

    // The estimate reverts: nothing is sent, nothing leaves the queue.
    refuse().await;
    let mut expected = queue_claims(&store, &domain, &ids[..2], 0).await;
    let refused = pass(&mut settler).await.unwrap();
    assert!(refused.submitted.is_empty(), "{refused:?}");
    assert_eq!(refused.held, 2, "{refused:?}");
    assert_eq!(queued(&store).await, expected, "the claims stay queued");
    assert!(store.skipped_claims().await.unwrap().is_empty());
    // Backed off: the next pass does not try again at once.
    accept().await;
    let backed_off = pass(&mut settler).await.unwrap();
    assert!(backed_off.submitted.is_empty(), "{backed_off:?}");
    let (passes, errors) = drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;
    assert!(errors.is_empty(), "{errors:?}");
    eprintln!("after the payee accepts: {passes:?}");

    // Sent, then the payee turns before the block: the batch reverts on-chain.
    anvil
        .rpc("evm_setAutomine", serde_json::json!([false]))
        .await;
    let round_two = queue_claims(&store, &domain, &ids[2..], 10_000).await;
    expected.extend(round_two.clone());
    let sent = pass(&mut settler).await.unwrap();
    assert_eq!(sent.submitted.len(), 1, "{sent:?}");
    let hash = store.in_flight().await.unwrap()[0].hashes[0];
    refuse().await;
    let passes = settle_in_flight(&mut settler, &anvil.url).await;
    assert_eq!(tx_mined(&anvil.url, hash).await, Some(true));
    let receipt = rpc(
        &anvil.url,
        "eth_getTransactionReceipt",
        serde_json::json!([hash]),
    )
    .await;
    assert_eq!(receipt["status"], "0x0", "the batch reverted on-chain");
    assert_eq!(
        queued(&store).await,
        round_two,
        "a reverted batch's claims stay queued: {passes:?}"
    );
    assert!(store.skipped_claims().await.unwrap().is_empty());
    accept().await;
    let (passes, errors) = drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;
    assert!(errors.is_empty(), "{errors:?}");
    eprintln!("after the payee accepts again: {passes:?}");
    assert_settled_once(&payer, &store, &expected, &HashMap::new(), before, from).await;
}

/// The payee revokes the settler's operator key: the settler stops sending for it, and the
/// claims of a batch the contract skipped as `not_payee` stay queued for whoever may claim.
/// When the payee makes it an operator again, the settler sees it (its answer is re-read) and
/// settles them. Before: the first answer was kept for the life of the process, the batch went
/// out, and its skipped claims were taken off the shared queue for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_operator_leaves_the_claims_for_the_next() {
    let anvil = Anvil::start();
    let redis = Redis::start();
    let contract = deploy(&anvil.url).await;
    let payer = payer(&anvil.url, contract).await;
    let payee_chain = Channels::at(
        RpcBackend::connect(&anvil.url, dev_signer(2))
            .await
            .unwrap(),
        contract,
    );
    let domain = ChannelDomain::new(payer.backend().chain_id(), contract);
    let store = RedisStore::connect(&redis.url, PREFIX).await.unwrap();
    let ids = open_channels(&payer, 1, 3).await;
    let from = payer.backend().block_number().await.unwrap();
    let before = payer.backend().balance(payee()).await.unwrap();
    let mut settle_config = config(1, 1, 100);
    settle_config.channel_cache_secs = 1;
    let mut settler = settler(&anvil.url, contract, &redis.url, settle_config).await;
    let mut expected = queue_claims(&store, &domain, &ids[..1], 0).await;
    drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;

    let revoked = payee_chain.set_operator(operator(), false).await.unwrap();
    let round_two = queue_claims(&store, &domain, &ids[1..], 10_000).await;
    expected.extend(round_two.clone());
    let passes = settle_in_flight(&mut settler, &anvil.url).await;
    eprintln!("revoked: {passes:?}");
    assert_eq!(queued(&store).await, round_two, "nothing lost: {passes:?}");
    assert!(store.skipped_claims().await.unwrap().is_empty());
    let idle = pass(&mut settler).await.unwrap();
    assert!(idle.submitted.is_empty(), "{idle:?}");

    let granted = payee_chain.set_operator(operator(), true).await.unwrap();
    let (passes, errors) = drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;
    assert!(errors.is_empty(), "{errors:?}");
    eprintln!("an operator again: {passes:?}");
    // The payee paid for its two setOperator transactions.
    let spent =
        fee_paid(&anvil.url, revoked.tx_hash).await + fee_paid(&anvil.url, granted.tx_hash).await;
    assert_settled_once(
        &payer,
        &store,
        &expected,
        &HashMap::new(),
        before - spent,
        from,
    )
    .await;
}

/// What the sender of `hash` paid for it (wei).
async fn fee_paid(url: &str, hash: B256) -> U256 {
    let receipt = rpc(url, "eth_getTransactionReceipt", serde_json::json!([hash])).await;
    let field = |name: &str| {
        U256::from_str_radix(receipt[name].as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
    };
    field("gasUsed") * field("effectiveGasPrice")
}

/// What a claim's queued record says about its age (`since`, unix seconds).
async fn claim_since(store: &RedisStore, id: B256) -> u64 {
    store
        .queued_claims(10_000)
        .await
        .unwrap()
        .into_iter()
        .find(|q| q.claim.channel_id == id)
        .expect("queued")
        .since
}

/// A claim queued two hours ago (its record's age rewritten in Redis) goes by age; a larger one
/// is queued for the channel while the batch confirms. Once the first is paid, the larger one's
/// age counts from then, not from the first: it waits for its value. Before: it kept the first
/// one's age and went again at once, and a live session (a claim every minute) was settled
/// every time, whatever its claims were worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_after_a_payment_counts_its_age_from_the_payment() {
    let anvil = Anvil::start();
    let redis = Redis::start();
    let contract = deploy(&anvil.url).await;
    let payer = payer(&anvil.url, contract).await;
    let domain = ChannelDomain::new(payer.backend().chain_id(), contract);
    let store = RedisStore::connect(&redis.url, PREFIX).await.unwrap();
    let ids = open_channels(&payer, 1, 1).await;
    let mut settle_config = config(2, 1, 100);
    settle_config.economics.force = false;
    settle_config.economics.max_age_secs = 3_600;
    // 1 wei of gas price: a claim is worth its gas from 24,000 wei; these are far below.
    settle_config.economics.gas_price_wei = 1;
    let mut settler = settler(&anvil.url, contract, &redis.url, settle_config).await;
    store
        .queue_claim(claim(&domain, ids[0], 1, 1_000, 1_000), Fence::NONE)
        .await
        .unwrap();
    let waits = pass(&mut settler).await.unwrap();
    assert!(waits.submitted.is_empty(), "{waits:?}");
    // Two hours old.
    let mut conn = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // The claim is the channel record's `q` field (docs/STORE.md).
    let key = format!("{PREFIX}ch:{{{}}}", ids[0]);
    let field = "q";
    let record: String = redis::cmd("HGET")
        .arg(&key)
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (head, since) = record.rsplit_once('|').unwrap();
    let old = since.parse::<u64>().unwrap() - 7_200;
    let _: i64 = redis::cmd("HSET")
        .arg(&key)
        .arg(field)
        .arg(format!("{head}|{old}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(claim_since(&store, ids[0]).await, old);
    let by_age = pass(&mut settler).await.unwrap();
    assert_eq!(by_age.submitted.len(), 1, "due by age: {by_age:?}");
    store
        .queue_claim(claim(&domain, ids[0], 2, 3_000, 3_000), Fence::NONE)
        .await
        .unwrap();
    assert_eq!(
        claim_since(&store, ids[0]).await,
        old,
        "a larger claim keeps the age"
    );
    let passes = settle_in_flight(&mut settler, &anvil.url).await;
    assert_eq!(
        payer.read_channel(ids[0]).await.unwrap().unwrap().claimed,
        1_000,
        "the larger claim waits for its value: {passes:?}"
    );
    let since = claim_since(&store, ids[0]).await;
    assert!(
        since > old + 3_600,
        "the rest's age counts from the payment: since {since}, first {old}: {passes:?}"
    );
    let after = pass(&mut settler).await.unwrap();
    assert!(
        after.submitted.is_empty(),
        "the rest waits for its value: {after:?}"
    );
    assert_eq!(queued(&store).await.get(&ids[0]), Some(&3_000));
}

/// A lone claim worth its marginal gas twice over, but not the gas of a whole transaction,
/// waits; when enough claims of the payee are due together, they go in one batch whose gas
/// costs at most half their value. Before: the lone claim went at once, and its transaction
/// (52,733 gas for one claim) cost more than twice what it collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_goes_on_value_only_when_it_pays_for_its_whole_gas() {
    let anvil = Anvil::start();
    let redis = Redis::start();
    let contract = deploy(&anvil.url).await;
    let payer = payer(&anvil.url, contract).await;
    let domain = ChannelDomain::new(payer.backend().chain_id(), contract);
    let store = RedisStore::connect(&redis.url, PREFIX).await.unwrap();
    let ids = open_channels(&payer, 1, 5).await;
    let mut settle_config = config(1, 1, 100);
    settle_config.economics.force = false;
    // Native ETH at 1 wei per gas: a claim is worth its marginal gas twice from 24,000 wei.
    settle_config.economics.gas_price_wei = 1;
    assert_eq!(settle_config.economics.threshold(), 24_000);
    let mut settler = settler(&anvil.url, contract, &redis.url, settle_config).await;
    let value = 50_000u128;
    store
        .queue_claim(claim(&domain, ids[0], 1, value, value), Fence::NONE)
        .await
        .unwrap();
    let lone = pass(&mut settler).await.unwrap();
    assert!(
        lone.submitted.is_empty(),
        "a lone claim does not pay for a transaction: {lone:?}"
    );
    assert_eq!(lone.waiting, 1, "{lone:?}");
    for id in &ids[1..] {
        store
            .queue_claim(claim(&domain, *id, 1, value, value), Fence::NONE)
            .await
            .unwrap();
    }
    let together = pass(&mut settler).await.unwrap();
    assert_eq!(together.submitted, vec![(0, 5)], "{together:?}");
    drain(&mut settler, &anvil.url, Duration::from_secs(20)).await;
    let gas = settler
        .metrics()
        .gas_used
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("5 claims of {value} wei: {gas} gas at 1 wei");
    assert!(
        u128::from(gas) * 2 <= 5 * value,
        "gas {gas} is more than half of {}",
        5 * value
    );
}

/// A withdrawal-due claim goes even when the queue holds more claims than a pass looks at
/// (lowered here to one): it is looked up by its channel, not found by the scan. Before: the
/// scan stopped at the limit, and a claim past it waited while its payer's deadline ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_due_claim_goes_past_the_scan_limit() {
    let anvil = Anvil::start();
    let redis = Redis::start();
    let contract = deploy(&anvil.url).await;
    let payer = payer(&anvil.url, contract).await;
    let domain = ChannelDomain::new(payer.backend().chain_id(), contract);
    let store = RedisStore::connect(&redis.url, PREFIX).await.unwrap();
    let ids = open_channels(&payer, 1, 3).await;
    let mut settle_config = config(1, 1, 100);
    settle_config.economics.force = false;
    settle_config.max_queued_claims = 1;
    let mut settler = settler(&anvil.url, contract, &redis.url, settle_config).await;
    // Small claims (far below the threshold), the last one queued last.
    let expected = queue_claims(&store, &domain, &ids, 0).await;
    let idle = pass(&mut settler).await.unwrap();
    assert!(idle.submitted.is_empty(), "{idle:?}");
    payer.request_withdraw(ids[2]).await.unwrap();
    let urgent = pass(&mut settler).await.unwrap();
    assert_eq!(urgent.submitted, vec![(0, 1)], "{urgent:?}");
    settle_in_flight(&mut settler, &anvil.url).await;
    let info = payer.read_channel(ids[2]).await.unwrap().unwrap();
    assert_eq!(info.claimed, expected[&ids[2]]);
    let left = queued(&store).await;
    assert_eq!(left.len(), 2, "the others wait: {left:?}");
}
