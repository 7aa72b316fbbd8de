//! The batch settler (issue 10) on a real anvil with the deployed contract and a real
//! redis-server: claims queued by real sessions reach the chain once, confirmed, in bounded
//! batches, and the payee's balance grows by exactly what was consumed.

mod common;

use alloy::primitives::{B256, U256};
use common::anvil::dev_signer;
use common::stack::{Client, ETH, Options, Stack, payee};
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{Backend, Channels};
use paystream::protocol::{ClientMessage, ServerMessage};
use paystream::settle::{SettleConfig, Settler};
use paystream::store::redis::RedisStore;
use paystream::store::{ChannelStore, SettlementStore};

fn per_token() -> Options {
    Options::new(r#"{"perMessage":{"amount":"7","per":"10"}}"#)
}

/// Streams `tokens` tokens on a fresh channel and closes the session (the claim is queued).
async fn stream(stack: &Stack, salt: u8, tokens: u64) -> (B256, u128) {
    let id = stack.open_channel(payee(), salt, ETH).await;
    let mut c: Client = stack.client(id).await;
    c.opened(1, 1_000_000).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": tokens }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await;
    c.send(&ClientMessage::Close {
        close_channel: false,
    })
    .await;
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::Receipt { .. }))
        .await;
    let Some(ServerMessage::Receipt { settled_amount, .. }) = seen.last() else {
        unreachable!()
    };
    (id, *settled_amount)
}

/// A settler sending as the payee's operator (dev key 3, registered with `setOperator`), so the
/// payee's balance moves by exactly what is claimed (the operator pays the gas).
async fn settler(stack: &Stack, config: SettleConfig) -> Settler<RpcBackend, RedisStore> {
    let operator = dev_signer(3);
    let payee_chain = Channels::at(
        RpcBackend::connect(&stack.anvil.url, dev_signer(2))
            .await
            .unwrap(),
        stack.contract,
    );
    if !payee_chain
        .is_operator(payee(), operator.address())
        .await
        .unwrap()
    {
        payee_chain
            .set_operator(operator.address(), true)
            .await
            .unwrap();
    }
    let backend = RpcBackend::connect(&stack.anvil.url, operator)
        .await
        .unwrap();
    let store = RedisStore::connect(&stack.redis.url, "ps:").await.unwrap();
    Settler::new(Channels::at(backend, stack.contract), store, config)
}

fn forced() -> SettleConfig {
    let mut config = SettleConfig::default();
    config.economics.force = true;
    config.confirmations = 1;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_claims_are_settled_once_and_leave_the_queue() {
    let stack = Stack::start(per_token()).await;
    let mut expected = 0u128;
    let mut ids = Vec::new();
    for salt in 1..=3u8 {
        let (id, amount) = stream(&stack, salt, 10 * u64::from(salt)).await;
        expected += amount;
        ids.push((id, amount));
    }
    let mut settler = settler(&stack, forced()).await;
    let before = stack.payer.backend().balance(payee()).await.unwrap();
    let pass = settler.run_once().await.unwrap();
    assert_eq!(pass.submitted.len(), 1, "{pass:?}");
    let pass = settler.run_once().await.unwrap();
    assert_eq!(pass.settled, 3, "{pass:?}");
    assert!(
        stack
            .state
            .store
            .pending_claims(10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(settler.store().in_flight().await.unwrap().is_empty());
    let after = stack.payer.backend().balance(payee()).await.unwrap();
    assert_eq!(
        after - before,
        U256::from(expected),
        "exactly what was consumed"
    );
    for (id, amount) in &ids {
        assert_eq!(stack.read_channel(*id).await.claimed, *amount);
    }
    // A second run settles nothing more.
    let pass = settler.run_once().await.unwrap();
    assert!(pass.submitted.is_empty(), "{pass:?}");
}

/// A stream on `id` with the client signing as `key`; returns the receipt's settled amount.
async fn stream_on(stack: &Stack, id: B256, key: &k256::ecdsa::SigningKey, tokens: u64) -> u128 {
    let mut c: Client = stack.client(id).await;
    c.key = key.clone();
    c.opened(1, 1_000_000).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": tokens }),
    })
    .await;
    c.recv_until(|m| matches!(m, ServerMessage::End { .. }))
        .await;
    c.send(&ClientMessage::Close {
        close_channel: false,
    })
    .await;
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::Receipt { .. }))
        .await;
    let Some(ServerMessage::Receipt { settled_amount, .. }) = seen.last() else {
        unreachable!()
    };
    *settled_amount
}

