//! [`RedisStore`]: channel states in Redis, with compare-and-set on the nonce in Lua.
//!
//! Layout (prefix `ps:` by default; see docs/STORE.md):
//! - `ps:ch:{channelId}`: hash `n` nonce (20-digit zero-padded decimal), `c` cumulative
//!   (39-digit), `s` signature (0x-hex, 65 bytes), `u` consumed (39-digit). Zero-padding makes
//!   Lua's string comparison the numeric one, beyond the 2^53 a Lua number holds exactly.
//! - `ps:claims`: hash `{channelId}` -> `amount(39)|nonce|cumulative|signature`, the claims
//!   queued for the settler.
//!
//! No key has a TTL: these are money. Durability is Redis's: run it with `appendonly yes` and
//! `appendfsync always` for no acknowledged voucher to be lost on a crash (`everysec` bounds the
//! loss to one second of vouchers, which can only cost the payee, never the payer).

use std::time::Duration;

use alloy::hex;
use alloy::primitives::{B256, Signature};
use redis::Script;
use redis::aio::ConnectionManager;

use super::{ChannelStore, PendingClaim, StoreError, StoredChannel, StoredVoucher};
use crate::channel::signature;

/// Key prefix unless configured otherwise.
pub const DEFAULT_REDIS_PREFIX: &str = "ps:";
/// A Redis call slower than this counts as an outage (delivery pauses, nothing is acked).
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 2_000;

const SAVE_VOUCHER: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'n')
if cur and cur >= ARGV[1] then return {0, cur} end
redis.call('HSET', KEYS[1], 'n', ARGV[1], 'c', ARGV[2], 's', ARGV[3])
return {1, ARGV[1]}
"#;

const SAVE_CONSUMED: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], 'u')
if (not cur) or cur < ARGV[1] then redis.call('HSET', KEYS[1], 'u', ARGV[1]) end
return 1
"#;

const QUEUE_CLAIM: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (not cur) or string.sub(cur, 1, 39) < ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3])
end
return 1
"#;

/// Channel states in Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    save_voucher: Script,
    save_consumed: Script,
    queue_claim: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn pad_u64(v: u64) -> String {
    format!("{v:020}")
}

fn pad_u128(v: u128) -> String {
    format!("{v:039}")
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`), reconnecting on its own after an outage.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let timeout = Duration::from_millis(DEFAULT_REDIS_TIMEOUT_MS);
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(unavailable)?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            save_voucher: Script::new(SAVE_VOUCHER),
            save_consumed: Script::new(SAVE_CONSUMED),
            queue_claim: Script::new(QUEUE_CLAIM),
        })
    }

    fn channel_key(&self, id: B256) -> String {
        format!("{}ch:{id}", self.prefix)
    }

    fn claims_key(&self) -> String {
        format!("{}claims", self.prefix)
    }
}

fn corrupt(key: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn parse_signature(key: &str, text: &str) -> Result<Signature, StoreError> {
    let bytes = hex::decode(text).map_err(|e| corrupt(key, e.to_string()))?;
    signature::parse_signature(&bytes).map_err(|e| corrupt(key, e.to_string()))
}

fn parse_voucher(
    key: &str,
    nonce: &str,
    cumulative: &str,
    sig: &str,
) -> Result<StoredVoucher, StoreError> {
    Ok(StoredVoucher {
        nonce: nonce.parse().map_err(|_| corrupt(key, "nonce"))?,
        cumulative: cumulative.parse().map_err(|_| corrupt(key, "cumulative"))?,
        signature: parse_signature(key, sig)?,
    })
}

impl ChannelStore for RedisStore {
    async fn save_voucher(
        &self,
        channel_id: B256,
        voucher: StoredVoucher,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let (saved, stored): (i64, String) = self
            .save_voucher
            .key(self.channel_key(channel_id))
            .arg(pad_u64(voucher.nonce))
            .arg(pad_u128(voucher.cumulative))
            .arg(hex::encode_prefixed(signature::to_bytes(
                &voucher.signature,
            )))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if saved == 1 {
            Ok(())
        } else {
            Err(StoreError::StaleNonce {
                got: voucher.nonce,
                stored: stored.parse().unwrap_or(u64::MAX),
            })
        }
    }

    async fn load(&self, channel_id: B256) -> Result<Option<StoredChannel>, StoreError> {
        let key = self.channel_key(channel_id);
        let mut conn = self.conn.clone();
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&key)
            .arg("n")
            .arg("c")
            .arg("s")
            .arg("u")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let [n, c, s, u] =
            <[Option<String>; 4]>::try_from(fields).map_err(|_| corrupt(&key, "HMGET arity"))?;
        let (Some(n), Some(c), Some(s)) = (n, c, s) else {
            return Ok(None);
        };
        let voucher = parse_voucher(&key, &n, &c, &s)?;
        let consumed = u
            .map(|u| u.parse().map_err(|_| corrupt(&key, "consumed")))
            .transpose()?
            .unwrap_or(0);
        Ok(Some(StoredChannel { voucher, consumed }))
    }

    async fn save_consumed(&self, channel_id: B256, consumed: u128) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .save_consumed
            .key(self.channel_key(channel_id))
            .arg(pad_u128(consumed))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn queue_claim(&self, claim: PendingClaim) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let rest = format!(
            "{}|{}|{}",
            claim.voucher.nonce,
            claim.voucher.cumulative,
            hex::encode_prefixed(signature::to_bytes(&claim.voucher.signature))
        );
        let _: i64 = self
            .queue_claim
            .key(self.claims_key())
            .arg(claim.channel_id.to_string())
            .arg(pad_u128(claim.amount))
            .arg(rest)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn pending_claims(&self, limit: usize) -> Result<Vec<PendingClaim>, StoreError> {
        let key = self.claims_key();
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, entries): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("COUNT")
                .arg(limit.clamp(10, 1000))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for (field, value) in entries {
                if out.len() >= limit {
                    return Ok(out);
                }
                let channel_id: B256 = field.parse().map_err(|_| corrupt(&key, "channel id"))?;
                let parts: Vec<&str> = value.split('|').collect();
                let [amount, nonce, cumulative, sig] = parts[..] else {
                    return Err(corrupt(&key, "claim fields"));
                };
                out.push(PendingClaim {
                    channel_id,
                    voucher: parse_voucher(&key, nonce, cumulative, sig)?,
                    amount: amount.parse().map_err(|_| corrupt(&key, "amount"))?,
                });
            }
            cursor = next;
            if cursor == 0 || out.len() >= limit {
                return Ok(out);
            }
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
