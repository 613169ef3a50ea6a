//! The durable store: a PostgreSQL pool shared by all replicas, or an embedded
//! SQLite file for development and single-instance use.

use std::{str::FromStr, sync::Arc, time::Duration};

use secrecy::ExposeSecret;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    PgPool, SqlitePool,
};

use super::{guard::Guard, Dependency, StoreError};
use crate::config::{Config, DatabaseConfig};

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The connection pool of the configured backend.
#[derive(Clone)]
pub enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// The durable store with its guard. Cheap to clone.
#[derive(Clone)]
pub struct Database {
    pub pool: Pool,
    pub guard: Arc<Guard>,
}

impl Database {
    /// Builds the pool without connecting: a replica must start (and answer its
    /// liveness probe) even while PostgreSQL is down, and connect when it returns.
    pub fn connect_lazy(config: &Config) -> Result<Self, StoreError> {
        let timeout = config.dependency_timeout;
        let pool = match &config.database {
            DatabaseConfig::Postgres { url } => {
                let options = PgConnectOptions::from_str(url.expose_secret())
                    .map_err(StoreError::Database)?
                    .application_name("auth-service")
                    // A statement that runs away must not hold a pooled connection.
                    .options([("statement_timeout", "5000")]);
                Pool::Postgres(
                    PgPoolOptions::new()
                        .max_connections(16)
                        .min_connections(0)
                        .acquire_timeout(timeout)
                        .idle_timeout(Duration::from_secs(300))
                        .connect_lazy_with(options),
                )
            }
            DatabaseConfig::Embedded => {
                std::fs::create_dir_all(&config.data_dir).map_err(|e| {
                    StoreError::Database(sqlx::Error::Configuration(
                        format!("cannot create AUTH_DATA_DIR {}: {e}", config.data_dir.display())
                            .into(),
                    ))
                })?;
                let options = SqliteConnectOptions::new()
                    .filename(config.data_dir.join("auth.db"))
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(5));
                Pool::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(8)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_lazy_with(options),
                )
            }
        };
        Ok(Self {
            pool,
            guard: Arc::new(Guard::new(Dependency::Database, timeout)),
        })
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self.pool, Pool::Sqlite(_))
    }

    /// Applies pending migrations. On PostgreSQL, sqlx holds an advisory lock for
    /// the whole run, so replicas starting at once apply each migration once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.pool {
            Pool::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
            Pool::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    /// One round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.guard
            .run(async {
                match &self.pool {
                    Pool::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
                    Pool::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
                }
            })
            .await
    }

    pub async fn close(&self) {
        match &self.pool {
            Pool::Postgres(pool) => pool.close().await,
            Pool::Sqlite(pool) => pool.close().await,
        }
    }
}
