//! `config.yaml`: typed, defaulted, overridable from the environment, validated once at start.
//!
//! [`Config::load`] runs these steps on the YAML value tree, then on the typed value:
//!
//! 1. parse the YAML (a syntax error reports its line and column) and apply `<<` merge keys;
//! 2. drop keys left empty (`key:` or `key: null`): they take their default;
//! 3. apply `QUOTAGATE__SECTION__KEY` variables to scalar keys outside `providers` (the name is
//!    matched without regard to case; an unknown one is an error). Where the key's default is a
//!    number or a boolean the value is read as a YAML scalar, otherwise it is taken verbatim;
//! 4. expand `${VAR}` and `${VAR:-default}` in every string value, the overrides' included
//!    (comments are gone by then, so they are never expanded). `$$` is a literal `$`, and a `$`
//!    not followed by `{` is kept as it is. Expansion yields strings: numbers come from
//!    `QUOTAGATE__…` variables instead;
//! 5. deserialise into the sections' structs (`sections`, `providers`): every key has a default,
//!    unknown keys are errors with their full path (`providers[0].accounts[1].quota_limt`);
//! 6. resolve `data_dir` and an SQLite file against the config file's directory, and check the
//!    database URL;
//! 7. validate what the types cannot (ranges, cron expressions, timezones, unique names, …).
//!
//! Whatever fails is one [`ConfigError`] line naming the file and the key. Nothing here is
//! global: every command and test loads its own [`Config`] and passes it on as a value.

mod codec;
mod error;
mod providers;
mod sections;
mod tree;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use error::ConfigError;
pub use providers::{
    AccountConfig, AuthConfig, Credentials, LimitValue, ModelConfig, Price, ProviderConfig,
    RateLimitHeaders, RateLimitsConfig, WindowConfig,
};
pub use sections::{
    Arbiters, DatabaseConfig, InstanceConfig, JobsConfig, LogFormat, LoggingConfig,
    NotificationsConfig, QuotaConfig, RedisConfig, RuntimeConfig, SecurityConfig, ServerConfig,
    SyncConfig, TrackingConfig, UpstreamConfig,
};

use crate::secrets::Secret;
use error::Issue;

/// The whole configuration, as loaded from one file and the environment.
///
/// `Serialize` gives the effective configuration with every secret as `***` (and the database URL
/// redacted); `Debug` never shows a secret either.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub server: ServerConfig,
    pub runtime: RuntimeConfig,
    /// Where generated secrets live; absolute (resolved against the config file's directory).
    pub data_dir: PathBuf,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    /// `instance.id` resolved: never empty.
    pub instance: InstanceConfig,
    pub sync: SyncConfig,
    pub upstream: UpstreamConfig,
    pub quota: QuotaConfig,
    pub tracking: TrackingConfig,
    pub jobs: JobsConfig,
    pub notifications: NotificationsConfig,
    pub security: SecurityConfig,
    pub logging: LoggingConfig,
    pub providers: Vec<ProviderConfig>,
    /// The absolute path of the file this was read from.
    #[serde(skip)]
    pub path: PathBuf,
    /// `database.url` parsed during load, so a bad URL is refused at start, not at first use.
    #[serde(skip)]
    backend: DatabaseBackend,
}

/// The file's shape: [`Config`] before paths are resolved. Its serialised default is also the
/// list of keys that `QUOTAGATE__…` variables may name.
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    server: ServerConfig,
    runtime: RuntimeConfig,
    data_dir: PathBuf,
    database: DatabaseConfig,
    redis: RedisConfig,
    instance: InstanceConfig,
    sync: SyncConfig,
    upstream: UpstreamConfig,
    quota: QuotaConfig,
    tracking: TrackingConfig,
    jobs: JobsConfig,
    notifications: NotificationsConfig,
    security: SecurityConfig,
    logging: LoggingConfig,
    providers: Vec<ProviderConfig>,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            server: ServerConfig::default(),
            runtime: RuntimeConfig::default(),
            data_dir: PathBuf::from("data"),
            database: DatabaseConfig::default(),
            redis: RedisConfig::default(),
            instance: InstanceConfig::default(),
            sync: SyncConfig::default(),
            upstream: UpstreamConfig::default(),
            quota: QuotaConfig::default(),
            tracking: TrackingConfig::default(),
            jobs: JobsConfig::default(),
            notifications: NotificationsConfig::default(),
            security: SecurityConfig::default(),
            logging: LoggingConfig::default(),
            providers: Vec::new(),
        }
    }
}

impl Config {
    /// Loads `path` with the process environment (for `QUOTAGATE__…` and `${VAR}`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // `vars_os` rather than `vars`, which panics on a non-UTF-8 variable; such variables
        // cannot be meant for us and are skipped.
        let env: BTreeMap<String, String> = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect();
        Config::load_with_env(path, &env)
    }

    /// Loads `path` with the given environment instead of the process's (for tests).
    pub fn load_with_env(
        path: &Path,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let path = absolute(path);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::new(&path, "", format!("cannot read the file: {e}")))?;
        Config::from_yaml(&text, &path, env)
    }

    /// Builds the configuration from `text`. `path` is used only in messages and to resolve
    /// relative paths; the file is not read.
    pub fn from_yaml(
        text: &str,
        path: &Path,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let path = absolute(path);
        let mut overridden = BTreeMap::new();
        build(text, &path, env, &mut overridden)
            .map_err(|issue| ConfigError::from_issue(&path, issue, &overridden))
    }

    /// The database `database.url` selects (checked during load).
    pub fn database_backend(&self) -> DatabaseBackend {
        self.backend.clone()
    }
}

