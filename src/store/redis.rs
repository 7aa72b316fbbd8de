//! [`RedisStore`]: channel states in Redis (a single server or a Redis Cluster), with every
//! compare-and-set in a Lua script that touches one hash slot.
//!
//! Layout (prefix `ps:` by default; docs/STORE.md has the table). Every key of a channel
//! carries the channel id as its hash tag (`{0x..}`), so the scripts that touch several of them
//! stay in one slot of a cluster:
//! - `ps:ch:{channelId}`: hash `n` nonce (20-digit zero-padded decimal), `c` cumulative
//!   (39-digit), `s` signature (0x-hex, 65 bytes), `u` consumed rounded up (39-digit), `x` and
//!   `d` the exact consumption `x / d` (78-digit numerator, decimal denominator), `k` the amount
//!   of a `Close` the payee consented to (39-digit), `f` the last fencing token issued, `q` the
//!   claim queued for the settler (`amount(39)|nonce|cumulative|signature|since`). Zero-padding
//!   makes Lua's string comparison the numeric one, beyond the 2^53 a Lua number holds exactly.
//! - `ps:lease:{channelId}`: string `holder|fence`, expiring (`PX`) unless renewed.
//! - `ps:sess:{channelId}`: hash `sid`, `jti`, `seq`, `rq`, `h` the last holder (and `w` while a resume elsewhere
//!   waits), expiring with the resume window.
//! - `ps:claimq`: set of the channels with a queued claim (the settler's index).
//!
//! Records of money (`ps:ch:*`) have no TTL. Durability is Redis's: run it with `appendonly yes`
//! and `appendfsync always` for no acknowledged voucher to be lost on a crash (`everysec` bounds
//! the loss to one second of vouchers, which can only cost the payee, never the payer).

use std::sync::Arc;
use std::time::Duration;

use alloy::hex;
use alloy::primitives::{B256, Signature, U256};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use tokio::sync::Semaphore;

use super::settlement::{InFlight, QueuedClaim, SettlementStore, SkippedClaim};
use super::{
    ChannelStore, Fence, LeaseStatus, PendingClaim, Resumed, SessionRecord, SessionWrite,
    StoreError, StoredChannel, StoredVoucher,
};
use crate::chain::Fees;
use crate::channel::signature;
use crate::meter::Exact;

/// Key prefix unless configured otherwise.
pub const DEFAULT_REDIS_PREFIX: &str = "ps:";
/// A Redis call slower than this counts as an outage (delivery pauses, nothing is acked).
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 2_000;
/// Calls in flight on the connection at once: enough to pipeline thousands of sessions' writes
/// in a few round trips; beyond it, callers wait their turn (back-pressure, not failures).
pub const MAX_IN_FLIGHT: usize = 512;
/// The longest a call waits for its turn before it counts as an outage. Long: the wait is this
/// process's own load queueing for the connection (Redis answering each call within
/// [`DEFAULT_REDIS_TIMEOUT_MS`] is what tells an outage), and a burst of thousands of opens must
/// wait its turn, not fail.
pub const MAX_QUEUE_WAIT: Duration = Duration::from_secs(60);
/// The layout this build reads and writes (`ps:layout`).
const LAYOUT: &str = "2";

/// Refused: the write's fence is not the channel's (`{3, current}`).
const FENCE_CHECK: &str = r#"
if ARGV[1] ~= '0' then
  local f = redis.call('HGET', KEYS[1], 'f') or '0'
  if f ~= ARGV[1] then return {3, f} end
end
"#;

/// KEYS[1] channel; ARGV fence, nonce, cumulative, signature.
const SAVE_VOUCHER: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'n', 'c')
if cur[1] and cur[1] >= ARGV[2] then return {0, cur[1], cur[2]} end
if cur[2] and cur[2] > ARGV[3] then return {2, cur[1], cur[2]} end
redis.call('HSET', KEYS[1], 'n', ARGV[2], 'c', ARGV[3], 's', ARGV[4])
return {1, ARGV[2], ARGV[3]}
"#;

