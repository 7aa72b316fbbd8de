//! `paystream pay` as a process against the server, a real anvil and redis-server.

mod common;

use common::anvil::DEV_KEYS;
use common::stack::{Options, Stack};
use std::process::Command;

/// Runs `paystream pay` against the stack's server with a per-message maximum of `max_price`.
async fn pay(stack: &Stack, max_price: &str, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<String> = vec![
        "pay".into(),
        format!("{}/tokens", stack.url),
        "--rpc-url".into(),
        stack.anvil.url.clone(),
        "--contract".into(),
        stack.contract.to_string(),
        "--chain".into(),
        stack.chain_id.to_string(),
    ];
    for a in [
        "--deposit",
        "5000",
        "--max-total",
        "5000",
        "--max-window",
        "50",
        "--max-per-message",
        max_price,
    ] {
        args.push(a.into());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args(&args)
            .env("PAYSTREAM_PAYER_KEY", DEV_KEYS[1])
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_streams_and_prints_a_checked_receipt() {
    let mut options = Options::new(r#"{"perMessage":{"amount":"1","per":"2"}}"#);
    options.tokens_per_sec = 1_000;
    let stack = Stack::start(options).await;
    let out = pay(
        &stack,
        "1/2",
        &["--prompt", "hi", "--max-tokens", "120", "--close-channel"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PayStream meters"), "the stream is printed");
    let receipt: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(receipt["consumed"], "60", "120 tokens at 1/2");
    assert_eq!(receipt["refund"], "4940");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vouchers"),
        "a status line"
    );

    // Over the policy: refused before any money moves, with a clear message and exit code 1.
    let out = pay(&stack, "1/3", &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("terms refused"));
}
