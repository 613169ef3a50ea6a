//! Sessions in the embedded SQLite database (embedded mode).
//!
//! The same behaviour as [`super::redis`], with SQLite's means (tables in
//! `migrations/sqlite/0003_sessions.sql`):
//! - `sessions`: one row per session, refresh-token state included; a row lives
//!   until `idle_expires_at` = min(last touch + idle timeout, absolute end), which
//!   stands in for the Redis key's TTL;
//! - `login_failures` (keyed by lower-cased username) and `ip_login_failures`:
//!   the failed-login counters, with the expiry Redis would have set on their keys.
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

use super::{lockout_ms, LockoutPolicy, RefreshOutcome, Session, SessionStore, TOUCH_INTERVAL_MS};
use crate::store::StoreError;

/// Takes the write lock when the transaction starts (see the module doc).
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// Used refresh-token hashes remembered per session for reuse detection (as in Redis).
const USED_HISTORY: usize = 16;

/// The per-IP failure window: a fixed minute from the first failure.
const IP_WINDOW_MS: i64 = 60_000;

/// The columns of a [`Session`].
const SESSION_COLUMNS: &str = "id, user_id, username, roles, permissions, created_at, \
    last_used_at, expires_at, client_ip, user_agent, generation";

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

/// A JSON array of strings, as stored in the list columns.
fn to_json(items: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(items).map_err(|e| StoreError::Corrupt(format!("string list: {e}")))
}

fn list_column(row: &SqliteRow, column: &str) -> Result<Vec<String>, StoreError> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("session {column}: {e}")))
}

