//! Users and their client keys. Keys are stored as SHA-256 hashes (see `crate::secrets`).

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::{client_keys, users};
use super::{conflict_as, DbConn, StoreError};

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable)]
#[diesel(table_name = users)]
pub struct UserRow {
    pub id: String,
    pub name: String,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable)]
#[diesel(table_name = client_keys)]
pub struct ClientKeyRow {
    pub id: String,
    pub name: String,
    pub user_id: String,
    /// Lowercase hex SHA-256 of the key.
    pub key_hash: String,
    /// The first characters of the key, safe to show.
    pub prefix: String,
    pub created_at: NaiveDateTime,
    pub revoked_at: Option<NaiveDateTime>,
}

/// A key with its user's name.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyWithUser {
    pub key: ClientKeyRow,
    pub user_name: String,
}

/// The user called `name`, created when absent.
pub fn ensure_user(conn: &mut DbConn, name: &str) -> Result<UserRow, StoreError> {
    if let Some(user) = find_user(conn, name)? {
        return Ok(user);
    }
    let row = UserRow {
        id: super::new_id(),
        name: name.to_string(),
        created_at: super::now(),
    };
    diesel::insert_into(users::table)
        .values(&row)
        .execute(conn)
        .map_err(conflict_as(format!("user `{name}`")))?;
    Ok(row)
}

/// A user by id or name.
pub fn find_user(conn: &mut DbConn, id_or_name: &str) -> Result<Option<UserRow>, StoreError> {
    Ok(users::table
        .filter(users::id.eq(id_or_name).or(users::name.eq(id_or_name)))
        .select(UserRow::as_select())
        .first(conn)
        .optional()?)
}

/// Stores a new key (already hashed) for the user called `user_name`, creating the user.
pub fn create(
    conn: &mut DbConn,
    name: &str,
    user_name: &str,
    key_hash: &str,
    prefix: &str,
) -> Result<KeyWithUser, StoreError> {
    conn.transaction(|conn| {
        let user = ensure_user(conn, user_name)?;
        let key = ClientKeyRow {
            id: super::new_id(),
            name: name.to_string(),
            user_id: user.id,
            key_hash: key_hash.to_string(),
            prefix: prefix.to_string(),
            created_at: super::now(),
            revoked_at: None,
        };
        diesel::insert_into(client_keys::table)
            .values(&key)
            .execute(conn)
            .map_err(conflict_as(format!("key `{name}`")))?;
        Ok(KeyWithUser {
            key,
            user_name: user.name,
        })
    })
}

pub fn list(conn: &mut DbConn) -> Result<Vec<KeyWithUser>, StoreError> {
    Ok(client_keys::table
        .inner_join(users::table)
        .select((ClientKeyRow::as_select(), users::name))
        .order(client_keys::created_at)
        .load::<(ClientKeyRow, String)>(conn)?
        .into_iter()
        .map(|(key, user_name)| KeyWithUser { key, user_name })
        .collect())
}

/// Keys that are not revoked: what the front door holds in memory to authenticate requests.
pub fn list_active(conn: &mut DbConn) -> Result<Vec<KeyWithUser>, StoreError> {
    Ok(list(conn)?
        .into_iter()
        .filter(|k| k.key.revoked_at.is_none())
        .collect())
}

/// Revokes a key given by id or name; revoking twice is not an error.
pub fn revoke(conn: &mut DbConn, id_or_name: &str) -> Result<ClientKeyRow, StoreError> {
    let key = client_keys::table
        .filter(
            client_keys::id
                .eq(id_or_name)
                .or(client_keys::name.eq(id_or_name)),
        )
        .select(ClientKeyRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("key `{id_or_name}`")))?;
    if key.revoked_at.is_some() {
        return Ok(key);
    }
    let now = super::now();
    diesel::update(client_keys::table.find(&key.id))
        .set(client_keys::revoked_at.eq(now))
        .execute(conn)?;
    Ok(ClientKeyRow {
        revoked_at: Some(now),
        ..key
    })
}
