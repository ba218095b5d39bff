//! Storage: one diesel connection type over Postgres and embedded SQLite, the embedded migrations,
//! and the queries, as plain functions over `&mut DbConn` (one file per table group).
//!
//! The backend is chosen by the URL scheme at run time. Queries are blocking: async callers run
//! them off the async threads (a `SyncArbiter` or `web::block`).

pub mod accounts;
pub mod activity;
pub mod audit;
pub mod keys;
pub mod limits;
pub mod lock;
pub mod logs;
pub mod providers;
pub mod retention;
pub mod rollup;
pub mod schema;
pub mod settings;
mod sql;
pub mod state;
pub mod stats;
mod upsert;

use std::path::Path;
use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::r2d2::{self, ManageConnection, PooledConnection};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness as _};

use crate::config::{Config, DatabaseBackend};
use crate::secrets::redact_url;

const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// How long a caller waits for a pooled connection before the store reports itself unavailable.
const POOL_WAIT: Duration = Duration::from_secs(5);

/// One connection type over both backends. The SQLite variant is last: SQLite accepts any string
/// as a path, so it must never be the fallback of a failed Postgres URL.
#[derive(diesel::MultiConnection)]
pub enum DbConn {
    Postgres(diesel::PgConnection),
    Sqlite(diesel::SqliteConnection),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the database {url}: {message}")]
    Connect { url: String, message: String },
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Query(#[from] DieselError),
}

impl StoreError {
    /// Whether retrying later may succeed (connection loss, timeouts), as opposed to a request that
    /// will fail the same way every time.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect { .. } | StoreError::Unavailable(_) => true,
            StoreError::Query(DieselError::DatabaseError(kind, _)) => matches!(
                kind,
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::SerializationFailure
            ),
            StoreError::Query(DieselError::BrokenTransactionManager) => true,
            _ => false,
        }
    }
}

/// `text` with every NUL replaced by U+FFFD: Postgres refuses the NUL character in text columns
/// (SQLite would take it), and text that reaches the store from outside — a client's model name,
/// an upstream's error message — may hold one. Borrowed when there is none (the usual case).
pub fn without_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// Whether `error` is Postgres refusing a NUL character in text (SQLSTATE 22021, "invalid byte
/// sequence for encoding UTF8: 0x00"): bad input, not a failure of the store.
pub fn is_nul_refusal(error: &StoreError) -> bool {
    match error {
        StoreError::Query(DieselError::DatabaseError(_, info)) => info.message().contains("0x00"),
        _ => false,
    }
}

/// Maps a unique-constraint violation to `Conflict(what)`, leaving other errors as they are.
pub(crate) fn conflict_as(what: impl Into<String>) -> impl FnOnce(DieselError) -> StoreError {
    move |e| match e {
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
            StoreError::Conflict(what.into())
        }
        other => StoreError::Query(other),
    }
}

/// Which backend a connection talks to (for the few places where SQL must differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Opens connections of the configured backend, dispatching on the URL scheme ourselves so that a
/// failure reports libpq's or SQLite's own message.
#[derive(Debug, Clone)]
pub struct ConnectionFactory {
    backend: DatabaseBackend,
}

impl ConnectionFactory {
    pub fn new(backend: DatabaseBackend) -> Self {
        ConnectionFactory { backend }
    }

    pub fn backend(&self) -> Backend {
        match self.backend {
            DatabaseBackend::Postgres(_) => Backend::Postgres,
            DatabaseBackend::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The database location with any password removed, for messages and logs.
    pub fn display_url(&self) -> String {
        match &self.backend {
            DatabaseBackend::Postgres(url) => redact_url(url.expose()),
            DatabaseBackend::Sqlite(path) => format!("sqlite://{}", path.display()),
        }
    }

    pub fn connect(&self) -> Result<DbConn, StoreError> {
        let fail = |message: String| StoreError::Connect {
            url: self.display_url(),
            message,
        };
        match &self.backend {
            DatabaseBackend::Postgres(url) => diesel::PgConnection::establish(url.expose())
                .map(DbConn::Postgres)
                .map_err(|e| fail(e.to_string().trim().to_string())),
            DatabaseBackend::Sqlite(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
                }
                let path = path
                    .to_str()
                    .ok_or_else(|| fail("the path is not valid UTF-8".into()))?;
                let mut conn =
                    diesel::SqliteConnection::establish(path).map_err(|e| fail(e.to_string()))?;
                // WAL lets readers run beside the one writer; the busy timeout makes a writer wait
                // for the lock instead of failing at once; foreign keys are off by default.
                conn.batch_execute(
                    "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000; \
                     PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;",
                )
                .map_err(|e| fail(e.to_string()))?;
                Ok(DbConn::Sqlite(conn))
            }
        }
    }
}

impl ManageConnection for ConnectionFactory {
    type Connection = DbConn;
    type Error = StoreError;

    fn connect(&self) -> Result<DbConn, StoreError> {
        ConnectionFactory::connect(self)
    }

