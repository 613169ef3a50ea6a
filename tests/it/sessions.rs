//! The session stores. First the Redis store against the test Redis Cluster:
//! what `check` answers and writes around the touch interval and the absolute
//! expiry (validation asks it on every request; most answers come from a plain
//! read, and only a due touch or an expired session runs the script). Then the
//! rules of the 2026-11 security review, on both stores (Redis Cluster and
//! embedded SQLite) through the same checks: authorization versions, the cap on
//! sessions, tagged refresh tokens, atomic lockout reservations, the IP slow lane.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use auth_service::{
    config::RedisConfig,
    sessions::{
        ip_slow_lane_interval_ms, redis::RedisSessions, sqlite::SqliteSessions, Attempt,
        IpAdmission, LockoutPolicy, RefreshOutcome, Rotation, Session, SessionStore,
        IP_SLOW_LANE_MAX_WAIT_MS, TOUCH_INTERVAL_MS,
    },
    store::Redis,
};
use secrecy::SecretString;
use uuid::Uuid;

use crate::kit;

const IDLE: i64 = 3_600_000;
const ABSOLUTE: i64 = 7 * 24 * 3_600_000;

fn store() -> RedisSessions {
    let config = RedisConfig {
        urls: kit::redis_cluster_urls()
            .into_iter()
            .map(SecretString::from)
            .collect(),
        cluster: true,
    };
    RedisSessions::new(Redis::new(&config, Duration::from_secs(5)).unwrap(), 1)
}

fn session(now: i64) -> Session {
    Session {
        id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        username: kit::username("check"),
        roles: vec!["user".into()],
        permissions: vec!["profile:read".into()],
        created_at: now,
        last_used_at: now,
        expires_at: now + ABSOLUTE,
        client_ip: None,
        user_agent: None,
        generation: 0,
        authz_version: 0,
        password_epoch: None,
    }
}

async fn last_used(store: &RedisSessions, s: &Session, now: i64) -> Option<i64> {
    let listed = store.list(s.user_id, now).await.unwrap();
    listed.iter().find(|l| l.id == s.id).map(|l| l.last_used_at)
}

#[tokio::test]
async fn check_moves_the_idle_timer_once_per_touch_interval() {
    let store = store();
    let now = auth_service::auth::now_ms();
    let s = session(now);
    store.create(&s, "h0", IDLE, 100).await.unwrap();

    assert!(store
        .check(s.user_id, s.id, now + 1, IDLE)
        .await
        .unwrap()
        .is_some());
    let edge = now + TOUCH_INTERVAL_MS - 1;
    assert!(store
        .check(s.user_id, s.id, edge, IDLE)
        .await
        .unwrap()
        .is_some());
    assert_eq!(last_used(&store, &s, edge).await, Some(now));

    let due = now + TOUCH_INTERVAL_MS;
    assert!(store
        .check(s.user_id, s.id, due, IDLE)
        .await
        .unwrap()
        .is_some());
    assert_eq!(last_used(&store, &s, due).await, Some(due));
    assert!(store
        .check(s.user_id, s.id, due + 1, IDLE)
        .await
        .unwrap()
        .is_some());
    assert_eq!(last_used(&store, &s, due + 1).await, Some(due));
}

#[tokio::test]
async fn check_fails_at_the_absolute_expiry_and_deletes_the_session() {
    let store = store();
    let now = auth_service::auth::now_ms();
    let s = session(now);
    store.create(&s, "h0", IDLE, 100).await.unwrap();

    assert!(store
        .check(s.user_id, s.id, s.expires_at - 1, IDLE)
        .await
        .unwrap()
        .is_some());
    assert!(store
        .check(s.user_id, s.id, s.expires_at, IDLE)
        .await
        .unwrap()
        .is_none());
    // Deleted: an earlier clock does not bring it back.
    assert!(store
        .check(s.user_id, s.id, now + 1, IDLE)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn check_fails_for_unknown_and_revoked_sessions() {
    let store = store();
    let now = auth_service::auth::now_ms();
    let s = session(now);
    store.create(&s, "h0", IDLE, 100).await.unwrap();
    assert!(store
        .check(Uuid::new_v4(), s.id, now + 1, IDLE)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .check(s.user_id, Uuid::new_v4(), now + 1, IDLE)
        .await
        .unwrap()
        .is_none());
    assert!(store.revoke(s.user_id, s.id).await.unwrap());
    assert!(store
        .check(s.user_id, s.id, now + 2, IDLE)
        .await
        .unwrap()
        .is_none());
}

// ---------------------------------------------------------------------------
// Both stores
// ---------------------------------------------------------------------------

/// An embedded store on a fresh file with the crate's migrations; the directory
/// must outlive the store.
async fn sqlite_store() -> (tempfile::TempDir, SqliteSessions) {
    let dir = tempfile::tempdir().unwrap();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("t.db"))
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::migrate!("./migrations/sqlite")
        .run(&pool)
        .await
        .unwrap();
    (dir, SqliteSessions::new(pool))
}

/// Generates, for each check, one test per store: `sessions::redis::<check>` and
/// `sessions::sqlite::<check>`.
macro_rules! on_both_stores {
    ($($check:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(&super::store()).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $check() {
                    let (_dir, store) = super::sqlite_store().await;
                    super::$check(&store).await;
                }
            )*
        }
    };
}

