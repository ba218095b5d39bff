//! Providers and their models.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::{models, providers};
use super::{conflict_as, DbConn, StoreError};

/// Who declared a provider or an account: the config file wins for what it declares; what the API
/// or the CLI created is left alone by the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    Api,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = providers, treat_none_as_null = true)]
pub struct ProviderRow {
    pub id: String,
    pub name: String,
    pub base_url: String,
    pub strategy: String,
    pub auth_header: String,
    pub auth_scheme: String,
    pub timeout_ms: Option<i64>,
    pub max_completion_tokens: i64,
    pub tokenizer: String,
    /// JSON `{"requests": "rpm", "tokens": "tpm"}`.
    pub ratelimit_headers: Option<String>,
    pub active: bool,
    pub source: String,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable)]
#[diesel(table_name = models)]
pub struct ModelRow {
    pub id: String,
    pub provider_id: String,
    pub name: String,
    pub price_input: f64,
    pub price_output: f64,
    pub created_at: NaiveDateTime,
}

pub fn insert(conn: &mut DbConn, row: &ProviderRow) -> Result<(), StoreError> {
    diesel::insert_into(providers::table)
        .values(row)
        .execute(conn)
        .map_err(conflict_as(format!("provider `{}`", row.name)))?;
    super::settings::bump_catalog(conn)
}

/// Writes every field of `row` (matched by id).
pub fn update(conn: &mut DbConn, row: &ProviderRow) -> Result<(), StoreError> {
    let n = diesel::update(providers::table.find(&row.id))
        .set(row)
        .execute(conn)
        .map_err(conflict_as(format!("provider `{}`", row.name)))?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("provider `{}`", row.id)));
    }
    super::settings::bump_catalog(conn)
}

pub fn delete(conn: &mut DbConn, id: &str) -> Result<(), StoreError> {
    let n = diesel::delete(providers::table.find(id)).execute(conn)?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("provider `{id}`")));
    }
    super::settings::bump_catalog(conn)
}

pub fn list(conn: &mut DbConn) -> Result<Vec<ProviderRow>, StoreError> {
    Ok(providers::table
        .order(providers::name)
        .select(ProviderRow::as_select())
        .load(conn)?)
}

/// A provider by id or by name.
pub fn find(conn: &mut DbConn, id_or_name: &str) -> Result<ProviderRow, StoreError> {
    providers::table
        .filter(
            providers::id
                .eq(id_or_name)
                .or(providers::name.eq(id_or_name)),
        )
        .select(ProviderRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("provider `{id_or_name}`")))
}

pub fn find_by_name(conn: &mut DbConn, name: &str) -> Result<Option<ProviderRow>, StoreError> {
    Ok(providers::table
        .filter(providers::name.eq(name))
        .select(ProviderRow::as_select())
        .first(conn)
        .optional()?)
}

pub fn list_models(conn: &mut DbConn, provider_id: &str) -> Result<Vec<ModelRow>, StoreError> {
    Ok(models::table
        .filter(models::provider_id.eq(provider_id))
        .order(models::name)
        .select(ModelRow::as_select())
        .load(conn)?)
}

pub fn list_all_models(conn: &mut DbConn) -> Result<Vec<ModelRow>, StoreError> {
    Ok(models::table
        .order((models::provider_id, models::name))
        .select(ModelRow::as_select())
        .load(conn)?)
}

/// Creates the model or updates its prices (one `INSERT … ON CONFLICT DO UPDATE`); the id of an
/// existing model never changes, so limits and history that refer to it stay attached.
pub fn upsert_model(
    conn: &mut DbConn,
    provider_id: &str,
    name: &str,
    price_input: f64,
    price_output: f64,
) -> Result<ModelRow, StoreError> {
    use diesel::upsert::excluded;
    let new = ModelRow {
        id: super::new_id(),
        provider_id: provider_id.to_string(),
        name: name.to_string(),
        price_input,
        price_output,
        created_at: super::now(),
    };
    let upsert = diesel::insert_into(models::table)
        .values(&new)
        .on_conflict((models::provider_id, models::name))
        .do_update()
        .set((
            models::price_input.eq(excluded(models::price_input)),
            models::price_output.eq(excluded(models::price_output)),
        ))
        .returning(models::all_columns);
    let row = super::sql::get_result_native(conn, upsert)?;
    super::settings::bump_catalog(conn)?;
    Ok(row)
}

/// Removes the provider's models whose names are not in `keep` (their limits go with them).
pub fn delete_models_except(
    conn: &mut DbConn,
    provider_id: &str,
    keep: &[&str],
) -> Result<usize, StoreError> {
    let deleted = diesel::delete(
        models::table
            .filter(models::provider_id.eq(provider_id))
            .filter(models::name.ne_all(keep)),
    )
    .execute(conn)?;
    if deleted > 0 {
        super::settings::bump_catalog(conn)?;
    }
    Ok(deleted)
}
