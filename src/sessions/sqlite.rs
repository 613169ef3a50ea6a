//! Sessions in the embedded SQLite database (embedded mode).
//!
//! The same behaviour as [`super::redis`], with SQLite's means (tables in
//! `migrations/sqlite/0003_sessions.sql`):
//! - `sessions`: one row per session, refresh-token state included; a row lives
//!   until `idle_expires_at` = min(last touch + idle timeout, absolute end), which
//!   stands in for the Redis key's TTL;
//! - `authz_versions`: each user's authorization version, with the expiry Redis
//!   would have set on its key;
//! - `login_failures` (keyed by subject: `id:<uuid>` or `name:<name>`) and
//!   `ip_login_failures` (with the IP's slow-lane turn): the failed-login
//!   counters, with the expiry Redis would have set on their keys.
//!
//! Times are the callers' Unix milliseconds (`now_ms`). A row past its expiry is
//! treated as absent everywhere; since nothing expires rows by itself here, writes
//! delete them lazily (`create` and `record_login_failure` sweep the tables through
//! their expiry indexes) so abandoned sessions and counters do not pile up.
//!
//! Atomicity comes from SQLite's single writer: every read-check-write runs in a
//! `BEGIN IMMEDIATE` transaction, which takes the write lock up front. A deferred
//! transaction that reads and then writes fails at once with SQLITE_BUSY when
//! another connection wrote in between (the busy timeout cannot help there), and a
//! refresh rotation would not be atomic without it: two concurrent refreshes with
//! the same token must end in one rotation and one reuse, never two rotations.

use sqlx::{sqlite::SqliteRow, Row, SqlitePool};
use uuid::{fmt::Hyphenated, Uuid};

use super::{
    ip_slow_lane_interval_ms, lockout_ms, Attempt, IpAdmission, LockoutPolicy, RefreshOutcome,
    Rotation, Session, SessionStore, AUTHZ_VERSION_TTL_MS, IP_SLOW_LANE_MAX_WAIT_MS,
    TOUCH_INTERVAL_MS,
};
use crate::store::StoreError;

/// Takes the write lock when the transaction starts (see the module doc).
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// Used hashes of untagged refresh tokens remembered per session (as in Redis).
const USED_HISTORY: usize = 16;

/// The per-IP failure window: a fixed minute from the first failure.
const IP_WINDOW_MS: i64 = 60_000;

/// The columns of a [`Session`].
const SESSION_COLUMNS: &str = "id, user_id, username, roles, permissions, authz_version, \
    password_epoch, created_at, last_used_at, expires_at, client_ip, user_agent, generation";

/// The user's authorization version in force at `?2` (ms), for `?1` = user id.
const AUTHZ_VERSION_OF: &str = "SELECT version FROM authz_versions \
    WHERE user_id = ?1 AND expires_at > ?2";

/// The embedded session store.
#[derive(Clone)]
pub struct SqliteSessions {
    /// The embedded database's pool, shared with the identity store.
    pub pool: SqlitePool,
}

impl SqliteSessions {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

/// The wall clock in Unix ms, for the operations whose callers pass no time.
fn wall_clock_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn to_u64(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(what.to_owned()))
}

fn to_i64(n: u64, field: &'static str) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Invalid {
        field,
        message: "out of range".into(),
    })
}

/// A JSON array of strings, as stored in the list columns.
fn to_json(items: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(items).map_err(|e| StoreError::Corrupt(format!("string list: {e}")))
}

fn list_column(row: &SqliteRow, column: &str) -> Result<Vec<String>, StoreError> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("session {column}: {e}")))
}

fn session_from_row(row: &SqliteRow) -> Result<Session, StoreError> {
    Ok(Session {
        id: row.try_get::<Hyphenated, _>("id")?.into_uuid(),
        user_id: row.try_get::<Hyphenated, _>("user_id")?.into_uuid(),
        username: row.try_get("username")?,
        roles: list_column(row, "roles")?,
        permissions: list_column(row, "permissions")?,
        authz_version: to_u64(row.try_get("authz_version")?, "session authz_version")?,
        password_epoch: row.try_get("password_epoch")?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get("last_used_at")?,
        expires_at: row.try_get("expires_at")?,
        client_ip: row.try_get("client_ip")?,
        user_agent: row.try_get("user_agent")?,
        generation: to_u64(row.try_get("generation")?, "session generation")?,
    })
}

/// Counts the rows of a `DELETE ... RETURNING idle_expires_at` that were still
/// alive: like Redis's `DEL`, revoking counts only sessions that had not ended.
/// Revocations carry no caller time, so the wall clock decides.
fn count_alive(idle_expiries: &[i64]) -> u64 {
    let now = wall_clock_ms();
    let alive = idle_expiries.iter().filter(|&&t| t > now).count();
    u64::try_from(alive).unwrap_or(u64::MAX)
}

