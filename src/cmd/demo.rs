//! `paystream demo`: the whole system in one process, on embedded defaults, with nothing to
//! install: the in-process EVM running the real contract, the memory store, the server with
//! the token generator, and the paying client. It streams tokens with their cost live, closes
//! the channel cooperatively, and reads the settlement and the refund from the contract.
//!
//! Amounts are base units of a 6-decimal dollar token (as USDC: 1 base unit = $0.000001); the
//! in-process chain carries them as its native token.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use alloy::primitives::{Address, B256, U256};
use anyhow::Context;
use k256::ecdsa::SigningKey;
use paystream::chain::evm::EvmNode;
use paystream::chain::{ChannelChain, Channels};
use paystream::channel::{ChannelDomain, signature};
use paystream::client::{Event, Payer, Policy, fetch_challenge};
use paystream::meter::{Price, Tariff};
use paystream::server::resource::{Resource, TokenGenerator};
use paystream::server::{self, ServerState};
use paystream::session::SessionParams;
use paystream::store::memory::MemoryStore;

/// Demo keys: fixed so the demo is reproducible; they hold nothing anywhere.
const PAYER_KEY: [u8; 32] = [0xd1; 32];
const PAYEE_KEY: [u8; 32] = [0xd2; 32];
/// 0.3 micro-cents per token: 0.003 base units of a 6-decimal dollar token.
const PRICE_PER_TOKEN: Price = Price {
    amount: 3,
    per: 1000,
};
const TOKENS: u64 = 2_000;
const TOKENS_PER_SEC: u32 = 250;
/// One voucher per 2 base units: about 670 tokens of credit at a time.
const CREDIT_WINDOW: u128 = 2;
/// $0.10 of deposit.
const DEPOSIT: u128 = 100_000;

fn dollars(base_units: u128) -> String {
    format!("${}.{:06}", base_units / 1_000_000, base_units % 1_000_000)
}

