//! Configuration: sections with their defaults (each `DEFAULT_*` constant has its unit in the
//! name and the reason beside it, next to the code it tunes), read from a TOML file and then
//! from environment variables. Secrets (keys) come only from the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use alloy::primitives::Address;
use serde::Deserialize;

use crate::meter::{DEFAULT_LIVENESS_NS, DEFAULT_MARGIN_NS, DEFAULT_RTT_NS, MeterConfig, Tariff};
use crate::protocol::money;
use crate::server::Limits;
use crate::session::{
    DEFAULT_HEARTBEAT_MS, DEFAULT_MAX_REQUESTS_PER_SEC, DEFAULT_MAX_VOUCHERS_PER_SEC,
    DEFAULT_MIN_WITHDRAW_DELAY_SECS, DEFAULT_USAGE_INTERVAL_MS, DEFAULT_VOUCHER_DEADLINE_MS,
};

/// Listen address of `paystream serve`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default token generator rate: about a fast LLM's speed.
pub const DEFAULT_TOKENS_PER_SEC: u32 = 50;
/// Default tokens per request of the token generator.
pub const DEFAULT_MAX_TOKENS: u64 = 1_000;

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The TOML did not parse or had unknown keys.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value is out of range or missing.
    #[error("invalid configuration value {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A value in the file (or the environment) that cannot be read as its key needs.
    #[error("invalid configuration: {key} = {value}: {reason}")]
    Value {
        /// The key (`chain.contract`, `tariff.perMessage`, or an environment variable).
        key: String,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// `paystream serve`'s configuration (the TOML file's layout; see the README).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on (`PAYSTREAM_LISTEN`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL clients reach this server at; defaults to `http://{listen}`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// The chain.
    pub chain: ChainSection,
    /// The store.
    #[serde(default)]
    pub store: StoreSection,
    /// What sessions charge (the 402 challenge's JSON keys).
    #[serde(default)]
    pub tariff: Tariff,
    /// Session behaviour.
    #[serde(default)]
    pub session: SessionSection,
    /// Bounds.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Resources by name (`/ws/{name}`).
    #[serde(default)]
    pub resources: BTreeMap<String, ResourceSection>,
    /// The settler.
    #[serde(default)]
    pub settle: SettleSection,
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("a valid default")
}

/// `[chain]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChainSection {
    /// JSON-RPC endpoint (`PAYSTREAM_RPC_URL`).
    pub rpc_url: String,
    /// The PaymentChannels contract (`PAYSTREAM_CONTRACT`).
    pub contract: Address,
    /// The token charged in; zero for native ETH.
    #[serde(default)]
    pub token: Address,
    /// The payee, when `serve` holds no key (`[settle] mode = "separate"`); otherwise the
    /// payee is the key's address (`PAYSTREAM_PAYEE_KEY`).
    #[serde(default)]
    pub payee: Option<Address>,
}