on_both_stores!(
    authorization_versions_only_rise_and_come_with_the_check,
    sessions_beyond_the_cap_end_oldest_first,
    a_tagged_token_that_is_not_current_revokes_however_old,
    concurrent_attempts_reserve_no_more_than_the_threshold,
    an_ip_over_its_limit_takes_turns,
    the_identity_snapshot_and_password_epoch_are_kept,
);

const POLICY: LockoutPolicy = LockoutPolicy {
    threshold: 5,
    window_ms: 60_000,
    ip_limit: 3,
};

fn rotation<'a>(presented: &'a str, replacement: &'a str, authentic: bool) -> Rotation<'a> {
    Rotation {
        presented_hash: presented,
        authentic,
        replacement_hash: replacement,
        now_ms: auth_service::auth::now_ms(),
        grace_ms: 0,
        idle_ms: IDLE,
    }
}

async fn authorization_versions_only_rise_and_come_with_the_check(store: &impl SessionStore) {
    let now = auth_service::auth::now_ms();
    let s = session(now);
    store.create(&s, "h0", IDLE, 100).await.unwrap();
    assert_eq!(
        store.check(s.user_id, s.id, now, IDLE).await.unwrap(),
        Some(0)
    );
    store.set_authz_version(s.user_id, 3, now).await.unwrap();
    store.set_authz_version(s.user_id, 2, now).await.unwrap();
    assert_eq!(
        store.check(s.user_id, s.id, now, IDLE).await.unwrap(),
        Some(3)
    );
    // Rotation reports it too (refresh compares it with the session's snapshot).
    match store
        .rotate_refresh(s.user_id, s.id, &rotation("h0", "h1", false))
        .await
        .unwrap()
    {
        RefreshOutcome::Rotated { authz_version, .. } => assert_eq!(authz_version, 3),
        other => panic!("{other:?}"),
    }
    // Another user's version is their own.
    let t = session(now);
    store.create(&t, "h0", IDLE, 100).await.unwrap();
    assert_eq!(
        store.check(t.user_id, t.id, now, IDLE).await.unwrap(),
        Some(0)
    );
}

async fn sessions_beyond_the_cap_end_oldest_first(store: &impl SessionStore) {
    let now = auth_service::auth::now_ms();
    let user = Uuid::new_v4();
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut s = session(now + i);
        s.user_id = user;
        let ended = store.create(&s, "h", IDLE, 3).await.unwrap();
        assert_eq!(ended, u64::from(i >= 3), "create {i}");
        ids.push(s.id);
    }
    let listed: Vec<Uuid> = store
        .list(user, now + 10)
        .await
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, ids[2..]);
    // revoke_all has at most the cap to end.
    assert_eq!(store.revoke_all(user, None).await.unwrap(), 3);
}

async fn a_tagged_token_that_is_not_current_revokes_however_old(store: &impl SessionStore) {
    let now = auth_service::auth::now_ms();
    let s = session(now);
    store.create(&s, "t0", IDLE, 100).await.unwrap();
    for i in 0..20 {
        let outcome = store
            .rotate_refresh(
                s.user_id,
                s.id,
                &rotation(&format!("t{i}"), &format!("t{}", i + 1), true),
            )
            .await
            .unwrap();
        assert!(matches!(outcome, RefreshOutcome::Rotated { .. }), "{i}");
    }
    // Untagged and forgotten (beyond the history): nothing happens.
    assert_eq!(
        store
            .rotate_refresh(s.user_id, s.id, &rotation("t0", "x", false))
            .await
            .unwrap(),
        RefreshOutcome::Unknown
    );
    assert!(store
        .check(s.user_id, s.id, now, IDLE)
        .await
        .unwrap()
        .is_some());
    // Tagged: ours, used, so the session ends.
    assert_eq!(
        store
            .rotate_refresh(s.user_id, s.id, &rotation("t0", "x", true))
            .await
            .unwrap(),
        RefreshOutcome::Reused
    );
    assert!(store
        .check(s.user_id, s.id, now, IDLE)
        .await
        .unwrap()
        .is_none());
}

