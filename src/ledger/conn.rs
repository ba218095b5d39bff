//! The Redis link: a standalone server or a Redis Cluster, from `redis.{host,password,db,timeout}`,
//! and what is wrong with it in words an operator can act on.
//!
//! Both kinds are reached through one connection type ([`RedisConn`]) that reconnects by itself
//! (the `redis` crate's connection manager, or its cluster connection, which follows slot moves):
//! a call fails within `redis.timeout` while Redis is away and works again once it is back.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo as _, RedisConnectionInfo};
use redis::{Pipeline, RedisFuture, Value};

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

/// Where Redis is: one server, or the seed nodes of a Redis Cluster (`redis.host` lists several).
#[derive(Clone)]
pub enum RedisTarget {
    Standalone(redis::Client),
    Cluster(Box<ClusterClient>),
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr())
    }
}

impl RedisTarget {
    /// The target `config` names; `None` when `redis.host` is empty (Redis off).
    ///
    /// Errors: [`RedisProblem::BadAddress`] for a host that is not `host:port`.
    pub fn from_config(config: &RedisConfig) -> Result<Option<RedisTarget>, RedisProblem> {
        let nodes = config.nodes();
        let infos = nodes
            .iter()
            .map(|node| connection_info(node, config))
            .collect::<Result<Vec<_>, _>>()?;
        match infos.len() {
            0 => Ok(None),
            1 => {
                let info = infos.into_iter().next().expect("one node");
                redis::Client::open(info)
                    .map(|c| Some(RedisTarget::Standalone(c)))
                    .map_err(|_| RedisProblem::BadAddress(config.host.clone()))
            }
            _ => {
                let mut builder = ClusterClient::builder(infos)
                    .connection_timeout(config.timeout)
                    .response_timeout(config.timeout)
                    .retries(1);
                if !config.password.is_empty() {
                    builder = builder.password(config.password.expose());
                }
                builder
                    .build()
                    .map(|c| Some(RedisTarget::Cluster(Box::new(c))))
                    .map_err(|_| RedisProblem::BadAddress(config.host.clone()))
            }
        }
    }

    /// The address(es) to name in messages (never the password).
    pub fn addr(&self) -> String {
        match self {
            RedisTarget::Standalone(c) => c.get_connection_info().addr().to_string(),
            RedisTarget::Cluster(_) => "the Redis Cluster".to_string(),
        }
    }

    /// Connects within `timeout`. The connection reconnects by itself afterwards; each call on it
    /// fails after `timeout` without an answer.
    pub async fn connect(&self, timeout: Duration) -> Result<RedisConn, RedisProblem> {
        let addr = self.addr();
        let attempt = async {
            match self {
                RedisTarget::Standalone(client) => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout))
                        .set_number_of_retries(1);
                    client
                        .get_connection_manager_with_config(config)
                        .await
                        .map(RedisConn::Standalone)
                }
                RedisTarget::Cluster(client) => client
                    .get_async_connection()
                    .await
                    .map(|c| RedisConn::Cluster(Box::new(c))),
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(classify(&addr, &e)),
            Err(_) => Err(RedisProblem::Timeout { addr, timeout }),
        }
    }

    /// Connects and sends PING within `timeout` (readiness, `doctor`).
    pub async fn ping(&self, timeout: Duration) -> Result<(), RedisProblem> {
        let addr = self.addr();
        let attempt = async {
            let mut conn = self.connect(timeout).await?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(|e| classify(&addr, &e))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(RedisProblem::Timeout { addr, timeout }),
        }
    }
}

/// `host:port` with the password and database of `config`.
fn connection_info(
    node: &str,
    config: &RedisConfig,
) -> Result<redis::ConnectionInfo, RedisProblem> {
    let bad = || RedisProblem::BadAddress(node.to_string());
    let (host, port) = node.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let mut settings = RedisConnectionInfo::default().set_db(config.db);
    if !config.password.is_empty() {
        settings = settings.set_password(config.password.expose());
    }
    Ok(
        ConnectionAddr::Tcp(host.trim_matches(['[', ']']).to_string(), port)
            .into_connection_info()
            .map_err(|_| bad())?
            .set_redis_settings(settings),
    )
}

/// A connection to a standalone Redis or to a Redis Cluster. Cheap to clone: clones share one
/// multiplexed connection (per node, for a cluster).
#[derive(Clone)]
pub enum RedisConn {
    Standalone(ConnectionManager),
    Cluster(Box<ClusterConnection>),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Standalone(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
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
