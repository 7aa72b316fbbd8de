//! `paystream deploy --rpc-url URL`: deploys `PaymentChannels` from the committed bytecode.
//! With `--out FILE` it writes the address there too, and with `--reuse` it first looks there:
//! a contract already deployed at that address on this chain is kept (a one-shot deploy step
//! of a compose file that runs again).

use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use clap::Args;
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{Backend, Channels};
use serde_json::json;

/// Environment variable holding the deployer's private key.
pub const DEPLOYER_KEY_ENV: &str = "PAYSTREAM_DEPLOYER_KEY";

/// Flags of `paystream deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// JSON-RPC endpoint of the chain (http:// or https://).
    #[arg(long, env = "PAYSTREAM_RPC_URL")]
    rpc_url: String,
    /// The deployer's private key, 0x-hex. Read it from the environment: a flag shows in
    /// process lists.
    #[arg(long, env = DEPLOYER_KEY_ENV, hide_env_values = true)]
    key: String,
    /// Also write the contract's address to this file.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// If `--out` names an address of a PaymentChannels contract on this chain, use it instead
    /// of deploying another.
    #[arg(long, requires = "out")]
    reuse: bool,
}

/// Deploys the contract and prints `{address, chainId, txHash, block, gasUsed, deployer}`.
pub async fn run(args: DeployArgs) -> anyhow::Result<()> {
    let signer: PrivateKeySigner = args
        .key
        .trim()
        .parse()
        .context("the deployer key is not a 32-byte hex private key")?;
    let backend = RpcBackend::connect(&args.rpc_url, signer)
        .await
        .with_context(|| format!("connecting to {}", args.rpc_url))?;
    let deployer = backend.sender();
    let chain_id = backend.chain_id();
    if args.reuse
        && let Some(path) = &args.out
        && let Ok(text) = std::fs::read_to_string(path)
        && let Ok(address) = text.trim().parse::<alloy::primitives::Address>()
    {
        // The contract answers its own view: it is there, on this chain.
        let existing = Channels::at(backend.clone(), address);
        if existing.domain_separator().await.is_ok() {
            println!(
                "{}",
                json!({ "address": address, "chainId": chain_id, "reused": true })
            );
            return Ok(());
        }
    }
    let contract = Channels::deploy(backend)
        .await
        .context("deploying PaymentChannels")?;
    if let Some(path) = &args.out {
        std::fs::write(path, format!("{}\n", contract.address()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "{}",
        json!({
            "address": contract.address(),
            "chainId": chain_id,
            "deployer": deployer,
        })
    );
    Ok(())
}
