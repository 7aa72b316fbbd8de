//! `paystream settle` as its own process, the only one holding the payee's key, beside
//! `paystream serve` running with no key ([settle] mode = "separate"), on a real anvil and
//! redis-server: a cooperative close is handed to the settler (the receipt says it is pending)
//! and lands with the payer's exact refund, and an ordinary claim is settled at its exact
//! amount.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{B256, U256};
use common::anvil::{Anvil, DEV_KEYS, dev_signer};
use common::redis::Redis;
use common::stack::payer_key;
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{Backend, ChannelChain, Channels};
use paystream::client::{Event, Payer, Policy, fetch_challenge};
use paystream::meter::Price;

/// A child process killed when the test ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `paystream ARGS` and waits for a log line containing `ready`.
fn start(args: &[&str], env: &[(&str, String)], ready: &str) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_paystream"));
    command
        .args(args)
        .env_remove("PAYSTREAM_PAYEE_KEY")
        .env(
            "PAYSTREAM_JWT_SECRET",
            "a shared secret of at least 32 bytes, for tests",
        )
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = Process(command.spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("paystream {args:?} never logged {ready:?}"));
        if line.contains(ready) {
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return child;
        }
    }
}

/// Polls `check` every 50 ms until it holds, for at most 30 s.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_settler_holds_the_only_key() {
    let anvil = Anvil::start();
    let redis = Redis::start();
    let deployer = RpcBackend::connect(&anvil.url, dev_signer(0))
        .await
        .unwrap();
    let contract = Channels::deploy(deployer).await.unwrap().address();
    let payee = dev_signer(2).address();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("paystream-settle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("paystream.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:{port}"
[chain]
rpc_url = "{rpc}"
contract = "{contract}"
payee = "{payee}"
[store]
kind = "redis"
redis_url = "{redis}"
[tariff]
perMessage = {{ amount = "7", per = "10" }}
[session]
credit_window = "100"
[settle]
mode = "separate"
confirmations = 1
interval_ms = 200
max_claim_age_secs = 0
[resources.tokens]
kind = "token_generator"
tokens_per_sec = 0
"#,
            rpc = anvil.url,
            redis = redis.url,
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    // The server: no key in its environment.
    let _serve = start(&["serve", "--config", &config], &[], "serving");
    // The settler: the payee's key.
    let _settle = start(
        &["settle", "--config", &config],
        &[("PAYSTREAM_SETTLER_KEY", DEV_KEYS[2].to_string())],
        "paystream settle",
    );

    let payer_chain = Channels::at(
        RpcBackend::connect(&anvil.url, dev_signer(1))
            .await
            .unwrap(),
        contract,
    );
    let challenge = fetch_challenge(&format!("http://127.0.0.1:{port}/tokens"))
        .await
        .unwrap();
    let policy = Policy {
        max_per_message: Some(Price { amount: 1, per: 1 }),
        max_per_second: None,
        max_per_byte_out: None,
        max_per_byte_in: None,
        max_total: 1_000_000,
        max_credit_window: 100,
        allowed_payees: vec![payee],
        allowed_chains: vec![31337],
    };
    let client = Payer::new(payer_chain.clone(), payer_key(), policy);
    let mut receipts = Vec::new();
    // The ordinary close first: the payer sends no transaction after the cooperative one.
    for (salt, close_channel) in [(2u8, false), (1u8, true)] {
        let mut session = client
            .start(&challenge, B256::repeat_byte(salt), 1_000_000)
            .await
            .unwrap();
        session
            .request(serde_json::json!({ "maxTokens": 30 }))
            .await
            .unwrap();
        while let Some(event) = session.next().await.unwrap() {
            if let Event::End { .. } = event {
                break;
            }
        }
        let id = session.channel_id();
        let payer_before = payer_chain
            .backend()
            .balance(dev_signer(1).address())
            .await
            .unwrap();
        let receipt = session.close(close_channel).await.unwrap();
        assert_eq!(receipt.consumed, 21, "30 tokens at 0.7");
        assert_eq!(receipt.close_pending, close_channel, "{receipt:?}");
        receipts.push((id, receipt, payer_before));
    }
    // The cooperative close lands through the settler: the payer gets exactly the rest (it
    // sent no transaction itself meanwhile).
    let (closed, receipt, payer_before) = receipts[1];
    eventually("the handed-over close", || async {
        payer_chain
            .read_channel(closed)
            .await
            .unwrap()
            .is_some_and(|c| c.closed)
    })
    .await;
    let payer_after = payer_chain
        .backend()
        .balance(dev_signer(1).address())
        .await
        .unwrap();
    assert_eq!(payer_after - payer_before, U256::from(receipt.refund));
    assert_eq!(receipt.refund, 1_000_000 - 21);
    // The ordinary claim is settled at its exact amount.
    let (claimed, receipt, _) = receipts[0];
    eventually("the claim's settlement", || async {
        payer_chain
            .read_channel(claimed)
            .await
            .unwrap()
            .is_some_and(|c| c.claimed == receipt.settled)
    })
    .await;
    // `status` shows nothing left pending.
    let status = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args(["settle", "status", "--config", &config])
        .env("PAYSTREAM_SETTLER_KEY", DEV_KEYS[2])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["pending"], serde_json::json!([]), "{status}");
    let _ = std::fs::remove_dir_all(dir);
}
