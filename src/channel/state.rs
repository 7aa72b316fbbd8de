//! The EIP-712 types the payer and payee sign, their domain, and the channel id.
//!
//! Hashing is done here by hand on a precomputed domain separator and type hash, because the
//! digest is computed for every voucher and alloy's `eip712_signing_hash` rehashes the domain
//! and the type string on every call. The tests check both paths agree with each other and with
//! the shared vectors.

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::sol_types::{Eip712Domain, SolStruct, SolValue, eip712_domain};

alloy::sol! {
    /// A channel state signed by the payer: "the payee may take up to `cumulative` from this
    /// channel, ever". The nonce orders states; it strictly increases.
    #[derive(Debug, PartialEq, Eq)]
    struct ChannelState {
        bytes32 channelId;
        uint64 nonce;
        uint128 cumulative;
    }

    /// Signed by the payee to close a channel cooperatively, taking `amount` and refunding the
    /// rest of the deposit to the payer at once.
    #[derive(Debug, PartialEq, Eq)]
    struct Close {
        bytes32 channelId;
        uint128 amount;
    }
}

/// EIP-712 domain name, fixed by DESIGN.md section 2.
pub const DOMAIN_NAME: &str = "PayStream";
/// EIP-712 domain version, fixed by DESIGN.md section 2.
pub const DOMAIN_VERSION: &str = "1";
/// `ChannelState(bytes32 channelId,uint64 nonce,uint128 cumulative)`.
pub const CHANNEL_STATE_TYPE: &str =
    "ChannelState(bytes32 channelId,uint64 nonce,uint128 cumulative)";
/// `Close(bytes32 channelId,uint128 amount)`.
pub const CLOSE_TYPE: &str = "Close(bytes32 channelId,uint128 amount)";

/// `keccak256(CHANNEL_STATE_TYPE)`, checked against the string in a unit test.
pub const CHANNEL_STATE_TYPEHASH: B256 =
    alloy::primitives::b256!("47a41333b1405736d062a3087293237af168c42fa3fe26413bfdff349004ab87");
/// `keccak256(CLOSE_TYPE)`, checked against the string in a unit test.
pub const CLOSE_TYPEHASH: B256 =
    alloy::primitives::b256!("7348a1f10dbe50b9ecad603909deb1d6cd483fa82f1c638e197746f6f34e62f8");

/// The signing domain of one deployed `PaymentChannels` contract on one chain, with its
/// separator computed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelDomain {
    /// The chain id the contract lives on.
    pub chain_id: u64,
    /// The `PaymentChannels` contract address (the EIP-712 `verifyingContract`).
    pub contract: Address,
    /// Precomputed because every voucher digest starts from it.
    separator: B256,
}

impl ChannelDomain {
    /// The domain `{name: "PayStream", version: "1", chainId, verifyingContract}`.
    pub fn new(chain_id: u64, contract: Address) -> Self {
        let separator = Self::eip712(chain_id, contract).separator();
        Self {
            chain_id,
            contract,
            separator,
        }
    }

    /// The same domain as alloy's [`Eip712Domain`], for wallets and cross-checks.
    pub fn eip712(chain_id: u64, contract: Address) -> Eip712Domain {
        eip712_domain! {
            name: DOMAIN_NAME,
            version: DOMAIN_VERSION,
            chain_id: chain_id,
            verifying_contract: contract,
        }
    }

    /// The EIP-712 domain separator (`DOMAIN_SEPARATOR()` on the contract).
    pub fn separator(&self) -> B256 {
        self.separator
    }

    /// The digest a payer signs for `state` (`stateDigest` on the contract).
    pub fn state_digest(&self, state: &ChannelState) -> B256 {
        self.digest(state_struct_hash(state))
    }

    /// The digest a payee signs for `close` (`closeDigest` on the contract).
    pub fn close_digest(&self, close: &Close) -> B256 {
        self.digest(close_struct_hash(close))
    }

