//! Rate limit rows. Scope: provider-wide (no model, no account), per model, or an account's
//! override (optionally per model). Each row is one [`LimitSpec`].

use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::rate_limits;
use super::{DbConn, StoreError};
use crate::domain::FixedReset;
use crate::domain::{LimitKind, LimitSpec};

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable)]
#[diesel(table_name = rate_limits)]
pub struct RateLimitRow {
    pub id: String,
    pub provider_id: String,
    pub model_id: Option<String>,
    pub account_id: Option<String>,
    pub kind: String,
    pub limit_value: i64,
    pub period_ms: Option<i64>,
    pub reset_cron: Option<String>,
    pub reset_timezone: Option<String>,
    pub created_at: NaiveDateTime,
}

/// Which set of limits a replacement touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitOwner<'a> {
    pub provider_id: &'a str,
    pub model_id: Option<&'a str>,
    pub account_id: Option<&'a str>,
}

impl RateLimitRow {
    /// The domain limit this row stores.
    pub fn spec(&self) -> Result<LimitSpec, StoreError> {
        let kind: LimitKind = self.kind.parse().map_err(StoreError::Invalid)?;
        let invalid =
            |what: &str| StoreError::Invalid(format!("rate limit {}: invalid {what}", self.id));
        let limit = u64::try_from(self.limit_value).map_err(|_| invalid("limit"))?;
        let per = match self.period_ms {
            Some(ms) => Some(Duration::from_millis(
                u64::try_from(ms).map_err(|_| invalid("period"))?,
            )),
            None => None,
        };
        let reset = match (&self.reset_cron, &self.reset_timezone) {
            (Some(cron), timezone) => Some(FixedReset {
                cron: cron.clone(),
                timezone: timezone.clone().unwrap_or_else(|| "UTC".to_string()),
            }),
            (None, _) => None,
        };
        Ok(LimitSpec {
            kind,
            limit,
            per,
            reset,
        })
    }

    fn new(owner: LimitOwner<'_>, spec: &LimitSpec) -> RateLimitRow {
        RateLimitRow {
            id: super::new_id(),
            provider_id: owner.provider_id.to_string(),
            model_id: owner.model_id.map(str::to_string),
            account_id: owner.account_id.map(str::to_string),
            kind: spec.kind.as_str().to_string(),
            limit_value: i64::try_from(spec.limit).unwrap_or(i64::MAX),
            period_ms: spec
                .per
                .map(|p| i64::try_from(p.as_millis()).unwrap_or(i64::MAX)),
            reset_cron: spec.reset.as_ref().map(|r| r.cron.clone()),
            reset_timezone: spec.reset.as_ref().map(|r| r.timezone.clone()),
            created_at: super::now(),
        }
    }
}

/// Replaces the whole set of limits of one owner (a PUT, or the config file's declaration).
pub fn replace(
    conn: &mut DbConn,
    owner: LimitOwner<'_>,
    specs: &[LimitSpec],
) -> Result<(), StoreError> {
    conn.transaction(|conn| {
        let mut query = diesel::delete(rate_limits::table)
            .filter(rate_limits::provider_id.eq(owner.provider_id))
            .into_boxed();
        query = match owner.model_id {
            Some(model) => query.filter(rate_limits::model_id.eq(model)),
            None => query.filter(rate_limits::model_id.is_null()),
        };
        query = match owner.account_id {
            Some(account) => query.filter(rate_limits::account_id.eq(account)),
            None => query.filter(rate_limits::account_id.is_null()),
        };
        query.execute(conn)?;
        for spec in specs {
            diesel::insert_into(rate_limits::table)
                .values(RateLimitRow::new(owner, spec))
                .execute(conn)?;
        }
        super::settings::bump_catalog(conn)
    })
}

/// Every limit of a provider, its models and its accounts.
pub fn list_for_provider(
    conn: &mut DbConn,
    provider_id: &str,
) -> Result<Vec<RateLimitRow>, StoreError> {
    Ok(rate_limits::table
        .filter(rate_limits::provider_id.eq(provider_id))
        .order((rate_limits::kind, rate_limits::period_ms))
        .select(RateLimitRow::as_select())
        .load(conn)?)
}

pub fn list_all(conn: &mut DbConn) -> Result<Vec<RateLimitRow>, StoreError> {
    Ok(rate_limits::table
        .select(RateLimitRow::as_select())
        .load(conn)?)
}
