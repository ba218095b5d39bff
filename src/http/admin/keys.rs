//! `/api/v1/admin/keys`: client keys, usable (or refused) at once: the front door's in-memory
//! credentials change with the store.

use std::sync::Arc;

use actix_web::{delete, get, post, web, HttpResponse};

use super::dto::{KeyBody, KeyView, NewKeyView};
use crate::http::auth::{Admin, Caller};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{read_json, typed};
use crate::http::{blocking, AppState};
use crate::manage;
use crate::store::keys;

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    responses((status = 200, description = "Every client key (never the key itself)", body = [KeyView]))
)]
#[get("/api/v1/admin/keys")]
pub(super) async fn list_keys(
    _: Admin,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let keys = blocking(&state.store, keys::list).await?;
    let views: Vec<KeyView> = keys.into_iter().map(KeyView::from).collect();
    Ok(HttpResponse::Ok().json(views))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    request_body = KeyBody,
    responses(
        (status = 201, description = "Created and usable at once; the key is shown only here", body = NewKeyView),
        (status = 400, description = "A bad body", body = ErrorBody),
        (status = 409, description = "A key of that name exists", body = ErrorBody),
    )
)]
#[post("/api/v1/admin/keys")]
pub(super) async fn create_key(
    _: Admin,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: KeyBody = typed(read_json(body).await?)?;
    let user = body.user.clone().unwrap_or_else(|| body.name.clone());
    manage::validate_name("key", &body.name)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("name")))?;
    manage::validate_name("user", &user)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("user")))?;
    let (created, token) = blocking(&state.store, move |conn| {
        manage::create_key(conn, &body.name, &user)
    })
    .await?;
    state.credentials.add_key(
        created.key.key_hash.clone(),
        Caller {
            key_id: Arc::from(created.key.id.as_str()),
            user_id: Arc::from(created.key.user_id.as_str()),
            user: Arc::from(created.user_name.as_str()),
        },
    );
    log::info!(event = "key_created", key_id = created.key.id.as_str(), user = created.user_name.as_str(); "client key created through the admin API");
    Ok(HttpResponse::Created().json(NewKeyView {
        id: created.key.id,
        name: created.key.name,
        user: created.user_name,
        user_id: created.key.user_id,
        key: token.expose().to_string(),
        created_at: created.key.created_at.and_utc(),
    }))
}

#[utoipa::path(
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The key's id or name")),
    responses(
        (status = 204, description = "Revoked; refused from now on (revoking twice is not an error)"),
        (status = 404, description = "No such key", body = ErrorBody),
    )
)]
#[delete("/api/v1/admin/keys/{id}")]
pub(super) async fn revoke_key(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let revoked = blocking(&state.store, move |conn| manage::revoke_key(conn, &id)).await?;
    state.credentials.remove_key(&revoked.id);
    log::info!(event = "key_revoked", key_id = revoked.id.as_str(); "client key revoked through the admin API");
    Ok(HttpResponse::NoContent().finish())
}
