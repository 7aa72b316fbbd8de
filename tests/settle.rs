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
    c.open(1, 1_000_000).await;
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
