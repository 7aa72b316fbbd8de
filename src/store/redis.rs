//! [`RedisStore`]: channel states in Redis, with compare-and-set on the nonce in Lua.
//!
//! Layout (prefix `ps:` by default; see docs/STORE.md):
//! - `ps:ch:{channelId}`: hash `n` nonce (20-digit zero-padded decimal), `c` cumulative
//!   (39-digit), `s` signature (0x-hex, 65 bytes), `u` consumed rounded up (39-digit), `x` and
//!   `d` the exact consumption `x / d` (78-digit numerator, decimal denominator), `k` the amount
//!   of a `Close` the payee consented to (39-digit). Zero-padding makes Lua's string comparison
//!   the numeric one, beyond the 2^53 a Lua number holds exactly.
//! - `ps:claims`: hash `{channelId}` -> `amount(39)|nonce|cumulative|signature`, the claims
//!   queued for the settler.
//!
//! No key has a TTL: these are money. Durability is Redis's: run it with `appendonly yes` and
//! `appendfsync always` for no acknowledged voucher to be lost on a crash (`everysec` bounds the
//! loss to one second of vouchers, which can only cost the payee, never the payer).

use std::time::Duration;

use alloy::hex;
use alloy::primitives::{B256, Signature, U256};
use redis::Script;
use redis::aio::ConnectionManager;

use super::settlement::{InFlight, QueuedClaim, SettlementStore, SkippedClaim};
use super::{ChannelStore, PendingClaim, StoreError, StoredChannel, StoredVoucher};
use crate::chain::Fees;
use crate::channel::signature;
use crate::meter::Exact;

/// Key prefix unless configured otherwise.
pub const DEFAULT_REDIS_PREFIX: &str = "ps:";
/// A Redis call slower than this counts as an outage (delivery pauses, nothing is acked).
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 2_000;

const SAVE_VOUCHER: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'n', 'c')
if cur[1] and cur[1] >= ARGV[1] then return {0, cur[1], cur[2]} end
if cur[2] and cur[2] > ARGV[2] then return {2, cur[1], cur[2]} end
redis.call('HSET', KEYS[1], 'n', ARGV[1], 'c', ARGV[2], 's', ARGV[3])
return {1, ARGV[1], ARGV[2]}
"#;

const SAVE_CONSUMED: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HMGET', KEYS[1], 'u', 'x', 'd')
local raise = (not cur[1]) or cur[1] < ARGV[1]
  or (cur[1] == ARGV[1] and ((not cur[2]) or (cur[3] == ARGV[3] and cur[2] < ARGV[2])))
if raise then redis.call('HSET', KEYS[1], 'u', ARGV[1], 'x', ARGV[2], 'd', ARGV[3]) end
return 1
"#;

const MARK_CLOSING: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], 'k', ARGV[1])
return 1
"#;

const QUEUE_CLAIM: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4])
elseif string.sub(cur, 1, 39) < ARGV[2] then
  local since = string.match(cur, '|([0-9]+)$') or ARGV[4]
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3] .. '|' .. since)
end
return 1
"#;

/// Removes each claim (`ARGV` pairs after `ARGV[1]`, the time: channel, amount) queued for at
/// most that amount; a larger one, queued since, stays, its age counted from now (what is left
/// of it started waiting with this payment). With a second key, records each one there as
/// skipped (`ARGV[last]`: the record's tail).
const CLAIMS_SETTLED: &str = r#"
local n = #ARGV
local tail = nil
if #KEYS == 2 then tail = ARGV[n]; n = n - 1 end
for i = 2, n, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    if string.sub(cur, 1, 39) <= ARGV[i + 1] then
      redis.call('HDEL', KEYS[1], ARGV[i])
    else
      redis.call('HSET', KEYS[1], ARGV[i], (string.gsub(cur, '|[0-9]+$', '|' .. ARGV[1])))
    end
  end
  if tail then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1] .. '|' .. tail) end
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
    mark_closing: Script,
    claims_settled: Script,
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

