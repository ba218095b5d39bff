//! The operational routes: `GET /metrics` (Prometheus), `GET /healthz` (alive) and
//! `GET /readyz` (ready: the database answers; Redis is reported).

use std::time::Duration;

use actix_web::{get, web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::status_page::StatusPage;
use super::AppState;

/// A scrape reuses forecast metrics up to this old (a status snapshot sets them too).
const METRICS_FRESHNESS: Duration = Duration::from_secs(10);

/// How long a readiness probe waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Prometheus text.
#[utoipa::path(
    tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain"))
)]
#[get("/metrics")]
pub(super) async fn metrics(
    state: web::Data<AppState>,
    page: Option<web::Data<StatusPage>>,
) -> HttpResponse {
    // The forecast gauges are computed, not counted: bring them up to date for this scrape.
    if let Some(page) = page {
        page.board.refresh_metrics(METRICS_FRESHNESS).await;
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.runtime.events().metrics().render())
}

/// Alive: the process answers.
#[utoipa::path(
    tag = "operations",
    responses((status = 200, description = "The process answers", body = Health))
)]
#[get("/healthz")]
pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// The answer of `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    #[schema(value_type = String)]
    status: &'static str,
}

/// The answer of `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    ready: bool,
    /// `ok` or `unhealthy` (details only in the log).
    #[schema(value_type = String)]
    database: &'static str,
    /// `ok`, `unhealthy` or `disabled` (details only in the log).
    #[schema(value_type = String)]
    redis: &'static str,
    /// Where account limits are kept: `local` (no Redis), `shared` (one ledger per account in
    /// Redis, for every instance) or `degraded` (Redis out of reach: this instance serves within
    /// its share of what was left).
    #[schema(value_type = String)]
    ledger: &'static str,
    /// Pools and accounts loaded in the actor runtime.
    pools: usize,
    accounts: usize,
}

/// Ready when the database answers; Redis is reported but does not make the gateway unready
/// (without it, each instance serves within its share of every limit). The route needs no token, so it says only healthy or
/// unhealthy per dependency: what went wrong (hosts, users, database names) goes to the log.
#[utoipa::path(
    tag = "operations",
    responses(
        (status = 200, description = "The database answers and the actors run (Redis is reported)", body = Readiness),
        (status = 503, description = "Not ready", body = Readiness),
    )
)]
#[get("/readyz")]
pub(super) async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let store = state.store.clone();
    let database = match tokio::time::timeout(PROBE_TIMEOUT, web::block(move || store.ping())).await
    {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    };
    let redis = match &state.redis {
        None => None,
        Some(target) => Some(target.ping(PROBE_TIMEOUT).await),
    };
    if let Err(problem) = &database {
        log::warn!(event = "readiness_failed", target = "database"; "readiness probe: the database does not answer: {problem}");
    }
    if let Some(Err(problem)) = &redis {
        log::warn!(event = "readiness_failed", target = "redis"; "readiness probe: Redis does not answer: {problem}");
    }
    let health = |ok: bool| if ok { "ok" } else { "unhealthy" };
    let ready = database.is_ok();
    let registry = state.runtime.registry();
    let body = Readiness {
        ready,
        database: health(ready),
        redis: redis.map_or("disabled", |r| health(r.is_ok())),
        ledger: match &state.ledger {
            None => "local",
            Some(link) if link.is_up() => "shared",
            Some(_) => "degraded",
        },
        pools: registry.providers().len(),
        accounts: registry.accounts().len(),
    };
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
