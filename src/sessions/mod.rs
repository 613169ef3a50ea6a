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
    /// The user's authorization version the snapshot was taken at (see
    /// [`SessionStore::set_authz_version`]).
    pub authz_version: u64,
    /// The user's `password_changed_at` (Unix microseconds) the session was
    /// started under, or confirmed by a password change made from it. A refresh
    /// refuses the session once the password changed since. None for sessions
    /// of releases before it was kept: those are judged by `created_at`.
    pub password_epoch: Option<i64>,
    pub created_at: i64,
    pub last_used_at: i64,
    /// The absolute end of the session.
    pub expires_at: i64,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    /// Refresh rotations so far.
    pub generation: u64,
}

impl Session {
    /// Whether the password the session was started with is still the user's
    /// (`password_changed_at`, Unix microseconds).
    pub fn predates_password_change(&self, password_changed_at_us: i64) -> bool {
        match self.password_epoch {
            Some(epoch) => epoch != password_changed_at_us,
            None => self.created_at.saturating_mul(1000) < password_changed_at_us,
        }
    }
}

/// The answer to a refresh. `authz_version` is the user's authorization version
/// in the session store at that moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The presented token was current: the replacement is now current.
    Rotated {
        session: Session,
        authz_version: u64,
    },
    /// The presented token was used just before, within the reuse grace: the
    /// replacement is current as well.
    Grace {
        session: Session,
        authz_version: u64,
    },
    /// The presented token was already used: the session is revoked.
    Reused,
    /// No such session, or a token this session never issued.
    Unknown,
}

/// One refresh: the presented token and its replacement (hashes), and the time
/// rules.
#[derive(Debug, Clone, Copy)]
pub struct Rotation<'a> {
    pub presented_hash: &'a str,
    /// The presented token carries our tag for this session, so it was issued to
    /// it: if it is not current (nor within the grace), it was used, however many
    /// rotations ago, and the session is revoked. A token without a tag (of a
    /// release before tags) is judged by the bounded history of used hashes.
    pub authentic: bool,
    pub replacement_hash: &'a str,
    pub now_ms: i64,
    pub grace_ms: i64,
    pub idle_ms: i64,
}

/// Failed-login limits: counts per account and per client IP.
#[derive(Debug, Clone, Copy)]
pub struct LockoutPolicy {
    pub threshold: u64,
    pub window_ms: i64,
    /// Failures per client IP per minute before its attempts are slowed down.
    pub ip_limit: u64,
}

/// The answer to [`SessionStore::reserve_attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The attempt may check the password; it counts as a failure until the
    /// counter is cleared. `lock_ms` is the lockout it started, if it was the
    /// attempt that reached the threshold.
    Admitted { lock_ms: Option<i64> },
    /// Locked out for this many more milliseconds; nothing was counted.
    Locked { retry_ms: i64 },
}

/// The answer to [`SessionStore::ip_admission`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpAdmission {
    /// Under the IP's failure limit: go ahead.
    Now,
    /// Over the limit: go ahead after waiting this many milliseconds (a slot of
    /// the IP's slow lane is reserved for the attempt).
    After(i64),
    /// Over the limit and the slow lane is full: come back in this many ms.
    Refused(i64),
}

/// Over its failure limit, a client IP gets one attempt per `60 s / limit` (its
/// average allowed rate), each waiting at most this long for its turn; attempts
/// that would wait longer are refused with the time to come back.
pub const IP_SLOW_LANE_MAX_WAIT_MS: i64 = 5_000;

/// The spacing of attempts in an IP's slow lane.
pub fn ip_slow_lane_interval_ms(policy: LockoutPolicy) -> i64 {
    let limit = i64::try_from(policy.ip_limit.max(1)).unwrap_or(i64::MAX);
    (60_000 / limit).max(1)
}

/// How long a user's authorization version is kept in the session store after
/// its last change: longer than any access token lives (at most a day), so a
/// token minted before the change cannot outlive the record that refuses it.
pub const AUTHZ_VERSION_TTL_MS: i64 = 25 * 3_600_000;

/// What failed logins are counted under: the account once the name resolves to
/// one (every spelling of the name shares its budget), else the normalized name
/// (bounded: names longer than a username may be never get here).
pub fn lockout_subject(account: Option<Uuid>, normalized_name: &str) -> String {
    match account {
        Some(id) => format!("id:{}", id.simple()),
        None => format!("name:{normalized_name}"),
    }
}

