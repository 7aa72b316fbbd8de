//! The chain boundary end to end: on a real anvil (the contract deployed by `paystream deploy`)
//! and on the in-process EVM, the same scenario opens channels, settles a batch of claims
//! signed by the channel module (valid and invalid mixed), closes one channel cooperatively and
//! reads the balances; both backends must give the same results.

mod common;

use alloy::primitives::{Address, B256, Signature, U256};
use alloy::signers::local::PrivateKeySigner;
use common::anvil::{Anvil, dev_signer};
use k256::ecdsa::SigningKey;
use paystream::chain::bindings::PaymentChannels::PaymentChannelsErrors;
use paystream::chain::evm::EvmNode;
use paystream::chain::rpc::RpcBackend;
use paystream::chain::{
    Backend, ChainError, ChannelChain, ChannelEvent, Channels, Claim, Events, SkipReason,
};
use paystream::channel::{ChannelDomain, ChannelState, Close, signature};
use std::process::Command;

const ETH: u128 = 1_000_000_000_000_000_000;
const DELAY_SECS: u32 = 3600;

/// The parties: deployer 0, payer 1, payee 2, the payee's operator 3, a stranger 4.
struct Parties<B> {
    payer: Channels<B>,
    payee: Channels<B>,
    operator: Channels<B>,
    stranger: Channels<B>,
}

/// What the scenario observed; compared across backends.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    settled: Vec<(B256, u64, u128)>,
    skipped: Vec<(B256, SkipReason)>,
    runs: Vec<(Address, Address, U256, Vec<B256>)>,
    payee_received: U256,
    payer_refunded: U256,
    contract_balance: U256,
    a_after_settle: (u128, u64),
    close: (u128, u128, u128),
    opened: Vec<B256>,
    withdraw_requested: Vec<B256>,
    closed: Vec<B256>,
}

fn key(i: usize) -> SigningKey {
    SigningKey::from_slice(dev_signer(i).to_bytes().as_slice()).unwrap()
}

fn sign_claim(
    domain: &ChannelDomain,
    key: &SigningKey,
    id: B256,
    nonce: u64,
    cumulative: u128,
    amount: u128,
) -> Claim {
    let state = ChannelState {
        channelId: id,
        nonce,
        cumulative,
    };
    let signature = signature::sign_digest(key, &domain.state_digest(&state));
    Claim {
        channel_id: id,
        nonce,
        cumulative,
        amount,
        signature,
    }
}

