//! Provider accounts. Credentials arrive here already sealed (see `crate::secrets::MasterKey`).

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::{accounts, providers};
use super::{conflict_as, DbConn, StoreError};

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = accounts, treat_none_as_null = true)]
pub struct AccountRow {
    pub id: String,
    pub provider_id: String,
    pub user_id: Option<String>,
    pub name: String,
    /// Sealed credentials JSON (nonce || ciphertext); never plaintext.
    pub credentials: Vec<u8>,
    pub credentials_hint: String,
    pub active: bool,
    pub disabled_reason: Option<String>,
    /// Tokens per quota period; 0 = unlimited.
    pub quota_limit: i64,
    pub quota_used: i64,
    pub last_reset: NaiveDateTime,
    pub expires_at: Option<NaiveDateTime>,
    pub source: String,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// An account with the name of its provider, for listings and `provider/account` references.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountWithProvider {
    pub account: AccountRow,
    pub provider_name: String,
}

impl AccountWithProvider {
    /// `provider/account`: the unambiguous name.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.provider_name, self.account.name)
    }
}

pub fn insert(conn: &mut DbConn, row: &AccountRow) -> Result<(), StoreError> {
    diesel::insert_into(accounts::table)
        .values(row)
        .execute(conn)
        .map_err(conflict_as(format!("account `{}`", row.name)))?;
    super::settings::bump_catalog(conn)
}

/// Writes every field of `row` (matched by id).
pub fn update(conn: &mut DbConn, row: &AccountRow) -> Result<(), StoreError> {
    let n = diesel::update(accounts::table.find(&row.id))
        .set(row)
        .execute(conn)
        .map_err(conflict_as(format!("account `{}`", row.name)))?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("account `{}`", row.id)));
    }
    super::settings::bump_catalog(conn)
}

pub fn delete(conn: &mut DbConn, id: &str) -> Result<(), StoreError> {
    let n = diesel::delete(accounts::table.find(id)).execute(conn)?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("account `{id}`")));
    }
    super::settings::bump_catalog(conn)
}

/// Writes the runtime's usage counters (the periodic sync). Not a catalog change: running servers
/// are not asked to reload for it.
pub fn record_usage(
    conn: &mut DbConn,
    id: &str,
    quota_used: i64,
    last_reset: NaiveDateTime,
) -> Result<(), StoreError> {
    diesel::update(accounts::table.find(id))
        .set((
            accounts::quota_used.eq(quota_used),
            accounts::last_reset.eq(last_reset),
        ))
        .execute(conn)?;
    Ok(())
}

/// Enables or disables an account; `reason` is kept for people (cleared on enable).
pub fn set_active(
    conn: &mut DbConn,
    id: &str,
    active: bool,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    let n = diesel::update(accounts::table.find(id))
        .set((
            accounts::active.eq(active),
            accounts::disabled_reason.eq(if active { None } else { reason }),
            accounts::updated_at.eq(super::now()),
        ))
        .execute(conn)?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("account `{id}`")));
    }
    super::settings::bump_catalog(conn)
}

/// When each account was created (`(id, created_at)`): the restore needs it to tell an account
/// that no copy holds because it is new from one that was never synced.
pub fn created_times(conn: &mut DbConn) -> Result<Vec<(String, NaiveDateTime)>, StoreError> {
    Ok(accounts::table
        .select((accounts::id, accounts::created_at))
        .load(conn)?)
}

/// All accounts (optionally of one provider), with their provider's name, by provider then name.
pub fn list(
    conn: &mut DbConn,
    provider_id: Option<&str>,
) -> Result<Vec<AccountWithProvider>, StoreError> {
    let mut query = accounts::table
        .inner_join(providers::table)
        .select((AccountRow::as_select(), providers::name))
        .order((providers::name, accounts::name))
        .into_boxed();
    if let Some(provider_id) = provider_id {
        query = query.filter(accounts::provider_id.eq(provider_id));
    }
    Ok(query
        .load::<(AccountRow, String)>(conn)?
        .into_iter()
        .map(|(account, provider_name)| AccountWithProvider {
            account,
            provider_name,
        })
        .collect())
}

pub fn find_in_provider(
    conn: &mut DbConn,
    provider_id: &str,
    name: &str,
) -> Result<Option<AccountRow>, StoreError> {
    Ok(accounts::table
        .filter(accounts::provider_id.eq(provider_id))
        .filter(accounts::name.eq(name))
        .select(AccountRow::as_select())
        .first(conn)
        .optional()?)
}

/// An account by id, by `provider/account`, or by its bare name when that is unique (an ambiguous
/// name is an error listing the candidates).
pub fn find(conn: &mut DbConn, reference: &str) -> Result<AccountWithProvider, StoreError> {
    let base = || {
        accounts::table
            .inner_join(providers::table)
            .select((AccountRow::as_select(), providers::name))
            .into_boxed()
    };
    let not_found = || StoreError::NotFound(format!("account `{reference}`"));
    let wrap = |(account, provider_name): (AccountRow, String)| AccountWithProvider {
        account,
        provider_name,
    };
    if let Some(found) = base()
        .filter(accounts::id.eq(reference))
        .first::<(AccountRow, String)>(conn)
        .optional()?
    {
        return Ok(wrap(found));
    }
    if let Some((provider, name)) = reference.split_once('/') {
        return base()
            .filter(providers::name.eq(provider).or(providers::id.eq(provider)))
            .filter(accounts::name.eq(name))
            .first::<(AccountRow, String)>(conn)
            .optional()?
            .map(wrap)
            .ok_or_else(not_found);
    }
    let mut matches = base()
        .filter(accounts::name.eq(reference))
        .load::<(AccountRow, String)>(conn)?;
    match matches.len() {
        0 => Err(not_found()),
        1 => Ok(wrap(matches.remove(0))),
        _ => {
            let candidates: Vec<String> = matches
                .into_iter()
                .map(|m| wrap(m).qualified_name())
                .collect();
            Err(StoreError::Invalid(format!(
                "account name `{reference}` is ambiguous: use one of {}",
                candidates.join(", ")
            )))
        }
    }
}
