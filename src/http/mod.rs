//! The HTTP front door (actix-web). One route table ([`configure`]); handlers are thin: they
//! parse, send a message or call a store function, and map the result; errors become answers in
//! one place ([`error::ApiError`]).

pub mod access;
pub mod admin;
pub mod attempt;
pub mod auth;
pub mod dates;
pub mod error;
pub mod openai;
pub mod openapi;
pub mod proxy;
pub mod session;
pub mod sse;
pub mod stats;
pub mod status_html;
pub mod status_page;
pub mod throttle;
pub mod upstream;
pub mod usage;

use std::time::Duration;

use actix_web::{get, web, HttpResponse};
use serde::Serialize;

use crate::actors::QuotaSystem;
use crate::store::Store;
use crate::sync::syncer::Syncer;

/// What handlers share. Cloned into every worker.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// `None` when Redis is off (`redis.host` empty).
    pub redis: Option<crate::ledger::RedisTarget>,
    /// The shared ledgers (Redis configured).
    pub ledger: Option<crate::ledger::LedgerLink>,
    pub runtime: QuotaSystem,
    /// Client keys and the admin token, in memory.
    pub credentials: auth::Credentials,
    /// Writes account state to the database and Redis (`POST /api/v1/admin/flush`).
    pub syncer: actix::Addr<Syncer>,
    /// The master key, to seal credentials given through the admin API.
    pub master_key: crate::secrets::MasterKey,
    /// Timeouts and retries of upstream calls.
    pub upstream: upstream::UpstreamSettings,
    /// How often a running stream renews its reservation.
    pub renew_every: Duration,
    /// Writes request-log rows and audit rows in batches.
    pub tracker: crate::actors::tracker::TrackerHandle,
}

/// A scrape reuses forecast metrics up to this old (a status snapshot sets them too).
const METRICS_FRESHNESS: Duration = Duration::from_secs(10);

/// How long a readiness probe waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    // One scope around every route, so that even a refusal by an extractor (a bad key) carries
    // its `x-request-id`.
    cfg.service(
        web::scope("")
            .wrap(actix_web::middleware::from_fn(refuse_nul))
            .wrap(actix_web::middleware::from_fn(request_id))
            .configure(routes)
            .default_service(web::to(unknown_route)),
    );
}

/// An unknown path (or method) still gets the error envelope.
async fn unknown_route(req: actix_web::HttpRequest) -> HttpResponse {
    use actix_web::ResponseError as _;
    error::ApiError::NotFound(format!("no route {} {}", req.method(), req.path())).error_response()
}

/// Refuses a URL holding an encoded NUL (`%00`) before any handler sees it: no id, name or query
/// value can hold one, and Postgres refuses it in text (a lookup would fail as a 500 instead of
/// finding nothing). A raw NUL cannot reach here: the HTTP parser refuses it.
async fn refuse_nul(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    use actix_web::ResponseError as _;
    let url = req.uri().path_and_query().map_or("", |p| p.as_str());
    if url
        .as_bytes()
        .windows(3)
        .any(|w| w.eq_ignore_ascii_case(b"%00"))
    {
        let refusal = error::ApiError::invalid(
            "the URL holds a NUL character (%00), which no id, name or parameter may contain",
            None,
        )
        .error_response();
        return Ok(req.into_response(refusal).map_into_right_body());
    }
    next.call(req).await.map(|r| r.map_into_left_body())
}

/// The id of a request: the client's `x-request-id` when it sent a usable one, else a new uuid.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Gives every request an id (kept in its extensions for the handlers) and every answer the
/// `x-request-id` header.
async fn request_id(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    use actix_web::http::header::{HeaderName, HeaderValue};
    use actix_web::HttpMessage as _;
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.call(req).await?;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), value);
    }
    Ok(response)
}

/// A random (v4) uuid from a per-thread generator: request ids need to be unique, not secret, and
/// a system call for each would cost more than the rest of the id.
fn new_request_id() -> String {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let seed = uuid::Uuid::new_v4().as_u128();
            (seed as u64 ^ (seed >> 64) as u64) | 1
        });
    }
    let next = || {
        STATE.with(|s| {
            // xorshift64*
            let mut x = s.get();
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            s.set(x);
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        })
    };
    let bytes = (u128::from(next()) << 64 | u128::from(next())).to_le_bytes();
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

fn routes(cfg: &mut web::ServiceConfig) {
    // The router tries routes in order, and the admin routes' `{id}` patterns are regexes: the
    // client API, on every request's path, comes first.
    cfg.service(proxy::chat_completions)
        .service(proxy::embeddings)
        .service(proxy::models)
        .service(healthz)
        .service(readyz)
        .service(metrics);
    admin::configure(cfg);
    stats::configure(cfg);
    status_page::configure(cfg);
    openapi::configure(cfg);
}

/// Prometheus text.
#[utoipa::path(
    tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain"))
)]
#[get("/metrics")]
async fn metrics(
    state: web::Data<AppState>,
    page: Option<web::Data<status_page::StatusPage>>,
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
    responses((status = 200, description = "The process answers", body = openapi::operations::Health))
)]
#[get("/healthz")]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

#[derive(Debug, Serialize)]
struct Readiness {
    ready: bool,
    /// `ok` or `unhealthy`.
    database: &'static str,
    /// `ok`, `unhealthy` or `disabled`.
    redis: &'static str,
    /// Where account limits are kept: `local` (no Redis), `shared` (one ledger per account in
    /// Redis, for every instance), or `degraded` (Redis out of reach: this instance serves within
    /// its share of what was left).
    ledger: &'static str,
    /// Pools and accounts loaded in the actor runtime.
    pools: usize,
    accounts: usize,
}

/// Ready when the database answers; Redis is reported but does not make the gateway unready
/// (it degrades to memory-only state). The route needs no token, so it says only healthy or
/// unhealthy per dependency: what went wrong (hosts, users, database names) goes to the log.
#[utoipa::path(
    tag = "operations",
    responses(
        (status = 200, description = "The database answers and the actors run (Redis is reported)", body = openapi::operations::Readiness),
        (status = 503, description = "Not ready", body = openapi::operations::Readiness),
    )
)]
#[get("/readyz")]
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
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