    /// `keccak256(0x1901 || separator || structHash)`.
    fn digest(&self, struct_hash: B256) -> B256 {
        let mut buf = [0u8; 66];
        buf[0] = 0x19;
        buf[1] = 0x01;
        buf[2..34].copy_from_slice(self.separator.as_slice());
        buf[34..].copy_from_slice(struct_hash.as_slice());
        keccak256(buf)
    }
}

/// `hashStruct(ChannelState)`: the type hash and the three fields, each as a 32-byte word.
pub fn state_struct_hash(state: &ChannelState) -> B256 {
    let mut buf = [0u8; 128];
    buf[..32].copy_from_slice(CHANNEL_STATE_TYPEHASH.as_slice());
    buf[32..64].copy_from_slice(state.channelId.as_slice());
    buf[88..96].copy_from_slice(&state.nonce.to_be_bytes());
    buf[112..128].copy_from_slice(&state.cumulative.to_be_bytes());
    keccak256(buf)
}

/// `hashStruct(Close)`.
pub fn close_struct_hash(close: &Close) -> B256 {
    let mut buf = [0u8; 96];
    buf[..32].copy_from_slice(CLOSE_TYPEHASH.as_slice());
    buf[32..64].copy_from_slice(close.channelId.as_slice());
    buf[80..96].copy_from_slice(&close.amount.to_be_bytes());
    keccak256(buf)
}

/// What identifies a channel, as the contract computes it in `open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelKey {
    /// Chain the contract lives on.
    pub chain_id: u64,
    /// The `PaymentChannels` contract.
    pub contract: Address,
    /// Who deposits and signs states.
    pub payer: Address,
    /// Who is paid.
    pub payee: Address,
    /// ERC-20 token, or the zero address for native ETH.
    pub token: Address,
    /// Chosen by the payer so one payer can hold several channels with one payee.
    pub salt: B256,
}

impl ChannelKey {
    /// `keccak256(abi.encode(block.chainid, address(this), payer, payee, token, salt))`.
    pub fn channel_id(&self) -> B256 {
        let encoded = (
            U256::from(self.chain_id),
            self.contract,
            self.payer,
            self.payee,
            self.token,
            self.salt,
        )
            .abi_encode();
        keccak256(encoded)
    }
}

/// alloy's generic EIP-712 path, kept for cross-checks against the hand-rolled one.
pub fn state_digest_via_alloy(domain: &Eip712Domain, state: &ChannelState) -> B256 {
    state.eip712_signing_hash(domain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{address, b256};

    #[test]
    fn type_hashes_match_type_strings() {
        assert_eq!(keccak256(CHANNEL_STATE_TYPE), CHANNEL_STATE_TYPEHASH);
        assert_eq!(keccak256(CLOSE_TYPE), CLOSE_TYPEHASH);
        assert_eq!(ChannelState::eip712_encode_type(), CHANNEL_STATE_TYPE);
        assert_eq!(Close::eip712_encode_type(), CLOSE_TYPE);
    }

    #[test]
    fn hand_rolled_digest_matches_alloy() {
        let contract = address!("9964ec2addcb8eece54876bb9a72c49caf676cfc");
        let domain = ChannelDomain::new(31337, contract);
        let eip = ChannelDomain::eip712(31337, contract);
        for (nonce, cumulative) in [(0u64, 0u128), (1, 1), (u64::MAX, u128::MAX), (7, 1 << 100)] {
            let state = ChannelState {
                channelId: b256!(
                    "fa8b4336c368a10c15412a0773d8e7d5e3037babca32d62ea85f164b644b7b77"
                ),
                nonce,
                cumulative,
            };
            assert_eq!(
                domain.state_digest(&state),
                state_digest_via_alloy(&eip, &state)
            );
            assert_eq!(state_struct_hash(&state), state.eip712_hash_struct());
            let close = Close {
                channelId: state.channelId,
                amount: cumulative,
            };
            assert_eq!(domain.close_digest(&close), close.eip712_signing_hash(&eip));
        }
        assert_eq!(domain.separator(), eip.separator());
    }
}
