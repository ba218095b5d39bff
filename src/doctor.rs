//! `quotagate doctor`: checks the config, the database, Redis and each provider, and says what is
//! wrong in plain words with the fix. Exit status: 0 all good, 1 something fails, 2 bad config.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{Config, DatabaseBackend};
use crate::ledger::{RedisProblem, RedisTarget};
use crate::secrets::{MasterKey, MASTER_KEY_FILE};
use crate::store::{self, ConnectionFactory};

const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Check {
    pub status: Status,
    pub subject: String,
    pub message: String,
    pub fix: Option<String>,
}

impl Check {
    fn ok(subject: &str, message: impl Into<String>) -> Check {
        Check {
            status: Status::Ok,
            subject: subject.to_string(),
            message: message.into(),
            fix: None,
        }
    }

    fn problem(
        status: Status,
        subject: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            status,
            subject: subject.to_string(),
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Runs every check, prints the report on stdout and returns the exit status.
pub fn run(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            print_check(&Check::problem(
                Status::Fail,
                "config",
                e.to_string(),
                "correct the key named above; every key and its default is documented in the shipped config.yaml",
            ));
            return ExitCode::from(2);
        }
    };
    let checks = check_all(&config);
    for check in &checks {
        print_check(check);
    }
    if checks.iter().any(|c| c.status == Status::Fail) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_check(check: &Check) {
    let status = match check.status {
        Status::Ok => "ok",
        Status::Warn => "WARN",
        Status::Fail => "FAIL",
    };
    println!("{status:<5} {:<10} {}", check.subject, check.message);
    if let Some(fix) = &check.fix {
        println!("{:<16} fix: {fix}", "");
    }
}

/// All checks of a loaded config, in report order.
pub fn check_all(config: &Config) -> Vec<Check> {
    let accounts: usize = config.providers.iter().map(|p| p.accounts.len()).sum();
    let mut checks = vec![Check::ok(
        "config",
        format!(
            "{}: {} provider(s), {} account(s) declared",
            config.path.display(),
            config.providers.len(),
            accounts
        ),
    )];
    checks.push(check_master_key(config));
    checks.push(check_database(config));
    checks.push(check_redis(config));
    for provider in &config.providers {
        checks.push(check_reachable(&provider.name, &provider.base_url));
    }
    checks
}

fn check_master_key(config: &Config) -> Check {
    if !config.security.master_key.is_empty() {
        return Check::ok("secrets", "master key set in the config");
    }
    let path = config.data_dir.join(MASTER_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match MasterKey::parse(&text) {
            Ok(_) => Check::ok("secrets", format!("master key in {}", path.display())),
            Err(e) => Check::problem(
                Status::Fail,
                "secrets",
                format!("{} is not a valid master key: {e}", path.display()),
                "restore the file from a backup (the stored credentials need it)",
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::ok(
            "secrets",
            format!(
                "no master key yet: the first start generates {}",
                path.display()
            ),
        ),
        Err(e) => Check::problem(
            Status::Fail,
            "secrets",
            format!("cannot read {}: {e}", path.display()),
            "make the file readable by the user that runs quotagate",
        ),
    }
}

fn check_database(config: &Config) -> Check {
    let backend = config.database_backend();
    if let DatabaseBackend::Sqlite(path) = &backend {
        if !path.exists() {
            return Check::ok(
                "database",
                format!(
                    "sqlite://{} does not exist yet: `quotagate migrate` or the first start creates it",
                    path.display()
                ),
            );
        }
    }
    let factory = ConnectionFactory::new(backend.clone());
    let url = factory.display_url();
    let mut conn = match factory.connect() {
        Ok(conn) => conn,
        Err(e) => {
            let fix = match backend {
                DatabaseBackend::Postgres(_) => {
                    "start Postgres or correct database.url (host, port, user, password, database name)"
                }
                DatabaseBackend::Sqlite(_) => {
                    "check that the directory of the database file exists and is writable"
                }
            };
            return Check::problem(Status::Fail, "database", e.to_string(), fix);
        }
    };
    match store::pending_migrations(&mut conn) {
        Ok(pending) if pending.is_empty() => {
            Check::ok("database", format!("{url}: reachable, migrations applied"))
        }
        Ok(pending) => Check::problem(
            Status::Warn,
            "database",
            format!(
                "{url}: {} migration(s) not applied: {}",
                pending.len(),
                pending.join(", ")
            ),
            "run `quotagate migrate` (serve also applies them at start)",
        ),
        Err(e) => Check::problem(
            Status::Fail,
            "database",
            format!("{url}: cannot read the migration state: {e}"),
            "check that the database user may read and create tables",
        ),
    }
}

fn check_redis(config: &Config) -> Check {
    let target = match RedisTarget::from_config(&config.redis) {
        Ok(None) => {
            return Check::ok(
                "redis",
                "off (redis.host is empty): state is kept in memory and synced to the database",
            )
        }
        Ok(Some(target)) => target,
        Err(problem) => {
            return Check::problem(
                Status::Fail,
                "redis",
                problem.to_string(),
                "write redis.host as host:port, e.g. localhost:6379 (several, comma-separated, for a Redis Cluster)",
            )
        }
    };
    let result = actix_web::rt::System::new().block_on(target.ping(TIMEOUT));
    match result {
        Ok(()) => Check::ok(
            "redis",
            format!("{}: reachable, authenticated", config.redis.host),
        ),
        Err(problem) => {
            let fix = match &problem {
                RedisProblem::Auth { .. } => {
                    "set redis.password (or QUOTAGATE__REDIS__PASSWORD) to the server's requirepass"
                }
                RedisProblem::Unreachable { .. } | RedisProblem::Timeout { .. } => {
                    "start redis-server, or correct redis.host; set redis.host to \"\" to run without Redis"
                }
                RedisProblem::BadAddress(_) => "write redis.host as host:port",
                RedisProblem::Other { .. } => "check the Redis server's log (is redis.db within its database count?)",
            };
            Check::problem(Status::Fail, "redis", problem.to_string(), fix)
        }
    }
}

/// A provider is reachable when its host resolves and accepts a TCP connection.
fn check_reachable(name: &str, base_url: &str) -> Check {
    let subject = format!("provider {name}");
    let Some((host, port)) = host_and_port(base_url) else {
        return Check::problem(
            Status::Fail,
            &subject,
            format!("base_url `{base_url}` has no host"),
            "write base_url as https://host[:port]/path",
        );
    };
    let target = format!("{host}:{port}");
    let addrs = match target.to_socket_addrs() {
        Ok(addrs) => addrs.collect::<Vec<_>>(),
        Err(e) => {
            return Check::problem(
                Status::Fail,
                &subject,
                format!("cannot resolve {host}: {e}"),
                "check the host name in base_url and this machine's DNS",
            )
        }
    };
    let mut last_error = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(_) => return Check::ok(&subject, format!("{target} accepts connections")),
            Err(e) => last_error = e.to_string(),
        }
    }
    Check::problem(
        Status::Fail,
        &subject,
        format!("cannot connect to {target}: {last_error}"),
        "check base_url and that this machine may reach the provider (firewall, proxy)",
    )
}

fn host_and_port(base_url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = base_url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    let default_port = if scheme == "https" { 443 } else { 80 };
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            let port = port.parse().ok()?;
            Some((host.trim_matches(['[', ']']).to_string(), port))
        }
        _ if authority.is_empty() => None,
        _ => Some((authority.trim_matches(['[', ']']).to_string(), default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_give_host_and_port() {
        assert_eq!(
            host_and_port("https://api.groq.com/openai/v1"),
            Some(("api.groq.com".into(), 443))
        );
        assert_eq!(
            host_and_port("http://127.0.0.1:9000/v1"),
            Some(("127.0.0.1".into(), 9000))
        );
        assert_eq!(host_and_port("http:///v1"), None);
    }
}