/// `[settle]`: the batch settler (see docs/SETTLER.md for each knob and its reason).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SettleSection {
    /// `in_process` (default: `serve` settles with the payee's key) or `separate` (`serve`
    /// holds no key; `paystream settle` runs beside it on the same store).
    #[serde(default = "default_settle_mode")]
    pub mode: String,
    /// Blocks before a batch is final (the receipt's included).
    #[serde(default = "default_confirmations")]
    pub confirmations: u64,
    /// Claims per transaction.
    #[serde(default = "default_max_batch_claims")]
    pub max_batch_claims: usize,
    /// Gas per transaction.
    #[serde(default = "default_max_batch_gas")]
    pub max_batch_gas: u64,
    /// Time between passes (the longest a due claim waits for its batch).
    #[serde(default = "default_settle_interval_ms")]
    pub interval_ms: u64,
    /// A claim older than this goes whatever it is worth.
    #[serde(default = "default_max_claim_age_secs")]
    pub max_claim_age_secs: u64,
    /// A claim goes on its value when that is at least this many times its marginal gas.
    #[serde(default = "default_profit_factor")]
    pub profit_factor: crate::meter::Price,
    /// Gas one more claim adds to a batch.
    #[serde(default = "default_marginal_gas")]
    pub marginal_gas_per_claim: u64,
    /// Gas of a batch beside its claims: claims that go on their value alone go when together
    /// they pay for it too.
    #[serde(default = "default_batch_base_gas")]
    pub batch_base_gas: u64,
    /// The gas price the economics assume (wei per gas, decimal string).
    #[serde(with = "money::u128_string", default = "default_gas_price")]
    pub gas_price_wei: u128,
    /// What one base unit of the token is worth in wei (a rational; 1/1 for native ETH).
    #[serde(default = "default_wei_per_base_unit")]
    pub wei_per_base_unit: crate::meter::Price,
    /// The most a settlement pays per gas (decimal string).
    #[serde(with = "money::u128_string", default = "default_max_fee")]
    pub max_fee_per_gas_wei: u128,
    /// The tip per gas (decimal string).
    #[serde(with = "money::u128_string", default = "default_priority_fee")]
    pub priority_fee_wei: u128,
    /// A transaction not mined after this is sent again with a higher fee.
    #[serde(default = "default_stuck_after_secs")]
    pub stuck_after_secs: u64,
    /// Fee raise per replacement (percent, at least 10).
    #[serde(default = "default_fee_bump")]
    pub fee_bump_percent: u128,
    /// The first wait before the claims of a batch that would revert go again (doubling up
    /// to ten times this; withdrawal-due claims every time this).
    #[serde(default = "default_reverted_retry_secs")]
    pub reverted_retry_secs: u64,
    /// Where `paystream settle` serves `/metrics` and `/healthz` (off when unset).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

fn default_settle_mode() -> String {
    "in_process".into()
}
fn default_confirmations() -> u64 {
    crate::settle::DEFAULT_CONFIRMATIONS
}
fn default_max_batch_claims() -> usize {
    crate::settle::DEFAULT_MAX_BATCH_CLAIMS
}
fn default_max_batch_gas() -> u64 {
    crate::settle::DEFAULT_MAX_BATCH_GAS
}
fn default_settle_interval_ms() -> u64 {
    crate::settle::DEFAULT_INTERVAL_MS
}
fn default_max_claim_age_secs() -> u64 {
    crate::settle::DEFAULT_MAX_CLAIM_AGE_SECS
}
fn default_profit_factor() -> crate::meter::Price {
    crate::settle::DEFAULT_PROFIT_FACTOR
}
fn default_marginal_gas() -> u64 {
    crate::settle::DEFAULT_MARGINAL_GAS_PER_CLAIM
}
fn default_batch_base_gas() -> u64 {
    crate::settle::DEFAULT_BATCH_BASE_GAS
}
fn default_reverted_retry_secs() -> u64 {
    crate::settle::DEFAULT_REVERTED_RETRY_SECS
}
fn default_gas_price() -> u128 {
    crate::settle::DEFAULT_GAS_PRICE_WEI
}
fn default_wei_per_base_unit() -> crate::meter::Price {
    crate::meter::Price::whole(1)
}
fn default_max_fee() -> u128 {
    crate::settle::DEFAULT_MAX_FEE_PER_GAS_WEI
}
fn default_priority_fee() -> u128 {
    crate::settle::DEFAULT_PRIORITY_FEE_WEI
}
fn default_stuck_after_secs() -> u64 {
    crate::settle::DEFAULT_STUCK_AFTER_SECS
}
fn default_fee_bump() -> u128 {
    crate::settle::DEFAULT_FEE_BUMP_PERCENT
}

impl Default for SettleSection {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl SettleSection {
    /// Whether `serve` runs the settler itself.
    pub fn in_process(&self) -> bool {
        self.mode != "separate"
    }