const CHANNELS: usize = 500;
const DEPOSIT: u128 = 1_000_000;

/// 500 channels of two payers streamed and closed through the server are settled in batches
/// within the bounds (at most 100 claims, one payee per transaction); the payee's balance grows
/// by exactly the sum of the rounded-up consumptions, every channel's claimed is its receipt's,
/// and a payer withdrawing gets exactly the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_channels_settle_in_bounded_batches() {
    let stack = Stack::start(per_token()).await;
    let payers = [
        (common::stack::payer_key(), stack.payer.clone()),
        (
            k256::ecdsa::SigningKey::from_slice(dev_signer(4).to_bytes().as_slice()).unwrap(),
            Channels::at(
                RpcBackend::connect(&stack.anvil.url, dev_signer(4))
                    .await
                    .unwrap(),
                stack.contract,
            ),
        ),
    ];
    let mut channels = Vec::new();
    for i in 0..CHANNELS {
        let (_, chain) = &payers[i % 2];
        let salt = B256::from(U256::from(0x500_000 + i));
        let (id, _) = chain
            .open(
                payee(),
                alloy::primitives::Address::ZERO,
                salt,
                DEPOSIT,
                3600,
            )
            .await
            .unwrap();
        channels.push((id, i % 2));
    }
    // Ten sessions at a time, 1 to 20 tokens each at 0.7 base units.
    let stack = std::sync::Arc::new(stack);
    let mut settled_by_channel = std::collections::HashMap::new();
    for chunk in channels.chunks(10) {
        let mut sessions = tokio::task::JoinSet::new();
        for (i, (id, payer)) in chunk.iter().copied().enumerate() {
            let stack = stack.clone();
            let key = payers[payer].0.clone();
            sessions.spawn(async move {
                let tokens = 1 + (id.0[0] as u64 + i as u64) % 20;
                (id, stream_on(&stack, id, &key, tokens).await)
            });
        }
        while let Some(done) = sessions.join_next().await {
            let (id, amount) = done.unwrap();
            settled_by_channel.insert(id, amount);
        }
    }
    let expected: u128 = settled_by_channel.values().sum();
    let mut config = forced();
    config.max_batch_claims = 100;
    let mut settler = settler(&stack, config).await;
    let before = stack.payer.backend().balance(payee()).await.unwrap();
    let started = std::time::Instant::now();
    let mut batches = Vec::new();
    for _ in 0..20 {
        let pass = settler.run_once().await.unwrap();
        batches.extend(pass.submitted.iter().map(|(_, n)| *n));
        if stack
            .state
            .store
            .pending_claims(1)
            .await
            .unwrap()
            .is_empty()
            && settler.store().in_flight().await.unwrap().is_empty()
        {
            break;
        }
    }
    let elapsed = started.elapsed();
    assert!(
        stack
            .state
            .store
            .pending_claims(1)
            .await
            .unwrap()
            .is_empty(),
        "the queue drained"
    );
    assert_eq!(batches.iter().sum::<usize>(), CHANNELS, "{batches:?}");
    assert!(batches.iter().all(|n| *n <= 100), "{batches:?}");
    let after = stack.payer.backend().balance(payee()).await.unwrap();
    assert_eq!(
        after - before,
        U256::from(expected),
        "exactly what was consumed"
    );
    for (id, amount) in &settled_by_channel {
        assert_eq!(stack.read_channel(*id).await.claimed, *amount, "{id}");
    }
    let metrics = settler.metrics();
    let gas = metrics.gas_used.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{CHANNELS} claims in {} batches, {:.0} gas per claim, {:.0} claims/s against anvil",
        batches.len(),
        gas as f64 / CHANNELS as f64,
        CHANNELS as f64 / elapsed.as_secs_f64()
    );
    // Refunds: a few channels of each payer withdraw; the contract pays each exactly the rest.
    for (id, payer) in channels.iter().take(6) {
        payers[*payer].1.request_withdraw(*id).await.unwrap();
    }
    stack.anvil.increase_time(3_601).await;
    for (id, payer) in channels.iter().take(6) {
        let held = stack.payer.backend().balance(stack.contract).await.unwrap();
        payers[*payer].1.withdraw(*id).await.unwrap();
        let paid = held - stack.payer.backend().balance(stack.contract).await.unwrap();
        assert_eq!(paid, U256::from(DEPOSIT - settled_by_channel[id]), "{id}");
    }
}

