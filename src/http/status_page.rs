//! The status page for people (`GET /`), its live fragment, its login and logout, its embedded
//! assets, and `GET /api/v1/status` (the same picture as JSON, for scripts and `quotagate status`).
//!
//! Live updates: the page's script polls `GET /status/live` every two seconds and swaps in the
//! server-rendered fragment (paused while the tab is hidden). Why polling rather than server-sent
//! events: every update is an ordinary authenticated request, so an expired session or a rotated
//! admin token ends the view at the next update with nothing to tear down; no connection is held
//! open per viewer; a gateway restart needs no reconnect logic; and the HTML is rendered in one
//! place (Rust), so the script stays a few dozen lines. The cost of one update is measured in the
//! README (it is one snapshot: a message per pool and per account, plus a request-log read shared
//! by all viewers for a few seconds).
//!
//! Without the admin token (session cookie or bearer) the page is the login form and nothing
//! else; the fragment and the JSON answer 401.

use std::sync::OnceLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{get, post, web, HttpRequest, HttpResponse, HttpResponseBuilder};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::auth::Admin;
use super::error::ApiError;
use super::error::ErrorBody;
use super::session::{self, Sessions, Viewer};
use super::status_html::{self, AssetLinks};
use super::AppState;
use crate::status::{Snapshot, StatusBoard};

const CSS: &str = include_str!("../../assets/status.css");
const JS: &str = include_str!("../../assets/status.js");

/// The strictest policy the page works under: only its own stylesheet and script, only requests
/// to itself, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the status page needs besides [`AppState`]; registered once per server as app data.
#[derive(Debug)]
pub struct StatusPage {
    pub board: StatusBoard,
    pub sessions: Sessions,
}

/// Registers the page's routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(index)
        .service(live)
        .service(login)
        .service(logout)
        .service(stylesheet)
        .service(script)
        .service(status_json);
}

/// The assets' URLs, versioned by their content so browsers may cache them for good.
fn assets() -> &'static AssetLinks {
    static LINKS: OnceLock<AssetLinks> = OnceLock::new();
    LINKS.get_or_init(|| {
        let version = |text: &str| hex::encode(&Sha256::digest(text.as_bytes())[..6]);
        AssetLinks {
            css: format!("/assets/status.css?v={}", version(CSS)),
            js: format!("/assets/status.js?v={}", version(JS)),
        }
    })
}

fn page_data(req: &HttpRequest) -> Result<&web::Data<StatusPage>, ApiError> {
    req.app_data::<web::Data<StatusPage>>()
        .ok_or_else(|| ApiError::Internal("the status page is not set up in this server".into()))
}

/// Who is looking, if anyone is allowed to.
fn viewer(req: &HttpRequest, state: &AppState, page: &StatusPage) -> Option<Viewer> {
    let now = state.runtime.clock().now_ms();
    page.sessions.viewer(req, &state.credentials, now)
}

/// An HTML answer that is never cached or framed, under the page's CSP.
fn html(status: StatusCode) -> HttpResponseBuilder {
    let mut b = HttpResponse::build(status);
    b.content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        // `same-origin`, not `no-referrer`: with no referrer, Chromium sends `Origin: null` on
        // the login form's post, and the origin check would refuse it.
        .insert_header((header::REFERRER_POLICY, "same-origin"));
    b
}

async fn snapshot(page: &StatusPage) -> Result<Snapshot, ApiError> {
    page.board
        .snapshot()
        .await
        .map_err(|e| ApiError::Internal(format!("status snapshot: {e}")))
}

/// The status page, or the login form without the admin token.
#[utoipa::path(
    tag = "operations",
    security((), ("admin_token" = [])),
    responses((status = 200, description = "The status page (HTML) for the admin (session cookie or bearer); the login form, with no data, for anyone else", content_type = "text/html"))
)]
#[get("/")]
async fn index(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let page = page_data(&req)?;
    match viewer(&req, &state, page) {
        None => Ok(html(StatusCode::OK).body(status_html::login(assets(), None))),
        Some(who) => {
            let snapshot = snapshot(page).await?;
            Ok(html(StatusCode::OK).body(status_html::page(
                &snapshot,
                assets(),
                who == Viewer::Session,
            )))
        }
    }
}

