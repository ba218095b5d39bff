//! quotagate: a quota and account-pool gateway for LLM APIs.
//!
//! Module map (I/O stays at the edges; `domain` is pure):
//! - [`config`]: `config.yaml` + environment overrides, validated once at start.
//! - [`domain`]: plain types and pure logic (limits, windows, quotas, selection). No I/O.
//! - [`secrets`]: secret strings, URL redaction, credential encryption, hashed tokens.
//! - [`store`]: diesel over Postgres and embedded SQLite; migrations; queries as plain functions.
//! - [`manage`]: management operations shared by the CLI and the admin API.
//! - [`provision`]: upserts the providers declared in `config.yaml`.
//! - [`sync`]: the Redis link, the periodic sync, restore on start and the crash mark.
//! - [`http`]: the actix-web front door.
//! - [`jobs`]: scheduled jobs: retention cleanup and daily aggregation of request statistics.
//! - [`server`]: `quotagate serve`: start-up, first-start secrets, signals.
//! - [`doctor`]: `quotagate doctor`: diagnoses config, database, Redis and providers.
//! - [`cli`]: the command line.
//! - [`logging`]: JSON-lines or text logs from the `log` crate's key-values, written off-thread.
//! - [`batch`]: per-thread batching of what requests leave behind (rows, metrics).

pub mod actors;
pub mod backoff;
pub mod batch;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod domain;
pub mod http;
pub mod jobs;
pub mod logging;
pub mod manage;
pub mod mark;
pub mod metrics;
pub mod provision;
pub mod secrets;
pub mod server;
pub mod status;
pub mod store;
pub mod sync;
