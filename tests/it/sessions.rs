//! The Redis session store against the test Redis Cluster: what `check` answers
//! and writes around the touch interval and the absolute expiry. (Validation asks
//! it on every request; most answers come from a plain read, and only a due touch
//! or an expired session runs the script.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use auth_service::{
    config::RedisConfig,
    sessions::{redis::RedisSessions, Session, SessionStore, TOUCH_INTERVAL_MS},
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
    store.create(&s, "h0", IDLE).await.unwrap();

    assert!(store.check(s.user_id, s.id, now + 1, IDLE).await.unwrap());
    let edge = now + TOUCH_INTERVAL_MS - 1;
    assert!(store.check(s.user_id, s.id, edge, IDLE).await.unwrap());
    assert_eq!(last_used(&store, &s, edge).await, Some(now));

    let due = now + TOUCH_INTERVAL_MS;
    assert!(store.check(s.user_id, s.id, due, IDLE).await.unwrap());
    assert_eq!(last_used(&store, &s, due).await, Some(due));
    assert!(store.check(s.user_id, s.id, due + 1, IDLE).await.unwrap());
    assert_eq!(last_used(&store, &s, due + 1).await, Some(due));
}

#[tokio::test]
async fn check_fails_at_the_absolute_expiry_and_deletes_the_session() {
    let store = store();
    let now = auth_service::auth::now_ms();
    let s = session(now);
    store.create(&s, "h0", IDLE).await.unwrap();

    assert!(store
        .check(s.user_id, s.id, s.expires_at - 1, IDLE)
        .await
        .unwrap());
    assert!(!store
        .check(s.user_id, s.id, s.expires_at, IDLE)
        .await
        .unwrap());
    // Deleted: an earlier clock does not bring it back.
    assert!(!store.check(s.user_id, s.id, now + 1, IDLE).await.unwrap());
}

#[tokio::test]
async fn check_fails_for_unknown_and_revoked_sessions() {
    let store = store();
    let now = auth_service::auth::now_ms();
    let s = session(now);
    store.create(&s, "h0", IDLE).await.unwrap();
    assert!(!store
        .check(Uuid::new_v4(), s.id, now + 1, IDLE)
        .await
        .unwrap());
    assert!(!store
        .check(s.user_id, Uuid::new_v4(), now + 1, IDLE)
        .await
        .unwrap());
    assert!(store.revoke(s.user_id, s.id).await.unwrap());
    assert!(!store.check(s.user_id, s.id, now + 2, IDLE).await.unwrap());
}