async fn concurrent_attempts_reserve_no_more_than_the_threshold(store: &impl SessionStore) {
    let subject = format!("id:{}", Uuid::new_v4().simple());
    let now = auth_service::auth::now_ms();
    let attempts = (0..20).map(|_| store.reserve_attempt(&subject, now, POLICY));
    let results = futures::future::join_all(attempts).await;
    let admitted: Vec<Option<i64>> = results
        .iter()
        .filter_map(|r| match r.as_ref().unwrap() {
            Attempt::Admitted { lock_ms } => Some(*lock_ms),
            Attempt::Locked { .. } => None,
        })
        .collect();
    assert_eq!(admitted.len(), 5, "{results:?}");
    // Exactly one of them, the fifth, started the lockout.
    assert_eq!(admitted.iter().filter(|l| l.is_some()).count(), 1);
    assert!(matches!(
        store.reserve_attempt(&subject, now, POLICY).await.unwrap(),
        Attempt::Locked { retry_ms } if retry_ms > 0 && retry_ms <= 30_000
    ));
    // A correct password clears the count and the lockout.
    store.clear_login_failures(&subject).await.unwrap();
    assert_eq!(
        store.reserve_attempt(&subject, now, POLICY).await.unwrap(),
        Attempt::Admitted { lock_ms: None }
    );
}

async fn an_ip_over_its_limit_takes_turns(store: &impl SessionStore) {
    let ip = kit::client_ip();
    let now = auth_service::auth::now_ms();
    assert_eq!(
        store.ip_admission(&ip, now, POLICY).await.unwrap(),
        IpAdmission::Now
    );
    for _ in 0..3 {
        store.record_ip_failure(&ip, now).await.unwrap();
    }
    // Limit 3 a minute: one turn per 20 s, waiting at most 5 s.
    let interval = ip_slow_lane_interval_ms(POLICY);
    assert_eq!(interval, 20_000);
    assert_eq!(
        store.ip_admission(&ip, now, POLICY).await.unwrap(),
        IpAdmission::After(0)
    );
    assert_eq!(
        store.ip_admission(&ip, now, POLICY).await.unwrap(),
        IpAdmission::Refused(interval - IP_SLOW_LANE_MAX_WAIT_MS)
    );
    let at_next_turn = now + interval - 1_000;
    assert_eq!(
        store.ip_admission(&ip, at_next_turn, POLICY).await.unwrap(),
        IpAdmission::After(1_000)
    );
    // Other IPs are not affected.
    assert_eq!(
        store
            .ip_admission(&kit::client_ip(), now, POLICY)
            .await
            .unwrap(),
        IpAdmission::Now
    );
}

async fn the_identity_snapshot_and_password_epoch_are_kept(store: &impl SessionStore) {
    let now = auth_service::auth::now_ms();
    let mut s = session(now);
    s.password_epoch = Some(now * 1000);
    store.create(&s, "h0", IDLE, 100).await.unwrap();
    let listed = store.list(s.user_id, now).await.unwrap();
    assert_eq!(listed, [s.clone()]);
    let mut changed = s.clone();
    changed.roles = vec!["admin".into()];
    changed.authz_version = 4;
    store.update_identity(&changed).await.unwrap();
    store
        .set_password_epoch(s.user_id, s.id, now * 1000 + 7)
        .await
        .unwrap();
    let listed = store.list(s.user_id, now).await.unwrap();
    assert_eq!(listed[0].roles, changed.roles);
    assert_eq!(listed[0].authz_version, 4);
    assert_eq!(listed[0].password_epoch, Some(now * 1000 + 7));
    // Neither resurrects a revoked session.
    assert!(store.revoke(s.user_id, s.id).await.unwrap());
    store.update_identity(&changed).await.unwrap();
    store.set_password_epoch(s.user_id, s.id, 1).await.unwrap();
    assert!(store.list(s.user_id, now).await.unwrap().is_empty());
    assert!(store
        .check(s.user_id, s.id, now, IDLE)
        .await
        .unwrap()
        .is_none());
}
