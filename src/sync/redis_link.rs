//! The Redis link: building the client from `redis.{host,password,db}`, telling what is wrong
//! with a link, and the keys the sync writes.

use std::time::Duration;

use redis::{ConnectionAddr, ErrorKind, IntoConnectionInfo as _, RedisConnectionInfo};

use crate::config::RedisConfig;

/// What went wrong when talking to Redis, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisProblem {
    #[error("redis.host `{0}` is not host:port")]
    BadAddress(String),
    #[error("Redis at {addr} refused the password (check redis.password): {detail}")]
    Auth { addr: String, detail: String },
    #[error("Redis at {addr} is not reachable: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("Redis at {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("Redis at {addr} answered with an error: {detail}")]
    Other { addr: String, detail: String },
}

/// The Redis client for the configured link; `None` when `redis.host` is empty (Redis off).
pub fn client(config: &RedisConfig) -> Result<Option<redis::Client>, RedisProblem> {
    if config.host.trim().is_empty() {
        return Ok(None);
    }
    let bad = || RedisProblem::BadAddress(config.host.clone());
    let (host, port) = config.host.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let mut settings = RedisConnectionInfo::default().set_db(config.db);
    if !config.password.is_empty() {
        settings = settings.set_password(config.password.expose());
    }
    let info = ConnectionAddr::Tcp(host.trim_matches(['[', ']']).to_string(), port)
        .into_connection_info()
        .map_err(|_| bad())?
        .set_redis_settings(settings);
    redis::Client::open(info).map(Some).map_err(|_| bad())
}

/// Connects and sends PING within `timeout`.
pub async fn ping(client: &redis::Client, timeout: Duration) -> Result<(), RedisProblem> {
    let addr = client.get_connection_info().addr().to_string();
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(classify(&addr, &e)),
        Err(_) => Err(RedisProblem::Timeout { addr, timeout }),
    }
}

/// Sorts a Redis error into what the operator should do about it.
pub fn classify(addr: &str, e: &redis::RedisError) -> RedisProblem {
    let detail = e.to_string();
    let addr = addr.to_string();
    let auth = e.kind() == ErrorKind::AuthenticationFailed
        || detail.contains("NOAUTH")
        || detail.contains("WRONGPASS")
        || detail.contains("invalid password");
    if auth {
        RedisProblem::Auth { addr, detail }
    } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
        RedisProblem::Unreachable { addr, detail }
    } else if e.is_timeout() {
        RedisProblem::Timeout {
            addr,
            timeout: Duration::ZERO,
        }
    } else {
        RedisProblem::Other { addr, detail }
    }
}

/// The Redis key of an account's state.
pub fn account_key(account_id: &str) -> String {
    format!("quotagate:account:{{{account_id}}}")
}

/// The Redis key of the sync heartbeat.
pub const HEARTBEAT_KEY: &str = "quotagate:heartbeat";
