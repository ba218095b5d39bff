//! Sessions of the status page: the admin token is entered once in a login form, and the browser
//! then holds an `HttpOnly`, `SameSite=Strict` cookie instead of the token.
//!
//! A session is a sealed value (XChaCha20-Poly1305 under the master key, the same sealing as
//! stored credentials) holding its expiry and a digest of the admin token's hash at login:
//! - nothing is stored per session, so sessions survive a restart and work on every instance that
//!   shares the master key;
//! - it cannot be forged or altered without the master key, and tells nothing to whoever reads it;
//! - it expires (`security.session_ttl`), and it ends as soon as the admin token changes, because
//!   the digest no longer matches (`quotagate admin-token rotate` reaches a running server within
//!   a few seconds);
//! - logging out revokes it on this instance (a small set of revoked session nonces, each kept
//!   until the session would have expired anyway).
//!
//! The page also accepts `Authorization: Bearer <admin token>` (scripts, the browser test).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::HttpRequest;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::auth::{bearer, Credentials};
use crate::domain::time::Millis;
use crate::secrets::MasterKey;

/// The cookie's name.
pub const COOKIE: &str = "quotagate_session";
/// Binds the sealed value to its use: a sealed credential is never a session, nor the reverse.
const CONTEXT: &[u8] = b"quotagate status-page session v1";
/// Bytes of the admin hash digest kept in a session.
const FINGERPRINT_LEN: usize = 16;
/// The nonce that starts every sealed value (XChaCha20): a session's identity for revocation.
const NONCE_LEN: usize = 24;

/// Issues and checks sessions. Shared by every HTTP worker.
pub struct Sessions {
    key: MasterKey,
    ttl: Duration,
    /// Logged-out sessions by nonce, with their expiry.
    revoked: Mutex<HashMap<[u8; NONCE_LEN], Millis>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Who is looking at the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viewer {
    /// The admin token in `Authorization: Bearer`.
    Bearer,
    /// A valid session cookie.
    Session,
}

fn fingerprint(admin_hash: &str) -> [u8; FINGERPRINT_LEN] {
    let digest = Sha256::digest(admin_hash.as_bytes());
    let mut out = [0; FINGERPRINT_LEN];
    out.copy_from_slice(&digest[..FINGERPRINT_LEN]);
    out
}

impl Sessions {
    /// Sessions sealed with `key`, lasting `ttl`.
    pub fn new(key: MasterKey, ttl: Duration) -> Sessions {
        Sessions {
            key,
            ttl,
            revoked: Mutex::default(),
        }
    }

    /// How long a new session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new session for the admin token whose stored hash is `admin_hash`, issued at `now`.
    pub fn issue(&self, admin_hash: &str, now: Millis) -> String {
        let expires = now.saturating_add(crate::domain::time::duration_ms(self.ttl));
        let mut plain = Vec::with_capacity(8 + FINGERPRINT_LEN);
        plain.extend_from_slice(&expires.to_be_bytes());
        plain.extend_from_slice(&fingerprint(admin_hash));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.key.seal(&plain, CONTEXT))
    }

    /// Whether `token` is a live session for the admin token whose stored hash is `admin_hash`.
    pub fn check(&self, token: &str, admin_hash: &str, now: Millis) -> bool {
        let Some((nonce, expires, print)) = self.open(token) else {
            return false;
        };
        use subtle::ConstantTimeEq as _;
        now < expires
            && bool::from(print.ct_eq(&fingerprint(admin_hash)))
            && !self
                .revoked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&nonce)
    }

    /// Ends a session on this instance (logout).
    pub fn revoke(&self, token: &str, now: Millis) {
        let Some((nonce, expires, _)) = self.open(token) else {
            return;
        };
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        // Expired sessions fail on their own: forget them, so the set stays small.
        revoked.retain(|_, until| *until > now);
        if expires > now {
            revoked.insert(nonce, expires);
        }
    }

    fn open(&self, token: &str) -> Option<([u8; NONCE_LEN], Millis, [u8; FINGERPRINT_LEN])> {
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim())
            .ok()?;
        let plain = self.key.open(&sealed, CONTEXT).ok()?;
        if plain.len() != 8 + FINGERPRINT_LEN {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = sealed.get(..NONCE_LEN)?.try_into().ok()?;
        let expires = Millis::from_be_bytes(plain[..8].try_into().ok()?);
        let print: [u8; FINGERPRINT_LEN] = plain[8..].try_into().ok()?;
        Some((nonce, expires, print))
    }

    /// Who is asking: the admin token as a bearer, or a live session cookie.
    pub fn viewer(
        &self,
        req: &HttpRequest,
        credentials: &Credentials,
        now: Millis,
    ) -> Option<Viewer> {
        if bearer(req).is_some_and(|token| credentials.is_admin(token)) {
            return Some(Viewer::Bearer);
        }
        let token = cookie(req)?;
        let admin_hash = credentials.admin_fingerprint()?;
        self.check(&token, &admin_hash, now)
            .then_some(Viewer::Session)
    }
}

