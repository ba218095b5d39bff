//! The command line: `quotagate [--config FILE] <command>`.
//!
//! Exit status: 0 on success, 2 for a bad config file or bad arguments, 1 for any other failure.
//! Secrets a command creates (keys, tokens) go to stdout once, never through the logger.
//! `quotagate status`, which draws the status snapshot in a terminal, is in `status`.

mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, Credentials};
use crate::domain::{Strategy, Tokenizer};
use crate::manage::{self, NewAccount, NewProvider};
use crate::secrets::{self, MasterKey, Secret, SecretsError};
use crate::store::providers::{self, Source};
use crate::store::{self, accounts, keys, open_store, settings, StoreError};

#[derive(Debug, Parser)]
#[command(
    name = "quotagate",
    version,
    about = "Quota and account-pool gateway for LLM APIs"
)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        long,
        global = true,
        default_value = "config.yaml",
        value_name = "FILE"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Check the config, the database, Redis and each provider, and say what is wrong.
    Doctor,
    /// Manage providers.
    #[command(subcommand)]
    Provider(ProviderCommand),
    /// Manage provider accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Manage client keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage the admin token.
    #[command(subcommand, name = "admin-token")]
    AdminToken(AdminTokenCommand),
    /// Show every pool and account (state, quota, rate windows, cooldowns), from a running
    /// gateway (admin token in QUOTAGATE_ADMIN_TOKEN) or from the database.
    Status(status::StatusArgs),
    /// Copy the embedded database to FILE while the server runs.
    Backup {
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    /// Add a provider (an OpenAI-compatible API).
    Add(ProviderAddArgs),
    /// List providers.
    List,
}

#[derive(Debug, Args)]
pub struct ProviderAddArgs {
    #[arg(long)]
    pub name: String,
    /// e.g. https://api.groq.com/openai/v1
    #[arg(long)]
    pub base_url: String,
    #[arg(long, default_value = "least_used", value_parser = parse_from_str::<Strategy>)]
    pub strategy: Strategy,
    /// A model the provider serves (repeat for several).
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    #[arg(long, default_value_t = 4096)]
    pub max_completion_tokens: u64,
    #[arg(long, default_value = "chars:3", value_parser = parse_from_str::<Tokenizer>)]
    pub tokenizer: Tokenizer,
    #[arg(long, default_value = "Authorization")]
    pub auth_header: String,
    /// The scheme before the key in the auth header; empty sends the bare key.
    #[arg(long, default_value = "Bearer")]
    pub auth_scheme: String,
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Add an account to a provider. The key is read from --api-key-env or stdin so that it does
    /// not land in the shell history.
    Add(AccountAddArgs),
    /// List accounts (their keys are never shown, only a masked tail).
    List {
        /// Only this provider's accounts (id or name).
        #[arg(long)]
        provider: Option<String>,
    },
    /// Disable an account (id, provider/name, or a unique name).
    Disable {
        account: String,
        #[arg(long, default_value = "disabled from the command line")]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct AccountAddArgs {
    /// The provider's id or name.
    #[arg(long)]
    pub provider: String,
    #[arg(long)]
    pub name: String,
    /// Read the API key from this environment variable (default: the first line of stdin).
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Tokens per quota period; 0 = unlimited.
    #[arg(long, default_value_t = 0)]
    pub quota_limit: u64,
    /// RFC 3339 time after which the account is not used.
    #[arg(long)]
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a client key; it is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// The user the key belongs to (created when new; default: the key's name).
        #[arg(long)]
        user: Option<String>,
    },
    /// List client keys (prefixes only).
    List,
    /// Revoke a client key (id or name).
    Revoke { key: String },
}

#[derive(Debug, Subcommand)]
pub enum AdminTokenCommand {
    /// Make a new admin token (printed once); the old one stops working.
    Rotate,
}

fn parse_from_str<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

/// Everything a command can fail with; the exit status follows from the variant.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Secrets(#[from] SecretsError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Config(_) | CliError::Usage(_) => ExitCode::from(2),
            _ => ExitCode::from(1),
        }
    }
}