/// KEYS[1] channel; ARGV fence, consumed rounded up, exact numerator, denominator.
const SAVE_CONSUMED: &str = r#"
if redis.call('HEXISTS', KEYS[1], 'n') == 0 then return {0} end
local cur = redis.call('HMGET', KEYS[1], 'u', 'x', 'd')
local raise = (not cur[1]) or cur[1] < ARGV[2]
  or (cur[1] == ARGV[2] and ((not cur[2]) or (cur[3] == ARGV[4] and cur[2] < ARGV[3])))
if raise then redis.call('HSET', KEYS[1], 'u', ARGV[2], 'x', ARGV[3], 'd', ARGV[4]) end
return {1}
"#;

/// KEYS[1] channel; ARGV fence, amount.
const MARK_CLOSING: &str = r#"
if redis.call('HEXISTS', KEYS[1], 'n') == 0 then return {0} end
redis.call('HSETNX', KEYS[1], 'k', ARGV[2])
return {1}
"#;

/// KEYS[1] channel; ARGV fence, amount (39-digit), `nonce|cumulative|signature`, now. Keeps the
/// larger amount and the first `since`.
const QUEUE_CLAIM: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'q')
if not cur then
  redis.call('HSET', KEYS[1], 'q', ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4])
elseif string.sub(cur, 1, 39) < ARGV[2] then
  local since = string.match(cur, '|([0-9]+)$') or ARGV[4]
  redis.call('HSET', KEYS[1], 'q', ARGV[2] .. '|' .. ARGV[3] .. '|' .. since)
end
return {1}
"#;

/// KEYS[1] channel; ARGV now, amount paid. Removes the claim if it is for at most that; a larger
/// one stays, its age counted from now. Returns whether a claim remains.
const CLAIM_SETTLED: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'q')
if not cur then return 0 end
if string.sub(cur, 1, 39) <= ARGV[2] then
  redis.call('HDEL', KEYS[1], 'q')
  return 0
end
redis.call('HSET', KEYS[1], 'q', (string.gsub(cur, '|[0-9]+$', '|' .. ARGV[1])))
return 1
"#;

/// KEYS lease, channel; ARGV holder, ttl (ms). `{1, fence, n, c, s, u, x, d, k}` taken under a
/// new fence (also when the holder had it: a new session's lease fences the old one's writes),
/// with the channel's fields as `load` reads them; `{0}` held by another.
const TAKE_LEASE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local h = string.match(cur, '^(.*)|[0-9]+$')
  if h ~= ARGV[1] then return {0} end
end
local f = tostring(redis.call('HINCRBY', KEYS[2], 'f', 1))
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. f, 'PX', ARGV[2])
local c = redis.call('HMGET', KEYS[2], 'n', 'c', 's', 'u', 'x', 'd', 'k')
return {1, f, c[1], c[2], c[3], c[4], c[5], c[6], c[7]}
"#;

/// KEYS lease, channel, session; ARGV holder, fence, ttl, session ttl (ms). 0 lost, 1 held,
/// 2 held but wanted by a resume elsewhere.
const RENEW_LEASE: &str = r#"
local mine = ARGV[1] .. '|' .. ARGV[2]
local cur = redis.call('GET', KEYS[1])
if cur == mine then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
elseif (not cur) and redis.call('HGET', KEYS[2], 'f') == ARGV[2] then
  redis.call('SET', KEYS[1], mine, 'PX', ARGV[3])
else
  return 0
end
redis.call('PEXPIRE', KEYS[3], ARGV[4])
if redis.call('HEXISTS', KEYS[3], 'w') == 1 then return 2 end
return 1
"#;

/// KEYS lease; ARGV `holder|fence`.
const RELEASE_LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// KEYS channel, session; ARGV fence, sid, jti, seq, request ('' for none), session ttl (ms),
/// mode (`f` a fresh session replacing any record, `p` progress of the recorded one, `e` its
/// end), holder, parked ('1' or '0').
const PUT_SESSION: &str = r#"
if ARGV[7] == 'f' then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], 'sid', ARGV[2], 'jti', ARGV[3], 'seq', ARGV[4], 'rq', ARGV[5], 'h', ARGV[8], 'p', ARGV[9])
elseif redis.call('HGET', KEYS[2], 'sid') == ARGV[2] then
  if ARGV[7] == 'e' then
    redis.call('DEL', KEYS[2])
    return {1}
  end
  redis.call('HSET', KEYS[2], 'seq', ARGV[4], 'rq', ARGV[5], 'h', ARGV[8], 'p', ARGV[9])
