//! The Lua scripts that keep the shared ledgers and the instances' heartbeats, and their typed
//! calls. Each runs atomically in Redis and reads Redis' own clock (`TIME`), so the instances'
//! clocks never decide anything.
//!
//! Keys (each a single key, so every script runs on one Redis Cluster node):
//! - `quotagate:ledger:{<account id>}` — an account's ledger: `"<version>\n<json>"`, where the
//!   JSON is a [`crate::domain::account::LedgerState`]; the account id is a hash tag, so a
//!   Cluster shards by account. It expires after [`LEDGER_KEEP`] untouched.
//! - `quotagate:instances` — a sorted set: each live instance's id, scored by its last heartbeat
//!   (ms, Redis time).
//! - `quotagate:owners` — a counter that gives each starting instance its lease-owner tag.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{Script, Value};

use super::conn::RedisConn;
use crate::domain::time::Millis;

/// How long an untouched ledger stays in Redis: longer than any window or quota period it counts
/// (a week), so an idle account keeps its daily counts; after it, the database copy seeds it.
pub const LEDGER_KEEP: Duration = Duration::from_secs(8 * 24 * 3600);

/// The key of an account's ledger.
pub fn ledger_key(account_id: &str) -> String {
    format!("quotagate:ledger:{{{account_id}}}")
}

/// The sorted set of live instances.
pub const INSTANCES_KEY: &str = "quotagate:instances";

/// The counter that hands out lease-owner tags.
pub const OWNERS_KEY: &str = "quotagate:owners";

/// `LOAD(key)` → `{now}` or `{now, value}`.
static LOAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local value = redis.call('GET', KEYS[1])
if value then return {now, value} end
return {now}
",
    )
});

/// `SWAP(key; expected, value, keep_ms)`: writes `value` only over the version `expected` (the
/// text before the first newline; empty: no ledger yet) → `{1, now}`; else `{0, now}` (no ledger)
/// or `{0, now, current}`.
static SWAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local current = redis.call('GET', KEYS[1])
local seen = ''
if current then seen = string.match(current, '^[^\n]*') end
if seen ~= ARGV[1] then
  if current then return {0, now, current} end
  return {0, now}
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return {1, now}
",
    )
});

/// `BEAT(instances; id, ttl_ms)`: records the instance alive now, forgets instances silent for
/// `ttl_ms` → `{now, id, id, …}` (every live instance).
static BEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 10)
local reply = redis.call('ZRANGE', KEYS[1], 0, -1)
table.insert(reply, 1, now)
return reply
",
    )
});

/// A ledger as read: Redis' time and the stored value, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub now: Millis,
    pub value: Option<String>,
}

/// The outcome of a swap.
#[derive(Debug, Clone, PartialEq)]
pub enum Swapped {
    /// Written, at Redis time `now`.
    Done { now: Millis },
    /// Another writer came first: the ledger as it is now (`None`: there is none).
    Conflict {
        now: Millis,
        current: Option<String>,
    },
}

/// Reads an account's ledger.
pub async fn load(conn: &mut RedisConn, key: &str) -> redis::RedisResult<Loaded> {
    let reply: Vec<Value> = LOAD.key(key).invoke_async(conn).await?;
    let now = int(reply.first())?;
    Ok(Loaded {
        now,
        value: text(reply.get(1))?,
    })
}

/// Writes `value` (`"<version>\n<json>"`) over version `expected` (`None`: only if there is no
/// ledger), keeping it [`LEDGER_KEEP`].
pub async fn swap(
    conn: &mut RedisConn,
    key: &str,
    expected: Option<u64>,
    value: &str,
) -> redis::RedisResult<Swapped> {
    let reply: Vec<Value> = SWAP
        .key(key)
        .arg(expected.map_or(String::new(), |v| v.to_string()))
        .arg(value)
        .arg(LEDGER_KEEP.as_millis() as u64)
        .invoke_async(conn)
        .await?;
    let now = int(reply.get(1))?;
    Ok(if int(reply.first())? == 1 {
        Swapped::Done { now }
    } else {
        Swapped::Conflict {
            now,
            current: text(reply.get(2))?,
        }
    })
}

/// Records instance `id` alive; answers Redis' time and the ids of the instances that beat within
/// `ttl`, sorted.
pub async fn beat(
    conn: &mut RedisConn,
    id: &str,
    ttl: Duration,
) -> redis::RedisResult<(Millis, Vec<String>)> {
    let reply: Vec<Value> = BEAT
        .key(INSTANCES_KEY)
        .arg(id)
        .arg(ttl.as_millis() as u64)
        .invoke_async(conn)
        .await?;
    let now = int(reply.first())?;
    let mut live = reply[1..]
        .iter()
        .map(|v| text(Some(v)).map(Option::unwrap_or_default))
        .collect::<redis::RedisResult<Vec<String>>>()?;
    live.sort();
    Ok((now, live))
}

/// Removes instance `id` from the live ones (a clean stop).
pub async fn leave(conn: &mut RedisConn, id: &str) -> redis::RedisResult<()> {
    redis::cmd("ZREM")
        .arg(INSTANCES_KEY)
        .arg(id)
        .query_async(conn)
        .await
}

/// A fresh lease-owner tag (1 ..= 2^24 - 1; see `Account::set_owner`).
pub async fn next_owner(conn: &mut RedisConn) -> redis::RedisResult<u64> {
    let n: u64 = redis::cmd("INCR").arg(OWNERS_KEY).query_async(conn).await?;
    Ok(n % 0xFF_FFFF + 1)
}

/// Splits a stored ledger into its version and its JSON.
pub fn split(value: &str) -> Option<(u64, &str)> {
    let (version, json) = value.split_once('\n')?;
    Some((version.parse().ok()?, json))
}

fn int(value: Option<&Value>) -> redis::RedisResult<i64> {
    match value {
        Some(Value::Int(n)) => Ok(*n),
        other => Err(unexpected(other)),
    }
}

fn text(value: Option<&Value>) -> redis::RedisResult<Option<String>> {
    match value {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::BulkString(bytes)) => String::from_utf8(bytes.clone())
            .map(Some)
            .map_err(|_| unexpected(value)),
        other => Err(unexpected(other)),
    }
}

fn unexpected(value: Option<&Value>) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Client,
        "unexpected reply from a ledger script",
        format!("{value:?}"),
    ))
}
