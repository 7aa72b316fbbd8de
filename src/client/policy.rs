//! The buyer's budget policy, and the checks of a 402 challenge's terms against it.

use alloy::primitives::{Address, U256};

use super::ClientError;
use crate::meter::{Price, Tariff};
use crate::protocol::{PaymentRequired, PaymentRequirements};

/// What a client agrees to pay. A challenge outside it is refused before any money moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Highest accepted price per message (`None`: the server must not price messages).
    pub max_per_message: Option<Price>,
    /// Highest accepted price per second.
    pub max_per_second: Option<Price>,
    /// Highest accepted price per byte out.
    pub max_per_byte_out: Option<Price>,
    /// Highest accepted price per byte in.
    pub max_per_byte_in: Option<Price>,
    /// The most this client deposits in a channel (and so ever pays in one).
    pub max_total: u128,
    /// The most credit it extends beyond what it received (its exposure).
    pub max_credit_window: u128,
    /// Payees it pays (empty: any).
    pub allowed_payees: Vec<Address>,
    /// Chain ids it pays on.
    pub allowed_chains: Vec<u64>,
}

/// `a / b <= c / d` without rounding.
fn at_most(p: &Price, max: &Price) -> bool {
    U256::from(p.amount) * U256::from(max.per) <= U256::from(max.amount) * U256::from(p.per)
}

impl Policy {
    /// Picks the `channel-stream` option of a challenge and checks it against the policy.
    pub fn check<'a>(
        &self,
        challenge: &'a PaymentRequired,
    ) -> Result<&'a PaymentRequirements, ClientError> {
        let offer = challenge.channel_stream().ok_or(ClientError::Terms(
            "no channel-stream payment option".into(),
        ))?;
        let chain: u64 = offer
            .network
            .strip_prefix("eip155:")
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ClientError::Terms(format!("unsupported network {}", offer.network)))?;
        if !self.allowed_chains.contains(&chain) {
            return Err(ClientError::Terms(format!(
                "network {} is not allowed by the policy",
                offer.network
            )));
        }
        if !self.allowed_payees.is_empty() && !self.allowed_payees.contains(&offer.pay_to) {
            return Err(ClientError::Terms(format!(
                "payee {} is not allowed by the policy",
                offer.pay_to
            )));
        }
        self.check_tariff(&offer.extra.tariff)?;
        if offer.extra.min_deposit > self.max_total {
            return Err(ClientError::Terms(format!(
                "the minimum deposit {} is above the policy's maximum total {}",
                offer.extra.min_deposit, self.max_total
            )));
        }
        Ok(offer)
    }

    /// Each price of the tariff must be at most the policy's for that kind.
    pub fn check_tariff(&self, tariff: &Tariff) -> Result<(), ClientError> {
        let kinds = [
            ("perMessage", tariff.per_message, self.max_per_message),
            ("perSecond", tariff.per_second, self.max_per_second),
            ("perByteOut", tariff.per_byte_out, self.max_per_byte_out),
            ("perByteIn", tariff.per_byte_in, self.max_per_byte_in),
        ];
        for (name, price, max) in kinds {
            match (price, max) {
                (Some(p), _) if p.amount == 0 => {}
                (Some(p), Some(m)) if at_most(&p, &m) => {}
                (Some(p), Some(m)) => {
                    return Err(ClientError::Terms(format!(
                        "{name} costs {}/{} base units, above the policy's {}/{}",
                        p.amount, p.per, m.amount, m.per
                    )));
                }
                (Some(p), None) => {
                    return Err(ClientError::Terms(format!(
                        "{name} is priced ({}/{}) and the policy allows no {name} charge",
                        p.amount, p.per
                    )));
                }
                (None, _) => {}
            }
        }
        Ok(())
    }
}
