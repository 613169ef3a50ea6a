//! Storage: PostgreSQL or embedded SQLite for durable data, Redis for sessions.
//!
//! Stores know nothing of HTTP. Every call to a shared dependency goes through a
//! [`guard::Guard`] (timeout + circuit breaker), so the rest of the service sees
//! a dependency outage as one error, [`StoreError::Unavailable`].

pub mod database;
pub mod guard;
pub mod identity;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::fmt;

pub use self::redis::Redis;
pub use database::Database;
pub use identity::{IdentityStore, StoredKey};

/// A shared dependency, as named in health output and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dependency {
    Database,
    Redis,
}

impl Dependency {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::Redis => "redis",
        }
    }
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The storage layer's error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Unreachable, timed out, or short-circuited: try again later.
    #[error("{0} is unavailable")]
    Unavailable(Dependency),
    /// A unique constraint said no; the text names what collided.
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("not found")]
    NotFound,
    /// The change would leave no enabled user with the admin permission.
    #[error("the change would leave no administrator")]
    LastAdmin,
    /// The request refers to something that does not exist (an unknown role).
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("redis error: {0}")]
    Redis(::redis::RedisError),
    /// Stored data that does not decode: a bug or tampering, never user input.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the dependency did not answer (as opposed to answering "no").
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::Protocol(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| is_transient_database_code(&c))
            }
            // Everything but an answer Redis gave on purpose (a script error, a
            // type mismatch, a bug of ours) means Redis is not there for us right
            // now: refused, reset, timed out, cluster down or mid-failover, no
            // node for the slot.
            Self::Redis(e) => !matches!(
                e.kind(),
                ::redis::ErrorKind::ResponseError
                    | ::redis::ErrorKind::TypeError
                    | ::redis::ErrorKind::ExecAbortError
                    | ::redis::ErrorKind::NoScriptError
                    | ::redis::ErrorKind::CrossSlot
                    | ::redis::ErrorKind::InvalidClientConfig
            ),
            _ => false,
        }
    }
}

/// Whether a database error code means "not now" rather than "no".
///
/// PostgreSQL's SQLSTATEs (five characters): class 08 (connection exception), 57P
/// (operator intervention: shutdown, crash), 53 (insufficient resources). SQLite's
/// result codes (numbers; the low byte is the primary code): SQLITE_BUSY (5) and
/// SQLITE_LOCKED (6) and their extended forms, when a lock was not had within the
/// busy timeout. The embedded database is then busy, not broken: 503 and
/// Retry-After, not 500.
fn is_transient_database_code(code: &str) -> bool {
    if code.len() == 5 {
        return code.starts_with("08") || code.starts_with("57P") || code.starts_with("53");
    }
    code.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6))
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::RowNotFound => Self::NotFound,
            sqlx::Error::Database(ref d) if d.is_unique_violation() => {
                Self::Conflict(d.constraint().unwrap_or("unique").to_owned())
            }
            e => Self::Database(e),
        }
    }
}

impl From<::redis::RedisError> for StoreError {
    fn from(e: ::redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

#[cfg(test)]
mod tests {
    use super::is_transient_database_code;

    #[test]
    fn transient_database_codes() {
        // PostgreSQL: connection lost, admin shutdown, too many connections.
        for code in ["08006", "57P01", "53300"] {
            assert!(is_transient_database_code(code), "{code}");
        }
        // PostgreSQL: unique violation, syntax error, serialization failure.
        for code in ["23505", "42601", "40001"] {
            assert!(!is_transient_database_code(code), "{code}");
        }
        // SQLite: BUSY, BUSY_SNAPSHOT, BUSY_TIMEOUT, LOCKED, LOCKED_SHAREDCACHE.
        for code in ["5", "517", "773", "6", "262"] {
            assert!(is_transient_database_code(code), "{code}");
        }
        // SQLite: ERROR, CONSTRAINT_UNIQUE, READONLY, CORRUPT.
        for code in ["1", "2067", "8", "11"] {
            assert!(!is_transient_database_code(code), "{code}");
        }
    }
}
