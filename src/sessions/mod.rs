//! Sessions, refresh-token state and login-failure counters.
//!
//! Shared by every replica: in Redis (Cluster or single) in production, in the
//! embedded SQLite file in embedded mode. Both implement [`SessionStore`]; the
//! [`Sessions`] enum picks the configured one. Every operation that changes more
//! than one thing (rotate a refresh token, detect reuse and revoke, revoke all of a
//! user's sessions) is atomic in the store, so replicas racing each other cannot
//! leave a half-rotated session.

pub mod redis;
pub mod sqlite;

use serde::Serialize;
use uuid::Uuid;

use crate::store::StoreError;

/// How long a validation may go without refreshing a session's idle timer: the
/// idle timeout moves at most this late, and validation writes at most this often.
pub const TOUCH_INTERVAL_MS: i64 = 60_000;

/// A login session. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Session {
    pub id: Uuid,
    pub user_id: Uuid,
    pub username: String,
    /// Snapshot of the user's roles and permissions, used when the database is
    /// unreachable during a refresh.
    pub roles: Vec<String>,
    pub permissions: Vec<String>,
    pub created_at: i64,
    pub last_used_at: i64,
    /// The absolute end of the session.
    pub expires_at: i64,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    /// Refresh rotations so far.
    pub generation: u64,
}

/// The answer to a refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The presented token was current: the replacement is now current.
    Rotated(Session),
    /// The presented token was used just before, within the reuse grace: the
    /// replacement is current as well.
    Grace(Session),
    /// The presented token was already used: the session is revoked.
    Reused,
    /// No such session, or a token this session never issued.
    Unknown,
}

/// Failed-login limits: counts per username and per client IP.
#[derive(Debug, Clone, Copy)]
pub struct LockoutPolicy {
    pub threshold: u64,
    pub window_ms: i64,
    /// Failures per client IP per minute.
    pub ip_limit: u64,
}

/// The storage of sessions and login counters.
#[allow(async_fn_in_trait)] // used with concrete types only, never as dyn
pub trait SessionStore {
    /// Stores a new session whose current refresh token hashes to `refresh_hash`;
    /// returns once the session is durable enough to acknowledge (see the Redis
    /// implementation for replication).
    async fn create(
        &self,
        session: &Session,
        refresh_hash: &str,
        idle_ms: i64,
    ) -> Result<(), StoreError>;
    /// Whether the session exists and has neither idled out nor expired; moves
    /// its idle timer forward when it was last moved over [`TOUCH_INTERVAL_MS`] ago.
    async fn check(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Rotates the refresh token, atomically: see [`RefreshOutcome`].
    #[allow(clippy::too_many_arguments)]
    async fn rotate_refresh(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        presented_hash: &str,
        replacement_hash: &str,
        now_ms: i64,
        grace_ms: i64,
        idle_ms: i64,
    ) -> Result<RefreshOutcome, StoreError>;
    /// Replaces the identity snapshot (username, roles, permissions).
    async fn update_identity(&self, session: &Session) -> Result<(), StoreError>;
    /// The user's live sessions.
    async fn list(&self, user_id: Uuid, now_ms: i64) -> Result<Vec<Session>, StoreError>;
    /// Ends one session; returns whether it existed.
    async fn revoke(&self, user_id: Uuid, session_id: Uuid) -> Result<bool, StoreError>;
    /// Ends every session of the user but `except`; returns how many ended.
    async fn revoke_all(&self, user_id: Uuid, except: Option<Uuid>) -> Result<u64, StoreError>;

    /// Milliseconds left on the username's lockout, if any.
    async fn login_lock(&self, username: &str, now_ms: i64) -> Result<Option<i64>, StoreError>;
    /// Counts a failed login for the username and the IP; returns the lockout
    /// that the failure started (ms), if it crossed the threshold. Each failure
    /// past the threshold doubles the lockout, up to the window.
    async fn record_login_failure(
        &self,
        username: &str,
        client_ip: Option<&str>,
        now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<Option<i64>, StoreError>;
    async fn clear_login_failures(&self, username: &str) -> Result<(), StoreError>;
    /// Failed logins from the IP in the current minute, and ms until it resets.
    async fn ip_failures(&self, client_ip: &str, now_ms: i64) -> Result<(u64, i64), StoreError>;
}

/// The first lockout after the threshold; it doubles with each further failure.
pub const BASE_LOCKOUT_MS: i64 = 30_000;

/// The lockout for the `n`-th failure under `policy`, if any.
pub fn lockout_ms(failures: u64, policy: LockoutPolicy) -> Option<i64> {
    if failures < policy.threshold {
        return None;
    }
    let doublings = u32::try_from((failures - policy.threshold).min(20)).unwrap_or(20);
    let cap = policy.window_ms.max(BASE_LOCKOUT_MS);
    Some(BASE_LOCKOUT_MS.saturating_mul(1i64 << doublings).min(cap))
}

/// The configured session store.
#[derive(Clone)]
pub enum Sessions {
    Redis(redis::RedisSessions),
    Embedded(sqlite::SqliteSessions),
}

macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Sessions::Redis(store) => store.$method($($arg),*).await,
            Sessions::Embedded(store) => store.$method($($arg),*).await,
        }
    };
}