/// The session cookie of a request, if any.
pub fn cookie(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get_all(actix_web::http::header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
}

/// Whether the request came over TLS (directly or through a proxy that says so): the cookie is
/// then `Secure`.
fn secure(req: &HttpRequest) -> bool {
    req.connection_info().scheme() == "https"
}

/// The `Set-Cookie` value that stores `token` for `ttl`.
pub fn set_cookie(req: &HttpRequest, token: &str, ttl: Duration) -> String {
    format!(
        "{COOKIE}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
        ttl.as_secs(),
        if secure(req) { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(req: &HttpRequest) -> String {
    format!(
        "{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if secure(req) { "; Secure" } else { "" }
    )
}

/// Whether a form post comes from this site's own page: its `Origin` (when the browser sends one)
/// must name the host the request was sent to. `SameSite=Strict` already keeps the cookie off
/// cross-site requests; this also stops another site from logging a browser in or out.
pub fn same_origin(req: &HttpRequest) -> bool {
    let Some(origin) = req
        .headers()
        .get(actix_web::http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    let host = req.connection_info().host().to_string();
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest.trim_end_matches('/') == host)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_700_000_000_000;

    fn sessions() -> Sessions {
        Sessions::new(MasterKey::generate(), Duration::from_secs(60))
    }

    #[test]
    fn a_session_is_valid_until_it_expires() {
        let s = sessions();
        let token = s.issue("hash-a", NOW);
        assert!(s.check(&token, "hash-a", NOW));
        assert!(s.check(&token, "hash-a", NOW + 59_999));
        assert!(!s.check(&token, "hash-a", NOW + 60_000));
    }

    #[test]
    fn a_rotated_admin_token_ends_every_session() {
        let s = sessions();
        let token = s.issue("hash-a", NOW);
        assert!(!s.check(&token, "hash-b", NOW));
    }

    #[test]
    fn a_session_sealed_with_another_key_or_altered_is_refused() {
        let s = sessions();
        let token = sessions().issue("hash-a", NOW);
        assert!(!s.check(&token, "hash-a", NOW));
        let mut bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.issue("hash-a", NOW))
            .unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        let altered = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        assert!(!s.check(&altered, "hash-a", NOW));
        for junk in ["", "x", "not base64!", &"A".repeat(200)] {
            assert!(!s.check(junk, "hash-a", NOW), "{junk}");
        }
    }

    #[test]
    fn a_revoked_session_ends_and_others_go_on() {
        let s = sessions();
        let (one, two) = (s.issue("hash-a", NOW), s.issue("hash-a", NOW));
        s.revoke(&one, NOW);
        assert!(!s.check(&one, "hash-a", NOW));
        assert!(s.check(&two, "hash-a", NOW));
        // Past their expiry, revoked entries are dropped at the next revocation.
        s.revoke(&two, NOW + 120_000);
        assert!(s.revoked.lock().unwrap().is_empty());
    }

    #[test]
    fn a_session_tells_nothing_about_the_token() {
        let s = sessions();
        let token = s.issue("0123456789abcdef", NOW);
        assert!(!token.contains("0123456789abcdef"));
        assert_ne!(
            token,
            s.issue("0123456789abcdef", NOW),
            "a fresh nonce each time"
        );
    }
}
