//! Client keys and the admin token: random tokens with a recognisable prefix, stored only as
//! their SHA-256 hash.

use super::validate_name;
use crate::secrets::{self, Secret};
use crate::store::keys::{self, ClientKeyRow, KeyWithUser};
use crate::store::{DbConn, StoreError};

/// Prefix of client keys, so that they are recognisable in configs and leak scanners.
pub const CLIENT_KEY_PREFIX: &str = "qg_";
/// Prefix of the admin token.
pub const ADMIN_TOKEN_PREFIX: &str = "qga_";

/// Creates a client key for `user` (created when absent); the plain key is returned once and only
/// its hash is stored.
pub fn create_key(
    conn: &mut DbConn,
    name: &str,
    user: &str,
) -> Result<(KeyWithUser, Secret), StoreError> {
    validate_name("key", name)?;
    validate_name("user", user)?;
    let token = secrets::generate_token(CLIENT_KEY_PREFIX);
    let prefix: String = token
        .expose()
        .chars()
        .take(CLIENT_KEY_PREFIX.len() + 6)
        .collect();
    let created = keys::create(
        conn,
        name,
        user,
        &secrets::hash_token(token.expose()),
        &prefix,
    )?;
    Ok((created, token))
}

/// Revokes a client key (by id or name); revoking twice is not an error.
pub fn revoke_key(conn: &mut DbConn, reference: &str) -> Result<ClientKeyRow, StoreError> {
    keys::revoke(conn, reference)
}