fn build(
    text: &str,
    path: &Path,
    env: &BTreeMap<String, String>,
    overridden: &mut BTreeMap<String, String>,
) -> Result<Config, Issue> {
    let mut root = tree::parse(text)?;
    tree::drop_empty_keys(&mut root);
    let defaults = yaml_serde::to_value(FileConfig::default())
        .map_err(|e| Issue::new("", format!("internal error: cannot list the keys: {e}")))?;
    *overridden = tree::apply_env_overrides(&mut root, &defaults, env)?;
    let mut tree = yaml_serde::Value::Mapping(root);
    tree::expand_vars(&mut tree, "", env)?;

    let file: FileConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
        let key = key_path(e.path());
        Issue::new(key, serde_problem(&e.into_inner().to_string()))
    })?;

    let dir = path.parent().unwrap_or(Path::new("/"));
    if file.data_dir.as_os_str().is_empty() {
        return Err(Issue::new("data_dir", "must not be empty"));
    }
    let backend = DatabaseBackend::from_url(file.database.url.expose(), dir)
        .map_err(|problem| Issue::new("database.url", problem))?;
    let instance_id = instance_id(&file.instance.id, file.server.port);
    let config = Config {
        server: file.server,
        runtime: file.runtime,
        data_dir: resolve(dir, &file.data_dir),
        database: file.database,
        redis: file.redis,
        instance: InstanceConfig { id: instance_id },
        sync: file.sync,
        upstream: file.upstream,
        quota: file.quota,
        tracking: file.tracking,
        jobs: file.jobs,
        notifications: file.notifications,
        security: file.security,
        logging: file.logging,
        providers: file.providers,
        path: path.to_path_buf(),
        backend,
    };
    validate::validate(&config)?;
    Ok(config)
}

/// `providers[0].accounts[1].quota_limit`, from serde_path_to_error's segments.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;

    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
            Segment::Unknown => key.push_str(if key.is_empty() { "?" } else { ".?" }),
        }
    }
    key
}

/// serde's messages in the words of a config file where they are about keys or ranges (the
/// key itself is already in the path): "unknown field `x`, expected one of …" and "invalid
/// value: integer `-1`, expected u32".
fn serde_problem(message: &str) -> String {
    if let Some((_, expected)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once("`, "))
    {
        return format!("unknown key ({expected})");
    }
    if let Some((number, expected)) = message
        .strip_prefix("invalid value: integer `")
        .and_then(|rest| rest.split_once("`, expected "))
    {
        let max = match expected {
            "u16" => Some(u64::from(u16::MAX)),
            "u32" => Some(u64::from(u32::MAX)),
            "u64" | "usize" => Some(u64::MAX),
            _ => None,
        };
        if let Some(max) = max {
            return if number.starts_with('-') {
                format!("must not be negative (got {number})")
            } else {
                format!("must be at most {max} (got {number})")
            };
        }
    }
    message.to_string()
}

/// `path` made absolute against the current directory, without touching the file system
/// beyond that (the file may not exist yet, and symlinks are kept as the user wrote them).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `instance.id` as configured, else `<host name>-<port>` (stable across restarts, unique per
/// machine); with port 0 (any free port) the process id stands in for the port.
fn instance_id(configured: &str, port: u16) -> String {
    let configured = configured.trim();
    if !configured.is_empty() {
        return configured.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "quotagate".to_string());
    match port {
        0 => format!("{host}-pid{}", std::process::id()),
        port => format!("{host}-{port}"),
    }
}

fn resolve(dir: &Path, path: &Path) -> PathBuf {
    absolute(&dir.join(path))
}

/// The database `database.url` selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseBackend {
    /// An SQLite file, absolute: `sqlite://data/q.db` is relative to the config file's directory,
    /// `sqlite:///var/lib/q.db` is absolute.
    Sqlite(PathBuf),
    /// A Postgres server: the full `postgres://` or `postgresql://` URL.
    Postgres(Secret),
}

impl DatabaseBackend {
    /// Messages name the scheme at most: the rest of the URL may hold a password.
    fn from_url(url: &str, dir: &Path) -> Result<DatabaseBackend, String> {
        const USE: &str = "use sqlite://FILE or postgres://user:password@host/db";
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!("not a database URL ({USE})"));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => match rest {
                "" => Err(format!("the SQLite URL names no file ({USE})")),
                ":memory:" => Err(
                    "an in-memory SQLite database is not supported: each pooled \
                                   connection would see its own empty database"
                        .to_string(),
                ),
                file => Ok(DatabaseBackend::Sqlite(resolve(dir, Path::new(file)))),
            },
            "postgres" | "postgresql" => Ok(DatabaseBackend::Postgres(Secret::new(url))),
            other => Err(format!("unsupported database scheme `{other}` ({USE})")),
        }
    }
}
