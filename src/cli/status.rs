//! `quotagate status`: the status page's picture in a terminal.
//!
//! From a running gateway (`GET /api/v1/status` at `--url`, default the configured address, with
//! the admin token from `QUOTAGATE_ADMIN_TOKEN` or the config), or — when none answers there, or
//! with `--offline` — from the database as of the last sync ([`crate::status::offline`]). `--watch`
//! redraws every `--interval` until interrupted; `--json` prints the snapshot as JSON.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use clap::Args;

use super::CliError;
use crate::config::Config;
use crate::status::table::{self, Colors};
use crate::status::{offline, Snapshot};

/// The environment variable the admin token is read from.
pub const TOKEN_ENV: &str = "QUOTAGATE_ADMIN_TOKEN";

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The gateway's address (default: the configured server.host and server.port).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Read the database instead of asking a running gateway.
    #[arg(long)]
    pub offline: bool,
    /// Redraw until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// How often --watch redraws (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Print the snapshot as JSON (as `GET /api/v1/status` answers).
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| e.to_string())
        .and_then(|d| {
            if d.is_zero() {
                Err("must be more than 0".into())
            } else {
                Ok(d)
            }
        })
}

/// Where the picture comes from.
enum Source {
    Gateway { url: String, token: Option<String> },
    Database,
}

/// Why a gateway gave no snapshot.
enum Unreachable {
    /// Nothing listens there: fall back to the database.
    NotRunning(String),
    /// Something answered, but not with a snapshot: say so.
    Failed(String),
}

/// The configured address as a URL (a wildcard host is reached on loopback).
fn default_url(config: &Config) -> String {
    let host = match config.server.host.as_str() {
        "0.0.0.0" | "" => "127.0.0.1",
        "::" | "[::]" => "[::1]",
        h => h,
    };
    format!("http://{host}:{}", config.server.port)
}

/// Runs the command.
pub fn run(config: &Config, args: &StatusArgs) -> Result<(), CliError> {
    let source = if args.offline {
        Source::Database
    } else {
        let token = std::env::var(TOKEN_ENV)
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| {
                let configured = config.security.admin_token.expose();
                (!configured.is_empty()).then(|| configured.to_string())
            });
        let url = args.url.clone().unwrap_or_else(|| default_url(config));
        Source::Gateway {
            url: url.trim_end_matches('/').to_string(),
            token,
        }
    };
    let colors = if args.json
        || std::env::var_os("NO_COLOR").is_some()
        || !std::io::stdout().is_terminal()
    {
        Colors::Off
    } else {
        Colors::On
    };
    actix_rt::System::new().block_on(async {
        let mut first = true;
        loop {
            let frame = frame(config, &source, args.json, colors).await;
            let mut out = std::io::stdout().lock();
            match frame {
                Ok(text) => {
                    if args.watch {
                        // Home and clear: each frame replaces the last.
                        let _ = write!(out, "\x1b[H\x1b[2J");
                    }
                    let _ = write!(out, "{text}");
                    let _ = out.flush();
                }
                Err(e) if !args.watch || first => return Err(e),
                Err(e) => {
                    let _ = writeln!(out, "quotagate: {e} (retrying)");
                }
            }
            drop(out);
            first = false;
            if !args.watch {
                return Ok(());
            }
            actix_rt::time::sleep(args.interval).await;
        }
    })
}

/// One picture, rendered.
async fn frame(
    config: &Config,
    source: &Source,
    json: bool,
    colors: Colors,
) -> Result<String, CliError> {
    let (snapshot, from) = match source {
        Source::Database => (
            offline(config)?,
            "from the database (as of the last sync)".to_string(),
        ),
        Source::Gateway { url, token } => match fetch(url, token.as_deref()).await {
            Ok(snapshot) => (snapshot, format!("from {url}")),
            Err(Unreachable::NotRunning(why)) => (
                offline(config)?,
                format!("no gateway at {url} ({why}): from the database (as of the last sync)"),
            ),
            Err(Unreachable::Failed(why)) => return Err(CliError::Failed(why)),
        },
    };
    if json {
        let mut text =
            serde_json::to_string_pretty(&snapshot).map_err(|e| CliError::Failed(e.to_string()))?;
        text.push('\n');
        return Ok(text);
    }
    Ok(table::render(&snapshot, &from, colors))
}

fn offline(config: &Config) -> Result<Snapshot, CliError> {
    let store = crate::store::open_store(config)?;
    offline::snapshot(config, &store).map_err(CliError::Failed)
}

async fn fetch(url: &str, token: Option<&str>) -> Result<Snapshot, Unreachable> {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish();
    let mut request = client.get(format!("{url}/api/v1/status"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let mut response = request.send().await.map_err(|e| match e {
        awc::error::SendRequestError::Connect(c) => Unreachable::NotRunning(c.to_string()),
        other => Unreachable::Failed(format!("{url}: {other}")),
    })?;
    let status = response.status();
    if status == awc::http::StatusCode::UNAUTHORIZED {
        return Err(Unreachable::Failed(match token {
            None => format!("{url} wants the admin token: set {TOKEN_ENV}"),
            Some(_) => format!("{url} refused the admin token in {TOKEN_ENV}"),
        }));
    }
    let body = response
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| Unreachable::Failed(format!("{url}: {e}")))?;
    if !status.is_success() {
        return Err(Unreachable::Failed(format!(
            "{url} answered {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    serde_json::from_slice(&body)
        .map_err(|e| Unreachable::Failed(format!("{url} sent an unreadable status: {e}")))
}
