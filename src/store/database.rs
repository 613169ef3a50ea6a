//! The durable store: a PostgreSQL pool shared by all replicas, or an embedded
//! SQLite file for development and single-instance use.

use std::{str::FromStr, sync::Arc, time::Duration};

use secrecy::ExposeSecret;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    PgPool, SqlitePool,
};

use uuid::Uuid;

use super::{guard::Guard, Dependency, IdentityStore, StoreError, StoredKey};
use crate::{
    config::{Config, DatabaseConfig},
    users::{
        AuditEvent, AuditQuery, AuthzVersion, Credentials, NewUser, Role, RoleUpdate,
        StoredAuditEvent, User, UserPage, UserUpdate,
    },
};

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
                        // Half the dependency timeout: sqlx retries a refused
                        // connection until this deadline, so while PostgreSQL is
                        // down each call that probes it (see guard.rs) costs this
                        // long, and a login that happens to be the probe must still
                        // answer its 503 well within a second.
                        .acquire_timeout(timeout / 2)
                        .idle_timeout(Duration::from_secs(300))
                        .connect_lazy_with(options),
                )
            }
            DatabaseConfig::Embedded => {
                prepare_data_dir(&config.data_dir).map_err(|e| {
                    StoreError::Database(sqlx::Error::Configuration(
                        format!(
                            "cannot prepare AUTH_DATA_DIR {}: {e}",
                            config.data_dir.display()
                        )
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

/// The files of the embedded data directory; all of them are the owner's alone.
const DATA_FILES: [&str; 5] = [
    "auth.db",
    "auth.db-wal",
    "auth.db-shm",
    "key-encryption.key",
    "initial-admin-password",
];

/// Makes the embedded data directory private: it holds the password hashes, the
/// sessions and (without AUTH_KEY_ENCRYPTION_KEY) the key that opens the signing
/// keys. The directory is created 0700 and every file in it is 0600, whatever
/// the umask: the database file is created here, empty, before SQLite opens it,
/// because SQLite creates files by the umask and gives its -wal and -shm files
/// the database file's permissions. A directory that already exists is left as
/// it is (it may be the operator's), with a warning if others may enter it.
fn prepare_data_dir(dir: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        if dir.exists() {
            let mode = std::fs::metadata(dir)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(data_dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "AUTH_DATA_DIR is open to other users; its files are 0600, but make the directory 0700");
            }
        } else {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("auth.db"))
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        for name in DATA_FILES {
            let path = dir.join(name);
            if path.exists() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// Runs one [`IdentityStore`] method on whichever backend is configured, under the
/// guard (timeout and circuit breaker), so each method below is one line and the
/// two backends are never spelled out per method.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        $self
            .guard
            .run(async {
                match &$self.pool {
                    Pool::Postgres(pool) => pool.$method($($arg),*).await,
                    Pool::Sqlite(pool) => pool.$method($($arg),*).await,
                }
            })
            .await
    };
}

impl IdentityStore for Database {
    async fn create_user(&self, user: &NewUser, audit: &AuditEvent) -> Result<User, StoreError> {
        dispatch!(self.create_user(user, audit))
    }
    async fn get_user(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        dispatch!(self.get_user(id))
    }
    async fn find_credentials(&self, username: &str) -> Result<Option<Credentials>, StoreError> {
        dispatch!(self.find_credentials(username))
    }
    async fn list_users(
        &self,
        filter: Option<&str>,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<UserPage, StoreError> {
        dispatch!(self.list_users(filter, cursor, limit))
    }
    async fn update_user(
        &self,
        id: Uuid,
        update: &UserUpdate,
        audit: &AuditEvent,
    ) -> Result<User, StoreError> {
        dispatch!(self.update_user(id, update, audit))
    }
    async fn delete_user(&self, id: Uuid, audit: &AuditEvent) -> Result<(), StoreError> {
        dispatch!(self.delete_user(id, audit))
    }
    async fn replace_password_hash(
        &self,
        id: Uuid,
        expected: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError> {
        dispatch!(self.replace_password_hash(id, expected, password_hash))
    }
    async fn create_first_user(
        &self,
        user: &NewUser,
        role: &Role,
        audit: &AuditEvent,
    ) -> Result<Option<User>, StoreError> {
        dispatch!(self.create_first_user(user, role, audit))
    }
    async fn count_users(&self) -> Result<i64, StoreError> {
        dispatch!(self.count_users())
    }
    async fn list_roles(&self) -> Result<Vec<Role>, StoreError> {
        dispatch!(self.list_roles())
    }
    async fn get_role(&self, name: &str) -> Result<Option<Role>, StoreError> {
        dispatch!(self.get_role(name))
    }
    async fn create_role(&self, role: &Role, audit: &AuditEvent) -> Result<Role, StoreError> {
        dispatch!(self.create_role(role, audit))
    }
    async fn update_role(
        &self,
        name: &str,
        update: &RoleUpdate,
        audit: &AuditEvent,
    ) -> Result<(Role, Vec<AuthzVersion>), StoreError> {
        dispatch!(self.update_role(name, update, audit))
    }
    async fn delete_role(
        &self,
        name: &str,
        audit: &AuditEvent,
    ) -> Result<Vec<AuthzVersion>, StoreError> {
        dispatch!(self.delete_role(name, audit))
    }
    async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        dispatch!(self.record_audit(event))
    }
    async fn audit_events(&self, query: &AuditQuery) -> Result<Vec<StoredAuditEvent>, StoreError> {
        dispatch!(self.audit_events(query))
    }
    async fn prune_audit(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        batch: u32,
    ) -> Result<Option<u64>, StoreError> {
        dispatch!(self.prune_audit(before, batch))
    }
    async fn load_configuration(&self) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        dispatch!(self.load_configuration())
    }
    async fn configuration_version(&self) -> Result<String, StoreError> {
        dispatch!(self.configuration_version())
    }
    async fn set_configuration(
        &self,
        key: &str,
        value: &serde_json::Value,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        dispatch!(self.set_configuration(key, value, audit))
    }
    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        dispatch!(self.signing_keys())
    }
    async fn add_signing_key(
        &self,
        key: &StoredKey,
        expected_newest: Option<&str>,
    ) -> Result<bool, StoreError> {
        dispatch!(self.add_signing_key(key, expected_newest))
    }
    async fn delete_signing_keys(&self, kids: &[String]) -> Result<(), StoreError> {
        dispatch!(self.delete_signing_keys(kids))
    }
}

// Small pieces both backends share.

/// Maps a unique violation to `Conflict` naming what collided, the same on both
/// backends (PostgreSQL reports the index name, SQLite only a message that names
/// the index or the column). Other errors convert as usual.
pub(super) fn conflict(e: sqlx::Error) -> StoreError {
    let Some(db) = e.as_database_error().filter(|d| d.is_unique_violation()) else {
        return e.into();
    };
    let what = db.constraint().unwrap_or_else(|| db.message());
    let field = if what.contains("users_username_key") {
        "username"
    } else if what.contains("users_email_key") {
        "email"
    } else if what.contains("users_username_ascii_key") {
        "username"
    } else if what == "roles_pkey" || what.ends_with(": roles.name") {
        "role"
    } else if what == "signing_keys_pkey" || what.ends_with(": signing_keys.kid") {
        "kid"
    } else {
        return e.into();
    };
    StoreError::Conflict(field.to_owned())
}

/// Sorted bytewise, duplicates removed: the order [`User`] and [`Role`] promise,
/// independent of either database's collation.
pub(super) fn distinct_sorted(mut items: Vec<String>) -> Vec<String> {
    items.sort_unstable();
    items.dedup();
    items
}

/// The audit event of a user's creation, given the new user's id when it names no
/// one else: the caller cannot know the id, the store makes it. An event about
/// someone else (the acting administrator) is left alone.
pub(super) fn audit_for_new_user(audit: &AuditEvent, id: Uuid, username: &str) -> AuditEvent {
    let mut event = audit.clone();
    if event.user_id.is_none() && event.username.as_deref().is_none_or(|u| u == username) {
        event.user_id = Some(id);
        event.username = Some(username.to_owned());
    }
    event
}