    fn is_valid(&self, conn: &mut DbConn) -> Result<(), StoreError> {
        conn.batch_execute("SELECT 1").map_err(StoreError::from)
    }

    fn has_broken(&self, _conn: &mut DbConn) -> bool {
        false
    }
}

/// The pooled store. Cloning is cheap (the pool is shared).
#[derive(Clone)]
pub struct Store {
    pool: r2d2::Pool<ConnectionFactory>,
    backend: Backend,
    display_url: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.display_url)
            .finish()
    }
}

pub type PooledConn = PooledConnection<ConnectionFactory>;

impl Store {
    /// Connects once (so a bad URL or a down server is reported with the driver's own message),
    /// then builds the pool. Does not run migrations.
    pub fn open(backend: &DatabaseBackend, pool_size: u32) -> Result<Store, StoreError> {
        let factory = ConnectionFactory::new(backend.clone());
        drop(factory.connect()?);
        let display_url = factory.display_url();
        let kind = factory.backend();
        let pool = r2d2::Pool::builder()
            .max_size(pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(POOL_WAIT)
            // Our own errors are reported to callers; r2d2's background attempts stay quiet.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(factory);
        Ok(Store {
            pool,
            backend: kind,
            display_url,
        })
    }

    /// Opens the store and applies pending migrations; returns the names of those applied.
    pub fn open_and_migrate(
        backend: &DatabaseBackend,
        pool_size: u32,
    ) -> Result<(Store, Vec<String>), StoreError> {
        let store = Store::open(backend, pool_size)?;
        let applied = run_migrations(&mut *store.conn()?)?;
        Ok((store, applied))
    }

    pub fn conn(&self) -> Result<PooledConn, StoreError> {
        self.pool
            .get()
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database location with any password removed.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    /// Whether the database answers a trivial query now.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.conn()?.batch_execute("SELECT 1")?;
        Ok(())
    }
}

/// Opens the configured database and applies pending migrations, so every command sees the
/// current schema.
pub fn open_store(config: &Config) -> Result<Store, StoreError> {
    open_and_log_migrations(config).map(|(store, _)| store)
}

/// Opens the configured database, applies and logs pending migrations, and returns their names.
pub fn open_and_log_migrations(config: &Config) -> Result<(Store, Vec<String>), StoreError> {
    let (store, applied) =
        Store::open_and_migrate(&config.database_backend(), config.database.pool_size)?;
    for name in &applied {
        log::info!(migration = name.as_str(), database = store.display_url(); "applied database migration");
    }
    Ok((store, applied))
}

/// Applies pending migrations on the matched backend, under the start lock (instances starting
/// together migrate one after the other); returns their names.
pub fn run_migrations(conn: &mut DbConn) -> Result<Vec<String>, StoreError> {
    lock::with_start_lock(conn, |conn| {
        let applied = match conn {
            DbConn::Postgres(c) => c.run_pending_migrations(POSTGRES_MIGRATIONS),
            DbConn::Sqlite(c) => c.run_pending_migrations(SQLITE_MIGRATIONS),
        }
        .map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(applied.iter().map(ToString::to_string).collect())
    })
}

/// The names of migrations not yet applied (for `quotagate doctor`).
pub fn pending_migrations(conn: &mut DbConn) -> Result<Vec<String>, StoreError> {
    let names = match conn {
        DbConn::Postgres(c) => c
            .pending_migrations(POSTGRES_MIGRATIONS)
            .map(|pending| pending.iter().map(|m| m.name().to_string()).collect()),
        DbConn::Sqlite(c) => c
            .pending_migrations(SQLITE_MIGRATIONS)
            .map(|pending| pending.iter().map(|m| m.name().to_string()).collect()),
    };
    names.map_err(|e| StoreError::Migration(e.to_string()))
}

/// A consistent copy of an embedded database, taken while the server runs (`VACUUM INTO` reads
/// one snapshot). Postgres is backed up with its own tools (see the README).
pub fn backup_sqlite(conn: &mut DbConn, to: &Path) -> Result<(), StoreError> {
    match conn {
        DbConn::Sqlite(c) => {
            if to.exists() {
                return Err(StoreError::Conflict(format!("{}", to.display())));
            }
            let target = to
                .to_str()
                .ok_or_else(|| StoreError::Invalid("the backup path is not valid UTF-8".into()))?;
            diesel::sql_query("VACUUM INTO ?")
                .bind::<diesel::sql_types::Text, _>(target)
                .execute(c)?;
            Ok(())
        }
        DbConn::Postgres(_) => Err(StoreError::Invalid(
            "`quotagate backup` copies the embedded SQLite database; back up Postgres with pg_dump \
             (see the README)"
                .into(),
        )),
    }
}

/// A new random id (uuid v4, stored as text).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The current time as stored: UTC, without offset, in whole microseconds (Postgres keeps no more,
/// so a value read back equals the value written).
pub fn now() -> chrono::NaiveDateTime {
    use chrono::SubsecRound as _;
    chrono::Utc::now().naive_utc().trunc_subsecs(6)
}