/// The part of the page a live update replaces (HTML; the page's script polls it).
#[utoipa::path(
    tag = "operations",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The pools, freshly rendered (an HTML fragment)", content_type = "text/html"),
        (status = 401, description = "No session cookie or admin token: log in again", content_type = "text/html"),
    )
)]
#[get("/status/live")]
async fn live(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let page = page_data(&req)?;
    if viewer(&req, &state, page).is_none() {
        return Ok(html(StatusCode::UNAUTHORIZED).body("log in again"));
    }
    let snapshot = snapshot(page).await?;
    Ok(html(StatusCode::OK).body(status_html::fragment(&snapshot)))
}

/// The login form.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct LoginForm {
    /// The admin token.
    token: String,
}

/// The login form's target: the admin token for a session cookie (`HttpOnly`,
/// `SameSite=Strict`, for `security.session_ttl`).
#[utoipa::path(
    tag = "operations",
    request_body(content = LoginForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Logged in: the session cookie is set; see `/`"),
        (status = 401, description = "Not the admin token: the login form again", content_type = "text/html"),
        (status = 403, description = "Posted from another site's page", content_type = "text/html"),
    )
)]
#[post("/login")]
async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: Result<web::Form<LoginForm>, actix_web::Error>,
) -> Result<HttpResponse, ApiError> {
    let page = page_data(&req)?;
    if !session::same_origin(&req) {
        return Ok(html(StatusCode::FORBIDDEN).body(status_html::login(
            assets(),
            Some("This form only works from the gateway's own page."),
        )));
    }
    let token = form.map(|f| f.into_inner().token).unwrap_or_default();
    let admin_hash = state.credentials.admin_fingerprint();
    match admin_hash {
        Some(hash) if state.credentials.is_admin(token.trim()) => {
            let now = state.runtime.clock().now_ms();
            let cookie = page.sessions.issue(&hash, now);
            log::info!(event = "status_login"; "status page login");
            Ok(HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/"))
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .insert_header((
                    header::SET_COOKIE,
                    session::set_cookie(&req, &cookie, page.sessions.ttl()),
                ))
                .finish())
        }
        _ => {
            log::warn!(event = "status_login_failed"; "status page login with a wrong token");
            Ok(html(StatusCode::UNAUTHORIZED).body(status_html::login(
                assets(),
                Some("That is not the admin token."),
            )))
        }
    }
}

/// Ends the session (on this instance) and removes the cookie.
#[utoipa::path(
    tag = "operations",
    responses((status = 303, description = "Logged out; see `/`"))
)]
#[post("/logout")]
async fn logout(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let page = page_data(&req)?;
    if session::same_origin(&req) {
        if let Some(token) = session::cookie(&req) {
            page.sessions.revoke(&token, state.runtime.clock().now_ms());
        }
    }
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/"))
        .insert_header((header::SET_COOKIE, session::clear_cookie(&req)))
        .finish())
}

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        // The URL carries the content's hash: a new build has new URLs.
        .insert_header((
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=31536000, immutable"),
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(body)
}

#[get("/assets/status.css")]
async fn stylesheet() -> HttpResponse {
    asset("text/css; charset=utf-8", CSS)
}

#[get("/assets/status.js")]
async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", JS)
}

/// Every pool and account as the status page shows them: state, cooldowns, quota and window use,
/// forecasts, requests and errors per minute over the last hour, last errors.
#[utoipa::path(
    tag = "operations",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The status of every pool and account", body = Snapshot),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
    )
)]
#[get("/api/v1/status")]
async fn status_json(_: Admin, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let page = page_data(&req)?;
    let snapshot = snapshot(page).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(snapshot))
}
