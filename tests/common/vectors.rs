//! The shared EIP-712 vectors (`tests/vectors/channel_state.json`, a copy of
//! `shared/vectors/channel_state.json` checked to be identical when `shared/` is beside the
//! repository).

use alloy::primitives::{Address, B256, Bytes};
use paystream::channel::{ChannelDomain, ChannelKey};
use serde::Deserialize;

/// The file's text, embedded so tests need nothing beside the repository.
pub const TEXT: &str = include_str!("../vectors/channel_state.json");

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct File {
    pub type_hashes: TypeHashes,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct TypeHashes {
    #[serde(rename = "ChannelState")]
    pub channel_state: B256,
    #[serde(rename = "Close")]
    pub close: B256,
}

/// One case; decimal strings are parsed into integers.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Case {
    pub private_key: B256,
    pub payer: Address,
    pub payee: Address,
    pub payee_private_key: B256,
    pub chain_id: u64,
    pub verifying_contract: Address,
    pub token: Address,
    pub salt: B256,
    pub channel_id: B256,
    #[serde(deserialize_with = "decimal")]
    pub nonce: u64,
    #[serde(deserialize_with = "decimal")]
    pub cumulative: u128,
    #[serde(deserialize_with = "decimal")]
    pub close_amount: u128,
    pub domain_separator: B256,
    pub struct_hash: B256,
    pub digest: B256,
    pub signature: Bytes,
    pub compact: Compact,
    pub high_s_signature: Bytes,
    pub close_digest: B256,
    pub close_signature: Bytes,
}

impl Case {
    pub fn domain(&self) -> ChannelDomain {
        ChannelDomain::new(self.chain_id, self.verifying_contract)
    }

    pub fn key(&self) -> ChannelKey {
        ChannelKey {
            chain_id: self.chain_id,
            contract: self.verifying_contract,
            payer: self.payer,
            payee: self.payee,
            token: self.token,
            salt: self.salt,
        }
    }
}

fn decimal<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text = String::deserialize(de)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// The EIP-2098 form `(r, vs)`.
#[derive(Debug, Clone, Deserialize)]
pub struct Compact {
    pub r: B256,
    pub vs: B256,
}

/// Parses the embedded file.
pub fn load() -> File {
    serde_json::from_str(TEXT).expect("the vectors parse")
}