    /// The settler's configuration.
    pub fn config(&self) -> crate::settle::SettleConfig {
        crate::settle::SettleConfig {
            confirmations: self.confirmations.max(1),
            max_batch_claims: self.max_batch_claims.max(1),
            max_batch_gas: self.max_batch_gas,
            interval_ms: self.interval_ms,
            economics: crate::settle::Economics {
                gas_price_wei: self.gas_price_wei,
                wei_per_base_unit: self.wei_per_base_unit,
                marginal_gas_per_claim: self.marginal_gas_per_claim,
                batch_base_gas: self.batch_base_gas,
                factor: self.profit_factor,
                max_age_secs: self.max_claim_age_secs,
                force: false,
            },
            stuck_after_secs: self.stuck_after_secs,
            fee_bump_percent: self.fee_bump_percent,
            max_fee_per_gas_wei: self.max_fee_per_gas_wei,
            priority_fee_wei: self.priority_fee_wei,
            reverted_retry_secs: self.reverted_retry_secs,
            ..crate::settle::SettleConfig::default()
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `redis` (production, one Redis), `redis_cluster` (a Redis Cluster) or `memory` (tests
    /// and demos: not durable, one process).
    #[serde(default = "default_store_kind")]
    pub kind: String,
    /// Redis URL (`PAYSTREAM_REDIS_URL`); with `redis_cluster`, a comma-separated list of
    /// some of the cluster's nodes (any one reachable is enough to find the rest).
    #[serde(default = "default_redis_url")]
    pub redis_url: String,
    /// Key prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_store_kind() -> String {
    "redis".into()
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:6379/".into()
}
fn default_prefix() -> String {
    crate::store::redis::DEFAULT_REDIS_PREFIX.into()
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            kind: default_store_kind(),
            redis_url: default_redis_url(),
            prefix: default_prefix(),
        }
    }
}

/// `[session]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SessionSection {
    /// Suggested cumulative step per voucher (base units, decimal string).
    #[serde(with = "money::u128_string", default = "default_credit_window")]
    pub credit_window: u128,
    /// Smallest deposit accepted (base units, decimal string).
    #[serde(with = "money::u128_string", default = "zero")]
    pub min_deposit: u128,
    /// Ask for a voucher when less than this is left, whatever the burn rate.
    #[serde(with = "money::u128_string", default = "zero")]
    pub min_threshold: u128,
    /// Ping interval.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// `usage` interval.
    #[serde(default = "default_usage_ms")]
    pub usage_interval_ms: u64,
    /// Time to answer `need_voucher` (then 4408).
    #[serde(default = "default_deadline_ms")]
    pub voucher_deadline_ms: u64,
    /// Voucher flood limit (then 4429).
    #[serde(default = "default_max_vouchers")]
    pub max_vouchers_per_sec: usize,
    /// Round trip assumed until one is measured.
    #[serde(default = "default_rtt_ms")]
    pub rtt_ms: u64,
    /// Margin on top of the round trip.
    #[serde(default = "default_margin_ms")]
    pub margin_ms: u64,
    /// How long after a disconnect a session can be resumed.
    #[serde(default = "default_resume_secs")]
    pub resume_window_secs: u64,
    /// Shortest `withdrawDelay` a channel may have (seconds): the settler's time to claim after
    /// a withdrawal request.
    #[serde(default = "default_min_withdraw_delay")]
    pub min_withdraw_delay_secs: u32,
    /// Requests per second per session (then `rate_limited`; twice that: 4429).
    #[serde(default = "default_max_requests")]
    pub max_requests_per_sec: usize,
    /// A request while another streams cancels the running one instead of being refused.
    #[serde(default)]
    pub replace_requests: bool,
    /// A live session queues its claim this often (ms), to be settled as it goes.
    #[serde(default = "default_claim_interval")]
    pub claim_interval_ms: u64,
}

fn default_credit_window() -> u128 {
    1_000
}
fn zero() -> u128 {
    0
}
fn default_heartbeat_ms() -> u64 {
    DEFAULT_HEARTBEAT_MS
}
fn default_usage_ms() -> u64 {
    DEFAULT_USAGE_INTERVAL_MS
}
fn default_deadline_ms() -> u64 {
    DEFAULT_VOUCHER_DEADLINE_MS
}
fn default_max_vouchers() -> usize {
    DEFAULT_MAX_VOUCHERS_PER_SEC
}
fn default_rtt_ms() -> u64 {
    DEFAULT_RTT_NS / 1_000_000
}
fn default_margin_ms() -> u64 {
    DEFAULT_MARGIN_NS / 1_000_000
}
fn default_resume_secs() -> u64 {
    300
}
fn default_min_withdraw_delay() -> u32 {
    DEFAULT_MIN_WITHDRAW_DELAY_SECS
}
fn default_claim_interval() -> u64 {
    crate::session::DEFAULT_CLAIM_INTERVAL_MS
}
fn default_max_requests() -> usize {
    DEFAULT_MAX_REQUESTS_PER_SEC
}

impl Default for SessionSection {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl SessionSection {
    /// The meter's configuration.
    pub fn meter(&self) -> MeterConfig {
        MeterConfig {
            rtt_ns: self.rtt_ms * 1_000_000,
            margin_ns: self.margin_ms * 1_000_000,
            min_threshold: self.min_threshold,
            credit_window: self.credit_window,
            liveness_ns: (self.heartbeat_ms * 2 * 1_000_000).max(DEFAULT_LIVENESS_NS / 10),
        }
    }
}

/// `[limits]`: see [`Limits`] for each bound and its reason.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Connections at once.
    pub max_connections: Option<usize>,
    /// Units buffered per session.
    pub queue_capacity: Option<usize>,
    /// Largest client message (bytes).
    pub max_message_bytes: Option<usize>,
    /// Time to send `open`.
    pub handshake_timeout_ms: Option<u64>,
    /// Time without inbound frames.
    pub idle_timeout_ms: Option<u64>,
    /// Channel read cache.
    pub channel_cache_ms: Option<u64>,
    /// Time a frame may wait for the client's socket before the connection closes.
    pub send_timeout_ms: Option<u64>,
    /// WebSocket connections per address before one of them opens a session.
    pub max_unauthenticated_per_ip: Option<usize>,
    /// The header a trusted reverse proxy puts the client's address in (`X-Forwarded-For`).
    pub client_ip_header: Option<String>,
    /// Errors a connection without a session gets before it is closed.
    pub max_errors_before_open: Option<u32>,
    /// Refused opens per connection (then 4429).
    pub max_failed_opens_per_connection: Option<u32>,
    /// Refused opens per address per minute (then 4429).
    pub max_failed_opens_per_ip_per_min: Option<u32>,
    /// How often the chain is polled for channel events.
    pub watch_interval_ms: Option<u64>,
    /// Blocks per `eth_getLogs` call.
    pub log_range_blocks: Option<u64>,
    /// How long a channel's lease lives in the store unless renewed (renewed every third of
    /// it; a crashed process's channels are free for resumes elsewhere after it).
    pub lease_ttl_ms: Option<u64>,
}

impl Default for LimitsSection {
    fn default() -> Self {
        toml::from_str("").expect("every field is optional")
    }
}

impl LimitsSection {
    /// The server's limits.
    pub fn limits(&self) -> Limits {
        let d = Limits::default();
        Limits {
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            queue_capacity: self.queue_capacity.unwrap_or(d.queue_capacity),
            max_message_bytes: self.max_message_bytes.unwrap_or(d.max_message_bytes),
            handshake_timeout_ms: self.handshake_timeout_ms.unwrap_or(d.handshake_timeout_ms),
            idle_timeout_ms: self.idle_timeout_ms.unwrap_or(d.idle_timeout_ms),
            channel_cache_ms: self.channel_cache_ms.unwrap_or(d.channel_cache_ms),
            send_timeout_ms: self.send_timeout_ms.unwrap_or(d.send_timeout_ms),
            max_unauthenticated_per_ip: self
                .max_unauthenticated_per_ip
                .unwrap_or(d.max_unauthenticated_per_ip),
            client_ip_header: self.client_ip_header.clone().or(d.client_ip_header),
            max_errors_before_open: self
                .max_errors_before_open
                .unwrap_or(d.max_errors_before_open),
            max_failed_opens_per_connection: self
                .max_failed_opens_per_connection
                .unwrap_or(d.max_failed_opens_per_connection),
            max_failed_opens_per_ip_per_min: self
                .max_failed_opens_per_ip_per_min
                .unwrap_or(d.max_failed_opens_per_ip_per_min),
            watch_interval_ms: self.watch_interval_ms.unwrap_or(d.watch_interval_ms),
            log_range_blocks: self.log_range_blocks.unwrap_or(d.log_range_blocks),
            lease_ttl_ms: self.lease_ttl_ms.unwrap_or(d.lease_ttl_ms),
            ..d
        }
    }
}

/// `[resources.NAME]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResourceSection {
    /// The built-in deterministic token generator.
    TokenGenerator {
        /// Tokens per second.
        #[serde(default = "default_tokens_per_sec")]
        tokens_per_sec: u32,
        /// Tokens per request unless the request says `maxTokens`.
        #[serde(default = "default_max_tokens")]
        max_tokens: u64,
    },
    /// An OpenAI-compatible streaming chat completions upstream (llama.cpp, vLLM, Ollama).
    Openai {
        /// Base URL (`/v1/chat/completions` is appended).
        base_url: String,
        /// Model name.
        model: String,
        /// Environment variable holding the upstream's API key, if any.
        #[serde(default)]
        api_key_env: Option<String>,
        /// Connect and first-byte timeout.
        #[serde(default = "default_upstream_timeout_ms")]
        timeout_ms: u64,
    },
}

