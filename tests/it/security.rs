//! The attacks of the 2026-11 security review (OWASP ASVS 4.0.3 V2, V3, V4, V7, V8
//! and RFC 8725), one test each, named for the attack it stops. Each of them
//! succeeded against the build before the fixes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use serde_json::{json, Value};

use crate::kit::{self, TestApp};

async fn login_as(app: &TestApp, ip: &str, username: &str, password: &str) -> reqwest::Response {
    app.post("/v1/auth/login")
        .header("x-forwarded-for", ip)
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap()
}

async fn refresh(app: &TestApp, token: &str) -> reqwest::Response {
    app.post("/v1/auth/refresh")
        .json(&json!({ "refresh_token": token }))
        .send()
        .await
        .unwrap()
}

fn token_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// The user id (`sub`) of an access token.
fn user_id(token: &str) -> String {
    token_part(token, 1)["sub"].as_str().unwrap().to_owned()
}

fn access(pair: &Value) -> String {
    pair["access_token"].as_str().unwrap().to_owned()
}

async fn admin_get(app: &TestApp, token: &str) -> u16 {
    app.get("/v1/admin/users")
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

// 1 -------------------------------------------------------------------------

#[tokio::test]
async fn client_chosen_http_methods_cannot_add_metric_series() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    let scrape = || async {
        app.get("/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let series = |text: &str| text.lines().filter(|l| l.starts_with("http_")).count();
    let send = |method: &str| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        app.client
            .request(method, format!("{}/v1/auth/forward-auth", app.url))
            .send()
    };
    // One request of an odd method makes the series an odd method may have (and
    // a first scrape, those of the scrapes).
    send("EVIL0").await.unwrap();
    scrape().await;
    let before = series(&scrape().await);
    for i in 1..=20 {
        let r = send(&format!("EVIL{i}")).await.unwrap();
        assert_eq!(r.status(), 401);
    }
    let long = "M".repeat(8000);
    send(&long).await.unwrap();
    let text = scrape().await;
    assert!(!text.contains("EVIL"), "a client's method became a label");
    assert!(
        !text.contains("MMMMMMMM"),
        "a client's method became a label"
    );
    assert_eq!(
        series(&text),
        before,
        "new series from client-chosen methods"
    );
    assert!(text.contains(r#"method="other""#), "{text}");
    app.stop().await;
}

// 2 -------------------------------------------------------------------------

#[tokio::test]
async fn a_demoted_administrator_loses_the_admin_api_at_once_on_every_replica() {
    let url = kit::fresh_database().await;
    let apps = kit::replicas(2, || kit::postgres_config(&url)).await;
    demoted_administrators_lose_the_admin_api(&apps).await;
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test]
async fn a_demoted_administrator_loses_the_admin_api_at_once_in_embedded_mode() {
    let dir = tempfile::tempdir().unwrap();
    let apps = [TestApp::spawn(kit::embedded_config(dir.path())).await];
    demoted_administrators_lose_the_admin_api(&apps).await;
    let [app] = apps;
    app.stop().await;
}

/// Through `apps[0]` and the last of `apps` (the same instance in embedded mode).
async fn demoted_administrators_lose_the_admin_api(apps: &[TestApp]) {
    let (a, b) = (&apps[0], &apps[apps.len() - 1]);
    let root = kit::admin_token(a).await;

    // Roles taken away from the user.
    let role = kit::username("admins");
    kit::create_role(a, &role, &["auth:admin"]).await;
    let victim = kit::create_user(a, &[&role]).await;
    let pair = kit::login(a, &victim).await;
    let token = access(&pair);
    assert_eq!(admin_get(b, &token).await, 200);
    let r = a
        .patch(&format!("/v1/admin/users/{}", user_id(&token)))
        .bearer_auth(&root)
        .json(&json!({"roles": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let changed = Instant::now();
    assert_eq!(
        admin_get(b, &token).await,
        401,
        "the old token still administers"
    );
    assert!(changed.elapsed() < Duration::from_secs(1));
    let r = b
        .get("/v1/auth/validate?permission=auth:admin")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The next refresh carries the current roles.
    let r = refresh(b, pair["refresh_token"].as_str().unwrap()).await;
    assert_eq!(r.status(), 200);
    let renewed = access(&r.json().await.unwrap());
    assert_eq!(token_part(&renewed, 1)["roles"], json!([]));
    assert_eq!(admin_get(a, &renewed).await, 403);

    // The permission taken off the role.
    let role = kit::username("admins");
    kit::create_role(a, &role, &["auth:admin"]).await;
    let holder = kit::create_user(a, &[&role]).await;
    let pair = kit::login(b, &holder).await;
    let token = access(&pair);
    assert_eq!(admin_get(a, &token).await, 200);
    let r = a
        .patch(&format!("/v1/admin/roles/{role}"))
        .bearer_auth(&root)
        .json(&json!({"permissions": ["docs:read"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        admin_get(b, &token).await,
        401,
        "the old token still administers"
    );
    let r = refresh(a, pair["refresh_token"].as_str().unwrap()).await;
    assert_eq!(r.status(), 200);
    let renewed = access(&r.json().await.unwrap());
    assert_eq!(token_part(&renewed, 1)["permissions"], json!(["docs:read"]));
    assert_eq!(admin_get(b, &renewed).await, 403);
    // The administrator who made the changes was not affected.
    assert_eq!(admin_get(b, &root).await, 200);
}

// 3 -------------------------------------------------------------------------

/// Fires `n` wrong passwords for `user` at once across `apps` (round robin) and
/// returns how many were answered 401 and how many 429.
async fn wrong_passwords_at_once(apps: &[TestApp], user: &str, n: usize) -> (usize, usize) {
    let ip = kit::client_ip();
    let attempts = (0..n).map(|i| {
        let app = &apps[i % apps.len()];
        login_as(app, &ip, user, "not the password at all")
    });
    let (mut unauthorized, mut locked) = (0, 0);
    for r in futures::future::join_all(attempts).await {
        match r.status().as_u16() {
            401 => unauthorized += 1,
            429 => locked += 1,
            other => panic!("unexpected {other}"),
        }
    }
    (unauthorized, locked)
}

fn concurrent_login_config(url: &str) -> auth_service::config::Config {
    let mut config = kit::trusting_loopback(kit::postgres_config(url));
    // A real hash takes a few milliseconds: long enough for every attempt to be in
    // flight before the first one is counted.
    config.password_hash.memory_kib = 8 * 1024;
    config.password_hash.iterations = 2;
    config.password_hash.queue = 128;
    config
}

#[tokio::test]
async fn concurrent_wrong_passwords_get_no_more_tries_than_the_threshold() {
    let url = kit::fresh_database().await;
    let app = TestApp::spawn(concurrent_login_config(&url)).await;
    let user = kit::create_user(&app, &[]).await;
    let apps = [app];
    let (unauthorized, locked) = wrong_passwords_at_once(&apps, &user, 10).await;
    assert_eq!((unauthorized, locked), (5, 5), "threshold 5");
    let [app] = apps;
    app.stop().await;
}

#[tokio::test]
async fn fifty_simultaneous_wrong_passwords_across_three_replicas_get_threshold_tries() {
    let url = kit::fresh_database().await;
    let apps = kit::replicas(3, || concurrent_login_config(&url)).await;
    let user = kit::create_user(&apps[0], &[]).await;
    let (unauthorized, locked) = wrong_passwords_at_once(&apps, &user, 50).await;
    assert_eq!(unauthorized, 5, "401s (threshold 5)");
    assert_eq!(locked, 45, "429s");
    for app in apps {
        app.stop().await;
    }
}

// 4 -------------------------------------------------------------------------

#[tokio::test]
async fn guessing_the_current_password_with_a_stolen_token_locks_the_account() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::trusting_loopback(kit::embedded_config(dir.path()))).await;
    let user = kit::create_user(&app, &[]).await;
    let token = access(&kit::login(&app, &user).await);
    let change = |current: &str| {
        app.post("/v1/auth/password")
            .bearer_auth(&token)
            .json(&json!({"current_password": current, "new_password": "a new passphrase nobody has 9"}))
            .send()
    };
    for i in 0..5 {
        let r = change(&format!("guess number {i}")).await.unwrap();
        assert_eq!(r.status(), 422, "guess {i}");
    }
    let r = change("guess number 5").await.unwrap();
    assert_eq!(r.status(), 429, "the sixth guess was checked");
    assert!(r.headers().contains_key("retry-after"));
    // Locked for logins too, and the right password does not get through.
    assert_eq!(change(kit::PASSWORD).await.unwrap().status(), 429);
    let ip = kit::client_ip();
    assert_eq!(
        login_as(&app, &ip, &user, kit::PASSWORD).await.status(),
        429
    );

    // And the other way round: a username locked by failed logins cannot change
    // its password with a token either.
    let other = kit::create_user(&app, &[]).await;
    let token = access(&kit::login(&app, &other).await);
    for _ in 0..5 {
        assert_eq!(
            login_as(&app, &ip, &other, "wrong wrong wrong")
                .await
                .status(),
            401
        );
    }
    let r = app
        .post("/v1/auth/password")
        .bearer_auth(&token)
        .json(&json!({"current_password": kit::PASSWORD, "new_password": "a new passphrase nobody has 9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    app.stop().await;
}

// 5 -------------------------------------------------------------------------

#[tokio::test]
async fn forward_auth_never_approves_an_options_request_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = kit::embedded_config(dir.path());
    config.cors_origins = Some(auth_service::config::CorsOrigins::Any);
    let app = TestApp::spawn(config).await;
    let options = |path: &str| {
        app.client
            .request(reqwest::Method::OPTIONS, format!("{}{path}", app.url))
    };
    // What Envoy forwards for a browser's OPTIONS request, with and without the
    // preflight headers.
    for path in ["/v1/auth/forward-auth", "/v1/auth/forward-auth/api/orders"] {
        let r = options(path).send().await.unwrap();
        assert_eq!(r.status(), 401, "OPTIONS {path} approved without a token");
        let r = options(path)
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "DELETE")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "preflight-shaped OPTIONS {path} approved");
        assert!(!r.headers().contains_key("access-control-allow-origin"));
    }
    let user = kit::create_user(&app, &[]).await;
    let token = access(&kit::login(&app, &user).await);
    let r = options("/v1/auth/forward-auth/api")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-auth-user-id"));
    // A real preflight on an API route is still answered by the CORS layer ...
    let r = options("/v1/auth/login")
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert!(r.headers().contains_key("access-control-allow-origin"));
    // ... and an OPTIONS that is not one goes to the route, which has no OPTIONS.
    let r = options("/v1/auth/login").send().await.unwrap();
    assert_eq!(r.status(), 405);
    app.stop().await;
}

// 6 -------------------------------------------------------------------------

#[tokio::test]
async fn failures_from_a_shared_ip_slow_it_down_but_never_shut_out_a_correct_password() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::trusting_loopback(kit::embedded_config(dir.path()))).await;
    let user = kit::create_user(&app, &[]).await;
    // The default limit: 30 failures a minute, then one attempt per 2 s.
    let ip = kit::client_ip();
    for i in 0..30 {
        let r = login_as(&app, &ip, &kit::username("nobody"), "wrong").await;
        assert_eq!(r.status(), 401, "failure {i}");
    }
    // Someone else behind the same NAT, with the right password.
    let started = Instant::now();
    let r = login_as(&app, &ip, &user, kit::PASSWORD).await;
    assert_eq!(r.status(), 200, "a correct password was refused");
    assert!(started.elapsed() < Duration::from_secs(6));
    // The attacker keeps going: attempts are spaced out, and those that would
    // wait too long are refused with the time to come back.
    let attempts = (0..8).map(|_| login_as(&app, &ip, "nobody-at-all", "wrong"));
    let statuses: Vec<u16> = futures::future::join_all(attempts)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(checked + refused, 8, "{statuses:?}");
    assert!(
        checked <= 4,
        "over the limit, {checked} of 8 were checked at once"
    );
    assert!(refused >= 4, "{statuses:?}");
    app.stop().await;
}

// 7 -------------------------------------------------------------------------

#[tokio::test]
async fn a_unicode_lookalike_of_a_locked_username_gets_no_budget_of_its_own() {
    // A database whose lower() knows Unicode (any UTF-8 locale does): there
    // lower('İLKER') is 'ilker', while Rust's to_lowercase gives 'i̇lker'.
    let admin = kit::admin_database_url();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap();
    sqlx::Executor::execute(
        &mut conn,
        format!(
            "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' \
             LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
        )
        .as_str(),
    )
    .await
    .unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let folded: String = sqlx::query_scalar("SELECT lower('İLKER')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        folded, "ilker",
        "this database does not fold Unicode: the test proves nothing"
    );

    let app = TestApp::spawn(kit::trusting_loopback(kit::postgres_config(&url))).await;
    let ip = kit::client_ip();
    let user = format!("ilker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let created = app
        .post("/v1/admin/users")
        .bearer_auth(kit::admin_token(&app).await)
        .json(&json!({"username": user, "password": kit::PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    for _ in 0..5 {
        assert_eq!(
            login_as(&app, &ip, &user, "wrong wrong wrong")
                .await
                .status(),
            401
        );
    }
    assert_eq!(
        login_as(&app, &ip, &user, kit::PASSWORD).await.status(),
        429
    );
    let lookalike = user.replacen('i', "İ", 1);
    let r = login_as(&app, &ip, &lookalike, kit::PASSWORD).await;
    assert_ne!(
        r.status(),
        200,
        "{lookalike} got past the lockout of {user}"
    );
    app.stop().await;
}

// 8 -------------------------------------------------------------------------

#[tokio::test]
async fn a_session_older_than_a_password_change_cannot_refresh_or_validate() {
    let url = kit::fresh_database().await;
    let app = TestApp::spawn(kit::postgres_config(&url)).await;
    sessions_older_than_a_password_change_end(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn a_session_older_than_a_password_change_cannot_refresh_in_embedded_mode() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    sessions_older_than_a_password_change_end(&app).await;
    app.stop().await;
}

async fn sessions_older_than_a_password_change_end(app: &TestApp) {
    use auth_service::store::IdentityStore;
    let user = kit::create_user(app, &[]).await;
    let pair = kit::login(app, &user).await;
    // A reset whose session revocation never ran (Redis blipped after the commit),
    // or a login that raced it: the password changes under the session.
    let id: uuid::Uuid = user_id(&access(&pair)).parse().unwrap();
    let hash = app
        .state
        .hasher
        .hash(secrecy::SecretString::from(
            "a reset passphrase nobody knows 3",
        ))
        .await
        .unwrap();
    app.state
        .db
        .update_user(
            id,
            &auth_service::users::UserUpdate {
                password_hash: Some(hash),
                ..Default::default()
            },
            &auth_service::users::AuditEvent::new("test", "success"),
        )
        .await
        .unwrap();
    let r = refresh(app, pair["refresh_token"].as_str().unwrap()).await;
    assert_eq!(r.status(), 401, "a session older than the reset refreshed");

    // Through the API: the caller keeps its session, but tokens minted before the
    // change stop validating, and the caller's next refresh is fresh.
    let user = kit::create_user(app, &[]).await;
    let mine = kit::login(app, &user).await;
    let other = kit::login(app, &user).await;
    let r = app
        .post("/v1/auth/password")
        .bearer_auth(access(&mine))
        .json(&json!({"current_password": kit::PASSWORD, "new_password": "another long passphrase 77"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(kit::validate_status(app, &access(&mine)).await, 401);
    assert_eq!(kit::validate_status(app, &access(&other)).await, 401);
    assert_eq!(
        refresh(app, other["refresh_token"].as_str().unwrap())
            .await
            .status(),
        401
    );
    let r = refresh(app, mine["refresh_token"].as_str().unwrap()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        kit::validate_status(app, &access(&r.json().await.unwrap())).await,
        200
    );
}

// 9 -------------------------------------------------------------------------

#[tokio::test]
async fn admin_routes_refuse_unchecked_sessions_while_redis_is_down() {
    let url = kit::fresh_database().await;
    let mut redis = kit::PrivateRedis::start().await;
    let mut config = kit::postgres_config(&url);
    config.redis = Some(auth_service::config::RedisConfig {
        urls: vec![secrecy::SecretString::from(redis.url())],
        cluster: false,
    });
    config.dependency_timeout = Duration::from_millis(300);
    let app = TestApp::spawn(config).await;
    let admin = kit::admin_token(&app).await;
    assert_eq!(admin_get(&app, &admin).await, 200);
    redis.stop();
    // Gateways still get the degraded answer (the default policy) ...
    assert_eq!(kit::validate_status(&app, &admin).await, 200);
    // ... but nothing else accepts a token whose session cannot be checked.
    let r = app
        .get("/v1/admin/users")
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "an unchecked admin token was accepted");
    assert!(r.headers().contains_key("retry-after"));
    let r = app
        .get("/v1/auth/me")
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    app.stop().await;
}

#[tokio::test]
async fn logging_in_again_and_again_cannot_pile_up_sessions() {
    let url = kit::fresh_database().await;
    let app = TestApp::spawn(kit::postgres_config(&url)).await;
    kit::set_config(&[&app], "max_sessions_per_user", json!(3)).await;
    let user = kit::create_user(&app, &[]).await;
    let mut pairs = Vec::new();
    for _ in 0..5 {
        pairs.push(kit::login(&app, &user).await);
    }
    let token = access(&pairs[4]);
    let sessions: Value = app
        .get("/v1/auth/sessions")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sessions.as_array().unwrap().len(), 3, "{sessions}");
    // The oldest ended first.
    for (i, pair) in pairs.iter().enumerate() {
        let expected = if i < 2 { 401 } else { 200 };
        assert_eq!(
            kit::validate_status(&app, &access(pair)).await,
            expected,
            "session {i}"
        );
    }
    app.stop().await;
}

/// The master of a private cluster holding `key`: the one that does not answer
/// MOVED.
fn owner(cluster: &kit::PrivateCluster, key: &str) -> u16 {
    cluster
        .masters()
        .into_iter()
        .find(|port| !kit::PrivateCluster::cli(*port, &["exists", key]).contains("MOVED"))
        .expect("some master holds the key")
}

#[tokio::test]
async fn one_hung_redis_node_does_not_take_down_the_other_slots() {
    let url = kit::fresh_database().await;
    let cluster = tokio::task::spawn_blocking(kit::PrivateCluster::start)
        .await
        .unwrap();
    let mut config = kit::postgres_config(&url);
    config.redis = Some(auth_service::config::RedisConfig {
        urls: cluster
            .urls
            .iter()
            .cloned()
            .map(secrecy::SecretString::from)
            .collect(),
        cluster: true,
    });
    config.session_outage_policy = auth_service::config::OutagePolicy::Strict;
    config.dependency_timeout = Duration::from_millis(300);
    let app = TestApp::spawn(config).await;
    let mut tokens = Vec::new();
    for _ in 0..12 {
        let user = kit::create_user(&app, &[]).await;
        let token = access(&kit::login(&app, &user).await);
        let key = format!("auth:{{u:{}}}:sessions", user_id(&token).replace('-', ""));
        tokens.push((owner(&cluster, &key), token));
    }
    let hung = tokens[0].0;
    let elsewhere: Vec<&String> = tokens
        .iter()
        .filter(|(p, _)| *p != hung)
        .map(|(_, t)| t)
        .collect();
    assert!(!elsewhere.is_empty(), "every session landed on one master");
    let pid = kit::PrivateCluster::cli(hung, &["info", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("process_id:").map(|p| p.trim().to_owned()))
        .unwrap();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
    };
    // Hung for well under the cluster's node timeout (2 s): no failover.
    signal("-STOP");
    let stuck = (0..4).map(|_| kit::validate_status(&app, &tokens[0].1));
    let stuck = futures::future::join_all(stuck).await;
    let others =
        futures::future::join_all(elsewhere.iter().map(|t| kit::validate_status(&app, t))).await;
    signal("-CONT");
    assert!(stuck.iter().all(|s| *s == 503), "{stuck:?}");
    assert!(
        others.iter().all(|s| *s == 200),
        "healthy slots failed too: {others:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_busy_embedded_database_never_passes_for_a_redis_outage() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    kit::set_config(&[&app], "session_idle_timeout_seconds", json!(1)).await;
    let user = kit::create_user(&app, &[]).await;
    let token = access(&kit::login(&app, &user).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Another writer holds SQLite's write lock while the idled-out session is
    // checked.
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.path().join("auth.db"));
    let mut writer = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&options)
        .await
        .unwrap();
    sqlx::Executor::execute(&mut writer, "BEGIN IMMEDIATE")
        .await
        .unwrap();
    let status = kit::validate_status(&app, &token).await;
    sqlx::Executor::execute(&mut writer, "ROLLBACK")
        .await
        .unwrap();
    assert_ne!(
        status, 200,
        "an idled-out session was accepted as a Redis outage"
    );
    assert_eq!(kit::validate_status(&app, &token).await, 401);
    app.stop().await;
}

// 10 ------------------------------------------------------------------------

#[cfg(unix)]
#[tokio::test]
async fn embedded_data_files_are_readable_by_the_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let app = TestApp::spawn(kit::embedded_config(&dir)).await;
    let user = kit::create_user(&app, &[]).await;
    kit::login(&app, &user).await;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "data directory");
    for name in [
        "auth.db",
        "auth.db-wal",
        "auth.db-shm",
        "key-encryption.key",
    ] {
        let path = dir.join(name);
        assert!(path.exists(), "{name} missing");
        assert_eq!(mode(&path), 0o600, "{name}");
    }
    app.stop().await;
}

// 11 ------------------------------------------------------------------------

#[tokio::test]
async fn a_refresh_token_replayed_after_many_rotations_still_revokes_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    replayed_refresh_tokens_revoke(&app).await;
    app.stop().await;
    let url = kit::fresh_database().await;
    let app = TestApp::spawn(kit::postgres_config(&url)).await;
    replayed_refresh_tokens_revoke(&app).await;
    app.stop().await;
}

async fn replayed_refresh_tokens_revoke(app: &TestApp) {
    let user = kit::create_user(app, &[]).await;
    let first = kit::login(app, &user).await;
    let stolen = first["refresh_token"].as_str().unwrap().to_owned();
    let mut current = stolen.clone();
    for _ in 0..20 {
        let r = refresh(app, &current).await;
        assert_eq!(r.status(), 200);
        current = r.json::<Value>().await.unwrap()["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    assert_eq!(refresh(app, &stolen).await.status(), 401);
    let r = refresh(app, &current).await;
    assert_eq!(
        r.status(),
        401,
        "the session survived the replay of a used token"
    );
}

// 12 ------------------------------------------------------------------------

#[tokio::test]
async fn the_last_administrator_cannot_be_removed() {
    let url = kit::fresh_database().await;
    let app = TestApp::spawn(with_root(kit::postgres_config(&url))).await;
    the_last_administrator_stays(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn the_last_administrator_cannot_be_removed_in_embedded_mode() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(with_root(kit::embedded_config(dir.path()))).await;
    the_last_administrator_stays(&app).await;
    app.stop().await;
}

fn with_root(mut config: auth_service::config::Config) -> auth_service::config::Config {
    config.bootstrap_admin = Some(auth_service::config::BootstrapAdmin {
        username: "root".into(),
        password: secrecy::SecretString::from(kit::PASSWORD),
    });
    config
}

async fn the_last_administrator_stays(app: &TestApp) {
    let token = access(&kit::login(app, "root").await);
    let id = user_id(&token);
    let refused = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 409);
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["code"], "last_admin", "{problem}");
    };
    let user = format!("/v1/admin/users/{id}");
    refused(
        app.patch(&user)
            .bearer_auth(&token)
            .json(&json!({"disabled": true}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    refused(
        app.patch(&user)
            .bearer_auth(&token)
            .json(&json!({"roles": []}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    refused(app.delete(&user).bearer_auth(&token).send().await.unwrap()).await;
    refused(
        app.patch("/v1/admin/roles/admin")
            .bearer_auth(&token)
            .json(&json!({"permissions": ["docs:read"]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    refused(
        app.delete("/v1/admin/roles/admin")
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(admin_get(app, &token).await, 200);
    // With a second administrator, the first may go.
    let r = app
        .post("/v1/admin/users")
        .bearer_auth(&token)
        .json(&json!({"username": kit::username("deputy"), "password": kit::PASSWORD, "roles": ["admin"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .patch(&user)
        .bearer_auth(&token)
        .json(&json!({"disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

// 13 ------------------------------------------------------------------------

#[tokio::test]
async fn a_background_rehash_cannot_overwrite_a_password_changed_meanwhile() {
    use auth_service::store::IdentityStore;
    let url = kit::fresh_database().await;
    let mut config = kit::postgres_config(&url);
    // Parameters stronger than the stored hash's: a login rehashes, slowly.
    config.password_hash.memory_kib = 64 * 1024;
    config.password_hash.iterations = 3;
    let app = TestApp::spawn(config).await;
    let cheap = auth_service::passwords::PasswordHasher::new(
        &auth_service::config::PasswordHashConfig {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
            concurrency: 1,
            queue: 4,
        },
        std::sync::Arc::new(auth_service::metrics::Metrics::new()),
    )
    .unwrap();
    let username = kit::username("rehash");
    let created = app
        .state
        .db
        .create_user(
            &auth_service::users::NewUser {
                username: username.clone(),
                email: None,
                password_hash: cheap
                    .hash(secrecy::SecretString::from(kit::PASSWORD))
                    .await
                    .unwrap(),
                roles: Vec::new(),
            },
            &auth_service::users::AuditEvent::new("test", "success"),
        )
        .await
        .unwrap();
    let new_password = "the password set meanwhile 51";
    let new_hash = cheap
        .hash(secrecy::SecretString::from(new_password))
        .await
        .unwrap();
    // The login starts a rehash of the old password; the reset lands first.
    kit::login(&app, &username).await;
    app.state
        .db
        .update_user(
            created.id,
            &auth_service::users::UserUpdate {
                password_hash: Some(new_hash),
                ..Default::default()
            },
            &auth_service::users::AuditEvent::new("test", "success"),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ip = kit::client_ip();
    let r = login_as(&app, &ip, &username, new_password).await;
    assert_eq!(r.status(), 200, "the rehash put the old password back");
    let r = login_as(&app, &ip, &username, kit::PASSWORD).await;
    assert_eq!(r.status(), 401);
    app.stop().await;
}

// 14 and 15 -----------------------------------------------------------------

/// Runs the binary in `dir` with exactly `vars`; returns (exit code, stderr), or
/// None if it was still running after `within` (it is killed then).
fn run_briefly(
    vars: &[(&str, &str)],
    dir: &std::path::Path,
    within: Duration,
) -> Option<(i32, String)> {
    use std::io::Read;
    let mut child = std::process::Command::new(kit::binary())
        .env_clear()
        .envs(vars.iter().copied())
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return Some((status.code().unwrap_or(-1), stderr));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_bootstrap_administrator_that_breaks_the_account_rules_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", kit::free_port());
    let cases = [
        ("root user", kit::PASSWORD, "AUTH_BOOTSTRAP_ADMIN_USERNAME"),
        (
            &"a".repeat(65),
            kit::PASSWORD,
            "AUTH_BOOTSTRAP_ADMIN_USERNAME",
        ),
        ("root", "password", "AUTH_BOOTSTRAP_ADMIN_PASSWORD"),
        ("root", "short", "AUTH_BOOTSTRAP_ADMIN_PASSWORD"),
        (
            "horsebattery",
            "correct horsebattery staple 42",
            "AUTH_BOOTSTRAP_ADMIN_PASSWORD",
        ),
    ];
    for (username, password, variable) in cases {
        let vars = [
            ("AUTH_LISTEN", listen.as_str()),
            ("AUTH_BOOTSTRAP_ADMIN_USERNAME", username),
            ("AUTH_BOOTSTRAP_ADMIN_PASSWORD", password),
        ];
        let (code, stderr) = run_briefly(&vars, dir.path(), Duration::from_secs(10))
            .unwrap_or_else(|| panic!("started with {username:?} / {password:?}"));
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains(variable), "{variable} not named: {stderr}");
        assert!(
            !stderr.contains(password) || password == "short",
            "the password was echoed: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_generated_embedded_admin_password_never_reaches_the_logs() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", kit::free_port());
    let mut child = std::process::Command::new(kit::binary())
        .env_clear()
        .env("AUTH_LISTEN", &listen)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("http://{listen}/health"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let file = dir.path().join("data").join("initial-admin-password");
    let password = std::fs::read_to_string(&file)
        .expect("the password file")
        .trim()
        .to_owned();
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let r = client
        .post(format!("http://{listen}/v1/auth/login"))
        .json(&json!({"username": "admin", "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let _ = child.wait();
        child
    })
    .await
    .unwrap()
    .wait_with_output()
    .unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!logs.contains(&password), "the password reached the logs");
    assert!(
        logs.contains("initial-admin-password"),
        "the file is not named: {logs}"
    );
}

// 16 ------------------------------------------------------------------------

#[tokio::test]
async fn a_flood_of_long_usernames_leaves_no_unbounded_keys() {
    let url = kit::fresh_database().await;
    let app = TestApp::spawn(kit::trusting_loopback(kit::postgres_config(&url))).await;
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let long = format!("{}{marker}", "l".repeat(200));
    let r = login_as(&app, &kit::client_ip(), &long, "wrong").await;
    assert_eq!(r.status(), 401);
    let mut found = Vec::new();
    for url in kit::redis_cluster_urls() {
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        let keys = kit::PrivateCluster::cli(port, &["--scan", "--pattern", &format!("*{marker}*")]);
        found.extend(keys.lines().filter(|l| !l.is_empty()).map(str::to_owned));
    }
    assert!(found.is_empty(), "keys hold the whole name: {found:?}");
    app.stop().await;
}

// 17 ------------------------------------------------------------------------

#[tokio::test]
async fn registration_conflicts_cannot_enumerate_usernames_at_speed() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::trusting_loopback(kit::embedded_config(dir.path()))).await;
    kit::set_config(&[&app], "registration_enabled", json!(true)).await;
    kit::set_config(&[&app], "failed_logins_per_ip_per_minute", json!(3)).await;
    let taken = kit::create_user(&app, &[]).await;
    let ip = kit::client_ip();
    let register = |name: String| {
        app.post("/v1/auth/register")
            .header("x-forwarded-for", &ip)
            .json(&json!({"username": name, "password": kit::PASSWORD}))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(register(taken.clone()).await.unwrap().status(), 409);
    }
    // Over the limit (3 a minute), one probe per 20 s: the first takes the turn,
    // the next would wait too long.
    assert_eq!(register(taken.clone()).await.unwrap().status(), 409);
    let r = register(taken.clone()).await.unwrap();
    assert_eq!(
        r.status(),
        429,
        "a probe beyond the slowed rate was answered"
    );
    assert!(r.headers().contains_key("retry-after"));
    // Another IP is not affected.
    let r = app
        .post("/v1/auth/register")
        .header("x-forwarded-for", kit::client_ip())
        .json(&json!({"username": kit::username("new"), "password": kit::PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    app.stop().await;
}

// 18 ------------------------------------------------------------------------

#[test]
fn secrets_never_print_through_debug() {
    use auth_service::users::{Credentials, NewUser, User, UserUpdate};
    let pair = auth_service::auth::TokenPair {
        access_token: "eyJ.access-secret.sig".into(),
        token_type: "Bearer",
        expires_in: 900,
        refresh_token: "rt.refresh-secret".into(),
        refresh_expires_in: 3600,
        session_id: uuid::Uuid::new_v4(),
    };
    let phc = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$hash-secret";
    let user = User {
        id: uuid::Uuid::new_v4(),
        username: "alice".into(),
        email: None,
        disabled: false,
        roles: Vec::new(),
        permissions: Vec::new(),
        created_at: chrono::Utc::now(),
        updated_at: chrono::Utc::now(),
        password_changed_at: chrono::Utc::now(),
        authz_version: 0,
    };
    let printed = [
        format!("{pair:?}"),
        format!(
            "{:?}",
            Credentials {
                user: user.clone(),
                password_hash: phc.into()
            }
        ),
        format!(
            "{:?}",
            NewUser {
                username: "alice".into(),
                email: None,
                password_hash: phc.into(),
                roles: Vec::new()
            }
        ),
        format!(
            "{:?}",
            UserUpdate {
                password_hash: Some(phc.into()),
                ..Default::default()
            }
        ),
    ];
    for text in printed {
        for secret in ["access-secret", "refresh-secret", "hash-secret"] {
            assert!(!text.contains(secret), "{secret} printed: {text}");
        }
    }
}

// 19 ------------------------------------------------------------------------

#[tokio::test]
async fn a_public_key_swapped_in_the_database_cannot_vouch_for_forged_tokens() {
    use ring::signature::KeyPair as _;
    let url = kit::fresh_database().await;
    let app = TestApp::spawn(kit::postgres_config(&url)).await;
    let user = kit::create_user(&app, &[]).await;
    let genuine = access(&kit::login(&app, &user).await);
    let kid = token_part(&genuine, 0)["kid"].as_str().unwrap().to_owned();
    // Whoever can write the table (not read the key-encryption key) puts their
    // own public key beside our sealed private key.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let theirs = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("UPDATE signing_keys SET public_key = $1 WHERE kid = $2")
        .bind(theirs.public_key().as_ref())
        .bind(&kid)
        .execute(&pool)
        .await
        .unwrap();
    app.state.tokens.keys.reload(&app.state.db).await.unwrap();
    let jwks: Value = app
        .get("/.well-known/jwks.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let published = URL_SAFE_NO_PAD.encode(theirs.public_key().as_ref());
    assert!(
        !jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["x"] == published),
        "the swapped public key is published"
    );
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(kid);
    header.typ = Some("at+jwt".into());
    let mut claims = token_part(&genuine, 1);
    claims["roles"] = json!(["admin"]);
    claims["permissions"] = json!(["auth:admin"]);
    let forged = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref()),
    )
    .unwrap();
    assert_eq!(
        kit::validate_status(&app, &forged).await,
        401,
        "a forged token validated"
    );
    assert_eq!(kit::validate_status(&app, &genuine).await, 200);
    app.stop().await;
}

// 20 ------------------------------------------------------------------------

#[tokio::test]
async fn a_jwt_of_another_type_signed_with_our_key_is_not_an_access_token() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    let user = kit::create_user(&app, &[]).await;
    let token = access(&kit::login(&app, &user).await);
    assert_eq!(token_part(&token, 0)["typ"], "at+jwt");
    let claims = token_part(&token, 1);
    let keys = app.state.tokens.keys.keys();
    let key = keys.signing_key(chrono::Utc::now()).unwrap();
    for typ in [Some("JWT"), Some("id+jwt"), Some("dpop+jwt"), None] {
        let mut header = jsonwebtoken::Header::new(key.algorithm);
        header.kid = Some(key.kid.clone());
        header.typ = typ.map(str::to_owned);
        let other = jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap();
        assert_eq!(
            kit::validate_status(&app, &other).await,
            401,
            "typ {typ:?} accepted"
        );
    }
    // No HSTS over plain http ...
    let r = app.get("/health/live").send().await.unwrap();
    assert!(!r.headers().contains_key("strict-transport-security"));
    app.stop().await;
    // ... and always when the issuer is https.
    let dir = tempfile::tempdir().unwrap();
    let mut config = kit::embedded_config(dir.path());
    config.issuer = "https://auth.example.com".into();
    let app = TestApp::spawn(config).await;
    let r = app.get("/v1/auth/validate").send().await.unwrap();
    let hsts = r.headers()["strict-transport-security"].to_str().unwrap();
    assert!(hsts.starts_with("max-age="), "{hsts}");
    app.stop().await;
}

// 21 ------------------------------------------------------------------------

#[tokio::test]
async fn credential_stuffing_cannot_fill_the_audit_log_and_the_log_can_be_searched() {
    let url = kit::fresh_database().await;
    let apps = kit::replicas(3, || kit::trusting_loopback(kit::postgres_config(&url))).await;
    let app = &apps[0];
    let admin = kit::admin_token(app).await;
    let user = kit::create_user(app, &[]).await;
    let ip = kit::client_ip();
    for _ in 0..3 {
        login_as(app, &ip, &user, "wrong wrong wrong").await;
    }
    let target = user_id(&access(&kit::login(app, &user).await));
    let audit = |query: String| {
        let admin = admin.clone();
        async move {
            let r = app
                .get(&format!("/v1/admin/audit?{query}"))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{query}");
            r.json::<Value>().await.unwrap()
        }
    };
    // Filters and a cursor, newest first.
    let page = audit(format!(
        "user_id={target}&kind=login&outcome=failure&limit=2"
    ))
    .await;
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{page}");
    assert!(events
        .iter()
        .all(|e| e["kind"] == "login" && e["outcome"] == "failure"));
    assert!(events[0]["id"].as_i64() > events[1]["id"].as_i64());
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let rest = audit(format!(
        "user_id={target}&kind=login&outcome=failure&limit=2&cursor={cursor}"
    ))
    .await;
    assert_eq!(rest["events"].as_array().unwrap().len(), 1, "{rest}");
    assert!(rest["next_cursor"].is_null());
    let success = audit(format!("user_id={target}&kind=login&outcome=success")).await;
    assert_eq!(success["events"].as_array().unwrap().len(), 1);
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let none = audit(format!("since={}", urlencode(&future))).await;
    assert!(none["events"].as_array().unwrap().is_empty());
    let r = app
        .get("/v1/admin/audit?since=yesterday")
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    // Retention: old events go, in batches, one replica at a time.
    let r = app
        .put("/v1/admin/config/audit_retention_days")
        .bearer_auth(&admin)
        .json(&json!({"value": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO audit_events (occurred_at, kind, outcome) \
         SELECT now() - interval '40 days', 'login', 'failure' FROM generate_series(1, 2500)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let recent = count().await - 2500;
    for app in &apps {
        app.state.runtime.refresh(&app.state.db).await.unwrap();
    }
    let pruned = futures::future::join_all(
        apps.iter()
            .map(|a| auth_service::auth::prune_audit(&a.state)),
    )
    .await;
    let pruned: Vec<u64> = pruned.into_iter().map(Result::unwrap).collect();
    assert_eq!(pruned.iter().sum::<u64>(), 2500, "{pruned:?}");
    assert_eq!(count().await, recent, "recent events were pruned too");
    for app in apps {
        app.stop().await;
    }
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}