async fn scenario<B: Backend>(p: Parties<B>) -> Observed {
    let chain_id = p.payer.chain_id();
    let domain = ChannelDomain::new(chain_id, p.payer.address());
    let payer = p.payer.backend().sender();
    let payee = p.payee.backend().sender();

    // The contract and the channel module agree on the domain and digests.
    assert_eq!(
        p.payer.domain_separator().await.unwrap(),
        domain.separator()
    );
    let probe = ChannelState {
        channelId: B256::repeat_byte(7),
        nonce: 9,
        cumulative: 11,
    };
    assert_eq!(
        p.payer.state_digest(probe.channelId, 9, 11).await.unwrap(),
        domain.state_digest(&probe)
    );

    p.payee
        .set_operator(p.operator.backend().sender(), true)
        .await
        .unwrap();
    let (a, _) = p
        .payer
        .open(payee, Address::ZERO, B256::repeat_byte(1), ETH, DELAY_SECS)
        .await
        .unwrap();
    let (b, _) = p
        .payer
        .open(
            payee,
            Address::ZERO,
            B256::repeat_byte(2),
            ETH / 2,
            DELAY_SECS,
        )
        .await
        .unwrap();
    assert_eq!(
        a,
        paystream::channel::ChannelKey {
            chain_id,
            contract: p.payer.address(),
            payer,
            payee,
            token: Address::ZERO,
            salt: B256::repeat_byte(1),
        }
        .channel_id()
    );
    p.payer.request_withdraw(b).await.unwrap();

    // Opening the same channel twice is a decoded revert that changes nothing.
    match p
        .payer
        .open(payee, Address::ZERO, B256::repeat_byte(1), 1, DELAY_SECS)
        .await
    {
        Err(ChainError::Reverted(PaymentChannelsErrors::ChannelExists(e))) => {
            assert_eq!(e.channelId, a)
        }
        other => panic!("expected ChannelExists, got {other:?}"),
    }

    let payee_before = p.payee.backend().balance(payee).await.unwrap();
    let payer_before = p.payer.backend().balance(payer).await.unwrap();

    let payer_key = key(1);
    let claims = vec![
        sign_claim(&domain, &payer_key, a, 1, 3 * ETH / 10, 2 * ETH / 10),
        sign_claim(&domain, &payer_key, b, 1, ETH / 10, ETH / 10),
        sign_claim(&domain, &key(4), a, 2, ETH, ETH),
        sign_claim(&domain, &payer_key, b, 1, ETH / 10, ETH / 10),
        sign_claim(&domain, &payer_key, a, 2, 4 * ETH / 10, 45 * ETH / 100),
    ];
    let settled = p.operator.settle(&claims).await.unwrap();
    assert!(settled.receipt.gas_used > 0);

    let info = p
        .payer
        .read_channel(a)
        .await
        .unwrap()
        .expect("channel a exists");
    assert_eq!((info.payer, info.payee, info.deposit), (payer, payee, ETH));
    let b_info = p.payer.read_channel(b).await.unwrap().unwrap();
    assert!(b_info.withdraw_requested() && !b_info.closed);
    assert_eq!(
        p.payer.read_channel(B256::repeat_byte(0xee)).await.unwrap(),
        None
    );

    // The cooperative close, submitted by a stranger with both signatures.
    let final_claim = sign_claim(&domain, &payer_key, a, 3, 6 * ETH / 10, 5 * ETH / 10);
    let close = Close {
        channelId: a,
        amount: 5 * ETH / 10,
    };
    let payee_sig: Signature = signature::sign_digest(&key(2), &domain.close_digest(&close));
    let closed = p
        .stranger
        .close_cooperative(&final_claim, &payee_sig)
        .await
        .unwrap();
    match p.stranger.close_cooperative(&final_claim, &payee_sig).await {
        Err(ChainError::Reverted(PaymentChannelsErrors::ChannelClosed(_))) => {}
        other => panic!("expected ChannelClosed, got {other:?}"),
    }
    assert!(p.payer.read_channel(a).await.unwrap().unwrap().closed);

    let latest = p.payee.block_number().await.unwrap();
    let events = p
        .payee
        .channel_events(0, latest, Events::All)
        .await
        .unwrap();
    // A read for changes only is the same less the `Opened` events.
    let changes = p
        .payee
        .channel_events(0, latest, Events::Changes)
        .await
        .unwrap();
    let without_opened: Vec<_> = events
        .iter()
        .filter(|(e, _)| !matches!(e, ChannelEvent::Opened(_)))
        .copied()
        .collect();
    assert_eq!(changes, without_opened);
    let of = |f: fn(&ChannelEvent) -> bool| -> Vec<B256> {
        events
            .iter()
            .filter(|(e, _)| f(e))
            .map(|(e, _)| e.channel_id())
            .collect()
    };
    Observed {
        settled: settled
            .claimed
            .iter()
            .map(|c| (c.channel_id, c.nonce, c.claimed))
            .collect(),
        skipped: settled.skipped,
        runs: settled
            .runs
            .iter()
            .map(|r| (r.payee, r.token, r.amount, r.channel_ids.clone()))
            .collect(),
        payee_received: p.payee.backend().balance(payee).await.unwrap() - payee_before,
        payer_refunded: p.payer.backend().balance(payer).await.unwrap() - payer_before,
        contract_balance: p.payer.backend().balance(p.payer.address()).await.unwrap(),
        a_after_settle: (info.claimed, info.claimed_nonce),
        close: (closed.claimed, closed.paid, closed.refund),
        opened: of(|e| matches!(e, ChannelEvent::Opened(_))),
        withdraw_requested: of(|e| matches!(e, ChannelEvent::WithdrawRequested(_))),
        closed: of(|e| matches!(e, ChannelEvent::Closed { .. })),
    }
}

fn expected(a: B256, b: B256) -> Observed {
    Observed {
        settled: vec![(a, 1, 2 * ETH / 10), (b, 1, ETH / 10)],
        skipped: vec![
            (a, SkipReason::BadSignature),
            (b, SkipReason::AlreadyClaimed),
            (a, SkipReason::ExceedsCumulative),
        ],
        runs: vec![(
            dev_signer(2).address(),
            Address::ZERO,
            U256::from(3 * ETH / 10),
            vec![a, b],
        )],
        payee_received: U256::from(6 * ETH / 10),
        payer_refunded: U256::from(5 * ETH / 10),
        contract_balance: U256::from(4 * ETH / 10),
        a_after_settle: (2 * ETH / 10, 1),
        close: (5 * ETH / 10, 3 * ETH / 10, 5 * ETH / 10),
        opened: vec![a, b],
        withdraw_requested: vec![b],
        closed: vec![a],
    }
}