/// Parses the command line, runs the command, and turns an error into one line on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("quotagate: {err}");
            err.exit_code()
        }
    }
}

pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    if let Command::Doctor = cli.command {
        return Ok(crate::doctor::run(&cli.config));
    }
    let config = Config::load(&cli.config)?;
    crate::logging::init(&config.logging.level, config.logging.format);
    let done = match cli.command {
        Command::Serve => crate::server::run(config).map_err(CliError::Failed),
        Command::Migrate => migrate(&config),
        Command::Doctor => unreachable!("handled before the config is loaded"),
        Command::Provider(cmd) => provider(&config, cmd),
        Command::Account(cmd) => account(&config, cmd),
        Command::Key(cmd) => key(&config, cmd),
        Command::AdminToken(AdminTokenCommand::Rotate) => rotate_admin_token(&config),
        Command::Backup { to } => backup(&config, &to),
        Command::Status(args) => status::run(&config, &args),
    };
    // Log lines are written by a thread of their own: let it finish before the process ends.
    crate::logging::flush(std::time::Duration::from_secs(2));
    done.map(|()| ExitCode::SUCCESS)
}

fn migrate(config: &Config) -> Result<(), CliError> {
    let (store, applied) = store::open_and_log_migrations(config)?;
    if applied.is_empty() {
        println!("database {} is up to date", store.display_url());
    } else {
        println!(
            "database {}: applied {}",
            store.display_url(),
            applied.join(", ")
        );
    }
    Ok(())
}

fn provider(config: &Config, cmd: ProviderCommand) -> Result<(), CliError> {
    let store = open_store(config)?;
    let mut conn = store.conn()?;
    match cmd {
        ProviderCommand::Add(args) => {
            let new = NewProvider {
                name: args.name,
                base_url: args.base_url,
                strategy: args.strategy,
                auth_header: args.auth_header,
                auth_scheme: args.auth_scheme,
                timeout_ms: None,
                max_completion_tokens: args.max_completion_tokens,
                tokenizer: args.tokenizer,
                models: args.models.into_iter().map(|m| (m, 0.0, 0.0)).collect(),
                limits: Vec::new(),
            };
            let row = manage::add_provider(&mut conn, &new, Source::Api)?;
            println!("created provider {} ({})", row.name, row.id);
        }
        ProviderCommand::List => {
            let rows = providers::list(&mut conn)?;
            let mut table = vec![[
                "NAME", "ID", "BASE_URL", "STRATEGY", "MODELS", "ACTIVE", "SOURCE",
            ]
            .map(String::from)
            .to_vec()];
            for row in rows {
                let models = providers::list_models(&mut conn, &row.id)?;
                let models: Vec<String> = models.into_iter().map(|m| m.name).collect();
                table.push(vec![
                    row.name,
                    row.id,
                    row.base_url,
                    row.strategy,
                    models.join(","),
                    row.active.to_string(),
                    row.source,
                ]);
            }
            print_table(&table);
        }
    }
    Ok(())
}