else
  return {1}
end
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return {1}
"#;

/// KEYS lease, channel, session; ARGV sid, jti, new jti, holder, ttl, session ttl (ms).
/// `{1, fence, seq, rq, last holder, n, c, s, u, x, d, k, parked}` taken (the channel's fields
/// as `load` reads them), `{0}` busy, `{-1}` unknown, `{-2}` used.
const RESUME_SESSION: &str = r#"
local s = redis.call('HMGET', KEYS[3], 'sid', 'jti', 'seq', 'rq', 'h', 'p')
if (not s[1]) or s[1] ~= ARGV[1] then return {-1} end
if s[2] ~= ARGV[2] then return {-2} end
local cur = redis.call('GET', KEYS[1])
if cur then
  local h = string.match(cur, '^(.*)|[0-9]+$')
  if h ~= ARGV[4] then
    redis.call('HSET', KEYS[3], 'w', '1')
    return {0}
  end
end
local f = tostring(redis.call('HINCRBY', KEYS[2], 'f', 1))
redis.call('SET', KEYS[1], ARGV[4] .. '|' .. f, 'PX', ARGV[5])
redis.call('HSET', KEYS[3], 'jti', ARGV[3], 'h', ARGV[4])
redis.call('HDEL', KEYS[3], 'w')
redis.call('PEXPIRE', KEYS[3], ARGV[6])
local c = redis.call('HMGET', KEYS[2], 'n', 'c', 's', 'u', 'x', 'd', 'k')
return {1, f, s[3] or '0', s[4] or '', s[5] or '', c[1] or false, c[2] or false, c[3] or false,
  c[4] or false, c[5] or false, c[6] or false, c[7] or false, s[6] or '0'}
"#;

/// One connection to a single Redis (reconnecting by itself) or to a cluster (routing each
/// command by its key's slot).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The scripts, each with the fence check first where it writes money.
struct Scripts {
    save_voucher: Script,
    save_consumed: Script,
    mark_closing: Script,
    queue_claim: Script,
    claim_settled: Script,
    take_lease: Script,
    renew_lease: Script,
    release_lease: Script,
    put_session: Script,
    resume_session: Script,
}

impl Scripts {
    fn new() -> Self {
        let fenced = |body: &str| Script::new(&format!("{FENCE_CHECK}{body}"));
        Self {
            save_voucher: fenced(SAVE_VOUCHER),
            save_consumed: fenced(SAVE_CONSUMED),
            mark_closing: fenced(MARK_CLOSING),
            queue_claim: fenced(QUEUE_CLAIM),
            claim_settled: Script::new(CLAIM_SETTLED),
            take_lease: Script::new(TAKE_LEASE),
            renew_lease: Script::new(RENEW_LEASE),
            release_lease: Script::new(RELEASE_LEASE),
            put_session: fenced(PUT_SESSION),
            resume_session: Script::new(RESUME_SESSION),
        }
    }

    fn all(&self) -> [&Script; 10] {
        [
            &self.save_voucher,
            &self.save_consumed,
            &self.mark_closing,
            &self.queue_claim,
            &self.claim_settled,
            &self.take_lease,
            &self.renew_lease,
            &self.release_lease,
            &self.put_session,
            &self.resume_session,
        ]
    }
}

