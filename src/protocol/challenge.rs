//! The HTTP 402 challenge (DESIGN.md section 4.1): an x402 v2 `PaymentRequired` with the
//! `channel-stream` scheme, sent as the JSON body and, base64-encoded (standard, padded), as the
//! `PAYMENT-REQUIRED` header.

use alloy::primitives::Address;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::error::ProtocolError;
use super::money;
use crate::channel::{DOMAIN_NAME, DOMAIN_VERSION};
use crate::meter::Tariff;

/// The header carrying the challenge.
pub const PAYMENT_REQUIRED_HEADER: &str = "PAYMENT-REQUIRED";
/// The x402 scheme name of PayStream's payment channels.
pub const SCHEME: &str = "channel-stream";
/// The protocol identifier in `extra.protocol`.
pub const PROTOCOL: &str = "paystream/1";

/// x402 v2 `PaymentRequired`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequired {
    /// Always 2.
    pub x402_version: u32,
    /// Why payment is required.
    pub error: String,
    /// The paid resource.
    pub resource: Resource,
    /// The payment options; PayStream offers one.
    pub accepts: Vec<PaymentRequirements>,
}

/// The resource being paid for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    /// Its URL.
    pub url: String,
    /// What it is.
    pub description: String,
    /// Its content type.
    pub mime_type: String,
}

/// One way to pay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirements {
    /// `channel-stream`.
    pub scheme: String,
    /// CAIP-2 network, `eip155:<chainId>`.
    pub network: String,
    /// The price of one unit rounded up to whole base units (the exact rational prices are in
    /// `extra.tariff`).
    #[serde(with = "money::u128_string")]
    pub amount: u128,
    /// The token (zero address for native ETH).
    pub asset: Address,
    /// The payee.
    pub pay_to: Address,
    /// How long the terms hold.
    pub max_timeout_seconds: u64,
    /// The channel-stream terms.
    pub extra: ChannelStreamTerms,
}

/// `extra` of the `channel-stream` scheme.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelStreamTerms {
    /// `paystream/1`.
    pub protocol: String,
    /// Where to connect.
    pub ws_endpoint: String,
    /// The `PaymentChannels` contract.
    pub contract: Address,
    /// The EIP-712 domain's name and version.
    pub domain: DomainTerms,
    /// What the session charges.
    pub tariff: Tariff,
    /// Suggested cumulative step per voucher.
    #[serde(with = "money::u128_string")]
    pub credit_window: u128,
    /// The smallest deposit the server accepts.
    #[serde(with = "money::u128_string")]
    pub min_deposit: u128,
    /// Interval of the server's Ping frames.
    pub heartbeat_ms: u64,
    /// How long after a disconnect a session can be resumed.
    pub resume_window_seconds: u64,
    /// The shortest `withdrawDelay` a channel may have for this server to accept it: the time
    /// its settler needs to claim after a withdrawal request. An extension of the design's
    /// terms; absent (0) from servers that do not set one.
    #[serde(default)]
    pub min_withdraw_delay_seconds: u32,
}

/// The EIP-712 domain's name and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainTerms {
    /// `PayStream`.
    pub name: String,
    /// `1`.
    pub version: String,
}

impl Default for DomainTerms {
    fn default() -> Self {
        Self {
            name: DOMAIN_NAME.into(),
            version: DOMAIN_VERSION.into(),
        }
    }
}

impl PaymentRequired {
    /// A challenge for one resource paid through one contract.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        resource: Resource,
        chain_id: u64,
        asset: Address,
        pay_to: Address,
        terms: ChannelStreamTerms,
    ) -> Self {
        let t = &terms.tariff;
        let unit = t
            .per_message
            .or(t.per_second)
            .or(t.per_byte_out)
            .or(t.per_byte_in);
        Self {
            x402_version: 2,
            error: "payment required".into(),
            resource,
            accepts: vec![PaymentRequirements {
                scheme: SCHEME.into(),
                network: format!("eip155:{chain_id}"),
                amount: unit.map_or(0, |p| p.ceil_per_unit()),
                asset,
                pay_to,
                max_timeout_seconds: 60,
                extra: terms,
            }],
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the challenge always serializes")
    }

    /// The `PAYMENT-REQUIRED` header value: the same JSON, standard padded base64.
    pub fn header_value(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.to_json())
    }

    /// Decodes a `PAYMENT-REQUIRED` header value.
    pub fn from_header(value: &str) -> Result<Self, ProtocolError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|e| {
                ProtocolError::Malformed(format!("PAYMENT-REQUIRED is not base64: {e}"))
            })?;
        serde_json::from_slice(&bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))
    }

    /// The `channel-stream` option, if offered.
    pub fn channel_stream(&self) -> Option<&PaymentRequirements> {
        self.accepts
            .iter()
            .find(|a| a.scheme == SCHEME && a.extra.protocol == PROTOCOL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::Price;

    fn challenge() -> PaymentRequired {
        let terms = ChannelStreamTerms {
            protocol: PROTOCOL.into(),
            ws_endpoint: "ws://127.0.0.1:8080/ws/tokens".into(),
            contract: Address::repeat_byte(0xcc),
            domain: DomainTerms::default(),
            tariff: Tariff {
                per_message: Some(Price {
                    amount: 3,
                    per: 1000,
                }),
                ..Tariff::default()
            },
            credit_window: 1000,
            min_deposit: 100_000,
            heartbeat_ms: 5000,
            resume_window_seconds: 300,
            min_withdraw_delay_seconds: 3600,
        };
        let resource = Resource {
            url: "http://127.0.0.1:8080/tokens".into(),
            description: "tokens".into(),
            mime_type: "application/json".into(),
        };
        PaymentRequired::new(
            resource,
            8453,
            Address::repeat_byte(0xaa),
            Address::repeat_byte(0xbb),
            terms,
        )
    }

    #[test]
    fn header_and_body_carry_the_same_x402_v2_json() {
        let c = challenge();
        let body: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(PaymentRequired::from_header(&c.header_value()).unwrap(), c);
        assert_eq!(body["x402Version"], 2);
        let accept = &body["accepts"][0];
        assert_eq!(accept["scheme"], "channel-stream");
        assert_eq!(accept["network"], "eip155:8453");
        assert_eq!(accept["amount"], "1", "0.003 rounds up to 1 base unit");
        assert_eq!(accept["maxTimeoutSeconds"], 60);
        assert_eq!(accept["extra"]["domain"]["name"], "PayStream");
        assert_eq!(accept["extra"]["tariff"]["perMessage"]["per"], "1000");
        assert_eq!(accept["extra"]["creditWindow"], "1000");
        assert_eq!(accept["extra"]["resumeWindowSeconds"], 300);
        assert_eq!(accept["extra"]["minWithdrawDelaySeconds"], 3600);
        assert!(c.channel_stream().is_some());
        assert!(c.header_value().len().is_multiple_of(4), "padded");
    }
}
