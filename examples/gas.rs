//! Gas of the contract's functions, measured from transaction receipts on a JSON-RPC node
//! (`scripts/gas` starts anvil and runs this). Prints a Markdown table.
//!
//! Usage: `cargo run --release --example gas -- RPC_URL` with anvil's development keys funded.

use alloy::primitives::{Address, B256};
use alloy::providers::Provider;
use alloy::signers::local::PrivateKeySigner;
use k256::ecdsa::SigningKey;
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{Backend, ChannelChain, Channels, Claim};
use paystream::channel::{ChannelDomain, ChannelState, Close, signature};

const KEYS: [&str; 3] = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
];
const DEPOSIT: u128 = 10_000_000_000_000_000; // 0.01 ETH
const DELAY_SECS: u32 = 900;

fn signer(i: usize) -> PrivateKeySigner {
    KEYS[i].parse().unwrap()
}

/// Intrinsic calldata gas of a `settle` call: 16 per non-zero byte, 4 per zero byte.
fn calldata_gas(claims: &[Claim]) -> u64 {
    use alloy::sol_types::SolCall;
    use paystream::chain::bindings::PaymentChannels as pc;
    let call = pc::settleCall {
        claims: claims
            .iter()
            .map(|c| {
                let (r, vs) = signature::to_compact(&c.signature);
                pc::Claim {
                    channelId: c.channel_id,
                    nonce: c.nonce,
                    cumulative: c.cumulative,
                    amount: c.amount,
                    r,
                    vs,
                }
            })
            .collect(),
    };
    call.abi_encode()
        .iter()
        .map(|b| if *b == 0 { 4 } else { 16 })
        .sum()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8545".into());
    let payer = Channels::deploy(RpcBackend::connect(&url, signer(0)).await?).await?;
    let payee = payer.with_backend(RpcBackend::connect(&url, signer(1)).await?);
    let payee_addr = payee.backend().sender();
    let payer_key = SigningKey::from_slice(signer(0).to_bytes().as_slice())?;
    let domain = ChannelDomain::new(payer.chain_id(), payer.address());
    let mut salt = 0u64;
    let mut open = |n: usize| {
        let payer = &payer;
        let start = salt;
        salt += n as u64;
        async move {
            let mut ids = Vec::with_capacity(n);
            let mut gas = 0;
            for s in start..start + n as u64 {
                let (id, r) = payer
                    .open(
                        payee_addr,
                        Address::ZERO,
                        B256::from(alloy::primitives::U256::from(s + 1)),
                        DEPOSIT,
                        DELAY_SECS,
                    )
                    .await?;
                ids.push(id);
                gas = r.gas_used;
            }
            anyhow::Ok((ids, gas))
        }
    };
    let claim = |id: B256, nonce: u64, amount: u128| {
        let state = ChannelState {
            channelId: id,
            nonce,
            cumulative: amount,
        };
        Claim {
            channel_id: id,
            nonce,
            cumulative: amount,
            amount,
            signature: signature::sign_digest(&payer_key, &domain.state_digest(&state)),
        }
    };

    println!(
        "| batch size | settle tx gas | gas per claim | marginal gas per claim (vs batch of 1) | of which calldata | of which execution |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut calldata_one = 0;
    let mut gas_one = 0;
    for n in [1usize, 10, 100] {
        let (ids, _) = open(n).await?;
        let claims: Vec<Claim> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| claim(*id, 1_000 + i as u64, 1_234_567_890 + i as u128))
            .collect();
        let outcome = payee.settle(&claims).await?;
        anyhow::ensure!(
            outcome.claimed.len() == n && outcome.skipped.is_empty(),
            "every claim pays"
        );
        let gas = outcome.receipt.gas_used;
        let calldata = calldata_gas(&claims);
        if n == 1 {
            gas_one = gas;
            calldata_one = calldata;
        }
        if n == 1 {
            println!("| 1 | {gas} | {gas} | - | - | - |");
        } else {
            let marginal = (gas - gas_one) / (n as u64 - 1);
            let marginal_calldata = (calldata - calldata_one) / (n as u64 - 1);
            println!(
                "| {n} | {gas} | {} | {marginal} | {marginal_calldata} | {} |",
                gas / n as u64,
                marginal - marginal_calldata
            );
        }
    }

    let (ids, open_gas) = open(1).await?;
    let id = ids[0];
    let top_up = payer.top_up(id, Address::ZERO, DEPOSIT).await?.gas_used;
    let request = payer.request_withdraw(id).await?.gas_used;
    payer
        .backend()
        .provider()
        .raw_request::<_, serde_json::Value>("evm_increaseTime".into(), (DELAY_SECS,))
        .await?;
    let withdraw = payer.withdraw(id).await?.gas_used;

    let (ids, _) = open(1).await?;
    let id = ids[0];
    payee.settle(&[claim(id, 1, 1_000)]).await?;
    let payee_key = SigningKey::from_slice(signer(1).to_bytes().as_slice())?;
    let close_sig = signature::sign_digest(
        &payee_key,
        &domain.close_digest(&Close {
            channelId: id,
            amount: 5_000,
        }),
    );
    let close = payer
        .close_cooperative(&claim(id, 2, 5_000), &close_sig)
        .await?
        .receipt
        .gas_used;

    println!();
    println!("| function | tx gas |");
    println!("|---|---:|");
    println!("| open (native) | {open_gas} |");
    println!("| topUp (native) | {top_up} |");
    println!("| requestWithdraw | {request} |");
    println!("| withdraw | {withdraw} |");
    println!("| closeCooperative (after a claim) | {close} |");
    Ok(())
}
