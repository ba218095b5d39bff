//! The bulk upsert of the rollups: many rows of one table in `INSERT … ON CONFLICT (key) DO
//! UPDATE` statements that add the new sums to the stored ones.

use chrono::{NaiveDate, NaiveDateTime};
use diesel::pg::Pg;
use diesel::sql_types::{Array, BigInt, Date, Double, Text, Timestamp};
use diesel::RunQueryDsl as _;

use super::sql::{statement, PgStatement, Statement};
use super::{DbConn, StoreError};

/// Rows of one rollup table to upsert: `INSERT … ON CONFLICT (key) DO UPDATE` adding the new sums
/// to the stored ones (or `DO NOTHING` when there are none).
///
/// Postgres gets one statement whatever the batch, its rows as one array per column
/// (`UNNEST`): a few typed parameters parse and plan much faster than a `VALUES` list with
/// thousands. SQLite, which has no arrays, gets `VALUES` lists of bound scalars.
pub(super) struct Upsert {
    table: &'static str,
    key: &'static [&'static str],
    added: &'static [&'static str],
    /// A column set to the new row's value on conflict (a timestamp).
    pub(super) replaced: Option<&'static str>,
    /// Column-major: key columns, added columns, then the replaced column.
    pub(super) values: Vec<Column>,
}

/// Rollup rows per SQLite statement: 14 binds each stays under its 32,766 bound values.
const ROLLUP_ROWS_PER_STATEMENT: usize = 1000;

impl Upsert {
    pub(super) fn new(
        table: &'static str,
        key: &'static [&'static str],
        added: &'static [&'static str],
    ) -> Upsert {
        Upsert {
            table,
            key,
            added,
            replaced: None,
            values: Vec::new(),
        }
    }

    fn sql(&self, rows: &str) -> String {
        let columns: Vec<&str> = self
            .key
            .iter()
            .chain(self.added)
            .chain(&self.replaced)
            .copied()
            .collect();
        let table = self.table;
        let mut set: Vec<String> = self
            .added
            .iter()
            .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
            .collect();
        set.extend(self.replaced.map(|c| format!("{c} = excluded.{c}")));
        let action = if set.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", set.join(", "))
        };
        format!(
            "INSERT INTO {table} ({}) {rows} ON CONFLICT ({}) {action}",
            columns.join(", "),
            self.key.join(", ")
        )
    }

    pub(super) fn run(self, conn: &mut DbConn) -> Result<(), StoreError> {
        let rows = self.values.first().map_or(0, Column::len);
        if rows == 0 {
            return Ok(());
        }
        match conn {
            DbConn::Postgres(pg) => {
                let arrays: Vec<String> =
                    (1..=self.values.len()).map(|n| format!("${n}")).collect();
                let sql = self.sql(&format!("SELECT * FROM UNNEST({})", arrays.join(", ")));
                let mut query = diesel::sql_query(sql).into_boxed::<Pg>();
                for column in self.values {
                    query = column.bind_array(query);
                }
                query.execute(pg)?;
            }
            DbConn::Sqlite(_) => {
                for start in (0..rows).step_by(ROLLUP_ROWS_PER_STATEMENT) {
                    let end = (start + ROLLUP_ROWS_PER_STATEMENT).min(rows);
                    let tuple = format!("({})", vec!["?"; self.values.len()].join(", "));
                    let sql = self.sql(&format!("VALUES {}", vec![tuple; end - start].join(", ")));
                    let mut query = statement(conn, &sql);
                    for row in start..end {
                        for column in &self.values {
                            query = column.bind_value(row, query);
                        }
                    }
                    query.execute(conn)?;
                }
            }
        }
        Ok(())
    }
}

/// One column of the rows of an [`Upsert`].
pub(super) enum Column {
    Date(Vec<NaiveDate>),
    Text(Vec<String>),
    BigInt(Vec<i64>),
    Double(Vec<f64>),
    Timestamp(Vec<NaiveDateTime>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Date(v) => v.len(),
            Column::Text(v) => v.len(),
            Column::BigInt(v) => v.len(),
            Column::Double(v) => v.len(),
            Column::Timestamp(v) => v.len(),
        }
    }

    /// Binds row `i`'s value.
    fn bind_value(&self, i: usize, query: Statement) -> Statement {
        match self {
            Column::Date(v) => query.bind::<Date, _>(v[i]),
            Column::Text(v) => query.bind::<Text, _>(v[i].clone()),
            Column::BigInt(v) => query.bind::<BigInt, _>(v[i]),
            Column::Double(v) => query.bind::<Double, _>(v[i]),
            Column::Timestamp(v) => query.bind::<Timestamp, _>(v[i]),
        }
    }

    /// Binds the whole column as one Postgres array.
    fn bind_array(self, query: PgStatement) -> PgStatement {
        match self {
            Column::Date(v) => query.bind::<Array<Date>, _>(v),
            Column::Text(v) => query.bind::<Array<Text>, _>(v),
            Column::BigInt(v) => query.bind::<Array<BigInt>, _>(v),
            Column::Double(v) => query.bind::<Array<Double>, _>(v),
            Column::Timestamp(v) => query.bind::<Array<Timestamp>, _>(v),
        }
    }
}
