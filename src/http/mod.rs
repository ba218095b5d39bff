//! The HTTP front door (actix-web). One route table ([`configure`]); handlers are thin: they
//! parse, send a message or call a store function, and map the result; errors become answers in
//! one place ([`error::ApiError`]).

pub mod access;
pub mod admin;
pub mod attempt;
pub mod auth;
pub mod dates;
pub mod error;
pub mod extract;
pub mod openai;
pub mod openapi;
pub mod operations;
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

use actix_web::{web, HttpResponse};
use utoipa::OpenApi;

use crate::actors::QuotaSystem;
use crate::store::{DbConn, Store, StoreError};
use crate::sync::syncer::Syncer;
use openapi::BearerTokens;

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

/// A random (v4) uuid from a per-thread generator (the selection's xorshift64*): request ids need
/// to be unique, not secret, and a system call for each would cost more than the rest of the id.
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
            let mut state = s.get();
            let value = crate::domain::selection::next_random(&mut state);
            s.set(state);
            value
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
        .service(operations::healthz)
        .service(operations::readyz)
        .service(operations::metrics);
    admin::configure(cfg);
    stats::configure(cfg);
    status_page::configure(cfg);
    openapi::configure(cfg);
}

/// Runs a store function off the async threads; its error becomes the answer's.
pub(crate) async fn blocking<T, F>(store: &Store, f: F) -> Result<T, error::ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut DbConn) -> Result<T, StoreError> + Send + 'static,
{
    let store = store.clone();
    web::block(move || {
        let mut conn = store.conn()?;
        f(&mut conn)
    })
    .await
    .map_err(|e| error::ApiError::Internal(format!("blocking task failed: {e}")))?
    .map_err(error::ApiError::from)
}

/// The OpenAPI document of every route ([`openapi`] serves it). It lists every handler, so it
/// lives here, above the handlers' modules: in a sibling of theirs, it would import them while
/// their annotations import its schemas.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "quotagate",
        description = "One OpenAI-compatible endpoint over a pool of LLM provider accounts, with exact quotas and rate limits."
    ),
    paths(
        proxy::chat_completions,
        proxy::embeddings,
        proxy::models,
        stats::usage,
        stats::pool,
        stats::quota,
        stats::ratelimit,
        stats::provider,
        stats::top_models,
        stats::errors,
        admin::providers::list_providers,
        admin::providers::create_provider,
        admin::providers::get_provider,
        admin::providers::patch_provider,
        admin::providers::delete_provider,
        admin::providers::get_provider_limits,
        admin::providers::put_provider_limits,
        admin::runtime::reset_provider,
        admin::accounts::list_accounts,
        admin::accounts::create_account,
        admin::accounts::get_account,
        admin::accounts::patch_account,
        admin::accounts::delete_account,
        admin::runtime::reset_account,
        admin::keys::list_keys,
        admin::keys::create_key,
        admin::keys::revoke_key,
        admin::runtime::flush,
        operations::metrics,
        operations::healthz,
        operations::readyz,
        status_page::index,
        status_page::live,
        status_page::login,
        status_page::logout,
        status_page::status_json,
        openapi::document,
    ),
    modifiers(&BearerTokens),
    tags(
        (name = "client", description = "OpenAI-compatible API (client key)"),
        (name = "stats", description = "Usage history and live quota state (admin token; a client key reads its own usage)"),
        (name = "admin", description = "Providers, accounts, limits and client keys (admin token); changes apply at once"),
        (name = "operations", description = "Health, readiness, metrics, the status page and this document"),
    )
)]
pub struct ApiDoc;
