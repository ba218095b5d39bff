//! The sections of `config.yaml` other than `providers` (see `super::providers`): one struct
//! each, with its defaults. Every key has a default and unknown keys are errors.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::codec;
use crate::secrets::Secret;

/// `server`: where the HTTP front door listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    /// 0 lets the OS pick (tests).
    pub port: u16,
    /// HTTP worker threads; 0 = one per core.
    pub workers: usize,
    /// How long in-flight requests may take to finish after a stop signal.
    #[serde(with = "codec::duration")]
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".to_string(),
            port: 8080,
            workers: 0,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// `runtime`: how actors are placed on threads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub arbiters: Arbiters,
}

/// How many arbiters (actor threads) host the pools: `auto` (one per core) or a number, where 0
/// runs everything on the caller's runtime (actor tests under a paused clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Arbiters {
    #[default]
    Auto,
    Count(usize),
}

impl Serialize for Arbiters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Arbiters::Auto => serializer.serialize_str("auto"),
            Arbiters::Count(n) => serializer.serialize_u64(*n as u64),
        }
    }
}

/// Accepts `auto`, a number, or a number as text (as a `QUOTAGATE__RUNTIME__ARBITERS` variable
/// gives it, since the key's default is the text `auto`).
impl<'de> Deserialize<'de> for Arbiters {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ArbitersVisitor;

        impl<'de> Visitor<'de> for ArbitersVisitor {
            type Value = Arbiters;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`auto` or a number of arbiters")
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Arbiters, E> {
                usize::try_from(n)
                    .map(Arbiters::Count)
                    .map_err(|_| E::custom(format!("too many arbiters: {n}")))
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Arbiters, E> {
                Err(E::custom(format!(
                    "must be `auto` or a number of 0 or more, got {n}"
                )))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Arbiters, E> {
                match text.trim() {
                    "auto" => Ok(Arbiters::Auto),
                    number => number.parse().map(Arbiters::Count).map_err(|_| {
                        E::custom(format!(
                            "must be `auto` or a number of 0 or more, got `{text}`"
                        ))
                    }),
                }
            }
        }

        deserializer.deserialize_any(ArbitersVisitor)
    }
}

/// `database`: Postgres or an embedded SQLite file, picked by the URL's scheme.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// As written (after `${VAR}` expansion); see [`super::Config::database_backend`] for its meaning.
    #[serde(serialize_with = "codec::redacted_url")]
    pub url: Secret,
    pub pool_size: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: Secret::new("sqlite://data/quotagate.db"),
            pool_size: 8,
        }
    }
}

/// `redis`: the seed's three keys, and how long a call may take. An empty host means no Redis.
///
/// With Redis, every account's ledger lives there and is shared by every instance on it
/// (API.md, "Several instances").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `host:port`; several, comma-separated (`h1:p1,h2:p2,…`), for a Redis Cluster (its seed
    /// nodes); empty for no Redis.
    pub host: String,
    pub password: Secret,
    /// The database number (standalone Redis only: a Cluster has only database 0).
    pub db: i64,
    /// A call to Redis that takes longer counts as failed: the instance keeps to its safe share
    /// until Redis answers again.
    #[serde(with = "codec::duration")]
    pub timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            host: String::new(),
            password: Secret::default(),
            db: 0,
            timeout: Duration::from_millis(500),
        }
    }
}

impl RedisConfig {
    /// The configured nodes (`host:port` each); more than one means a Redis Cluster.
    pub fn nodes(&self) -> Vec<&str> {
        self.host
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect()
    }
}

/// `instance`: this process among those that share one Redis and one database.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceConfig {
    /// Names this instance in Redis (its heartbeat) and in the database (its clean-shutdown mark);
    /// it must differ between instances and stay the same across restarts of one. Empty: the
    /// host name and the listening port (`host-8080`), which is both.
    pub id: String,
}