/// A payer asks to withdraw a channel whose claim is far below what is worth its gas: the
/// settler settles it anyway before the delay ends, and the payer's withdrawal afterwards
/// returns exactly the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_request_is_settled_before_its_deadline_whatever_it_is_worth() {
    let stack = Stack::start(per_token()).await;
    let (id, amount) = stream(&stack, 1, 10).await;
    let config = SettleConfig {
        confirmations: 1,
        ..SettleConfig::default()
    };
    let mut settler = settler(&stack, config).await;
    let pass = settler.run_once().await.unwrap();
    assert!(
        pass.submitted.is_empty(),
        "7 wei is not worth the gas: {pass:?}"
    );
    assert_eq!(pass.waiting, 1);
    stack.payer.request_withdraw(id).await.unwrap();
    let pass = settler.run_once().await.unwrap();
    assert_eq!(pass.submitted.len(), 1, "{pass:?}");
    settler.run_once().await.unwrap();
    let info = stack.read_channel(id).await;
    assert_eq!(info.claimed, amount);
    // The delay has not passed: the claim landed first.
    let now = stack
        .anvil
        .rpc("eth_getBlockByNumber", serde_json::json!(["latest", false]))
        .await;
    let block_time = u64::from_str_radix(
        now["timestamp"].as_str().unwrap().trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert!(block_time < info.withdraw_at, "settled before the deadline");
    stack.anvil.increase_time(3_601).await;
    let held = stack.payer.backend().balance(stack.contract).await.unwrap();
    stack.payer.withdraw(id).await.unwrap();
    let refund = held - stack.payer.backend().balance(stack.contract).await.unwrap();
    assert_eq!(refund, U256::from(ETH - amount));
}

/// A session longer than the settle age is settled as it goes: its claim reaches the chain
/// while it streams, and the session goes on (a later voucher is acknowledged, more tokens
/// flow), and its final consumption is settled after it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_session_is_settled_while_it_streams() {
    let mut options = per_token();
    options.tokens_per_sec = 100;
    options.params = Box::new(|p| p.claim_interval_ms = 200);
    let stack = Stack::start(options).await;
    let id = stack.open_channel(payee(), 1, ETH).await;
    let mut c = stack.client(id).await;
    c.opened(1, 1_000_000).await;
    c.send(&ClientMessage::Request {
        body: serde_json::json!({ "maxTokens": 10_000 }),
    })
    .await;
    let mut config = SettleConfig {
        confirmations: 1,
        ..SettleConfig::default()
    };
    config.economics.max_age_secs = 1;
    let mut settler = settler(&stack, config).await;
    // Passes while the session streams, until the chain shows part of it claimed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        c.recv_until(|m| matches!(m, ServerMessage::App { .. }))
            .await;
        settler.run_once().await.unwrap();
        if stack.read_channel(id).await.claimed > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never settled while streaming"
        );
    }
    // The session goes on.
    let v = c.voucher(2, 2_000_000);
    c.send(&ClientMessage::Voucher(v)).await;
    c.recv_until(|m| matches!(m, ServerMessage::VoucherAck { nonce: 2, .. }))
        .await;
    c.recv_until(|m| matches!(m, ServerMessage::App { .. }))
        .await;
    c.send(&ClientMessage::Close {
        close_channel: false,
    })
    .await;
    let seen = c
        .recv_until(|m| matches!(m, ServerMessage::Receipt { .. }))
        .await;
    let Some(ServerMessage::Receipt { settled_amount, .. }) = seen.last() else {
        unreachable!()
    };
    // The final claim is queued anew (the earlier one was paid): it goes once it is a second
    // old, the settle age here.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stack.read_channel(id).await.claimed != *settled_amount {
        assert!(
            std::time::Instant::now() < deadline,
            "the final claim was not settled"
        );
        settler.run_once().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