impl SessionStore for Sessions {
    async fn create(
        &self,
        session: &Session,
        refresh_hash: &str,
        idle_ms: i64,
    ) -> Result<(), StoreError> {
        dispatch!(self.create(session, refresh_hash, idle_ms))
    }
    async fn check(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<bool, StoreError> {
        dispatch!(self.check(user_id, session_id, now_ms, idle_ms))
    }
    async fn rotate_refresh(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        presented_hash: &str,
        replacement_hash: &str,
        now_ms: i64,
        grace_ms: i64,
        idle_ms: i64,
    ) -> Result<RefreshOutcome, StoreError> {
        dispatch!(self.rotate_refresh(
            user_id,
            session_id,
            presented_hash,
            replacement_hash,
            now_ms,
            grace_ms,
            idle_ms
        ))
    }
    async fn update_identity(&self, session: &Session) -> Result<(), StoreError> {
        dispatch!(self.update_identity(session))
    }
    async fn list(&self, user_id: Uuid, now_ms: i64) -> Result<Vec<Session>, StoreError> {
        dispatch!(self.list(user_id, now_ms))
    }
    async fn revoke(&self, user_id: Uuid, session_id: Uuid) -> Result<bool, StoreError> {
        dispatch!(self.revoke(user_id, session_id))
    }
    async fn revoke_all(&self, user_id: Uuid, except: Option<Uuid>) -> Result<u64, StoreError> {
        dispatch!(self.revoke_all(user_id, except))
    }
    async fn login_lock(&self, username: &str, now_ms: i64) -> Result<Option<i64>, StoreError> {
        dispatch!(self.login_lock(username, now_ms))
    }
    async fn record_login_failure(
        &self,
        username: &str,
        client_ip: Option<&str>,
        now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<Option<i64>, StoreError> {
        dispatch!(self.record_login_failure(username, client_ip, now_ms, policy))
    }
    async fn clear_login_failures(&self, username: &str) -> Result<(), StoreError> {
        dispatch!(self.clear_login_failures(username))
    }
    async fn ip_failures(&self, client_ip: &str, now_ms: i64) -> Result<(u64, i64), StoreError> {
        dispatch!(self.ip_failures(client_ip, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockout_starts_at_threshold_and_doubles_to_the_window() {
        let p = LockoutPolicy {
            threshold: 5,
            window_ms: 900_000,
            ip_limit: 30,
        };
        assert_eq!(lockout_ms(4, p), None);
        assert_eq!(lockout_ms(5, p), Some(30_000));
        assert_eq!(lockout_ms(6, p), Some(60_000));
        assert_eq!(lockout_ms(100, p), Some(900_000));
    }
}
