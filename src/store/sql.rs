//! Statements the typed query builder cannot run on the one-type connection: raw SQL written
//! once for both backends ([`statement`]: `?` placeholders, numbered `$n` for Postgres), and typed
//! statements run on the backend's own connection ([`execute_native`], [`get_result_native`]:
//! diesel's `ON CONFLICT` clauses).

use diesel::pg::Pg;
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::query_dsl::methods::{ExecuteDsl, LoadQuery};
use diesel::result::Error as DieselError;

use super::{DbConn, MultiBackend};

/// A raw statement for either backend (see [`statement`]).
pub(super) type Statement = BoxedSqlQuery<'static, MultiBackend, SqlQuery>;
/// A raw statement for Postgres alone (its array binds).
pub(super) type PgStatement = BoxedSqlQuery<'static, Pg, SqlQuery>;

/// A raw statement for `conn`'s backend: the `?` placeholders of `sql` become `$1, $2, …` on
/// Postgres. (The statements of the store have no `?` inside string literals.)
pub(super) fn statement(conn: &DbConn, sql: &str) -> Statement {
    let text = match conn {
        DbConn::Postgres(_) => {
            let mut numbered = String::with_capacity(sql.len() + 32);
            let mut n = 0;
            for c in sql.chars() {
                if c == '?' {
                    n += 1;
                    numbered.push('$');
                    numbered.push_str(&n.to_string());
                } else {
                    numbered.push(c);
                }
            }
            numbered
        }
        DbConn::Sqlite(_) => sql.to_string(),
    };
    diesel::sql_query(text).into_boxed()
}

/// Runs `query` on the connection of `conn`'s backend. For statements both backends run but the
/// one-type connection cannot build — diesel's `ON CONFLICT` clauses — so an upsert is one typed
/// statement rather than an update followed by an insert.
pub(crate) fn execute_native<Q>(conn: &mut DbConn, query: Q) -> Result<usize, DieselError>
where
    Q: ExecuteDsl<diesel::PgConnection> + ExecuteDsl<diesel::SqliteConnection>,
{
    match conn {
        DbConn::Postgres(c) => ExecuteDsl::execute(query, c),
        DbConn::Sqlite(c) => ExecuteDsl::execute(query, c),
    }
}

/// [`execute_native`] for a statement that returns a row (`… RETURNING`).
pub(crate) fn get_result_native<'q, Q, T>(conn: &mut DbConn, query: Q) -> Result<T, DieselError>
where
    Q: LoadQuery<'q, diesel::PgConnection, T> + LoadQuery<'q, diesel::SqliteConnection, T>,
{
    match conn {
        DbConn::Postgres(c) => query.get_result(c),
        DbConn::Sqlite(c) => query.get_result(c),
    }
}
