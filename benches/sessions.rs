//! Micro-benchmarks of the session check, the part of every validation that asks
//! the session store whether the token's session is still alive; and of
//! `auth::validate` as a whole (token, then session), for a token seen before.
//!
//!   cargo bench --bench sessions
//!
//! `embedded` uses a SQLite file in a temporary directory. `redis` needs a Redis:
//! set AUTH_BENCH_REDIS_URLS (or AUTH_TEST_REDIS_URLS, which `scripts/test` and
//! `scripts/bench --micro` export for their Redis Cluster); without it, the redis
//! benchmarks are skipped. Each iteration is one round trip: these figures are
//! latencies of a single caller, not throughput.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use auth_service::{
    app::{maintain_keys, AppState, Application},
    auth::{self, ClientInfo},
    config::{Config, DatabaseConfig, RedisConfig},
    sessions::SessionStore,
    users::User,
};
use secrecy::SecretString;
use uuid::Uuid;

fn main() {
    divan::main();
}

const STORES: &[&str] = &["embedded", "redis"];

fn redis_urls() -> Option<Vec<String>> {
    let urls = std::env::var("AUTH_BENCH_REDIS_URLS")
        .or_else(|_| std::env::var("AUTH_TEST_REDIS_URLS"))
        .ok()?;
    let urls: Vec<String> = urls
        .split(',')
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    (!urls.is_empty()).then_some(urls)
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    state: AppState,
    user_id: Uuid,
    session_id: Uuid,
    token: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// An instance on an embedded database, with sessions in `store`; None when
    /// that store is Redis and no Redis is configured.
    fn new(store: &str) -> Option<Self> {
        let redis = match store {
            "redis" => {
                let Some(urls) = redis_urls() else {
                    eprintln!("skipping {store}: set AUTH_BENCH_REDIS_URLS to benchmark it");
                    return None;
                };
                Some(RedisConfig {
                    cluster: urls.len() > 1,
                    urls: urls.into_iter().map(SecretString::from).collect(),
                })
            }
            _ => None,
        };
        let dir = tempfile::tempdir().unwrap();
        let config =
            Config::for_storage(DatabaseConfig::Embedded, redis, dir.path().to_path_buf()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (state, pair) = runtime.block_on(async {
            let app = Application::build(config).await.unwrap();
            let state = app.state().clone();
            state.db.migrate().await.unwrap();
            maintain_keys(&state, false).await.unwrap();
            let now = chrono::Utc::now();
            let user = User {
                id: Uuid::new_v4(),
                username: format!("bench-{}", Uuid::new_v4().simple()),
                email: None,
                disabled: false,
                roles: vec!["reader".into()],
                permissions: vec!["docs:read".into(), "docs:comment".into()],
                created_at: now,
                updated_at: now,
                password_changed_at: now,
                authz_version: 0,
            };
            let pair = auth::start_session(&state, &user, &ClientInfo::default())
                .await
                .unwrap();
            (state, pair)
        });
        let claims = state.tokens.verify(&pair.access_token).unwrap();
        Some(Self {
            runtime,
            user_id: claims.user_id().unwrap(),
            session_id: pair.session_id,
            token: pair.access_token,
            state,
            _dir: dir,
        })
    }
}

/// The session store's check alone (for Redis: one round trip, an HMGET and a GET
/// pipelined).
#[divan::bench(args = STORES)]
fn session_check(bencher: divan::Bencher, store: &str) {
    let Some(f) = Fixture::new(store) else {
        return;
    };
    bencher.bench_local(|| {
        let alive = f
            .runtime
            .block_on(
                f.state
                    .sessions
                    .check(f.user_id, f.session_id, auth::now_ms(), 3_600_000),
            )
            .unwrap();
        assert!(alive.is_some());
    });
}

/// `auth::validate` for a token seen before: the cached token checks, the
/// session check and the outcome metric.
#[divan::bench(args = STORES)]
fn validate(bencher: divan::Bencher, store: &str) {
    let Some(f) = Fixture::new(store) else {
        return;
    };
    bencher.bench_local(|| {
        f.runtime
            .block_on(auth::validate(&f.state, divan::black_box(&f.token), None))
            .unwrap()
    });
}