/// Channel states in Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    scripts: Arc<Scripts>,
    /// Turns for calls in flight ([`MAX_IN_FLIGHT`]).
    turns: Arc<Semaphore>,
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// Connects to a single Redis at `url` (`redis://host:port/db`), reconnecting on its own
    /// after an outage.
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
        Self::ready(Conn::Single(conn), prefix, true).await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port`), following
    /// its slots (and their moves) by itself.
    pub async fn connect_cluster(nodes: &[String], prefix: &str) -> Result<Self, StoreError> {
        let timeout = Duration::from_millis(DEFAULT_REDIS_TIMEOUT_MS);
        let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .map_err(unavailable)?;
        let conn = client.get_async_connection().await.map_err(unavailable)?;
        Self::ready(Conn::Cluster(conn), prefix, false).await
    }

    /// Loads the scripts (so thousands of sessions starting at once do not each find them
    /// missing), and moves records of the earlier layout to this one.
    async fn ready(conn: Conn, prefix: &str, single: bool) -> Result<Self, StoreError> {
        let store = Self {
            conn,
            prefix: prefix.to_string(),
            scripts: Arc::new(Scripts::new()),
            turns: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        };
        for script in store.scripts.all() {
            let mut conn = store.conn.clone();
            let _: String = script
                .prepare_invoke()
                .load_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        store.migrate(single).await?;
        Ok(store)
    }

    /// A turn to talk to Redis: at most [`MAX_IN_FLIGHT`] calls at once, pipelined on the one
    /// connection; the rest wait (up to [`MAX_QUEUE_WAIT`]).
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        match tokio::time::timeout(MAX_QUEUE_WAIT, self.turns.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(StoreError::Unavailable(format!(
                "the store is saturated: no turn within {} s",
                MAX_QUEUE_WAIT.as_secs()
            ))),
        }
    }

    /// Runs a command.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let _turn = self.turn().await?;
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn).await.map_err(unavailable)
    }

    /// Runs a script.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let _turn = self.turn().await?;
        let mut conn = self.conn.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// Runs a fenced money write: `Ok(reply)` or [`StoreError::Fenced`].
    async fn eval_fenced(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        fence: Fence,
    ) -> Result<Vec<Option<String>>, StoreError> {
        let reply: Vec<Option<String>> = self.eval(invocation).await?;
        if reply.first().and_then(|c| c.as_deref()) == Some("3") {
            let current = reply
                .get(1)
                .and_then(|f| f.as_deref())
                .and_then(|f| f.parse().ok())
                .unwrap_or(0);
            return Err(StoreError::Fenced {
                fence,
                current: Fence(current),
            });
        }
        Ok(reply)
    }

    /// The channel's tag: its keys hash to one slot.
    fn tag(id: B256) -> String {
        format!("{{{id}}}")
    }

    fn channel_key(&self, id: B256) -> String {
        format!("{}ch:{}", self.prefix, Self::tag(id))
    }

    fn lease_key(&self, id: B256) -> String {
        format!("{}lease:{}", self.prefix, Self::tag(id))
    }

    fn session_key(&self, id: B256) -> String {
        format!("{}sess:{}", self.prefix, Self::tag(id))
    }

    /// The settler's index of channels with a queued claim.
    fn claim_index(&self) -> String {
        format!("{}claimq", self.prefix)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Keeps `channel` in the claim index if it holds a claim: removes it, then adds it back
    /// if a claim is there (a claim queued meanwhile adds itself after it is written, so
    /// neither order loses it).
    async fn reindex(&self, channel: B256) -> Result<(), StoreError> {
        let index = self.claim_index();
        let _: i64 = self
            .query(redis::cmd("SREM").arg(&index).arg(channel.to_string()))
            .await?;
        let queued: i64 = self
            .query(
                redis::cmd("HEXISTS")
                    .arg(self.channel_key(channel))
                    .arg("q"),
            )
            .await?;
        if queued == 1 {
            let _: i64 = self
                .query(redis::cmd("SADD").arg(&index).arg(channel.to_string()))
                .await?;
        }
        Ok(())
    }

    /// Layout 1 (before hash tags: `ps:ch:0x..`, claims in the hash `ps:claims`) to layout 2,
    /// once, on a single Redis (a cluster only ever held layout 2).
    async fn migrate(&self, single: bool) -> Result<(), StoreError> {
        let layout_key = self.key("layout");
        let layout: Option<String> = self.query(redis::cmd("GET").arg(&layout_key)).await?;
        if layout.as_deref() == Some(LAYOUT) {
            return Ok(());
        }
        if single {
            let mut cursor: u64 = 0;
            let pattern = format!("{}ch:0x*", self.prefix);
            loop {
                let (next, keys): (u64, Vec<String>) = self
                    .query(
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(1000),
                    )
                    .await?;
                for old in keys {
                    let Ok(id) = old[self.prefix.len() + 3..].parse::<B256>() else {
                        continue;
                    };
                    let _: i64 = self
                        .query(redis::cmd("RENAMENX").arg(&old).arg(self.channel_key(id)))
                        .await?;
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            let old_claims = self.key("claims");
            let kind: String = self.query(redis::cmd("TYPE").arg(&old_claims)).await?;
            if kind == "hash" {
                for (field, value) in self.scan(&old_claims, usize::MAX).await? {
                    let Ok(id) = field.parse::<B256>() else {
                        continue;
                    };
                    let _: i64 = self
                        .query(
                            redis::cmd("HSETNX")
                                .arg(self.channel_key(id))
                                .arg("q")
                                .arg(&value),
                        )
                        .await?;
                    let _: i64 = self
                        .query(redis::cmd("SADD").arg(self.claim_index()).arg(&field))
                        .await?;
                }
                let _: i64 = self.query(redis::cmd("DEL").arg(&old_claims)).await?;
            }
        }
        let _: () = self
            .query(redis::cmd("SET").arg(&layout_key).arg(LAYOUT))
            .await?;
        Ok(())
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
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, entries): (u64, Vec<(String, String)>) = self
                .query(
                    redis::cmd("HSCAN")
                        .arg(key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(limit.clamp(10, 1000)),
                )
                .await?;
            out.extend(entries);
            cursor = next;
            if cursor == 0 || out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
        }
    }

    /// Members of the set `key`, by `SSCAN`, up to `limit`.
    async fn scan_set(&self, key: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, members): (u64, Vec<String>) = self
                .query(
                    redis::cmd("SSCAN")
                        .arg(key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(limit.clamp(10, 1000)),
                )
                .await?;
            out.extend(members);
            cursor = next;
            if cursor == 0 || out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
        }
    }

    /// The claims queued for `channels` (their `q` fields, read concurrently).
    async fn claims_of(&self, channels: &[B256]) -> Result<Vec<QueuedClaim>, StoreError> {
        let reads = channels.iter().map(|id| async move {
            let key = self.channel_key(*id);
            let value: Option<String> = self.query(redis::cmd("HGET").arg(&key).arg("q")).await?;
            Ok::<_, StoreError>((*id, key, value))
        });
        let mut out = Vec::new();
        for read in futures_util::future::join_all(reads).await {
            let (id, key, value) = read?;
            if let Some(value) = value {
                out.push(parse_claim(&key, &id.to_string(), &value)?);
            }
        }
        Ok(out)
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

/// The fields of a channel record `load` reads, in this order.
const CHANNEL_FIELDS: [&str; 7] = ["n", "c", "s", "u", "x", "d", "k"];

/// A channel record from its [`CHANNEL_FIELDS`]; `None` if it holds no voucher.
fn parse_channel(
    key: &str,
    fields: Vec<Option<String>>,
) -> Result<Option<StoredChannel>, StoreError> {
    let [n, c, s, u, x, d, k] =
        <[Option<String>; 7]>::try_from(fields).map_err(|_| corrupt(key, "channel arity"))?;
    let (Some(n), Some(c), Some(s)) = (n, c, s) else {
        return Ok(None);
    };
    let voucher = parse_voucher(key, &n, &c, &s)?;
    let parse_u128 = |field: &'static str, text: Option<String>| {
        text.map(|t| t.parse::<u128>().map_err(|_| corrupt(key, field)))
            .transpose()
    };
    let whole = parse_u128("consumed", u)?.unwrap_or(0);
    let consumed = match (x, d) {
        (Some(x), Some(d)) => {
            let numerator: U256 = x.parse().map_err(|_| corrupt(key, "exact consumed"))?;
            let denominator: U256 = d.parse().map_err(|_| corrupt(key, "denominator"))?;
            if denominator.is_zero() {
                return Err(corrupt(key, "zero denominator"));
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
        fence: Fence,
    ) -> Result<(), StoreError> {
        let reply = self
            .eval_fenced(
                self.scripts
                    .save_voucher
                    .key(self.channel_key(channel_id))
                    .arg(fence.0)
                    .arg(pad_u64(voucher.nonce))
                    .arg(pad_u128(voucher.cumulative))
                    .arg(hex::encode_prefixed(signature::to_bytes(
                        &voucher.signature,
                    ))),
                fence,
            )
            .await?;
        let field = |i: usize| reply.get(i).cloned().flatten().unwrap_or_default();
        match field(0).as_str() {
            "1" => Ok(()),
            "0" => Err(StoreError::StaleNonce {
                got: voucher.nonce,
                stored: field(1).parse().unwrap_or(u64::MAX),
            }),
            _ => Err(StoreError::CumulativeDecreased {
                got: voucher.cumulative,
                stored: field(2).parse().unwrap_or(u128::MAX),
            }),
        }
    }

    async fn load(&self, channel_id: B256) -> Result<Option<StoredChannel>, StoreError> {
        let key = self.channel_key(channel_id);
        let fields: Vec<Option<String>> = self
            .query(redis::cmd("HMGET").arg(&key).arg(&CHANNEL_FIELDS[..]))
            .await?;
        parse_channel(&key, fields)
    }

    async fn save_consumed(
        &self,
        channel_id: B256,
        consumed: Exact,
        fence: Fence,
    ) -> Result<(), StoreError> {
        self.eval_fenced(
            self.scripts
                .save_consumed
                .key(self.channel_key(channel_id))
                .arg(fence.0)
                .arg(pad_u128(consumed.ceil()))
                .arg(pad_u256(consumed.numerator))
                .arg(consumed.denominator.to_string()),
            fence,
        )
        .await?;
        Ok(())
    }

    async fn mark_closing(
        &self,
        channel_id: B256,
        amount: u128,
        fence: Fence,
    ) -> Result<(), StoreError> {
        let key = self.channel_key(channel_id);
        let reply = self
            .eval_fenced(
                self.scripts
                    .mark_closing
                    .key(&key)
                    .arg(fence.0)
                    .arg(pad_u128(amount)),
                fence,
            )
            .await?;
        if reply.first().cloned().flatten().as_deref() != Some("1") {
            // No record to mark (the store lost it): the close must not be signed.
            return Err(corrupt(&key, "no channel record to mark closing"));
        }
        Ok(())
    }

    async fn queue_claim(&self, claim: PendingClaim, fence: Fence) -> Result<(), StoreError> {
        // Indexed before (a crash after the write leaves it findable) and after (a settler
        // that just took an older claim off the index must see this one).
        let index = self.claim_index();
        let member = claim.channel_id.to_string();
        let _: i64 = self
            .query(redis::cmd("SADD").arg(&index).arg(&member))
            .await?;
        self.eval_fenced(
            self.scripts
                .queue_claim
                .key(self.channel_key(claim.channel_id))
                .arg(fence.0)
                .arg(pad_u128(claim.amount))
                .arg(voucher_fields(&claim))
                .arg(unix_now()),
            fence,
        )
        .await?;
        let _: i64 = self
            .query(redis::cmd("SADD").arg(&index).arg(&member))
            .await?;
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

    async fn take_lease(
        &self,
        channel_id: B256,
        holder: &str,
        ttl: Duration,
    ) -> Result<(Fence, Option<StoredChannel>), StoreError> {
        let key = self.channel_key(channel_id);
        let reply: Vec<Option<String>> = self
            .eval(
                self.scripts
                    .take_lease
                    .key(self.lease_key(channel_id))
                    .key(&key)
                    .arg(holder)
                    .arg(millis(ttl)),
            )
            .await?;
        if reply.first().cloned().flatten().as_deref() != Some("1") {
            return Err(StoreError::LeaseHeld);
        }
        let fence = reply
            .get(1)
            .cloned()
            .flatten()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| corrupt(&key, "fence"))?;
        let stored = parse_channel(&key, reply.get(2..9).map(<[_]>::to_vec).unwrap_or_default())?;
        Ok((Fence(fence), stored))
    }

    async fn renew_lease(
        &self,
        channel_id: B256,
        holder: &str,
        fence: Fence,
        ttl: Duration,
        session_ttl: Duration,
    ) -> Result<LeaseStatus, StoreError> {
        let status: i64 = self
            .eval(
                self.scripts
                    .renew_lease
                    .key(self.lease_key(channel_id))
                    .key(self.channel_key(channel_id))
                    .key(self.session_key(channel_id))
                    .arg(holder)
                    .arg(fence.0)
                    .arg(millis(ttl))
                    .arg(millis(session_ttl)),
            )
            .await?;
        Ok(match status {
            1 => LeaseStatus::Held,
            2 => LeaseStatus::Wanted,
            _ => LeaseStatus::Lost,
        })
    }

    async fn release_lease(
        &self,
        channel_id: B256,
        holder: &str,
        fence: Fence,
    ) -> Result<(), StoreError> {
        let _: i64 = self
            .eval(
                self.scripts
                    .release_lease
                    .key(self.lease_key(channel_id))
                    .arg(format!("{holder}|{fence}")),
            )
            .await?;
        Ok(())
    }

    async fn put_session(
        &self,
        channel_id: B256,
        record: &SessionRecord,
        write: SessionWrite,
        fence: Fence,
        session_ttl: Duration,
    ) -> Result<(), StoreError> {
        let mode = match write {
            SessionWrite::Fresh => "f",
            SessionWrite::Progress => "p",
            SessionWrite::End => "e",
        };
        self.eval_fenced(
            self.scripts
                .put_session
                .key(self.channel_key(channel_id))
                .key(self.session_key(channel_id))
                .arg(fence.0)
                .arg(&record.sid)
                .arg(&record.jti)
                .arg(record.next_seq)
                .arg(record.request.map(|r| r.to_string()).unwrap_or_default())
                .arg(millis(session_ttl))
                .arg(mode)
                .arg(&record.holder)
                .arg(if record.parked { "1" } else { "0" }),
            fence,
        )
        .await?;
        Ok(())
    }

    async fn resume_session(
        &self,
        channel_id: B256,
        sid: &str,
        jti: &str,
        new_jti: &str,
        holder: &str,
        ttl: Duration,
        session_ttl: Duration,
    ) -> Result<Resumed, StoreError> {
        let key = self.session_key(channel_id);
        let reply: Vec<Option<String>> = self
            .eval(
                self.scripts
                    .resume_session
                    .key(self.lease_key(channel_id))
                    .key(self.channel_key(channel_id))
                    .key(&key)
                    .arg(sid)
                    .arg(jti)
                    .arg(new_jti)
                    .arg(holder)
                    .arg(millis(ttl))
                    .arg(millis(session_ttl)),
            )
            .await?;
        let field = |i: usize| reply.get(i).cloned().flatten().unwrap_or_default();
        Ok(match field(0).as_str() {
            "1" => Resumed::Taken {
                record: SessionRecord {
                    sid: sid.to_string(),
                    jti: new_jti.to_string(),
                    next_seq: field(2).parse().map_err(|_| corrupt(&key, "seq"))?,
                    request: match field(3).as_str() {
                        "" => None,
                        r => Some(r.parse().map_err(|_| corrupt(&key, "request"))?),
                    },
                    holder: field(4),
                    parked: field(12) == "1",
                },
                fence: Fence(field(1).parse().map_err(|_| corrupt(&key, "fence"))?),
                stored: Box::new(parse_channel(
                    &self.channel_key(channel_id),
                    reply.get(5..12).map(<[_]>::to_vec).unwrap_or_default(),
                )?),
            },
            "0" => Resumed::Busy,
            "-2" => Resumed::Used,
            _ => Resumed::Unknown,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }
}

impl SettlementStore for RedisStore {
    async fn queued_claims(&self, limit: usize) -> Result<Vec<QueuedClaim>, StoreError> {
        let index = self.claim_index();
        let mut channels = Vec::new();
        for member in self.scan_set(&index, limit).await? {
            channels.push(
                member
                    .parse::<B256>()
                    .map_err(|_| corrupt(&index, "channel id"))?,
            );
        }
        let claims = self.claims_of(&channels).await?;
        if claims.len() < channels.len() {
            // Index entries left by a claim since settled: dropped, re-checked.
            let found: std::collections::HashSet<B256> =
                claims.iter().map(|q| q.claim.channel_id).collect();
            for channel in channels.iter().filter(|c| !found.contains(*c)) {
                self.reindex(*channel).await?;
            }
        }
        Ok(claims)
    }

    async fn queued_claims_of(&self, channels: &[B256]) -> Result<Vec<QueuedClaim>, StoreError> {
        self.claims_of(channels).await
    }

    async fn claims_settled(&self, settled: &[(B256, u128)]) -> Result<(), StoreError> {
        let now = unix_now();
        let removals = settled.iter().map(|(channel, amount)| async move {
            let remains: i64 = self
                .eval(
                    self.scripts
                        .claim_settled
                        .key(self.channel_key(*channel))
                        .arg(now)
                        .arg(pad_u128(*amount)),
                )
                .await?;
            if remains == 0 {
                self.reindex(*channel).await?;
            }
            Ok::<_, StoreError>(())
        });
        for removal in futures_util::future::join_all(removals).await {
            removal?;
        }
        Ok(())
    }

    async fn claim_skipped(&self, skipped: SkippedClaim) -> Result<(), StoreError> {
        // Recorded first: a crash between the two leaves the claim queued, not lost.
        let _: i64 = self
            .query(
                redis::cmd("HSET")
                    .arg(self.key("settle:skipped"))
                    .arg(skipped.channel_id.to_string())
                    .arg(format!(
                        "{}|{}|{}",
                        pad_u128(skipped.amount),
                        skipped.reason,
                        skipped.at
                    )),
            )
            .await?;
        self.claims_settled(&[(skipped.channel_id, skipped.amount)])
            .await
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
        let _: i64 = self
            .query(
                redis::cmd("HSET")
                    .arg(self.key("settle:tx"))
                    .arg(pad_u64(tx.nonce))
                    .arg(encode_in_flight(tx)),
            )
            .await?;
        Ok(())
    }

    async fn remove_in_flight(&self, nonce: u64) -> Result<(), StoreError> {
        let _: i64 = self
            .query(
                redis::cmd("HDEL")
                    .arg(self.key("settle:tx"))
                    .arg(pad_u64(nonce)),
            )
            .await?;
        Ok(())
    }

    async fn watch_cursor(&self) -> Result<Option<u64>, StoreError> {
        let key = self.key("settle:cursor");
        let value: Option<String> = self.query(redis::cmd("GET").arg(&key)).await?;
        value
            .map(|v| v.parse().map_err(|_| corrupt(&key, "block")))
            .transpose()
    }

    async fn set_watch_cursor(&self, block: u64) -> Result<(), StoreError> {
        let _: () = self
            .query(redis::cmd("SET").arg(self.key("settle:cursor")).arg(block))
            .await?;
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
        let _: i64 = self
            .query(
                redis::cmd("HSET")
                    .arg(self.key("settle:withdraw"))
                    .arg(channel_id.to_string())
                    .arg(withdraw_at),
            )
            .await?;
        Ok(())
    }

    async fn remove_withdrawal(&self, channel_id: B256) -> Result<(), StoreError> {
        let _: i64 = self
            .query(
                redis::cmd("HDEL")
                    .arg(self.key("settle:withdraw"))
                    .arg(channel_id.to_string()),
            )
            .await?;
        Ok(())
    }

    async fn queue_close(&self, claim: PendingClaim) -> Result<(), StoreError> {
        let _: i64 = self
            .query(
                redis::cmd("HSET")
                    .arg(self.key("closes"))
                    .arg(claim.channel_id.to_string())
                    .arg(format!(
                        "{}|{}",
                        pad_u128(claim.amount),
                        voucher_fields(&claim)
                    )),
            )
            .await?;
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
        let _: i64 = self
            .query(
                redis::cmd("HDEL")
                    .arg(self.key("closes"))
                    .arg(channel_id.to_string()),
            )
            .await?;
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
