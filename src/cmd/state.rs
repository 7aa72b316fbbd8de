//! `paystream state digest|sign|verify|channel-id`: the EIP-712 hashing and signatures of
//! channel states, for integrators checking their own wallet code against the engine.

use alloy::hex;
use alloy::primitives::{Address, B256};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use k256::ecdsa::SigningKey;
use paystream::channel::{
    ChannelDomain, ChannelKey, ChannelState, PayerKeys, signature, state_struct_hash,
};
use serde_json::{Value, json};
use std::process::ExitCode;

/// Environment variable the `sign` command reads the payer's private key from.
pub const PAYER_KEY_ENV: &str = "PAYSTREAM_PAYER_KEY";

/// The `state` subcommands.
#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Print the domain separator, struct hash and digest of a channel state.
    Digest(StateArgs),
    /// Sign a channel state with the key in $PAYSTREAM_PAYER_KEY (RFC 6979, low-s).
    Sign {
        #[command(flatten)]
        state: StateArgs,
        /// The payer's private key, 0x-hex. Read it from the environment: a flag shows in
        /// process lists.
        #[arg(long, env = PAYER_KEY_ENV, hide_env_values = true)]
        key: String,
    },
    /// Verify a signature; prints the signer. Exits non-zero when it does not verify.
    Verify {
        #[command(flatten)]
        state: StateArgs,
        /// The signature, 0x-hex: 65 bytes (r, s, v) or 64 bytes (EIP-2098 compact).
        #[arg(long)]
        signature: String,
        /// The expected payer; when given, the signature is checked against it.
        #[arg(long)]
        payer: Option<Address>,
    },
    /// Compute a channel id as the contract does in `open`.
    ChannelId {
        /// Chain id.
        #[arg(long)]
        chain_id: u64,
        /// The PaymentChannels contract address.
        #[arg(long)]
        contract: Address,
        /// Who deposits and signs.
        #[arg(long)]
        payer: Address,
        /// Who is paid.
        #[arg(long)]
        payee: Address,
        /// ERC-20 token, or the zero address for native ETH.
        #[arg(long, default_value_t = Address::ZERO)]
        token: Address,
        /// The payer's salt, 32 bytes 0x-hex.
        #[arg(long)]
        salt: B256,
    },
}

/// The fields of a channel state and its domain.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// Chain id of the domain.
    #[arg(long)]
    chain_id: u64,
    /// The PaymentChannels contract (the domain's verifyingContract).
    #[arg(long)]
    contract: Address,
    /// The channel id, 32 bytes 0x-hex.
    #[arg(long)]
    channel_id: B256,
    /// The state's nonce.
    #[arg(long)]
    nonce: u64,
    /// The cumulative amount authorized, in token base units (decimal).
    #[arg(long)]
    cumulative: u128,
}

impl StateArgs {
    fn domain(&self) -> ChannelDomain {
        ChannelDomain::new(self.chain_id, self.contract)
    }

    fn state(&self) -> ChannelState {
        ChannelState {
            channelId: self.channel_id,
            nonce: self.nonce,
            cumulative: self.cumulative,
        }
    }

    /// The JSON every subcommand starts from.
    fn describe(&self) -> (B256, Value) {
        let domain = self.domain();
        let state = self.state();
        let digest = domain.state_digest(&state);
        let value = json!({
            "chainId": self.chain_id,
            "contract": self.contract,
            "channelId": self.channel_id,
            "nonce": self.nonce.to_string(),
            "cumulative": self.cumulative.to_string(),
            "domainSeparator": domain.separator(),
            "structHash": state_struct_hash(&state),
            "digest": digest,
        });
        (digest, value)
    }
}

/// Runs one `state` subcommand, printing one JSON object.
pub fn run(command: StateCommand) -> anyhow::Result<ExitCode> {
    match command {
        StateCommand::Digest(args) => {
            print(&args.describe().1);
            Ok(ExitCode::SUCCESS)
        }
        StateCommand::Sign { state, key } => {
            let key = parse_key(&key)?;
            let (digest, mut out) = state.describe();
            let sig = signature::sign_digest(&key, &digest);
            let (r, vs) = signature::to_compact(&sig);
            out["signature"] = json!(hex::encode_prefixed(signature::to_bytes(&sig)));
            out["compact"] = json!({ "r": r, "vs": vs });
            out["payer"] = json!(signature::address_of(key.verifying_key()));
            print(&out);
            Ok(ExitCode::SUCCESS)
        }
        StateCommand::Verify {
            state,
            signature: sig_hex,
            payer,
        } => {
            let (digest, mut out) = state.describe();
            let bytes = hex::decode(sig_hex.trim()).context("--signature is not hex")?;
            let checked = signature::parse_signature(&bytes).and_then(|sig| match payer {
                Some(payer) => PayerKeys::default()
                    .verify(payer, &digest, &sig)
                    .map(|()| payer),
                None => signature::recover_address(&digest, &sig),
            });
            match checked {
                Ok(signer) => {
                    out["valid"] = json!(true);
                    out["payer"] = json!(signer);
                    print(&out);
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    out["valid"] = json!(false);
                    out["error"] = json!("invalid_signature");
                    out["message"] = json!(error.to_string());
                    print(&out);
                    eprintln!("signature does not verify: {error}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        StateCommand::ChannelId {
            chain_id,
            contract,
            payer,
            payee,
            token,
            salt,
        } => {
            let key = ChannelKey {
                chain_id,
                contract,
                payer,
                payee,
                token,
                salt,
            };
            print(&json!({
                "chainId": chain_id,
                "contract": contract,
                "payer": payer,
                "payee": payee,
                "token": token,
                "salt": salt,
                "channelId": key.channel_id(),
            }));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_key(text: &str) -> anyhow::Result<SigningKey> {
    let bytes = hex::decode(text.trim()).context("the private key is not hex")?;
    if bytes.len() != 32 {
        bail!("the private key must be 32 bytes, got {}", bytes.len());
    }
    SigningKey::from_slice(&bytes).context("the private key is not a valid secp256k1 scalar")
}

fn print(value: &Value) {
    println!("{value}");
}
