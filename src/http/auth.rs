//! Who is calling. Client keys and the admin token are held in memory (as SHA-256 hashes), so no
//! request waits for the database: loaded at start, changed at once by the admin API, and
//! refreshed from the store every few seconds for what the CLI changed.

use std::collections::HashMap;
use std::future::{ready, Ready};
use std::sync::{Arc, RwLock};

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};

use super::error::ApiError;
use super::throttle::AdminThrottle;
use super::AppState;
use crate::secrets::{self, Secret};
use crate::store::{keys, settings, DbConn, StoreError};

/// The user behind a client key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: Arc<str>,
    pub user_id: Arc<str>,
    pub user: Arc<str>,
}

/// Client key hashes and the admin token, in memory.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    inner: Arc<RwLock<Known>>,
    /// A token set in the config (`security.admin_token`); its hash never lives in the store.
    configured_admin: Option<String>,
    /// Failed admin-token attempts per client address.
    throttle: Arc<AdminThrottle>,
}

#[derive(Debug, Default)]
struct Known {
    keys: HashMap<String, Caller>,
    admin_hash: Option<String>,
}

impl Credentials {
    pub fn new(configured_admin: &Secret) -> Credentials {
        Credentials {
            inner: Arc::default(),
            configured_admin: (!configured_admin.is_empty())
                .then(|| secrets::hash_token(configured_admin.expose())),
            throttle: Arc::default(),
        }
    }

    /// Replaces what is known with the store's keys and generated admin token.
    pub fn reload(&self, conn: &mut DbConn) -> Result<usize, StoreError> {
        let active = keys::list_active(conn)?;
        let admin_hash = settings::get(conn, settings::ADMIN_TOKEN_HASH)?;
        let keys: HashMap<String, Caller> = active
            .into_iter()
            .map(|k| {
                let caller = Caller {
                    key_id: Arc::from(k.key.id.as_str()),
                    user_id: Arc::from(k.key.user_id.as_str()),
                    user: Arc::from(k.user_name.as_str()),
                };
                (k.key.key_hash, caller)
            })
            .collect();
        let count = keys.len();
        let mut known = self.inner.write().unwrap_or_else(|e| e.into_inner());
        known.keys = keys;
        known.admin_hash = admin_hash;
        Ok(count)
    }

    /// Makes a new key usable at once.
    pub fn add_key(&self, key_hash: String, caller: Caller) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .insert(key_hash, caller);
    }

    /// Makes a revoked key unusable at once.
    pub fn remove_key(&self, key_id: &str) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .retain(|_, c| &*c.key_id != key_id);
    }

    /// The caller of a presented client key.
    pub fn client(&self, token: &str) -> Option<Caller> {
        let hash = secrets::hash_token(token);
        // A map lookup by the hash: the hash of a wrong key reveals nothing about right ones.
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .get(&hash)
            .cloned()
    }

    /// The stored hash of the current admin token (`None` when there is none). Status-page
    /// sessions carry a digest of it, so rotating the token ends them (see `http::session`).
    pub fn admin_fingerprint(&self) -> Option<String> {
        match &self.configured_admin {
            Some(hash) => Some(hash.clone()),
            None => self
                .inner
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .admin_hash
                .clone(),
        }
    }

    /// Whether `token` is the admin token (compared in constant time).
    pub fn is_admin(&self, token: &str) -> bool {
        self.admin_fingerprint()
            .is_some_and(|hash| secrets::token_matches(token, &hash))
    }
}

/// Runs `check` on a request's token under the admin throttle: `Ok(passed)`, or a 429 while the
/// client's address is locked out after too many failures (see [`super::throttle`]).
fn throttled(
    req: &HttpRequest,
    credentials: &Credentials,
    check: impl FnOnce() -> bool,
) -> Result<bool, ApiError> {
    let peer = req.peer_addr().map(|a| a.ip());
    credentials
        .throttle
        .attempt(peer, std::time::Instant::now(), check)
        .map_err(|wait| ApiError::RateLimited {
            limit: "admin_auth".into(),
            retry_after: wait.as_secs_f64(),
            lower_bound: false,
        })
}

/// The bearer token of a request, if any.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The bearer token of a request and the credentials to check it against; without a token, the
/// request is refused with `missing`, which says what to send.
fn presented<'r>(
    req: &'r HttpRequest,
    missing: &str,
) -> Result<(&'r str, &'r Credentials), ApiError> {
    let token = bearer(req).ok_or_else(|| ApiError::InvalidApiKey(missing.to_string()))?;
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::Internal("application state missing".into()))?;
    Ok((token, &state.credentials))
}

/// A request authenticated with a client key.
#[derive(Debug, Clone)]
pub struct ClientKey(pub Caller);

impl FromRequest for ClientKey {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let (token, credentials) =
                presented(req, "missing API key: send `Authorization: Bearer <key>`")?;
            credentials
                .client(token)
                .map(ClientKey)
                .ok_or_else(|| ApiError::InvalidApiKey("unknown or revoked API key".into()))
        })())
    }
}

/// A request authenticated with the admin token.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let (token, credentials) = presented(
                req,
                "missing admin token: send `Authorization: Bearer <token>`",
            )?;
            if throttled(req, credentials, || credentials.is_admin(token))? {
                Ok(Admin)
            } else {
                Err(ApiError::InvalidApiKey("not the admin token".into()))
            }
        })())
    }
}

/// The admin, or a client reading its own data (the stats API).
#[derive(Debug, Clone)]
pub enum Reader {
    Admin,
    Client(Caller),
}

impl FromRequest for Reader {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let (token, credentials) =
                presented(req, "missing token: send `Authorization: Bearer <token>`")?;
            let mut reader = None;
            throttled(req, credentials, || {
                reader = if credentials.is_admin(token) {
                    Some(Reader::Admin)
                } else {
                    credentials.client(token).map(Reader::Client)
                };
                reader.is_some()
            })?;
            reader.ok_or_else(|| ApiError::InvalidApiKey("unknown token".into()))
        })())
    }
}
