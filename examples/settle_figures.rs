//! The settler's figures (`scripts/settle-figures` starts anvil and redis-server and runs
//! this): gas per claim in the settler's real batches, claims settled per second against anvil,
//! and the time from a session's close (its claim queued) to its confirmed settlement.
//!
//! Usage: `settle_figures RPC_URL REDIS_URL CLAIMS` against an anvil with its development keys.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use k256::ecdsa::SigningKey;
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{Backend, ChannelChain, Channels};
use paystream::channel::{ChannelDomain, ChannelState, signature};
use paystream::settle::{SettleConfig, Settler};
use paystream::store::redis::RedisStore;
use paystream::store::{ChannelStore, Fence, PendingClaim, StoredVoucher};

const KEYS: [&str; 4] = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
];

fn signer(i: usize) -> PrivateKeySigner {
    KEYS[i].parse().unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rpc = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8545".into());
    let redis = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let claims: usize = args.next().map_or(Ok(500), |n| n.parse())?;
    let payer = Channels::deploy(RpcBackend::connect(&rpc, signer(1)).await?).await?;
    let payee = payer.with_backend(RpcBackend::connect(&rpc, signer(2)).await?);
    let payee_address = payee.backend().sender();
    let operator = signer(3);
    payee.set_operator(operator.address(), true).await?;
    let domain = ChannelDomain::new(payer.chain_id(), payer.address());
    let payer_key = SigningKey::from_slice(signer(1).to_bytes().as_slice())?;
    let store = RedisStore::connect(&redis, "figures:").await?;
    let claim_on = |id: B256, amount: u128| {
        let state = ChannelState {
            channelId: id,
            nonce: 1,
            cumulative: amount,
        };
        let sig = signature::sign_digest(&payer_key, &domain.state_digest(&state));
        PendingClaim {
            channel_id: id,
            voucher: StoredVoucher {
                nonce: 1,
                cumulative: amount,
                signature: sig,
            },
            amount,
        }
    };
    eprintln!("opening {claims} channels...");
    let mut queued = Vec::new();
    for i in 0..claims {
        let salt = B256::from(U256::from(i + 1));
        let (id, _) = payer
            .open(payee_address, Address::ZERO, salt, 1_000_000, 3_600)
            .await?;
        let amount = 1 + (i as u128 % 997);
        store.queue_claim(claim_on(id, amount), Fence::NONE).await?;
        queued.push(amount);
    }
    // Throughput: every claim due (forced), 100 per batch, one confirmation (anvil mines each
    // transaction at once).
    let mut config = SettleConfig {
        confirmations: 1,
        interval_ms: 0,
        ..SettleConfig::default()
    };
    config.economics.force = true;
    let backend = RpcBackend::connect(&rpc, operator.clone()).await?;
    let mut settler = Settler::new(payee.with_backend(backend), store.clone(), config);
    let before = payee.backend().balance(payee_address).await?;
    let started = Instant::now();
    let mut batches = 0;
    while !store.pending_claims(1).await?.is_empty() {
        let pass = settler.run_once().await?;
        batches += pass.submitted.len();
    }
    let elapsed = started.elapsed();
    let paid = payee.backend().balance(payee_address).await? - before;
    let expected: u128 = queued.iter().sum();
    anyhow::ensure!(
        paid == U256::from(expected),
        "paid {paid}, expected {expected}"
    );
    let metrics = settler.metrics();
    let gas = metrics.gas_used.load(Ordering::Relaxed);
    println!("| figure | value |\n|---|---:|");
    println!("| claims settled | {claims} in {batches} batches |");
    println!(
        "| gas per claim (whole transactions) | {:.0} |",
        gas as f64 / claims as f64
    );
    println!(
        "| claims settled per second against anvil | {:.0} |",
        claims as f64 / elapsed.as_secs_f64()
    );
    // Latency: a claim queued (as a session's close queues it) to its confirmed settlement, with
    // the defaults (a pass every 2 s, 2 confirmations) on a chain with 1 s blocks.
    let (id, _) = payer
        .open(
            payee_address,
            Address::ZERO,
            B256::repeat_byte(0xee),
            1_000_000,
            3_600,
        )
        .await?;
    let mut defaults = SettleConfig::default();
    defaults.economics.force = true;
    // From here anvil mines a block every second, as a chain does (automine mined each
    // transaction at once so far).
    let _: serde_json::Value = reqwest::Client::new()
        .post(&rpc)
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "evm_setIntervalMining", "params": [1]}))
        .send()
        .await?
        .json()
        .await?;
    let backend = RpcBackend::connect(&rpc, operator).await?;
    let settler = Settler::new(payee.with_backend(backend), store.clone(), defaults);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(settler.run(async move {
        let _ = stopped.await;
    }));
    let queued_at = Instant::now();
    store.queue_claim(claim_on(id, 5), Fence::NONE).await?;
    while payee.read_channel(id).await?.map_or(0, |c| c.claimed) < 5
        || !store.pending_claims(1).await?.is_empty()
    {
        anyhow::ensure!(queued_at.elapsed() < Duration::from_secs(60), "not settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "| close to confirmed settlement (2 s passes, 2 confirmations, 1 s blocks) | {:.1} s |",
        queued_at.elapsed().as_secs_f64()
    );
    let _ = stop.send(());
    let _ = task.await;
    Ok(())
}