fn session_from_row(row: &SqliteRow) -> Result<Session, StoreError> {
    let generation: i64 = row.try_get("generation")?;
    Ok(Session {
        id: row.try_get::<Hyphenated, _>("id")?.into_uuid(),
        user_id: row.try_get::<Hyphenated, _>("user_id")?.into_uuid(),
        username: row.try_get("username")?,
        roles: list_column(row, "roles")?,
        permissions: list_column(row, "permissions")?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get("last_used_at")?,
        expires_at: row.try_get("expires_at")?,
        client_ip: row.try_get("client_ip")?,
        user_agent: row.try_get("user_agent")?,
        generation: u64::try_from(generation)
            .map_err(|_| StoreError::Corrupt("session generation".into()))?,
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
    ) -> Result<(), StoreError> {
        let generation = i64::try_from(s.generation).map_err(|_| StoreError::Invalid {
            field: "generation",
            message: "out of range".into(),
        })?;
        let idle_expires_at = s.last_used_at.saturating_add(idle_ms).min(s.expires_at);
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        // The lazy sweep (see the module doc); the index keeps it a range scan.
        sqlx::query("DELETE FROM sessions WHERE idle_expires_at <= ?1")
            .bind(s.created_at)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO sessions (id, user_id, username, roles, permissions, created_at, \
             last_used_at, expires_at, idle_expires_at, client_ip, user_agent, generation, \
             current_hashes) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )
        .bind(s.id.hyphenated())
        .bind(s.user_id.hyphenated())
        .bind(&s.username)
        .bind(to_json(&s.roles)?)
        .bind(to_json(&s.permissions)?)
        .bind(s.created_at)
        .bind(s.last_used_at)
        .bind(s.expires_at)
        .bind(idle_expires_at)
        .bind(s.client_ip.as_deref())
        .bind(s.user_agent.as_deref())
        .bind(generation)
        .bind(to_json(&[refresh_hash.to_owned()])?)
        .execute(&mut *tx)
        .await?;
        // Committed means on disk (WAL): the client may be told about it.
        tx.commit().await?;
        Ok(())
    }

    async fn check(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<bool, StoreError> {
        // A plain read first: validation runs on every request and should write
        // only once per TOUCH_INTERVAL_MS, not take the single write lock each time.
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT last_used_at, idle_expires_at FROM sessions WHERE id = ?1 AND user_id = ?2",
        )
        .bind(session_id.hyphenated())
        .bind(user_id.hyphenated())
        .fetch_optional(&self.pool)
        .await?;
        let Some((last_used_at, idle_expires_at)) = row else {
            return Ok(false);
        };
        if idle_expires_at <= now_ms {
            // Ended (idle or absolute; idle_expires_at never exceeds expires_at).
            // Deleted so that a caller with a slower clock cannot revive it.
            sqlx::query(
                "DELETE FROM sessions WHERE id = ?1 AND user_id = ?2 AND idle_expires_at <= ?3",
            )
            .bind(session_id.hyphenated())
            .bind(user_id.hyphenated())
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
            return Ok(false);
        }
        if now_ms - last_used_at >= TOUCH_INTERVAL_MS {
            // Guarded on the value read: if a rotation or another check touched
            // (or a revocation deleted) the row in between, this changes nothing,
            // which is the outcome of this check having run first.
            sqlx::query(
                "UPDATE sessions SET last_used_at = ?3, idle_expires_at = min(?4, expires_at) \
                 WHERE id = ?1 AND user_id = ?2 AND last_used_at = ?5",
            )
            .bind(session_id.hyphenated())
            .bind(user_id.hyphenated())
            .bind(now_ms)
            .bind(now_ms.saturating_add(idle_ms))
            .bind(last_used_at)
            .execute(&self.pool)
            .await?;
        }
        Ok(true)
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
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        let row = sqlx::query(
            "SELECT idle_expires_at, current_hashes, previous_hashes, rotated_at, used_hashes \
             FROM sessions WHERE id = ?1 AND user_id = ?2",
        )
        .bind(session_id.hyphenated())
        .bind(user_id.hyphenated())
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
        let current = list_column(&row, "current_hashes")?;
        let previous = list_column(&row, "previous_hashes")?;
        let rotated_at: Option<i64> = row.try_get("rotated_at")?;
        let mut used = list_column(&row, "used_hashes")?;
        let presented = presented_hash.to_owned();
        // Any use moves the idle timer, never past the absolute end (min in SQL).
        let idle_until = now_ms.saturating_add(idle_ms);

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
            .bind(to_json(&[replacement_hash.to_owned()])?)
            .bind(to_json(&current)?)
            .bind(to_json(&used)?)
            .bind(now_ms)
            .bind(idle_until)
            .fetch_one(&mut *tx)
            .await?;
            let session = session_from_row(&updated)?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Rotated(session));
        }

        // Several tabs refreshing at once present the same token: within the
        // grace the just-used one earns another token of the same generation,
        // which becomes current beside the first replacement.
        let within_grace = now_ms - rotated_at.unwrap_or(0) <= grace_ms;
        if grace_ms > 0 && previous.contains(&presented) && within_grace {
            let mut current = current;
            current.push(replacement_hash.to_owned());
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
            return Ok(RefreshOutcome::Grace(session));
        }

        if used.contains(&presented) || previous.contains(&presented) {
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
            "UPDATE sessions SET username = ?3, roles = ?4, permissions = ?5 \
             WHERE id = ?1 AND user_id = ?2",
        )
        .bind(s.id.hyphenated())
        .bind(s.user_id.hyphenated())
        .bind(&s.username)
        .bind(to_json(&s.roles)?)
        .bind(to_json(&s.permissions)?)
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

    async fn login_lock(&self, username: &str, now_ms: i64) -> Result<Option<i64>, StoreError> {
        // A lockout always ends before its counter lapses, so the counter's own
        // expiry need not be checked.
        let locked_until: Option<i64> =
            sqlx::query_scalar("SELECT locked_until FROM login_failures WHERE username = ?1")
                .bind(username.to_lowercase())
                .fetch_optional(&self.pool)
                .await?;
        let remaining = locked_until.map_or(0, |until| until - now_ms);
        Ok((remaining > 0).then_some(remaining))
    }

    async fn record_login_failure(
        &self,
        username: &str,
        client_ip: Option<&str>,
        now_ms: i64,
        policy: LockoutPolicy,
    ) -> Result<Option<i64>, StoreError> {
        // Usernames are case-insensitive, so their counters are too. Rust's
        // lower-casing, not SQLite's lower(), which folds ASCII only.
        let name = username.to_lowercase();
        // Read-count-write: concurrent failures must each count.
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        // Lapsed counters are swept first, so a row that remains is live.
        sqlx::query("DELETE FROM login_failures WHERE expires_at <= ?1")
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        let previous: Option<(i64, i64)> =
            sqlx::query_as("SELECT failures, locked_until FROM login_failures WHERE username = ?1")
                .bind(&name)
                .fetch_optional(&mut *tx)
                .await?;
        let failures = previous.map_or(1, |(n, _)| n.saturating_add(1));
        let lock = lockout_ms(
            u64::try_from(failures)
                .map_err(|_| StoreError::Corrupt("login failure count".into()))?,
            policy,
        );
        // Below the threshold an earlier lockout (from a lower threshold) runs on,
        // as the Redis lock key would.
        let locked_until = match lock {
            Some(ms) => now_ms.saturating_add(ms),
            None => previous.map_or(0, |(_, until)| until),
        };
        // The count outlives the lockout by the window, so the next failure after
        // a lockout doubles it instead of starting over.
        let expires_at = now_ms
            .saturating_add(policy.window_ms)
            .saturating_add(lock.unwrap_or(0));
        sqlx::query(
            "INSERT INTO login_failures (username, failures, locked_until, expires_at) \
             VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (username) DO UPDATE SET failures = excluded.failures, \
             locked_until = excluded.locked_until, expires_at = excluded.expires_at",
        )
        .bind(&name)
        .bind(failures)
        .bind(locked_until)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;

        if let Some(ip) = client_ip {
            sqlx::query("DELETE FROM ip_login_failures WHERE expires_at <= ?1")
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            // A fixed window from the first failure: later failures do not
            // extend it (as INCR + PEXPIRE-on-first in Redis).
            sqlx::query(
                "INSERT INTO ip_login_failures (client_ip, failures, expires_at) \
                 VALUES (?1, 1, ?2) \
                 ON CONFLICT (client_ip) DO UPDATE SET failures = failures + 1",
            )
            .bind(ip)
            .bind(now_ms.saturating_add(IP_WINDOW_MS))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(lock)
    }

    async fn clear_login_failures(&self, username: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM login_failures WHERE username = ?1")
            .bind(username.to_lowercase())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn ip_failures(&self, client_ip: &str, now_ms: i64) -> Result<(u64, i64), StoreError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT failures, expires_at FROM ip_login_failures \
             WHERE client_ip = ?1 AND expires_at > ?2",
        )
        .bind(client_ip)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some((failures, expires_at)) => (
                u64::try_from(failures)
                    .map_err(|_| StoreError::Corrupt("ip failure count".into()))?,
                expires_at - now_ms,
            ),
            None => (0, 0),
        })
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
        }
    }

    #[tokio::test]
    async fn create_then_check_then_revoke() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE).await?;
        assert!(store.check(s.user_id, s.id, now + 1, IDLE).await?);
        // Another user's id does not reach the session.
        assert!(!store.check(Uuid::new_v4(), s.id, now + 1, IDLE).await?);
        assert!(store.revoke(s.user_id, s.id).await?);
        assert!(!store.check(s.user_id, s.id, now + 2, IDLE).await?);
        assert!(!store.revoke(s.user_id, s.id).await?);
        Ok(())
    }

    #[tokio::test]
    async fn check_fails_after_idle_timeout_and_after_absolute_expiry() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let idled = session(Uuid::new_v4(), now);
        store.create(&idled, "h0", IDLE).await?;
        assert!(
            store
                .check(idled.user_id, idled.id, now + IDLE - 1, IDLE)
                .await?
        );
        let fresh = session(Uuid::new_v4(), now);
        store.create(&fresh, "h1", IDLE).await?;
        assert!(
            !store
                .check(fresh.user_id, fresh.id, now + IDLE, IDLE)
                .await?
        );

        // Touched every half hour, it still ends at the absolute expiry.
        let long = session(Uuid::new_v4(), now);
        store.create(&long, "h2", IDLE).await?;
        let mut t = now;
        while t + IDLE / 2 < long.expires_at {
            t += IDLE / 2;
            assert!(
                store.check(long.user_id, long.id, t, IDLE).await?,
                "alive at {t}"
            );
        }
        assert!(
            !store
                .check(long.user_id, long.id, long.expires_at, IDLE)
                .await?
        );
        // Ended sessions are deleted, so an earlier clock cannot revive them.
        assert!(!store.check(long.user_id, long.id, t, IDLE).await?);
        Ok(())
    }

    #[tokio::test]
    async fn touch_moves_idle_timer_only_after_touch_interval() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE).await?;
        // Within the touch interval: no move, so the session ends at now + IDLE.
        assert!(
            store
                .check(s.user_id, s.id, now + TOUCH_INTERVAL_MS - 1, IDLE)
                .await?
        );
        assert!(!store.check(s.user_id, s.id, now + IDLE, IDLE).await?);

        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h1", IDLE).await?;
        let touched = now + TOUCH_INTERVAL_MS;
        assert!(store.check(s.user_id, s.id, touched, IDLE).await?);
        let listed = store.list(s.user_id, touched).await?;
        assert_eq!(listed.first().map(|l| l.last_used_at), Some(touched));
        assert!(
            store
                .check(s.user_id, s.id, touched + IDLE - 1, IDLE)
                .await?
        );
        assert!(
            !store
                .check(s.user_id, s.id, touched + 2 * IDLE, IDLE)
                .await?
        );
        Ok(())
    }

    #[tokio::test]
    async fn rotation_then_replay_of_old_token_revokes_the_session() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE).await?;

        let RefreshOutcome::Rotated(rotated) = store
            .rotate_refresh(s.user_id, s.id, "h0", "h1", now + 10, 0, IDLE)
            .await?
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

        let RefreshOutcome::Rotated(again) = store
            .rotate_refresh(s.user_id, s.id, "h1", "h2", now + 20, 0, IDLE)
            .await?
        else {
            panic!("expected Rotated");
        };
        assert_eq!(again.generation, 2);

        // h0 is two rotations old (history), replayed: the session ends.
        assert_eq!(
            store
                .rotate_refresh(s.user_id, s.id, "h0", "h9", now + 30, 0, IDLE)
                .await?,
            RefreshOutcome::Reused
        );
        assert!(!store.check(s.user_id, s.id, now + 31, IDLE).await?);
        assert_eq!(
            store
                .rotate_refresh(s.user_id, s.id, "h2", "h3", now + 32, 0, IDLE)
                .await?,
            RefreshOutcome::Unknown
        );

        // The just-used token without grace is reuse too.
        let t = session(Uuid::new_v4(), now);
        store.create(&t, "a0", IDLE).await?;
        store
            .rotate_refresh(t.user_id, t.id, "a0", "a1", now + 10, 0, IDLE)
            .await?;
        assert_eq!(
            store
                .rotate_refresh(t.user_id, t.id, "a0", "a2", now + 11, 0, IDLE)
                .await?,
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
            store.create(&s, "h0", IDLE).await?;
            let rotated = store
                .rotate_refresh(s.user_id, s.id, "h0", "h1", now, grace, IDLE)
                .await?;
            assert!(matches!(rotated, RefreshOutcome::Rotated(_)));
            let RefreshOutcome::Grace(graced) = store
                .rotate_refresh(s.user_id, s.id, "h0", "h2", now + grace, grace, IDLE)
                .await?
            else {
                panic!("expected Grace");
            };
            assert_eq!(graced.generation, 1, "grace does not rotate");
            assert_eq!(graced.last_used_at, now + grace);

            let next = if use_second { "h2" } else { "h1" };
            let RefreshOutcome::Rotated(r) = store
                .rotate_refresh(s.user_id, s.id, next, "h3", now + grace + 1, grace, IDLE)
                .await?
            else {
                panic!("expected {next} to be current");
            };
            assert_eq!(r.generation, 2);
        }

        // Past the grace, the just-used token is reuse.
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE).await?;
        store
            .rotate_refresh(s.user_id, s.id, "h0", "h1", now, grace, IDLE)
            .await?;
        assert_eq!(
            store
                .rotate_refresh(s.user_id, s.id, "h0", "h2", now + grace + 1, grace, IDLE)
                .await?,
            RefreshOutcome::Reused
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_refreshes_with_one_token_rotate_once() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE).await?;
        // Both present h0 at once; without the write lock up front both could read
        // it as current and both rotate.
        let tasks: Vec<_> = ["x1", "x2", "x3", "x4"]
            .into_iter()
            .map(|replacement| {
                let store = store.clone();
                let (uid, sid) = (s.user_id, s.id);
                tokio::spawn(async move {
                    store
                        .rotate_refresh(uid, sid, "h0", replacement, now + 1, 0, IDLE)
                        .await
                })
            })
            .collect();
        let mut rotated = 0;
        for task in tasks {
            match task.await?? {
                RefreshOutcome::Rotated(_) => rotated += 1,
                RefreshOutcome::Reused | RefreshOutcome::Unknown => {}
                RefreshOutcome::Grace(_) => panic!("no grace configured"),
            }
        }
        assert_eq!(rotated, 1);
        // The replays after the rotation revoked the session.
        assert!(!store.check(s.user_id, s.id, now + 2, IDLE).await?);
        Ok(())
    }

    #[tokio::test]
    async fn unknown_hash_or_session_leaves_everything_alone() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE).await?;
        assert_eq!(
            store
                .rotate_refresh(s.user_id, s.id, "forged", "h1", now + 1, 10_000, IDLE)
                .await?,
            RefreshOutcome::Unknown
        );
        assert!(store.check(s.user_id, s.id, now + 2, IDLE).await?);
        assert_eq!(
            store
                .rotate_refresh(s.user_id, Uuid::new_v4(), "h0", "h1", now + 3, 0, IDLE)
                .await?,
            RefreshOutcome::Unknown
        );
        // The real token still rotates.
        assert!(matches!(
            store
                .rotate_refresh(s.user_id, s.id, "h0", "h1", now + 4, 0, IDLE)
                .await?,
            RefreshOutcome::Rotated(_)
        ));
        // An idled-out session is unknown, whatever the token.
        assert_eq!(
            store
                .rotate_refresh(s.user_id, s.id, "h1", "h2", now + 4 + IDLE, 0, IDLE)
                .await?,
            RefreshOutcome::Unknown
        );
        Ok(())
    }

    #[tokio::test]
    async fn used_history_is_bounded() -> TestResult {
        let (_dir, store) = store().await?;
        let now = base();
        let s = session(Uuid::new_v4(), now);
        store.create(&s, "h0", IDLE).await?;
        let rotations = USED_HISTORY + 2;
        for i in 0..rotations {
            let t = now + i64::try_from(i)?;
            let outcome = store
                .rotate_refresh(
                    s.user_id,
                    s.id,
                    &format!("h{i}"),
                    &format!("h{}", i + 1),
                    t,
                    0,
                    IDLE,
                )
                .await?;
            assert!(matches!(outcome, RefreshOutcome::Rotated(_)));
        }
        // h0 and h1 fell out of the history: no longer recognised, so no revocation.
        assert_eq!(
            store
                .rotate_refresh(s.user_id, s.id, "h0", "x", now + 100, 0, IDLE)
                .await?,
            RefreshOutcome::Unknown
        );
        assert_eq!(
            store
                .rotate_refresh(s.user_id, s.id, "h2", "x", now + 101, 0, IDLE)
                .await?,
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
            store.create(s, h, IDLE).await?;
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
        assert!(store.check(other.user_id, other.id, now + 10, IDLE).await?);
        assert_eq!(store.revoke_all(user, None).await?, 1);
        assert!(store.list(user, now + 10).await?.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn login_failures_lock_with_doubling_and_clear() -> TestResult {
        let (_dir, store) = store().await?;
        let now = 1_000_000_000;
        let p = POLICY;
        assert_eq!(store.record_login_failure("Bob", None, now, p).await?, None);
        assert_eq!(
            store.record_login_failure("bob", None, now + 1, p).await?,
            None
        );
        assert_eq!(store.login_lock("BOB", now + 1).await?, None);
        // Third failure: the threshold, case-insensitively.
        let first = store.record_login_failure("BOB", None, now + 2, p).await?;
        assert_eq!(first, lockout_ms(3, p));
        assert_eq!(first, Some(30_000));
        assert_eq!(store.login_lock("bob", now + 2).await?, Some(30_000));
        assert_eq!(store.login_lock("bob", now + 10_002).await?, Some(20_000));
        assert_eq!(store.login_lock("bob", now + 30_002).await?, None);
        // Each further failure doubles, up to the window.
        let t = now + 40_000;
        assert_eq!(
            store.record_login_failure("bob", None, t, p).await?,
            Some(60_000)
        );
        assert_eq!(store.login_lock("Bob", t).await?, Some(60_000));
        let mut last = None;
        for i in 0..10 {
            last = store.record_login_failure("bob", None, t + i, p).await?;
        }
        assert_eq!(last, Some(p.window_ms));
        // Another name is untouched.
        assert_eq!(store.login_lock("carol", t).await?, None);

        store.clear_login_failures("BoB").await?;
        assert_eq!(store.login_lock("bob", t + 20).await?, None);
        assert_eq!(
            store.record_login_failure("bob", None, t + 21, p).await?,
            None
        );
        Ok(())
    }

    #[tokio::test]
    async fn login_failure_count_lapses_after_window() -> TestResult {
        let (_dir, store) = store().await?;
        let now = 1_000_000_000;
        let p = POLICY;
        store.record_login_failure("dave", None, now, p).await?;
        store.record_login_failure("dave", None, now + 1, p).await?;
        // The window after the last failure has passed: counting starts over.
        let later = now + 1 + p.window_ms;
        assert_eq!(
            store.record_login_failure("dave", None, later, p).await?,
            None
        );
        assert_eq!(
            store
                .record_login_failure("dave", None, later + 1, p)
                .await?,
            None
        );
        assert_eq!(
            store
                .record_login_failure("dave", None, later + 2, p)
                .await?,
            Some(30_000)
        );
        // After a lockout the count outlives it by the window: the next failure
        // doubles instead of starting over.
        let after = later + 2 + 30_000 + p.window_ms - 1;
        assert_eq!(
            store.record_login_failure("dave", None, after, p).await?,
            Some(60_000)
        );
        Ok(())
    }

    #[tokio::test]
    async fn ip_failures_count_within_a_minute_then_reset() -> TestResult {
        let (_dir, store) = store().await?;
        let now = 1_000_000_000;
        let ip = "198.51.100.7";
        assert_eq!(store.ip_failures(ip, now).await?, (0, 0));
        store
            .record_login_failure("a", Some(ip), now, POLICY)
            .await?;
        store
            .record_login_failure("b", Some(ip), now + 20_000, POLICY)
            .await?;
        store
            .record_login_failure("c", Some("203.0.113.1"), now + 20_000, POLICY)
            .await?;
        // The window runs from the first failure and is not extended.
        assert_eq!(store.ip_failures(ip, now + 30_000).await?, (2, 30_000));
        assert_eq!(
            store.ip_failures("203.0.113.1", now + 30_000).await?,
            (1, 50_000)
        );
        assert_eq!(store.ip_failures(ip, now + 60_000).await?, (0, 0));
        store
            .record_login_failure("a", Some(ip), now + 60_000, POLICY)
            .await?;
        assert_eq!(store.ip_failures(ip, now + 60_000).await?, (1, 60_000));
        Ok(())
    }
}
