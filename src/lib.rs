//! quotagate: a quota and account-pool gateway for LLM APIs.
//!
//! Module map (I/O stays at the edges; `domain` is pure):
//! - [`config`]: `config.yaml` + environment overrides, validated once at start (`sections`: one
//!   struct per section; `providers`: the declarative pools).
//! - [`domain`]: plain types and pure logic (limits, windows, quotas, selection). No I/O.
//! - [`secrets`]: secret strings, URL redaction, credential encryption, hashed tokens.
//! - [`store`]: diesel over Postgres and embedded SQLite; migrations; queries as plain functions,
//!   one file per table group (request statistics: `rollup` writes them, `stats` reads them,
//!   `retention` deletes what is too old).
//! - [`manage`]: every write of providers, accounts and keys: the one write API of the CLI, the
//!   admin API and provisioning.
//! - [`provision`]: keeps the store as `config.yaml` declares it, through [`manage`].
//! - [`actors`]: the runtime: account, pool and supervisor actors, the request tracker, and
//!   [`actors::QuotaSystem`], the handle the rest uses.
//! - [`ledger`]: several instances, one limit: the account ledgers shared in Redis (standalone or
//!   Cluster), the instances' heartbeats, Redis' clock.
//! - [`startup`]: what an instance does to a shared database before serving, under a lock.
//! - [`sync`]: the periodic copy of account state to the database and its restore on start.
//! - [`mark`]: the crash mark in `data_dir` and the admission gate.
//! - [`backoff`]: retry delays that double up to a ceiling (tracker, sync, webhook).
//! - [`http`]: the actix-web front door (client API, admin and stats APIs, status page, OpenAPI).
//! - [`status`]: the status snapshot the page, `GET /api/v1/status` and `quotagate status` show.
//! - [`jobs`]: scheduled jobs: retention cleanup and daily aggregation of request statistics.
//! - [`server`]: `quotagate serve`: start-up, first-start secrets, signals.
//! - [`doctor`]: `quotagate doctor`: diagnoses config, database, Redis and providers.
//! - [`cli`]: the command line (`cli::status`: `quotagate status`).
//! - [`logging`]: JSON-lines or text logs from the `log` crate's key-values, written off-thread.
//! - [`metrics`]: the Prometheus registry.
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
pub mod ledger;
pub mod logging;
pub mod manage;
pub mod mark;
pub mod metrics;
pub mod provision;
pub mod secrets;
pub mod server;
pub mod startup;
pub mod status;
pub mod store;
pub mod sync;