/// `sync`: how often account state is flushed, how long a reservation may stay unsettled, and
/// how the worker threads' capacity leases are reported and renewed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// With Redis: how often the instance says it is alive there (an instance silent for five
    /// of these no longer counts as live); also the unit of the peak rates kept for the
    /// crash-gap charge.
    #[serde(with = "codec::duration")]
    pub redis_interval: Duration,
    /// How often changed account state is copied to the database.
    #[serde(with = "codec::duration")]
    pub database_interval: Duration,
    #[serde(with = "codec::duration")]
    pub reservation_timeout: Duration,
    /// How often each worker thread reports what it used and refills its leases (`0s`: no
    /// leases; every request asks its account's actor). Unused leased units come back at each
    /// report, so this bounds how long an idle worker strands capacity.
    #[serde(with = "codec::duration")]
    pub report_interval: Duration,
    /// A lease its holder stops renewing counts as used in full after this.
    #[serde(with = "codec::duration")]
    pub lease_ttl: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            redis_interval: Duration::from_secs(1),
            database_interval: Duration::from_secs(5),
            reservation_timeout: Duration::from_secs(600),
            report_interval: Duration::from_millis(25),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// `upstream`: calls to the providers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(with = "codec::duration")]
    pub connect_timeout: Duration,
    /// Whole-request timeout; a provider's `timeout` replaces it.
    #[serde(with = "codec::duration")]
    pub timeout: Duration,
    /// Longest silence allowed inside a streamed answer.
    #[serde(with = "codec::duration")]
    pub stream_idle_timeout: Duration,
    /// Retries on another account, only before the first byte reached the client.
    pub retries: u32,
    /// The longest cooldown an upstream's "wait" (`retry-after` and the like) can set, and the
    /// longest a ceiling learned from `x-ratelimit-*` headers lasts; longer values are cut to it.
    #[serde(with = "codec::duration")]
    pub max_cooldown: Duration,
    /// How long an upstream 403 keeps that account away from that model (a 401 disables it).
    #[serde(with = "codec::duration")]
    pub forbidden_cooldown: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(120),
            stream_idle_timeout: Duration::from_secs(60),
            retries: 2,
            max_cooldown: Duration::from_secs(3600),
            forbidden_cooldown: Duration::from_secs(600),
        }
    }
}

/// `quota`: the per-account token quota's period and warning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    /// Fraction of the quota at which a warning event fires, in (0, 1].
    pub warning_threshold: f64,
    /// When quotas reset (five-field cron).
    pub reset_cron: String,
    /// IANA timezone of `reset_cron`.
    pub timezone: String,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            warning_threshold: 0.8,
            reset_cron: "0 0 * * *".to_string(),
            timezone: "UTC".to_string(),
        }
    }
}

/// `tracking`: request logs, written in batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackingConfig {
    /// Rows per database write.
    pub batch_size: usize,
    #[serde(with = "codec::duration")]
    pub flush_interval: Duration,
    /// Rows held in memory at most; beyond that rows are dropped (and counted).
    pub buffer: usize,
    /// Days request logs are kept.
    pub retention_days: u32,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            batch_size: 500,
            flush_interval: Duration::from_secs(1),
            buffer: 100_000,
            retention_days: 90,
        }
    }
}

/// `jobs`: schedules of the periodic jobs (five-field cron, UTC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Deletes request logs older than `tracking.retention_days`.
    pub cleanup_cron: String,
    /// Builds the daily provider statistics.
    pub aggregate_cron: String,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            cleanup_cron: "0 2 * * *".to_string(),
            aggregate_cron: "0 1 * * *".to_string(),
        }
    }
}

/// `notifications`: where quota events are POSTed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationsConfig {
    /// Empty = no webhook.
    pub webhook_url: String,
}

/// `security`: secrets the runtime generates (into `data_dir`) when they are left empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    pub admin_token: Secret,
    /// Encrypts credentials at rest: 32 bytes as 64 hex characters or base64.
    pub master_key: Secret,
    /// How long a status-page login lasts (a rotated admin token ends it sooner).
    #[serde(with = "codec::duration")]
    pub session_ttl: Duration,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            admin_token: Secret::default(),
            master_key: Secret::default(),
            session_ttl: Duration::from_secs(12 * 3600),
        }
    }
}

/// `logging`: level and line format of the logs on stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// off, error, warn, info, debug or trace (any case).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".to_string(),
            format: LogFormat::Json,
        }
    }
}

/// One JSON object per line, or readable text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}