/// Runs the demo.
pub async fn run() -> anyhow::Result<()> {
    let payer_key = SigningKey::from_slice(&PAYER_KEY)?;
    let payee_key = SigningKey::from_slice(&PAYEE_KEY)?;
    let payer = signature::address_of(payer_key.verifying_key());
    let payee = signature::address_of(payee_key.verifying_key());

    println!("PayStream demo: everything in this process, nothing to install.\n");
    let node = EvmNode::default();
    node.fund(payer, U256::from(1_000_000u128));
    let contract = Channels::deploy(node.backend(payer))
        .await
        .context("deploying the contract in-process")?;
    println!(
        "  chain     in-process EVM (revm), chain id {}",
        contract.chain_id()
    );
    println!(
        "  contract  PaymentChannels at {} (the committed bytecode)",
        contract.address()
    );
    println!(
        "  payer     {payer}  balance {}",
        dollars(node.balance_of(payer).to())
    );
    println!("  payee     {payee}");

    let tariff = Tariff {
        per_message: Some(PRICE_PER_TOKEN),
        ..Tariff::default()
    };
    let params = SessionParams {
        usage_interval_ms: 1_000,
        ..SessionParams::new(
            ChannelDomain::new(contract.chain_id(), contract.address()),
            payee,
            Address::ZERO,
            tariff,
            CREDIT_WINDOW,
        )
    };
    let mut resources = BTreeMap::new();
    let tokens: Arc<dyn Resource> = Arc::new(TokenGenerator {
        tokens_per_sec: TOKENS_PER_SEC,
        default_max_tokens: TOKENS,
    });
    resources.insert("tokens".to_string(), tokens);
    let listener = server::listen("127.0.0.1:0".parse()?)?;
    let url = format!("http://{}", listener.local_addr()?);
    let chain = contract.with_backend(node.backend(payee));
    let state = ServerState::new(
        params,
        chain,
        MemoryStore::new(),
        resources,
        Some(payee_key),
        url.clone(),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(listener, Arc::new(state), async move {
        let _ = stop_rx.await;
    }));
    println!(
        "  server    {url}/tokens (memory store, token generator at {TOKENS_PER_SEC} tokens/s)\n"
    );

    let challenge = fetch_challenge(&format!("{url}/tokens")).await?;
    let offer = challenge
        .channel_stream()
        .context("channel-stream offered")?;
    println!(
        "402 Payment Required: 0.3 micro-cents per token ({}/{} base units), credit window {} base units",
        PRICE_PER_TOKEN.amount, PRICE_PER_TOKEN.per, offer.extra.credit_window
    );
    let policy = Policy {
        max_per_message: Some(Price {
            amount: 1,
            per: 100,
        }),
        max_per_second: None,
        max_per_byte_out: None,
        max_per_byte_in: None,
        max_total: DEPOSIT,
        max_credit_window: 10,
        allowed_payees: vec![payee],
        allowed_chains: vec![contract.chain_id()],
    };
    let client = Payer::new(
        contract.with_backend(node.backend(payer)),
        payer_key,
        policy,
    );
    let mut session = client.start(&challenge, B256::ZERO, DEPOSIT).await?;
    println!(
        "channel   {} opened with a deposit of {} ({} base units)\n",
        session.channel_id(),
        dollars(DEPOSIT),
        DEPOSIT
    );
    session
        .request(serde_json::json!({ "prompt": "tell me about paid streams", "maxTokens": TOKENS }))
        .await?;

    let mut out = std::io::stdout();
    let mut line = 0usize;
    while session.messages() < TOKENS {
        let Some(event) = session.next().await? else {
            break;
        };
        match event {
            Event::App { data, .. } => {
                let token = data.get("token").and_then(|t| t.as_str()).unwrap_or("");
                write!(out, "{token}")?;
                line += token.len();
                if line > 80 {
                    writeln!(out)?;
                    line = 0;
                }
                if session.messages() % 250 == 0 {
                    writeln!(
                        out,
                        "\n   [{} tokens | cost so far {} base units ({}) | vouchers signed {}]",
                        session.messages(),
                        session.received_worth(),
                        dollars(session.received_worth()),
                        session.vouchers_signed()
                    )?;
                    line = 0;
                }
                out.flush()?;
            }
            Event::VoucherSigned { nonce, cumulative } => {
                writeln!(
                    out,
                    "\n   [voucher #{nonce}: authorized up to {cumulative} base units]"
                )?;
                line = 0;
            }
            Event::Paused(reason) => writeln!(out, "\n   [paused: {reason}]")?,
            Event::Reconnected { resumed, .. } => writeln!(
                out,
                "\n   [reconnected: {}]",
                if resumed {
                    "session resumed"
                } else {
                    "channel re-opened"
                }
            )?,
            Event::End { .. } => break,
            _ => {}
        }
    }

    let contract_before = node.balance_of(contract.address());
    let payee_before = node.balance_of(payee);
    let payer_before = node.balance_of(payer);
    let receipt = session.close(true).await?;
    println!(
        "\n\nreceipt   consumed {} base units, settled {}, refund {}",
        receipt.consumed, receipt.settled, receipt.refund
    );
    let paid: u128 = (node.balance_of(payee) - payee_before).to();
    let refunded: u128 = (node.balance_of(payer) - payer_before).to();
    let left: u128 = node.balance_of(contract.address()).to();
    println!("settlement (read from the contract's balances after the cooperative close):");
    println!("  payee received  {paid} base units ({})", dollars(paid));
    println!(
        "  payer refunded  {refunded} base units ({})",
        dollars(refunded)
    );
    println!("  contract holds  {left} (was {})", contract_before);
    anyhow::ensure!(
        paid == receipt.settled && refunded == receipt.refund,
        "the chain disagrees with the receipt"
    );
    println!(
        "\n{} tokens at 0.3 micro-cents each: exactly {}.{:03} base units, settled as {} (rounded up once).",
        TOKENS,
        TOKENS * 3 / 1000,
        TOKENS * 3 % 1000,
        receipt.settled
    );
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(())
}