fn default_upstream_timeout_ms() -> u64 {
    30_000
}

fn default_tokens_per_sec() -> u32 {
    DEFAULT_TOKENS_PER_SEC
}
fn default_max_tokens() -> u64 {
    DEFAULT_MAX_TOKENS
}

/// What a key's value must look like, after what the parser said, where it helps.
fn with_hint(key: &str, reason: &str) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    let hint = match last {
        "contract" | "token" | "payee" => "expected an address: 0x and 40 hex digits",
        "listen" | "metrics_listen" => "expected host:port, such as 127.0.0.1:8080",
        "perMessage" | "perSecond" | "perByteOut" | "perByteIn" | "profit_factor"
        | "wei_per_base_unit" => {
            "expected { amount = \"..\", per = \"..\" }, whole numbers as strings, per above 0"
        }
        _ => return reason.to_string(),
    };
    format!("{reason} ({hint})")
}

impl ServeConfig {
    /// Parses the TOML file's text.
    /// A value that does not fit its key is named with its key and the value as written.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let value = inner
                .span()
                .and_then(|span| text.get(span))
                .map(|v| v.trim().to_string());
            match value {
                Some(value) if key != "." && !value.is_empty() => ConfigError::Value {
                    reason: with_hint(&key, inner.message().trim()),
                    key,
                    value,
                },
                _ => ConfigError::Parse(inner.to_string()),
            }
        })
    }

    /// Applies `PAYSTREAM_LISTEN`, `PAYSTREAM_PUBLIC_URL`, `PAYSTREAM_RPC_URL`,
    /// `PAYSTREAM_CONTRACT` and `PAYSTREAM_REDIS_URL` from `env`.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let bad = |key: &str, value: &str, reason: String| ConfigError::Value {
            key: key.to_string(),
            value: format!("{value:?}"),
            reason,
        };
        if let Some(v) = env("PAYSTREAM_LISTEN") {
            self.listen = v.parse().map_err(|e| {
                bad(
                    "PAYSTREAM_LISTEN",
                    &v,
                    format!("{e} (expected host:port, such as 0.0.0.0:8080)"),
                )
            })?;
        }
        if let Some(v) = env("PAYSTREAM_PUBLIC_URL") {
            self.public_url = Some(v);
        }
        if let Some(v) = env("PAYSTREAM_RPC_URL") {
            self.chain.rpc_url = v;
        }
        // The contract's address, or a file holding it (a one-shot deploy wrote it).
        let contract = match (env("PAYSTREAM_CONTRACT"), env("PAYSTREAM_CONTRACT_FILE")) {
            (Some(v), _) => Some(("PAYSTREAM_CONTRACT", v)),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    bad(
                        "PAYSTREAM_CONTRACT_FILE",
                        &path,
                        format!("cannot read it: {e}"),
                    )
                })?;
                Some(("PAYSTREAM_CONTRACT_FILE", text.trim().to_string()))
            }
            (None, None) => None,
        };
        if let Some((key, v)) = contract {
            self.chain.contract = v.parse().map_err(|e| {
                bad(
                    key,
                    &v,
                    format!("{e} (expected an address: 0x and 40 hex digits)"),
                )
            })?;
        }
        if let Some(v) = env("PAYSTREAM_REDIS_URL") {
            self.store.redis_url = v;
        }
        Ok(())
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        let value = |key: &str, value: String, reason: &str| {
            Err(ConfigError::Value {
                key: key.into(),
                value,
                reason: reason.into(),
            })
        };
        if !matches!(
            self.store.kind.as_str(),
            "redis" | "redis_cluster" | "memory"
        ) {
            return value(
                "store.kind",
                format!("{:?}", self.store.kind),
                "must be \"redis\", \"redis_cluster\" or \"memory\"",
            );
        }
        if let Some(ms) = self.limits.lease_ttl_ms.filter(|ms| *ms < 300) {
            return value(
                "limits.lease_ttl_ms",
                ms.to_string(),
                "must be at least 300",
            );
        }
        if self.tariff.is_free() {
            return invalid(
                "tariff",
                "prices nothing; a paywall needs at least one non-zero price",
            );
        }
        self.tariff.rates().map_err(|e| ConfigError::Invalid {
            field: "tariff",
            reason: e.to_string(),
        })?;
        if self.session.credit_window == 0 {
            return value("session.credit_window", "\"0\"".into(), "must be positive");
        }
        if self.session.heartbeat_ms == 0 {
            return value("session.heartbeat_ms", "0".into(), "must be positive");
        }
        if self.session.usage_interval_ms == 0 {
            return value("session.usage_interval_ms", "0".into(), "must be positive");
        }
        if self.resources.is_empty() {
            return invalid("resources", "configure at least one resource");
        }
        if !matches!(self.settle.mode.as_str(), "in_process" | "separate") {
            return value(
                "settle.mode",
                format!("{:?}", self.settle.mode),
                "must be \"in_process\" or \"separate\"",
            );
        }
        if !self.settle.in_process() && self.chain.payee.is_none() {
            return invalid(
                "chain.payee",
                "with [settle] mode = \"separate\" serve holds no key: set the payee's address",
            );
        }
        Ok(())
    }

    /// The public base URL.
    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
