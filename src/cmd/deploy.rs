//! `paystream deploy --rpc-url URL`: deploys `PaymentChannels` from the committed bytecode.

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
    let contract = Channels::deploy(backend)
        .await
        .context("deploying PaymentChannels")?;
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