/// The storage of sessions and login counters.
#[allow(async_fn_in_trait)] // used with concrete types only, never as dyn
pub trait SessionStore {
    /// Stores a new session whose current refresh token hashes to `refresh_hash`;
    /// returns once the session is durable enough to acknowledge (see the Redis
    /// implementation for replication). When the user then has more than
    /// `max_sessions` sessions, the oldest end; returns how many did.
    async fn create(
        &self,
        session: &Session,
        refresh_hash: &str,
        idle_ms: i64,
        max_sessions: u64,
    ) -> Result<u64, StoreError>;
    /// Whether the session exists and has neither idled out nor expired, with
    /// the user's authorization version (0 if none is recorded); moves its idle
    /// timer forward when it was last moved over [`TOUCH_INTERVAL_MS`] ago.
    async fn check(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<Option<u64>, StoreError>;
    /// Rotates the refresh token, atomically: see [`RefreshOutcome`].
    async fn rotate_refresh(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        rotation: &Rotation<'_>,
    ) -> Result<RefreshOutcome, StoreError>;
    /// Replaces the identity snapshot (username, roles, permissions, their
    /// authorization version, the password epoch) of a session that still exists.
    async fn update_identity(&self, session: &Session) -> Result<(), StoreError>;
    /// The user's live sessions.
    async fn list(&self, user_id: Uuid, now_ms: i64) -> Result<Vec<Session>, StoreError>;
    /// Ends one session; returns whether it existed.
    async fn revoke(&self, user_id: Uuid, session_id: Uuid) -> Result<bool, StoreError>;
    /// Ends every session of the user but `except`; returns how many ended.
    async fn revoke_all(&self, user_id: Uuid, except: Option<Uuid>) -> Result<u64, StoreError>;
    /// Records the password epoch of a session that outlives a password change
    /// made from it (see [`Session::password_epoch`]).
    async fn set_password_epoch(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        password_epoch: i64,
    ) -> Result<(), StoreError>;
    /// Raises the user's authorization version to `version` (never lowers it),
    /// kept for [`AUTHZ_VERSION_TTL_MS`]: tokens minted under an older version
    /// stop validating.
    async fn set_authz_version(
        &self,
        user_id: Uuid,
        version: u64,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Reserves one password attempt for `subject` (see [`lockout_subject`]), in
    /// one atomic step, so concurrent attempts cannot all pass a check made
    /// before any of them failed: the attempt counts as a failure until
    /// [`Self::clear_login_failures`]; the one that reaches the threshold starts
    /// the lockout, which doubles with each further failure, up to the window.
    async fn reserve_attempt(
        &self,
        subject: &str,
        now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<Attempt, StoreError>;
    /// Forgets the subject's failures and lockout (after a correct password).
    async fn clear_login_failures(&self, subject: &str) -> Result<(), StoreError>;
    /// Counts a failed attempt from a client IP, in a fixed minute from its first.
    async fn record_ip_failure(&self, client_ip: &str, now_ms: i64) -> Result<(), StoreError>;
    /// Whether an attempt from the client IP may go ahead now, after a wait in the
    /// IP's slow lane, or not (see [`IpAdmission`]).
    async fn ip_admission(
        &self,
        client_ip: &str,
        now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<IpAdmission, StoreError>;
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
        max_sessions: u64,
    ) -> Result<u64, StoreError> {
        dispatch!(self.create(session, refresh_hash, idle_ms, max_sessions))
    }
    async fn check(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        dispatch!(self.check(user_id, session_id, now_ms, idle_ms))
    }
    async fn rotate_refresh(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        rotation: &Rotation<'_>,
    ) -> Result<RefreshOutcome, StoreError> {
        dispatch!(self.rotate_refresh(user_id, session_id, rotation))
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
    async fn set_password_epoch(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        password_epoch: i64,
    ) -> Result<(), StoreError> {
        dispatch!(self.set_password_epoch(user_id, session_id, password_epoch))
    }
    async fn set_authz_version(
        &self,
        user_id: Uuid,
        version: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        dispatch!(self.set_authz_version(user_id, version, now_ms))
    }
    async fn reserve_attempt(
        &self,
        subject: &str,
        now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<Attempt, StoreError> {
        dispatch!(self.reserve_attempt(subject, now_ms, policy))
    }
    async fn clear_login_failures(&self, subject: &str) -> Result<(), StoreError> {
        dispatch!(self.clear_login_failures(subject))
    }
    async fn record_ip_failure(&self, client_ip: &str, now_ms: i64) -> Result<(), StoreError> {
        dispatch!(self.record_ip_failure(client_ip, now_ms))
    }
    async fn ip_admission(
        &self,
        client_ip: &str,
        now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<IpAdmission, StoreError> {
        dispatch!(self.ip_admission(client_ip, now_ms, policy))
    }
}

impl Sessions {
    /// Whether this store is shared by replicas over the network (Redis), so
    /// that its being unreachable is an outage the outage policy governs. The
    /// embedded store is a file of this process: its errors (a busy lock) are
    /// never a reason to accept a token unchecked.
    pub fn is_networked(&self) -> bool {
        matches!(self, Self::Redis(_))
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