listen = "127.0.0.1:9000"
[chain]
rpc_url = "http://127.0.0.1:8545"
contract = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
[tariff]
perMessage = { amount = "3", per = "1000" }
[session]
credit_window = "500"
[resources.tokens]
kind = "token_generator"
tokens_per_sec = 20
"#;

    /// Issue 13: `contract = "0xdeadbeef"` stopped `serve` with only `invalid string length`,
    /// and a zero `per` with `a price's per must not be zero` (which price?). Every bad value
    /// now names its key and the value as written.
    #[test]
    fn every_bad_value_names_its_key_and_value() {
        let file = |from: &str, to: &str| {
            assert!(EXAMPLE.contains(from), "{from}");
            ServeConfig::from_toml(&EXAMPLE.replace(from, to))
                .and_then(|c| c.validate().map(|()| c))
                .expect_err(to)
                .to_string()
        };
        let cases = [
            (
                file(
                    "contract = \"0x5FbDB2315678afecb367f032d93F642f64180aa3\"",
                    "contract = \"0xdeadbeef\"",
                ),
                "chain.contract = \"0xdeadbeef\"",
            ),
            (
                file("per = \"1000\"", "per = \"0\""),
                "tariff.perMessage = { amount = \"3\", per = \"0\" }",
            ),
            (
                file("amount = \"3\"", "amount = \"three\""),
                "tariff.perMessage = { amount = \"three\", per = \"1000\" }",
            ),
            (
                file("credit_window = \"500\"", "credit_window = \"-5\""),
                "session.credit_window = \"-5\"",
            ),
            (
                file("credit_window = \"500\"", "credit_window = \"0\""),
                "session.credit_window = \"0\"",
            ),
            (
                file("listen = \"127.0.0.1:9000\"", "listen = \"nowhere\""),
                "listen = \"nowhere\"",
            ),
            (
                file("[session]", "[store]\nkind = \"postgres\"\n[session]"),
                "store.kind = \"postgres\"",
            ),
            (
                file("[session]", "[limits]\nlease_ttl_ms = 10\n[session]"),
                "limits.lease_ttl_ms = 10",
            ),
            (
                file("[session]", "[settle]\nmode = \"elsewhere\"\n[session]"),
                "settle.mode = \"elsewhere\"",
            ),
        ];
        for (message, names) in cases {
            assert!(
                message.contains(names),
                "{message:?} does not name {names:?}"
            );
        }
        // A resource's fields are read through its `kind`: the resource's key, and the value.
        let message = file("tokens_per_sec = 20", "tokens_per_sec = \"fast\"");
        assert!(
            message.contains("resources.tokens") && message.contains("\"fast\""),
            "{message}"
        );
        let mut c = ServeConfig::from_toml(EXAMPLE).unwrap();
        for (key, value) in [
            ("PAYSTREAM_CONTRACT", "0x12"),
            ("PAYSTREAM_LISTEN", "port 80"),
        ] {
            let message = c
                .apply_env(|k| (k == key).then(|| value.to_string()))
                .unwrap_err()
                .to_string();
            assert!(message.contains(&format!("{key} = {value:?}")), "{message}");
        }
    }

    #[test]
    fn parses_validates_and_takes_the_environment() {
        let mut c = ServeConfig::from_toml(EXAMPLE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.session.credit_window, 500);
        assert_eq!(c.session.heartbeat_ms, DEFAULT_HEARTBEAT_MS);
        assert_eq!(c.store.kind, "redis");
        c.apply_env(|k| (k == "PAYSTREAM_REDIS_URL").then(|| "redis://10.0.0.1/".to_string()))
            .unwrap();
        assert_eq!(c.store.redis_url, "redis://10.0.0.1/");
        assert_eq!(c.public_url(), "http://127.0.0.1:9000");
    }

    #[test]
    fn the_documented_example_is_valid() {
        let c = ServeConfig::from_toml(include_str!("../examples/serve.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.resources.len(), 1);
        assert_eq!(c.limits.limits().max_connections, 1024);
    }

    #[test]
    fn refuses_bad_configurations() {
        assert!(ServeConfig::from_toml(&format!("{EXAMPLE}\nbogus = 1")).is_err());
        let free = EXAMPLE.replace(r#"perMessage = { amount = "3", per = "1000" }"#, "");
        assert!(ServeConfig::from_toml(&free).unwrap().validate().is_err());
        let zero_per = EXAMPLE.replace(r#"per = "1000""#, r#"per = "0""#);
        assert!(ServeConfig::from_toml(&zero_per).is_err());
    }
}