impl SessionStore for SqliteSessions {
    async fn create(
        &self,
        s: &Session,
        refresh_hash: &str,
        idle_ms: i64,
        max_sessions: u64,
    ) -> Result<u64, StoreError> {
        let idle_expires_at = s.last_used_at.saturating_add(idle_ms).min(s.expires_at);
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        // The lazy sweep (see the module doc); the index keeps it a range scan.
        sqlx::query("DELETE FROM sessions WHERE idle_expires_at <= ?1")
            .bind(s.created_at)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO sessions (id, user_id, username, roles, permissions, authz_version, \
             password_epoch, created_at, last_used_at, expires_at, idle_expires_at, client_ip, \
             user_agent, generation, current_hashes) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )
        .bind(s.id.hyphenated())
        .bind(s.user_id.hyphenated())
        .bind(&s.username)
        .bind(to_json(&s.roles)?)
        .bind(to_json(&s.permissions)?)
        .bind(to_i64(s.authz_version, "authz_version")?)
        .bind(s.password_epoch)
        .bind(s.created_at)
        .bind(s.last_used_at)
        .bind(s.expires_at)
        .bind(idle_expires_at)
        .bind(s.client_ip.as_deref())
        .bind(s.user_agent.as_deref())
        .bind(to_i64(s.generation, "generation")?)
        .bind(to_json(&[refresh_hash.to_owned()])?)
        .execute(&mut *tx)
        .await?;
        // Beyond the cap, the user's oldest sessions end (never this one).
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sessions WHERE user_id = ?1 AND idle_expires_at > ?2",
        )
        .bind(s.user_id.hyphenated())
        .bind(s.created_at)
        .fetch_one(&mut *tx)
        .await?;
        let excess = live.saturating_sub(to_i64(max_sessions.max(1), "max_sessions")?);
        let ended = if excess > 0 {
            sqlx::query(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions \
                 WHERE user_id = ?1 AND idle_expires_at > ?2 AND id <> ?3 \
                 ORDER BY created_at, id LIMIT ?4)",
            )
            .bind(s.user_id.hyphenated())
            .bind(s.created_at)
            .bind(s.id.hyphenated())
            .bind(excess)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        } else {
            0
        };
        // Committed means on disk (WAL): the client may be told about it.
        tx.commit().await?;
        Ok(ended)
    }

    async fn check(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        // A plain read first: validation runs on every request and should write
        // only once per TOUCH_INTERVAL_MS, not take the single write lock each time.
        let row: Option<(i64, i64, Option<i64>)> = sqlx::query_as(&format!(
            "SELECT last_used_at, idle_expires_at, ({AUTHZ_VERSION_OF}) \
             FROM sessions WHERE user_id = ?1 AND id = ?3"
        ))
        .bind(user_id.hyphenated())
        .bind(now_ms)
        .bind(session_id.hyphenated())
        .fetch_optional(&self.pool)
        .await?;
        let Some((last_used_at, idle_expires_at, version)) = row else {
            return Ok(None);
        };
        if idle_expires_at <= now_ms {
            // Ended (idle or absolute; idle_expires_at never exceeds expires_at).
            // Deleted so that a caller with a slower clock cannot revive it; the
            // answer does not wait on that: if the write lock is busy, the row is
            // swept later, and the session has ended either way.
            let deleted = sqlx::query(
                "DELETE FROM sessions WHERE id = ?1 AND user_id = ?2 AND idle_expires_at <= ?3",
            )
            .bind(session_id.hyphenated())
            .bind(user_id.hyphenated())
            .bind(now_ms)
            .execute(&self.pool)
            .await;
            if let Err(e) = deleted {
                tracing::debug!(error = %e, "ended session not deleted yet");
            }
            return Ok(None);
        }
        if now_ms - last_used_at >= TOUCH_INTERVAL_MS {
            // Guarded on the value read: if a rotation or another check touched
            // (or a revocation deleted) the row in between, this changes nothing,
            // which is the outcome of this check having run first. A touch the
            // busy write lock held up is not a reason to refuse a live session:
            // the idle timer moves at the next check instead.
            let touched = sqlx::query(
                "UPDATE sessions SET last_used_at = ?3, idle_expires_at = min(?4, expires_at) \
                 WHERE id = ?1 AND user_id = ?2 AND last_used_at = ?5",
            )
            .bind(session_id.hyphenated())
            .bind(user_id.hyphenated())
            .bind(now_ms)
            .bind(now_ms.saturating_add(idle_ms))
            .bind(last_used_at)
            .execute(&self.pool)
            .await;
            if let Err(e) = touched {
                tracing::debug!(error = %e, "session idle timer not moved this time");
            }
        }
        Ok(Some(to_u64(version.unwrap_or(0), "authorization version")?))
    }

    async fn rotate_refresh(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        r: &Rotation<'_>,
    ) -> Result<RefreshOutcome, StoreError> {
        let now_ms = r.now_ms;
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let row = sqlx::query(&format!(
            "SELECT idle_expires_at, current_hashes, previous_hashes, rotated_at, used_hashes, \
             ({AUTHZ_VERSION_OF}) AS version \
             FROM sessions WHERE user_id = ?1 AND id = ?3"
        ))
        .bind(user_id.hyphenated())
        .bind(now_ms)
        .bind(session_id.hyphenated())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(RefreshOutcome::Unknown);
        };
        let idle_expires_at: i64 = row.try_get("idle_expires_at")?;
        if idle_expires_at <= now_ms {
            sqlx::query("DELETE FROM sessions WHERE id = ?1 AND user_id = ?2")
                .bind(session_id.hyphenated())
                .bind(user_id.hyphenated())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Unknown);
        }
        let authz_version = to_u64(
            row.try_get::<Option<i64>, _>("version")?.unwrap_or(0),
            "authorization version",
        )?;
        let current = list_column(&row, "current_hashes")?;
        let previous = list_column(&row, "previous_hashes")?;
        let rotated_at: Option<i64> = row.try_get("rotated_at")?;
        let mut used = list_column(&row, "used_hashes")?;
        let presented = r.presented_hash.to_owned();
        // Any use moves the idle timer, never past the absolute end (min in SQL).
        let idle_until = now_ms.saturating_add(r.idle_ms);

        if current.contains(&presented) {
            // Every current hash is used up now (after a grace there are several).
            used.extend(current.iter().cloned());
            let excess = used.len().saturating_sub(USED_HISTORY);
            used.drain(..excess);
            let updated = sqlx::query(&format!(
                "UPDATE sessions SET current_hashes = ?3, previous_hashes = ?4, \
                 used_hashes = ?5, rotated_at = ?6, last_used_at = ?6, \
                 generation = generation + 1, idle_expires_at = min(?7, expires_at) \
                 WHERE id = ?1 AND user_id = ?2 RETURNING {SESSION_COLUMNS}"
            ))
            .bind(session_id.hyphenated())
            .bind(user_id.hyphenated())
            .bind(to_json(&[r.replacement_hash.to_owned()])?)
            .bind(to_json(&current)?)
            .bind(to_json(&used)?)
            .bind(now_ms)
            .bind(idle_until)
            .fetch_one(&mut *tx)
            .await?;
            let session = session_from_row(&updated)?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Rotated {
                session,
                authz_version,
            });
        }

        // Several tabs refreshing at once present the same token: within the
        // grace the just-used one earns another token of the same generation,
        // which becomes current beside the first replacement.
        let within_grace = now_ms - rotated_at.unwrap_or(0) <= r.grace_ms;
        if r.grace_ms > 0 && previous.contains(&presented) && within_grace {
            let mut current = current;
            current.push(r.replacement_hash.to_owned());
            let updated = sqlx::query(&format!(
                "UPDATE sessions SET current_hashes = ?3, last_used_at = ?4, \
                 idle_expires_at = min(?5, expires_at) \
                 WHERE id = ?1 AND user_id = ?2 RETURNING {SESSION_COLUMNS}"
            ))
            .bind(session_id.hyphenated())
            .bind(user_id.hyphenated())
            .bind(to_json(&current)?)
            .bind(now_ms)
            .bind(idle_until)
            .fetch_one(&mut *tx)
            .await?;
            let session = session_from_row(&updated)?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Grace {
                session,
                authz_version,
            });
        }

        if r.authentic || used.contains(&presented) || previous.contains(&presented) {
            // A used token came back: whoever holds it may have stolen it, so the
            // whole session ends (reuse detection).
            sqlx::query("DELETE FROM sessions WHERE id = ?1 AND user_id = ?2")
                .bind(session_id.hyphenated())
                .bind(user_id.hyphenated())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Reused);
        }
        // A token this session never issued (or forgot) proves nothing about the
        // session's holder: leave the session alone. Dropping `tx` rolls back.
        Ok(RefreshOutcome::Unknown)
    }

    async fn update_identity(&self, s: &Session) -> Result<(), StoreError> {
        // An UPDATE cannot resurrect a revoked session: no row, no change.
        sqlx::query(
            "UPDATE sessions SET username = ?3, roles = ?4, permissions = ?5, \
             authz_version = ?6, password_epoch = ?7 WHERE id = ?1 AND user_id = ?2",
        )
        .bind(s.id.hyphenated())
        .bind(s.user_id.hyphenated())
        .bind(&s.username)
        .bind(to_json(&s.roles)?)
        .bind(to_json(&s.permissions)?)
        .bind(to_i64(s.authz_version, "authz_version")?)
        .bind(s.password_epoch)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list(&self, user_id: Uuid, now_ms: i64) -> Result<Vec<Session>, StoreError> {
        // The id breaks ties so the order is stable between calls.
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions \
             WHERE user_id = ?1 AND idle_expires_at > ?2 ORDER BY created_at, id"
        ))
        .bind(user_id.hyphenated())
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn revoke(&self, user_id: Uuid, session_id: Uuid) -> Result<bool, StoreError> {
        let ended: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM sessions WHERE id = ?1 AND user_id = ?2 RETURNING idle_expires_at",
        )
        .bind(session_id.hyphenated())
        .bind(user_id.hyphenated())
        .fetch_all(&self.pool)
        .await?;
        Ok(count_alive(&ended) > 0)
    }

    async fn revoke_all(&self, user_id: Uuid, except: Option<Uuid>) -> Result<u64, StoreError> {
        // One statement, so a session created concurrently is either listed in
        // the count or left alone, never half-deleted.
        let ended: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM sessions WHERE user_id = ?1 AND (?2 IS NULL OR id <> ?2) \
             RETURNING idle_expires_at",
        )
        .bind(user_id.hyphenated())
        .bind(except.map(|id| id.hyphenated()))
        .fetch_all(&self.pool)
        .await?;
        Ok(count_alive(&ended))
    }

    async fn set_password_epoch(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        password_epoch: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE sessions SET password_epoch = ?3 WHERE id = ?1 AND user_id = ?2")
            .bind(session_id.hyphenated())
            .bind(user_id.hyphenated())
            .bind(password_epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_authz_version(
        &self,
        user_id: Uuid,
        version: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        // Raises, never lowers; a lapsed row counts as absent (as an expired key).
        sqlx::query(
            "INSERT INTO authz_versions (user_id, version, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (user_id) DO UPDATE SET \
               version = excluded.version, expires_at = excluded.expires_at \
             WHERE authz_versions.expires_at <= ?4 OR excluded.version > authz_versions.version",
        )
        .bind(user_id.hyphenated())
        .bind(to_i64(version, "authz_version")?)
        .bind(now_ms.saturating_add(AUTHZ_VERSION_TTL_MS))
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn reserve_attempt(
        &self,
        subject: &str,
        now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<Attempt, StoreError> {
        // Check, count and lock in one write transaction: concurrent attempts
        // queue for the lock and each sees the counts of those before it.
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        // Lapsed counters are swept first, so a row that remains is live.
        sqlx::query("DELETE FROM login_failures WHERE expires_at <= ?1")
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        let previous: Option<(i64, i64)> =
            sqlx::query_as("SELECT failures, locked_until FROM login_failures WHERE subject = ?1")
                .bind(subject)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((_, locked_until)) = previous {
            if locked_until > now_ms {
                return Ok(Attempt::Locked {
                    retry_ms: locked_until - now_ms,
                });
            }
        }
        let failures = previous.map_or(1, |(n, _)| n.saturating_add(1));
        let lock = lockout_ms(to_u64(failures, "login failure count")?, policy);
        // Below the threshold an earlier lockout (from a lower threshold) is over
        // by now, or this attempt would have been refused above.
        let locked_until = lock.map_or(0, |ms| now_ms.saturating_add(ms));
        // The count outlives the lockout by the window, so the next failure after
        // a lockout doubles it instead of starting over.
        let expires_at = now_ms
            .saturating_add(policy.window_ms)
            .saturating_add(lock.unwrap_or(0));
        sqlx::query(
            "INSERT INTO login_failures (subject, failures, locked_until, expires_at) \
             VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (subject) DO UPDATE SET failures = excluded.failures, \
             locked_until = excluded.locked_until, expires_at = excluded.expires_at",
        )
        .bind(subject)
        .bind(failures)
        .bind(locked_until)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Attempt::Admitted { lock_ms: lock })
    }

    async fn clear_login_failures(&self, subject: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM login_failures WHERE subject = ?1")
            .bind(subject)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn record_ip_failure(&self, client_ip: &str, now_ms: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        sqlx::query("DELETE FROM ip_login_failures WHERE expires_at <= ?1")
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        // A fixed window from the first failure: later failures do not extend it
        // (as INCR + PEXPIRE-on-first in Redis).
        sqlx::query(
            "INSERT INTO ip_login_failures (client_ip, failures, expires_at) \
             VALUES (?1, 1, ?2) \
             ON CONFLICT (client_ip) DO UPDATE SET failures = failures + 1",
        )
        .bind(client_ip)
        .bind(now_ms.saturating_add(IP_WINDOW_MS))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn ip_admission(
        &self,
        client_ip: &str,
        now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<IpAdmission, StoreError> {
        let failures: Option<i64> = sqlx::query_scalar(
            "SELECT failures FROM ip_login_failures WHERE client_ip = ?1 AND expires_at > ?2",
        )
        .bind(client_ip)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        let limit = to_i64(policy.ip_limit, "failed_logins_per_ip_per_minute")?;
        if failures.is_none_or(|n| n < limit) {
            return Ok(IpAdmission::Now);
        }
        // Over the limit: take the next turn of the slow lane, atomically.
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let slow_until: Option<i64> = sqlx::query_scalar(
            "SELECT slow_until FROM ip_login_failures WHERE client_ip = ?1 AND expires_at > ?2",
        )
        .bind(client_ip)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(slow_until) = slow_until else {
            // The window lapsed meanwhile.
            return Ok(IpAdmission::Now);
        };
        let turn = now_ms.max(slow_until);
        let wait = turn - now_ms;
        if wait > IP_SLOW_LANE_MAX_WAIT_MS {
            return Ok(IpAdmission::Refused(wait - IP_SLOW_LANE_MAX_WAIT_MS));
        }
        sqlx::query("UPDATE ip_login_failures SET slow_until = ?2 WHERE client_ip = ?1")
            .bind(client_ip)
            .bind(turn.saturating_add(ip_slow_lane_interval_ms(policy)))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(IpAdmission::After(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const IDLE: i64 = 3_600_000;
    const ABSOLUTE: i64 = 7 * 24 * 3_600_000;
    const POLICY: LockoutPolicy = LockoutPolicy {
        threshold: 3,
        window_ms: 900_000,
        ip_limit: 30,
    };

    /// A store on a fresh file with the crate's migrations; the directory must
    /// outlive the store.
    async fn store() -> Result<(tempfile::TempDir, SqliteSessions), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("t.db"))
            .create_if_missing(true);
        let pool = SqlitePool::connect_with(options).await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok((dir, SqliteSessions::new(pool)))
    }

    /// Wall-clock based, because revocation counts live sessions by the wall clock.
    fn base() -> i64 {
        wall_clock_ms()
    }

    fn session(user_id: Uuid, created_at: i64) -> Session {
        Session {
            id: Uuid::new_v4(),
            user_id,
            username: "alice".into(),
            roles: vec!["user".into()],
            permissions: vec!["profile:read".into()],
            created_at,
            last_used_at: created_at,
            expires_at: created_at + ABSOLUTE,
            client_ip: Some("192.0.2.1".into()),
            user_agent: None,
            generation: 0,
            authz_version: 0,
            password_epoch: None,
        }
    }

    /// A rotation with an untagged token (judged by the used-hash history).
    async fn rotate(
        store: &SqliteSessions,
        user_id: Uuid,
        session_id: Uuid,
        presented_hash: &str,
        replacement_hash: &str,
        now_ms: i64,
        grace_ms: i64,
    ) -> Result<RefreshOutcome, StoreError> {
        store
            .rotate_refresh(
                user_id,
                session_id,
                &Rotation {
                    presented_hash,
                    authentic: false,
                    replacement_hash,
                    now_ms,
                    grace_ms,
                    idle_ms: IDLE,
                },
            )
            .await
    }

    #[tokio::test]
    async fn create_then_check_then_revoke() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE, 100).await?;
        assert!(store.check(s.user_id, s.id, now + 1, IDLE).await?.is_some());
        // Another user's id does not reach the session.
        assert!(store
            .check(Uuid::new_v4(), s.id, now + 1, IDLE)
            .await?
            .is_none());
        assert!(store.revoke(s.user_id, s.id).await?);
        assert!(store.check(s.user_id, s.id, now + 2, IDLE).await?.is_none());
        assert!(!store.revoke(s.user_id, s.id).await?);
        Ok(())
    }

    #[tokio::test]
    async fn check_fails_after_idle_timeout_and_after_absolute_expiry() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let idled = session(Uuid::new_v4(), now);
        store.create(&idled, "h0", IDLE, 100).await?;
        assert!(store
            .check(idled.user_id, idled.id, now + IDLE - 1, IDLE)
            .await?
            .is_some());
        let fresh = session(Uuid::new_v4(), now);
        store.create(&fresh, "h1", IDLE, 100).await?;
        assert!(store
            .check(fresh.user_id, fresh.id, now + IDLE, IDLE)
            .await?
            .is_none());

        // Touched every half hour, it still ends at the absolute expiry.
        let long = session(Uuid::new_v4(), now);
        store.create(&long, "h2", IDLE, 100).await?;
        let mut t = now;
        while t + IDLE / 2 < long.expires_at {
            t += IDLE / 2;
            assert!(
                store.check(long.user_id, long.id, t, IDLE).await?.is_some(),
                "alive at {t}"
            );
        }
        assert!(store
            .check(long.user_id, long.id, long.expires_at, IDLE)
            .await?
            .is_none());
        // Ended sessions are deleted, so an earlier clock cannot revive them.
        assert!(store.check(long.user_id, long.id, t, IDLE).await?.is_none());
        Ok(())
    }

    #[tokio::test]
    async fn touch_moves_idle_timer_only_after_touch_interval() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE, 100).await?;
        // Within the touch interval: no move, so the session ends at now + IDLE.
        assert!(store
            .check(s.user_id, s.id, now + TOUCH_INTERVAL_MS - 1, IDLE)
            .await?
            .is_some());
        assert!(store
            .check(s.user_id, s.id, now + IDLE, IDLE)
            .await?
            .is_none());

        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h1", IDLE, 100).await?;
        let touched = now + TOUCH_INTERVAL_MS;
        assert!(store.check(s.user_id, s.id, touched, IDLE).await?.is_some());
        let listed = store.list(s.user_id, touched).await?;
        assert_eq!(listed.first().map(|l| l.last_used_at), Some(touched));
        assert!(store
            .check(s.user_id, s.id, touched + IDLE - 1, IDLE)
            .await?
            .is_some());
        assert!(store
            .check(s.user_id, s.id, touched + 2 * IDLE, IDLE)
            .await?
            .is_none());
        Ok(())
    }

    #[tokio::test]
    async fn rotation_then_replay_of_old_token_revokes_the_session() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE, 100).await?;

        let RefreshOutcome::Rotated {
            session: rotated, ..
        } = rotate(&store, s.user_id, s.id, "h0", "h1", now + 10, 0).await?
        else {
            panic!("expected Rotated");
        };
        assert_eq!(rotated.generation, 1);
        assert_eq!(rotated.last_used_at, now + 10);
        assert_eq!((rotated.id, rotated.user_id), (s.id, s.user_id));
        assert_eq!(
            (&rotated.roles, &rotated.permissions),
            (&s.roles, &s.permissions)
        );

        let RefreshOutcome::Rotated { session: again, .. } =
            rotate(&store, s.user_id, s.id, "h1", "h2", now + 20, 0).await?
        else {
            panic!("expected Rotated");
        };
        assert_eq!(again.generation, 2);

        // h0 is two rotations old (history), replayed: the session ends.
        assert_eq!(
            rotate(&store, s.user_id, s.id, "h0", "h9", now + 30, 0).await?,
            RefreshOutcome::Reused
        );
        assert!(store
            .check(s.user_id, s.id, now + 31, IDLE)
            .await?
            .is_none());
        assert_eq!(
            rotate(&store, s.user_id, s.id, "h2", "h3", now + 32, 0).await?,
            RefreshOutcome::Unknown
        );

        // The just-used token without grace is reuse too.
        let t = session(Uuid::new_v4(), now);
        store.create(&t, "a0", IDLE, 100).await?;
        rotate(&store, t.user_id, t.id, "a0", "a1", now + 10, 0).await?;
        assert_eq!(
            rotate(&store, t.user_id, t.id, "a0", "a2", now + 11, 0).await?,
            RefreshOutcome::Reused
        );
        assert!(store.list(t.user_id, now + 12).await?.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn replay_within_grace_yields_a_second_current_token() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let grace = 10_000;
        // Either of the two replacements is current afterwards: one session each.
        for use_second in [false, true] {
            let s = session(Uuid::new_v4(), now);
            store.create(&s, "h0", IDLE, 100).await?;
            let rotated = rotate(&store, s.user_id, s.id, "h0", "h1", now, grace).await?;
            assert!(matches!(rotated, RefreshOutcome::Rotated { .. }));
            let RefreshOutcome::Grace {
                session: graced, ..
            } = rotate(&store, s.user_id, s.id, "h0", "h2", now + grace, grace).await?
            else {
                panic!("expected Grace");
            };
            assert_eq!(graced.generation, 1, "grace does not rotate");
            assert_eq!(graced.last_used_at, now + grace);

            let next = if use_second { "h2" } else { "h1" };
            let RefreshOutcome::Rotated { session: r, .. } =
                rotate(&store, s.user_id, s.id, next, "h3", now + grace + 1, grace).await?
            else {
                panic!("expected {next} to be current");
            };
            assert_eq!(r.generation, 2);
        }

        // Past the grace, the just-used token is reuse.
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE, 100).await?;
        rotate(&store, s.user_id, s.id, "h0", "h1", now, grace).await?;
        assert_eq!(
            rotate(&store, s.user_id, s.id, "h0", "h2", now + grace + 1, grace).await?,
            RefreshOutcome::Reused
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_refreshes_with_one_token_rotate_once() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE, 100).await?;
        // Both present h0 at once; without the write lock up front both could read
        // it as current and both rotate.
        let tasks: Vec<_> = ["x1", "x2", "x3", "x4"]
            .into_iter()
            .map(|replacement| {
                let store = store.clone();
                let (uid, sid) = (s.user_id, s.id);
                tokio::spawn(async move {
                    rotate(&store, uid, sid, "h0", replacement, now + 1, 0).await
                })
            })
            .collect();
        let mut rotated = 0;
        for task in tasks {
            match task.await?? {
                RefreshOutcome::Rotated { .. } => rotated += 1,
                RefreshOutcome::Reused | RefreshOutcome::Unknown => {}
                RefreshOutcome::Grace { .. } => panic!("no grace configured"),
            }
        }
        assert_eq!(rotated, 1);
        // The replays after the rotation revoked the session.
        assert!(store.check(s.user_id, s.id, now + 2, IDLE).await?.is_none());
        Ok(())
    }

    #[tokio::test]
    async fn unknown_hash_or_session_leaves_everything_alone() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE, 100).await?;
        assert_eq!(
            rotate(&store, s.user_id, s.id, "forged", "h1", now + 1, 10_000).await?,
            RefreshOutcome::Unknown
        );
        assert!(store.check(s.user_id, s.id, now + 2, IDLE).await?.is_some());
        assert_eq!(
            rotate(&store, s.user_id, Uuid::new_v4(), "h0", "h1", now + 3, 0).await?,
            RefreshOutcome::Unknown
        );
        // The real token still rotates.
        assert!(matches!(
            rotate(&store, s.user_id, s.id, "h0", "h1", now + 4, 0).await?,
            RefreshOutcome::Rotated { .. }
        ));
        // An idled-out session is unknown, whatever the token.
        assert_eq!(
            rotate(&store, s.user_id, s.id, "h1", "h2", now + 4 + IDLE, 0).await?,
            RefreshOutcome::Unknown
        );
        Ok(())
    }

    #[tokio::test]
    async fn used_history_is_bounded() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE, 100).await?;
        let rotations = USED_HISTORY + 2;
        for i in 0..rotations {
            let t = now + i64::try_from(i)?;
            let outcome = rotate(
                &store,
                s.user_id,
                s.id,
                &format!("h{i}"),
                &format!("h{}", i + 1),
                t,
                0,
            )
            .await?;
            assert!(matches!(outcome, RefreshOutcome::Rotated { .. }));
        }
        // h0 and h1 fell out of the history: no longer recognised, so no revocation.
        assert_eq!(
            rotate(&store, s.user_id, s.id, "h0", "x", now + 100, 0).await?,
            RefreshOutcome::Unknown
        );
        assert_eq!(
            rotate(&store, s.user_id, s.id, "h2", "x", now + 101, 0).await?,
            RefreshOutcome::Reused
        );
        Ok(())
    }

    #[tokio::test]
    async fn list_returns_live_sessions_by_creation_and_revoke_all_keeps_one() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let user = Uuid::new_v4();
        let second = session(user, now + 2);
        let first = session(user, now + 1);
        let third = session(user, now + 3);
        let mut idle = session(user, now);
        idle.last_used_at = now - IDLE;
        let other = session(Uuid::new_v4(), now);
        for (s, h) in [
            (&second, "b"),
            (&first, "a"),
            (&third, "c"),
            (&idle, "d"),
            (&other, "e"),
        ] {
            store.create(s, h, IDLE, 100).await?;
        }
        let listed = store.list(user, now + 10).await?;
        let ids: Vec<Uuid> = listed.iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![first.id, second.id, third.id]);
        assert_eq!(listed.first(), Some(&first));

        let mut renamed = second.clone();
        renamed.username = "Alice2".into();
        renamed.roles = vec!["admin".into()];
        store.update_identity(&renamed).await?;
        let listed = store.list(user, now + 10).await?;
        assert_eq!(
            listed.get(1).map(|s| (&s.username, &s.roles)),
            Some((&renamed.username, &renamed.roles))
        );

        // The idled-out one is not counted.
        assert_eq!(store.revoke_all(user, Some(second.id)).await?, 2);
        let ids: Vec<Uuid> = store
            .list(user, now + 10)
            .await?
            .iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, vec![second.id]);
        assert!(store
            .check(other.user_id, other.id, now + 10, IDLE)
            .await?
            .is_some());
        assert_eq!(store.revoke_all(user, None).await?, 1);
        assert!(store.list(user, now + 10).await?.is_empty());
        Ok(())
    }

    /// A reservation the way login makes one.
    async fn reserve(
        store: &SqliteSessions,
        subject: &str,
        now: i64,
    ) -> Result<Attempt, StoreError> {
        store.reserve_attempt(subject, now, POLICY).await
    }

    fn admitted(lock_ms: Option<i64>) -> Attempt {
        Attempt::Admitted { lock_ms }
    }

    #[tokio::test]
    async fn attempts_lock_with_doubling_and_clear() -> TestResult {
        let (_dir, store) = store().await?;
        let now = 1_000_000_000;
        let bob = "id:b0b";
        assert_eq!(reserve(&store, bob, now).await?, admitted(None));
        assert_eq!(reserve(&store, bob, now + 1).await?, admitted(None));
        // The third attempt reaches the threshold and starts the lockout.
        assert_eq!(
            reserve(&store, bob, now + 2).await?,
            admitted(lockout_ms(3, POLICY))
        );
        assert_eq!(lockout_ms(3, POLICY), Some(30_000));
        assert_eq!(
            reserve(&store, bob, now + 10_002).await?,
            Attempt::Locked { retry_ms: 20_000 }
        );
        // Each attempt after the lockout doubles it, up to the window.
        let t = now + 40_000;
        assert_eq!(reserve(&store, bob, t).await?, admitted(Some(60_000)));
        assert_eq!(
            reserve(&store, bob, t + 1).await?,
            Attempt::Locked { retry_ms: 59_999 }
        );
        let mut u = t;
        let mut last = None;
        for _ in 0..10 {
            u += POLICY.window_ms;
            if let Attempt::Admitted { lock_ms } = reserve(&store, bob, u).await? {
                last = lock_ms;
            }
        }
        assert_eq!(last, Some(POLICY.window_ms));
        // Another subject is untouched.
        assert_eq!(reserve(&store, "id:ca401", u).await?, admitted(None));
        store.clear_login_failures(bob).await?;
        assert_eq!(reserve(&store, bob, u + 1).await?, admitted(None));
        Ok(())
    }

    #[tokio::test]
    async fn attempt_count_lapses_after_window() -> TestResult {
        let (_dir, store) = store().await?;
        let now = 1_000_000_000;
        let dave = "name:dave";
        reserve(&store, dave, now).await?;
        reserve(&store, dave, now + 1).await?;
        // The window after the last attempt has passed: counting starts over.
        let later = now + 1 + POLICY.window_ms;
        assert_eq!(reserve(&store, dave, later).await?, admitted(None));
        assert_eq!(reserve(&store, dave, later + 1).await?, admitted(None));
        assert_eq!(
            reserve(&store, dave, later + 2).await?,
            admitted(Some(30_000))
        );
        // After a lockout the count outlives it by the window: the next attempt
        // doubles instead of starting over.
        let after = later + 2 + 30_000 + POLICY.window_ms - 1;
        assert_eq!(reserve(&store, dave, after).await?, admitted(Some(60_000)));
        Ok(())
    }

    #[tokio::test]
    async fn ip_failures_count_within_a_minute_then_reset() -> TestResult {
        let (_dir, store) = store().await?;
        let now = 1_000_000_000;
        let ip = "198.51.100.7";
        let policy = LockoutPolicy {
            ip_limit: 2,
            ..POLICY
        };
        assert_eq!(store.ip_admission(ip, now, policy).await?, IpAdmission::Now);
        store.record_ip_failure(ip, now).await?;
        store.record_ip_failure(ip, now + 20_000).await?;
        store.record_ip_failure("203.0.113.1", now + 20_000).await?;
        // Two failures reach the limit: the slow lane, a turn per 30 s.
        assert_eq!(
            store.ip_admission(ip, now + 30_000, policy).await?,
            IpAdmission::After(0)
        );
        assert_eq!(
            store.ip_admission(ip, now + 31_000, policy).await?,
            IpAdmission::Refused(29_000 - IP_SLOW_LANE_MAX_WAIT_MS)
        );
        assert_eq!(
            store
                .ip_admission("203.0.113.1", now + 30_000, policy)
                .await?,
            IpAdmission::Now
        );
        // The window runs from the first failure and is not extended.
        assert_eq!(
            store.ip_admission(ip, now + 60_000, policy).await?,
            IpAdmission::Now
        );
        store.record_ip_failure(ip, now + 60_000).await?;
        assert_eq!(
            store.ip_admission(ip, now + 60_000, policy).await?,
            IpAdmission::Now
        );
        Ok(())
    }
}
