//! `paystream demo` runs on embedded defaults with nothing else installed, and shows tokens,
//! the live cost, the settlement and the refund read from the contract. And the demo's terms
//! (0.3 micro-cents per token, a 2-unit credit window) never run a paid stream dry: before the
//! fix of issue 9 item 0, half the demos paused at exhausted credit and ended with 4408.

mod common;

use std::process::Command;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use common::anvil::dev_signer;
use common::stack::{Options, Stack, payee, payer_key};
use paystream::chain::Channels;
use paystream::chain::rpc::RpcBackend;
use paystream::client::{Event, Payer, Policy, fetch_challenge};
use paystream::meter::{MeterConfig, Price};

#[test]
fn the_demo_streams_pays_settles_and_refunds() {
    // Three at once: a demo that passes by luck fails here.
    let runs: Vec<_> = (0..3)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_paystream"))
                .arg("demo")
                .env_remove("RUST_LOG")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("paystream demo runs")
        })
        .collect();
    for run in runs {
        let out = run.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "demo failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("PayStream meters every token"),
            "tokens are shown"
        );
        assert!(stdout.contains("cost so far"), "the cost is shown live");
        assert!(
            stdout.contains("voucher #"),
            "vouchers are signed while streaming"
        );
        assert!(
            !stdout.contains("[paused"),
            "the stream never paused: {stdout}"
        );
        assert!(
            stdout.contains("receipt   consumed 6 base units, settled 6, refund 99994"),
            "{stdout}"
        );
        assert!(
            stdout.contains("payee received  6 base units"),
            "settlement read from the chain"
        );
        assert!(
            stdout.contains("payer refunded  99994 base units"),
            "refund read from the chain"
        );
    }
}

const STREAMS: usize = 50;
const AT_ONCE: usize = 10;
const TOKENS: u64 = 2_000;

/// 50 paid streams on the demo's terms (2,000 tokens each at 0.003 base units, a 2-unit credit
/// window, the client's policy window 10) through the client library against the real server,
/// anvil and Redis, ten at a time: none pauses and none ends with 4408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_paid_streams_on_the_demo_terms_never_run_dry() {
    let mut options = Options::new(r#"{"perMessage":{"amount":"3","per":"1000"}}"#);
    options.tokens_per_sec = 1_000;
    options.params = Box::new(|p| {
        p.meter = MeterConfig::with_credit_window(2);
        p.usage_interval_ms = 1_000;
    });
    let stack = Stack::start(options).await;
    // The channels first (one account, one transaction at a time), then the streams at once.
    for i in 0..STREAMS {
        stack
            .payer
            .open(payee(), Address::ZERO, salt(i), 100_000, 3600)
            .await
            .unwrap();
    }
    let challenge = fetch_challenge(&format!("{}/tokens", stack.url))
        .await
        .unwrap();
    let policy = Policy {
        max_per_message: Some(Price {
            amount: 1,
            per: 100,
        }),
        max_per_second: None,
        max_per_byte_out: None,
        max_per_byte_in: None,
        max_total: 100_000,
        max_credit_window: 10,
        allowed_payees: vec![payee()],
        allowed_chains: vec![stack.chain_id],
    };
    let backend = RpcBackend::connect(&stack.anvil.url, dev_signer(1))
        .await
        .unwrap();
    let payer = std::sync::Arc::new(Payer::new(
        Channels::at(backend, stack.contract),
        payer_key(),
        policy,
    ));
    for round in 0..STREAMS / AT_ONCE {
        let mut streams = tokio::task::JoinSet::new();
        for i in round * AT_ONCE..(round + 1) * AT_ONCE {
            let (payer, challenge) = (payer.clone(), challenge.clone());
            streams.spawn(async move {
                let mut session = payer.start(&challenge, salt(i), 100_000).await.unwrap();
                session
                    .request(serde_json::json!({ "maxTokens": TOKENS }))
                    .await
                    .unwrap();
                let mut pauses = 0;
                while session.messages() < TOKENS {
                    match tokio::time::timeout(Duration::from_secs(20), session.next())
                        .await
                        .unwrap_or_else(|_| panic!("stream {i} stalled"))
                    {
                        Ok(Some(Event::Paused(_))) => pauses += 1,
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("stream {i} ended early"),
                        Err(e) => panic!("stream {i}: {e}"),
                    }
                }
                let receipt = session.close(false).await.unwrap();
                // 2,000 tokens at 0.003: exactly 6.
                assert_eq!(receipt.consumed, 6, "stream {i}");
                pauses
            });
        }
        while let Some(pauses) = streams.join_next().await {
            assert_eq!(pauses.unwrap(), 0, "a stream paused for credit");
        }
    }
}

fn salt(i: usize) -> B256 {
    B256::from(U256::from(0x5eed_0000 + i))
}
