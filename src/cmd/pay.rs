//! `paystream pay <url>`: pay for a stream from the command line.

use std::io::Write;

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use clap::Args;
use k256::ecdsa::SigningKey;
use paystream::chain::Channels;
use paystream::chain::rpc::RpcBackend;
use paystream::client::{Event, Payer, Policy, fetch_challenge};
use paystream::meter::Price;

/// Environment variable holding the payer's private key.
pub const PAYER_KEY_ENV: &str = "PAYSTREAM_PAYER_KEY";

/// Flags of `paystream pay`.
#[derive(Debug, Args)]
pub struct PayArgs {
    /// The resource URL (answers 402 with the terms).
    url: String,
    /// JSON-RPC endpoint of the chain.
    #[arg(long, env = "PAYSTREAM_RPC_URL")]
    rpc_url: String,
    /// The PaymentChannels contract this client trusts with its deposit.
    #[arg(long, env = "PAYSTREAM_CONTRACT")]
    contract: Address,
    /// The payer's private key.
    #[arg(long, env = PAYER_KEY_ENV, hide_env_values = true)]
    key: String,
    /// Channel salt: the same salt reuses the same channel.
    #[arg(long, default_value_t = B256::ZERO)]
    salt: B256,
    /// Deposit when a channel is opened (base units; at most --max-total).
    #[arg(long)]
    deposit: u128,
    /// Highest price per message, `amount/per` base units (e.g. 3/1000).
    #[arg(long, value_parser = parse_price)]
    max_per_message: Option<Price>,
    /// Highest price per second.
    #[arg(long, value_parser = parse_price)]
    max_per_second: Option<Price>,
    /// Highest price per byte out.
    #[arg(long, value_parser = parse_price)]
    max_per_byte_out: Option<Price>,
    /// Highest price per byte in.
    #[arg(long, value_parser = parse_price)]
    max_per_byte_in: Option<Price>,
    /// The most this client deposits (and so ever pays) in a channel.
    #[arg(long)]
    max_total: u128,
    /// The most credit extended beyond what was received.
    #[arg(long)]
    max_window: u128,
    /// Payees allowed (repeat; none: any).
    #[arg(long = "payee")]
    payees: Vec<Address>,
    /// Chain ids allowed (repeat).
    #[arg(long = "chain", required = true)]
    chains: Vec<u64>,
    /// The request body's prompt.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Tokens to ask for.
    #[arg(long, default_value_t = 100)]
    max_tokens: u64,
    /// Close the channel at the end (refund the rest of the deposit now).
    #[arg(long)]
    close_channel: bool,
}

fn parse_price(text: &str) -> Result<Price, String> {
    let (amount, per) = text.split_once('/').unwrap_or((text, "1"));
    let amount = amount.trim().parse().map_err(|e| format!("amount: {e}"))?;
    let per = per.trim().parse().map_err(|e| format!("per: {e}"))?;
    Price::new(amount, per).map_err(|e| e.to_string())
}

/// Runs `paystream pay`.
pub async fn run(args: PayArgs) -> anyhow::Result<()> {
    let signer: PrivateKeySigner = args
        .key
        .trim()
        .parse()
        .context("the payer key is not a 32-byte hex private key")?;
    let key = SigningKey::from_slice(signer.to_bytes().as_slice())?;
    let backend = RpcBackend::connect(&args.rpc_url, signer)
        .await
        .context("connecting to the chain")?;
    let policy = Policy {
        max_per_message: args.max_per_message,
        max_per_second: args.max_per_second,
        max_per_byte_out: args.max_per_byte_out,
        max_per_byte_in: args.max_per_byte_in,
        max_total: args.max_total,
        max_credit_window: args.max_window,
        allowed_payees: args.payees,
        allowed_chains: args.chains,
    };
    let challenge = fetch_challenge(&args.url).await?;
    let payer = Payer::new(Channels::at(backend, args.contract), key, policy);
    let mut session = payer.start(&challenge, args.salt, args.deposit).await?;
    session
        .request(serde_json::json!({ "prompt": args.prompt, "maxTokens": args.max_tokens }))
        .await?;
    let started = std::time::Instant::now();
    let mut out = std::io::stdout();
    while session.messages() < args.max_tokens {
        let Some(event) = session.next().await? else {
            break;
        };
        match event {
            Event::App { data, .. } => {
                match data.get("token").and_then(|t| t.as_str()) {
                    Some(token) => write!(out, "{token}")?,
                    None => writeln!(out, "{data}")?,
                }
                out.flush()?;
            }
            Event::Binary(bytes) => eprintln!("[{} binary bytes]", bytes.len()),
            Event::Error { code, message } => eprintln!("\n[server error {code}: {message}]"),
            Event::Paused(reason) => eprintln!("\n[paused: {reason}]"),
            Event::Reconnected { resumed, attempts } => eprintln!(
                "\n[reconnected after {attempts} attempt(s): {}]",
                if resumed {
                    "session resumed"
                } else {
                    "channel re-opened"
                }
            ),
            Event::End { reason, .. } => {
                if reason != "completed" && reason != "max_tokens" {
                    eprintln!("\n[the stream ended: {reason}]");
                }
                break;
            }
            _ => {}
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        eprint!(
            "\r\x1b[2K[spent {} | credit {} | {:.1} msg/s | vouchers {} | reconnects {}]",
            session.spent(),
            session.cumulative().saturating_sub(session.spent()),
            session.messages() as f64 / secs,
            session.vouchers_signed(),
            session.reconnects()
        );
    }
    let receipt = session.close(args.close_channel).await?;
    eprintln!();
    println!(
        "\n{}",
        serde_json::json!({
            "consumed": receipt.consumed.to_string(),
            "settled": receipt.settled.to_string(),
            "refund": receipt.refund.to_string(),
            "closePending": receipt.close_pending,
            "cumulative": receipt.cumulative.to_string(),
        })
    );
    Ok(())
}