/// A 256-bit numerator, zero-padded to 78 digits (2^256 has 78).
fn pad_u256(v: U256) -> String {
    format!("{v:0>78}")
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
            mark_closing: Script::new(MARK_CLOSING),
            claims_settled: Script::new(CLAIMS_SETTLED),
        })
    }

    fn channel_key(&self, id: B256) -> String {
        format!("{}ch:{id}", self.prefix)
    }

    fn claims_key(&self) -> String {
        format!("{}claims", self.prefix)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `nonce|cumulative|signature`, the voucher part of a claim record.
fn voucher_fields(claim: &PendingClaim) -> String {
    format!(
        "{}|{}|{}",
        claim.voucher.nonce,
        claim.voucher.cumulative,
        hex::encode_prefixed(signature::to_bytes(&claim.voucher.signature))
    )
}

/// A claim record `amount|nonce|cumulative|signature[|since]` of `channel`.
fn parse_claim(key: &str, channel: &str, value: &str) -> Result<QueuedClaim, StoreError> {
    let channel_id: B256 = channel.parse().map_err(|_| corrupt(key, "channel id"))?;
    let parts: Vec<&str> = value.split('|').collect();
    let (amount, nonce, cumulative, sig, since) = match parts[..] {
        [amount, nonce, cumulative, sig] => (amount, nonce, cumulative, sig, "0"),
        [amount, nonce, cumulative, sig, since] => (amount, nonce, cumulative, sig, since),
        _ => return Err(corrupt(key, "claim fields")),
    };
    Ok(QueuedClaim {
        claim: PendingClaim {
            channel_id,
            voucher: parse_voucher(key, nonce, cumulative, sig)?,
            amount: amount.parse().map_err(|_| corrupt(key, "amount"))?,
        },
        since: since.parse().map_err(|_| corrupt(key, "since"))?,
    })
}

impl RedisStore {
    /// Every field of the hash `key`, by `HSCAN` (bounded batches, never one huge reply).
    async fn scan(&self, key: &str, limit: usize) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, entries): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(key)
                .arg(cursor)
                .arg("COUNT")
                .arg(limit.clamp(10, 1000))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            out.extend(entries);
            cursor = next;
            if cursor == 0 || out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
        }
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
        let (saved, nonce, cumulative): (i64, String, String) = self
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
        match saved {
            1 => Ok(()),
            0 => Err(StoreError::StaleNonce {
                got: voucher.nonce,
                stored: nonce.parse().unwrap_or(u64::MAX),
            }),
            _ => Err(StoreError::CumulativeDecreased {
                got: voucher.cumulative,
                stored: cumulative.parse().unwrap_or(u128::MAX),
            }),
        }
    }

    async fn load(&self, channel_id: B256) -> Result<Option<StoredChannel>, StoreError> {
        let key = self.channel_key(channel_id);
        let mut conn = self.conn.clone();
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["n", "c", "s", "u", "x", "d", "k"][..])
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let [n, c, s, u, x, d, k] =
            <[Option<String>; 7]>::try_from(fields).map_err(|_| corrupt(&key, "HMGET arity"))?;
        let (Some(n), Some(c), Some(s)) = (n, c, s) else {
            return Ok(None);
        };
        let voucher = parse_voucher(&key, &n, &c, &s)?;
        let parse_u128 = |field: &'static str, text: Option<String>| {
            text.map(|t| t.parse::<u128>().map_err(|_| corrupt(&key, field)))
                .transpose()
        };
        let whole = parse_u128("consumed", u)?.unwrap_or(0);
        let consumed = match (x, d) {
            (Some(x), Some(d)) => {
                let numerator: U256 = x.parse().map_err(|_| corrupt(&key, "exact consumed"))?;
                let denominator: U256 = d.parse().map_err(|_| corrupt(&key, "denominator"))?;
                if denominator.is_zero() {
                    return Err(corrupt(&key, "zero denominator"));
                }
                Exact {
                    numerator,
                    denominator,
                }
            }
            _ => Exact::whole(whole),
        };
        Ok(Some(StoredChannel {
            voucher,
            consumed,
            closing: parse_u128("closing", k)?,
        }))
    }

    async fn save_consumed(&self, channel_id: B256, consumed: Exact) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .save_consumed
            .key(self.channel_key(channel_id))
            .arg(pad_u128(consumed.ceil()))
            .arg(pad_u256(consumed.numerator))
            .arg(consumed.denominator.to_string())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn mark_closing(&self, channel_id: B256, amount: u128) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = self.channel_key(channel_id);
        let marked: i64 = self
            .mark_closing
            .key(&key)
            .arg(pad_u128(amount))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if marked == 0 {
            // No record to mark (the store lost it): the close must not be signed.
            return Err(corrupt(&key, "no channel record to mark closing"));
        }
        Ok(())
    }

    async fn queue_claim(&self, claim: PendingClaim) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .queue_claim
            .key(self.claims_key())
            .arg(claim.channel_id.to_string())
            .arg(pad_u128(claim.amount))
            .arg(voucher_fields(&claim))
            .arg(unix_now())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn pending_claims(&self, limit: usize) -> Result<Vec<PendingClaim>, StoreError> {
        Ok(self
            .queued_claims(limit)
            .await?
            .into_iter()
            .map(|q| q.claim)
            .collect())
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

impl SettlementStore for RedisStore {
    async fn queued_claims(&self, limit: usize) -> Result<Vec<QueuedClaim>, StoreError> {
        let key = self.claims_key();
        self.scan(&key, limit)
            .await?
            .iter()
            .map(|(field, value)| parse_claim(&key, field, value))
            .collect()
    }

    async fn queued_claims_of(&self, channels: &[B256]) -> Result<Vec<QueuedClaim>, StoreError> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.claims_key();
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        for chunk in channels.chunks(1_000) {
            let fields: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            let values: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(&key)
                .arg(&fields)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for (field, value) in fields.iter().zip(values) {
                if let Some(value) = value {
                    out.push(parse_claim(&key, field, &value)?);
                }
            }
        }
        Ok(out)
    }

    async fn claims_settled(&self, settled: &[(B256, u128)]) -> Result<(), StoreError> {
        if settled.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut invocation = self.claims_settled.key(self.claims_key());
        invocation.arg(unix_now());
        for (channel, amount) in settled {
            invocation.arg(channel.to_string()).arg(pad_u128(*amount));
        }
        let _: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn claim_skipped(&self, skipped: SkippedClaim) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .claims_settled
            .key(self.claims_key())
            .key(self.key("settle:skipped"))
            .arg(unix_now())
            .arg(skipped.channel_id.to_string())
            .arg(pad_u128(skipped.amount))
            .arg(format!("{}|{}", skipped.reason, skipped.at))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn skipped_claims(&self) -> Result<Vec<SkippedClaim>, StoreError> {
        let key = self.key("settle:skipped");
        self.scan(&key, usize::MAX)
            .await?
            .iter()
            .map(|(field, value)| {
                let parts: Vec<&str> = value.split('|').collect();
                let [amount, reason, at] = parts[..] else {
                    return Err(corrupt(&key, "skip fields"));
                };
                Ok(SkippedClaim {
                    channel_id: field.parse().map_err(|_| corrupt(&key, "channel id"))?,
                    amount: amount.parse().map_err(|_| corrupt(&key, "amount"))?,
                    reason: reason.to_string(),
                    at: at.parse().map_err(|_| corrupt(&key, "time"))?,
                })
            })
            .collect()
    }

    async fn in_flight(&self) -> Result<Vec<InFlight>, StoreError> {
        let key = self.key("settle:tx");
        let mut out: Vec<InFlight> = self
            .scan(&key, usize::MAX)
            .await?
            .iter()
            .map(|(_, value)| decode_in_flight(&key, value))
            .collect::<Result<_, _>>()?;
        out.sort_by_key(|t| t.nonce);
        Ok(out)
    }

    async fn save_in_flight(&self, tx: &InFlight) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(self.key("settle:tx"))
            .arg(pad_u64(tx.nonce))
            .arg(encode_in_flight(tx))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn remove_in_flight(&self, nonce: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HDEL")
            .arg(self.key("settle:tx"))
            .arg(pad_u64(nonce))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn watch_cursor(&self) -> Result<Option<u64>, StoreError> {
        let key = self.key("settle:cursor");
        let mut conn = self.conn.clone();
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        value
            .map(|v| v.parse().map_err(|_| corrupt(&key, "block")))
            .transpose()
    }

    async fn set_watch_cursor(&self, block: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("SET")
            .arg(self.key("settle:cursor"))
            .arg(block)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn withdrawals(&self) -> Result<Vec<(B256, u64)>, StoreError> {
        let key = self.key("settle:withdraw");
        self.scan(&key, usize::MAX)
            .await?
            .iter()
            .map(|(field, value)| {
                Ok((
                    field.parse().map_err(|_| corrupt(&key, "channel id"))?,
                    value.parse().map_err(|_| corrupt(&key, "withdraw time"))?,
                ))
            })
            .collect()
    }

    async fn add_withdrawal(&self, channel_id: B256, withdraw_at: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(self.key("settle:withdraw"))
            .arg(channel_id.to_string())
            .arg(withdraw_at)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn remove_withdrawal(&self, channel_id: B256) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HDEL")
            .arg(self.key("settle:withdraw"))
            .arg(channel_id.to_string())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn queue_close(&self, claim: PendingClaim) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(self.key("closes"))
            .arg(claim.channel_id.to_string())
            .arg(format!(
                "{}|{}",
                pad_u128(claim.amount),
                voucher_fields(&claim)
            ))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn closes(&self) -> Result<Vec<PendingClaim>, StoreError> {
        let key = self.key("closes");
        self.scan(&key, usize::MAX)
            .await?
            .iter()
            .map(|(field, value)| parse_claim(&key, field, value).map(|q| q.claim))
            .collect()
    }

    async fn remove_close(&self, channel_id: B256) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HDEL")
            .arg(self.key("closes"))
            .arg(channel_id.to_string())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// `nonce;gas_limit;max_fee;priority;first_sent;last_sent;hash,hash;claim;claim` with each
/// claim as `channel|amount|nonce|cumulative|signature`.
fn encode_in_flight(tx: &InFlight) -> String {
    let hashes: Vec<String> = tx.hashes.iter().map(|h| h.to_string()).collect();
    let mut out = format!(
        "{};{};{};{};{};{};{}",
        tx.nonce,
        tx.gas_limit,
        tx.fees.max_fee_per_gas,
        tx.fees.max_priority_fee_per_gas,
        tx.first_sent,
        tx.last_sent,
        hashes.join(",")
    );
    for claim in &tx.claims {
        out.push_str(&format!(
            ";{}|{}|{}",
            claim.channel_id,
            pad_u128(claim.amount),
            voucher_fields(claim)
        ));
    }
    out
}

fn decode_in_flight(key: &str, value: &str) -> Result<InFlight, StoreError> {
    let bad = |what: &str| corrupt(key, format!("in-flight {what}"));
    let mut parts = value.split(';');
    let mut next = |what: &str| parts.next().ok_or_else(|| bad(what));
    let nonce = next("nonce")?.parse().map_err(|_| bad("nonce"))?;
    let gas_limit = next("gas")?.parse().map_err(|_| bad("gas"))?;
    let max_fee_per_gas = next("fee")?.parse().map_err(|_| bad("fee"))?;
    let max_priority_fee_per_gas = next("tip")?.parse().map_err(|_| bad("tip"))?;
    let first_sent = next("time")?.parse().map_err(|_| bad("time"))?;
    let last_sent = next("time")?.parse().map_err(|_| bad("time"))?;
    let hashes = next("hashes")?
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| h.parse().map_err(|_| bad("hash")))
        .collect::<Result<_, _>>()?;
    let claims = parts
        .map(|c| {
            let (channel, rest) = c.split_once('|').ok_or_else(|| bad("claim"))?;
            parse_claim(key, channel, rest).map(|q| q.claim)
        })
        .collect::<Result<_, _>>()?;
    Ok(InFlight {
        nonce,
        hashes,
        claims,
        fees: Fees {
            max_fee_per_gas,
            max_priority_fee_per_gas,
        },
        gas_limit,
        first_sent,
        last_sent,
    })
}