fn account(config: &Config, cmd: AccountCommand) -> Result<(), CliError> {
    let store = open_store(config)?;
    let mut conn = store.conn()?;
    match cmd {
        AccountCommand::Add(args) => {
            let api_key = read_api_key(args.api_key_env.as_deref())?;
            let (master_key, _) =
                MasterKey::load_or_generate(&config.security.master_key, &config.data_dir)?;
            let new = NewAccount {
                provider: args.provider,
                name: args.name,
                credentials: Credentials {
                    api_key,
                    headers: Default::default(),
                },
                quota_limit: args.quota_limit,
                expires_at: args.expires_at,
                active: true,
            };
            let created = manage::add_account(&mut conn, &master_key, &new, Source::Api, "cli")?;
            println!(
                "created account {} ({}), key {}",
                created.qualified_name(),
                created.account.id,
                created.account.credentials_hint
            );
        }
        AccountCommand::List { provider } => {
            let provider_id = match provider {
                Some(p) => Some(providers::find(&mut conn, &p)?.id),
                None => None,
            };
            let rows = accounts::list(&mut conn, provider_id.as_deref())?;
            let mut table = vec![[
                "ACCOUNT",
                "ID",
                "KEY",
                "ACTIVE",
                "QUOTA_USED",
                "QUOTA_LIMIT",
                "EXPIRES_AT",
                "SOURCE",
            ]
            .map(String::from)
            .to_vec()];
            for row in rows {
                let name = row.qualified_name();
                let a = row.account;
                let active = match (&a.active, &a.disabled_reason) {
                    (true, _) => "yes".to_string(),
                    (false, Some(reason)) => format!("no ({reason})"),
                    (false, None) => "no".to_string(),
                };
                table.push(vec![
                    name,
                    a.id,
                    a.credentials_hint,
                    active,
                    a.quota_used.to_string(),
                    if a.quota_limit == 0 {
                        "unlimited".to_string()
                    } else {
                        a.quota_limit.to_string()
                    },
                    a.expires_at
                        .map(|t| t.and_utc().to_rfc3339())
                        .unwrap_or_else(|| "-".into()),
                    a.source,
                ]);
            }
            print_table(&table);
        }
        AccountCommand::Disable { account, reason } => {
            let found = manage::disable_account(&mut conn, &account, "cli", &reason)?;
            println!(
                "disabled account {} ({})",
                found.qualified_name(),
                found.account.id
            );
        }
    }
    Ok(())
}

fn read_api_key(env_var: Option<&str>) -> Result<Secret, CliError> {
    let key = match env_var {
        Some(var) => std::env::var(var)
            .map_err(|_| CliError::Usage(format!("--api-key-env: ${var} is not set")))?,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| CliError::Usage(format!("cannot read the API key from stdin: {e}")))?;
            line
        }
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(CliError::Usage(
            "no API key given: pipe it on stdin or name a variable with --api-key-env".into(),
        ));
    }
    Ok(Secret::new(key))
}

fn key(config: &Config, cmd: KeyCommand) -> Result<(), CliError> {
    let store = open_store(config)?;
    let mut conn = store.conn()?;
    match cmd {
        KeyCommand::Create { name, user } => {
            let user = user.unwrap_or_else(|| name.clone());
            let (created, token) = manage::create_key(&mut conn, &name, &user)?;
            println!(
                "created key {} ({}) for user {}; it is shown only now:",
                created.key.name, created.key.id, created.user_name
            );
            println!("{}", token.expose());
        }
        KeyCommand::List => {
            let mut table = vec![["NAME", "ID", "USER", "PREFIX", "CREATED_AT", "REVOKED_AT"]
                .map(String::from)
                .to_vec()];
            for k in keys::list(&mut conn)? {
                table.push(vec![
                    k.key.name,
                    k.key.id,
                    k.user_name,
                    format!("{}…", k.key.prefix),
                    k.key.created_at.and_utc().to_rfc3339(),
                    k.key
                        .revoked_at
                        .map(|t| t.and_utc().to_rfc3339())
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            print_table(&table);
        }
        KeyCommand::Revoke { key } => {
            let revoked = manage::revoke_key(&mut conn, &key)?;
            println!("revoked key {} ({})", revoked.name, revoked.id);
        }
    }
    Ok(())
}

fn rotate_admin_token(config: &Config) -> Result<(), CliError> {
    if !config.security.admin_token.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: security.admin_token is set in the config; change it there (rotate only replaces a \
             generated token)",
            config.path.display()
        )));
    }
    let store = open_store(config)?;
    let token = secrets::generate_token(manage::ADMIN_TOKEN_PREFIX);
    settings::put(
        &mut *store.conn()?,
        settings::ADMIN_TOKEN_HASH,
        &secrets::hash_token(token.expose()),
    )?;
    println!("new admin token (shown only now; the old one no longer works):");
    println!("{}", token.expose());
    Ok(())
}

fn backup(config: &Config, to: &Path) -> Result<(), CliError> {
    let store = open_store(config)?;
    store::backup_sqlite(&mut *store.conn()?, to)?;
    println!("copied {} to {}", store.display_url(), to.display());
    Ok(())
}

/// Prints rows as left-aligned columns.
fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}
