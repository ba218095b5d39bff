//! The HTTP front door (actix-web). One route table ([`configure`]); handlers are thin: they
//! parse, send a message or call a store function, and map the result; errors become answers in
//! one place ([`error::ApiError`]).

pub mod auth;
pub mod error;

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::Serialize;

use crate::actors::QuotaSystem;
use crate::store::Store;
use crate::sync::syncer::Syncer;

/// What handlers share. Cloned into every worker.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// `None` when Redis is off (`redis.host` empty).
    pub redis: Option<redis::Client>,
    pub runtime: QuotaSystem,
    /// Client keys and the admin token, in memory.
    pub credentials: auth::Credentials,
    /// Writes account state to the database and Redis (`POST /api/v1/admin/flush`).
    pub syncer: actix::Addr<Syncer>,
    /// The master key, to seal credentials given through the admin API.
    pub master_key: crate::secrets::MasterKey,
}

/// How long a readiness probe waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz));
}

/// Alive: the process answers.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

#[derive(Debug, Serialize)]
struct Readiness {
    ready: bool,
    database: String,
    redis: String,
    /// Pools and accounts loaded in the actor runtime.
    pools: usize,
    accounts: usize,
}

/// Ready when the database answers; Redis is reported but does not make the gateway unready
/// (it degrades to memory-only state).
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let store = state.store.clone();
    let database = match tokio::time::timeout(PROBE_TIMEOUT, web::block(move || store.ping())).await
    {
        Ok(Ok(Ok(()))) => "ok".to_string(),
        Ok(Ok(Err(e))) => format!("error: {e}"),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => format!("error: no answer within {PROBE_TIMEOUT:?}"),
    };
    let redis = match &state.redis {
        None => "disabled".to_string(),
        Some(client) => match crate::sync::ping(client, PROBE_TIMEOUT).await {
            Ok(()) => "ok".to_string(),
            Err(problem) => format!("down: {problem}"),
        },
    };
    let ready = database == "ok";
    let registry = state.runtime.registry();
    let body = Readiness {
        ready,
        database,
        redis,
        pools: registry.providers().len(),
        accounts: registry.accounts().len(),
    };
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