fn ids(chain_id: u64, contract: Address) -> (B256, B256) {
    let key = |salt| paystream::channel::ChannelKey {
        chain_id,
        contract,
        payer: dev_signer(1).address(),
        payee: dev_signer(2).address(),
        token: Address::ZERO,
        salt,
    };
    (
        key(B256::repeat_byte(1)).channel_id(),
        key(B256::repeat_byte(2)).channel_id(),
    )
}

/// Deploys with the `paystream deploy` command and returns the contract address.
fn deploy_with_cli(url: &str) -> (Address, u64) {
    let out = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args(["deploy", "--rpc-url", url])
        .env("PAYSTREAM_DEPLOYER_KEY", common::anvil::DEV_KEYS[0])
        .output()
        .expect("paystream deploy runs");
    assert!(
        out.status.success(),
        "deploy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("deploy prints JSON");
    (
        v["address"].as_str().unwrap().parse().unwrap(),
        v["chainId"].as_u64().unwrap(),
    )
}

async fn rpc_party(url: &str, contract: Address, i: usize) -> Channels<RpcBackend> {
    let signer: PrivateKeySigner = dev_signer(i);
    Channels::at(RpcBackend::connect(url, signer).await.unwrap(), contract)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_scenario_on_anvil_and_in_process_gives_the_same_balances() {
    // anvil, deployed by the CLI.
    let anvil = Anvil::start();
    let (contract, chain_id) = deploy_with_cli(&anvil.url);
    assert_eq!(chain_id, 31337);
    let on_anvil = scenario(Parties {
        payer: rpc_party(&anvil.url, contract, 1).await,
        payee: rpc_party(&anvil.url, contract, 2).await,
        operator: rpc_party(&anvil.url, contract, 3).await,
        stranger: rpc_party(&anvil.url, contract, 4).await,
    })
    .await;
    let (a, b) = ids(chain_id, contract);
    assert_eq!(on_anvil, expected(a, b));
    drop(anvil);

    // The in-process EVM, deployed from the same bytecode.
    let node = EvmNode::new(31337);
    for i in 0..5 {
        node.fund(dev_signer(i).address(), U256::from(10_000 * ETH));
    }
    let deployed = Channels::deploy(node.backend(dev_signer(0).address()))
        .await
        .unwrap();
    let party = |i: usize| deployed.with_backend(node.backend(dev_signer(i).address()));
    let in_process = scenario(Parties {
        payer: party(1),
        payee: party(2),
        operator: party(3),
        stranger: party(4),
    })
    .await;
    let (a, b) = ids(31337, deployed.address());
    assert_eq!(in_process, expected(a, b));
}

#[tokio::test]
async fn withdraw_after_the_delay_on_the_in_process_evm() {
    let node = EvmNode::default();
    let payer = dev_signer(1).address();
    let payee = dev_signer(2).address();
    node.fund(payer, U256::from(10 * ETH));
    let c = Channels::deploy(node.backend(payer)).await.unwrap();
    let (id, _) = c
        .open(payee, Address::ZERO, B256::ZERO, ETH, 900)
        .await
        .unwrap();
    c.request_withdraw(id).await.unwrap();
    match c.withdraw(id).await {
        Err(ChainError::Reverted(PaymentChannelsErrors::WithdrawTooEarly(_))) => {}
        other => panic!("expected WithdrawTooEarly, got {other:?}"),
    }
    node.advance_time(900);
    let before = node.balance_of(payer);
    c.withdraw(id).await.unwrap();
    assert_eq!(node.balance_of(payer) - before, U256::from(ETH));
    assert!(c.read_channel(id).await.unwrap().unwrap().closed);
}

/// `paystream deploy --out FILE --reuse` (the compose file's one-shot step): the first run
/// deploys and writes the address; a second run on the same chain keeps that contract; on a
/// chain without it (a fresh anvil) it deploys again.
#[test]
fn deploy_writes_its_address_and_reuses_a_deployed_contract() {
    let anvil = Anvil::start();
    let dir = common::faults::TempDir::new("deploy");
    let out = dir.path().join("contract");
    let run = |url: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args(["deploy", "--rpc-url", url, "--reuse", "--out"])
            .arg(&out)
            .env("PAYSTREAM_DEPLOYER_KEY", common::anvil::DEV_KEYS[0])
            .output()
            .expect("paystream deploy runs");
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let first = run(&anvil.url);
    let written = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        written.trim().parse::<Address>().unwrap(),
        first["address"]
            .as_str()
            .unwrap()
            .parse::<Address>()
            .unwrap()
    );
    let second = run(&anvil.url);
    assert_eq!(second["address"], first["address"]);
    assert_eq!(second["reused"], true);
    drop(anvil);
    let fresh = Anvil::start();
    let third = run(&fresh.url);
    assert_ne!(
        third["reused"], true,
        "nothing there on a new chain: deployed"
    );
}
