//! Tokens and sessions across replicas: login, validate, refresh, reuse detection,
//! logout, forged tokens, lockout, load shedding, outages and key rotation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use serde_json::{json, Value};

use crate::kit::{self, TestApp};

async fn three_replicas() -> Vec<TestApp> {
    let url = kit::fresh_database().await;
    kit::replicas(3, || kit::postgres_config(&url)).await
}

async fn refresh(app: &TestApp, token: &str) -> reqwest::Response {
    app.post("/v1/auth/refresh")
        .json(&json!({ "refresh_token": token }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn tokens_work_on_every_replica_and_reuse_revokes_everywhere() {
    let apps = three_replicas().await;
    let (a, b, c) = (&apps[0], &apps[1], &apps[2]);
    let role = kit::username("readers");
    kit::create_role(a, &role, &["docs:read"]).await;
    let user = kit::create_user(a, &[&role]).await;

    let pair = kit::login(a, &user).await;
    assert_eq!(pair["token_type"], "Bearer");
    assert_eq!(pair["expires_in"], 900);
    let access = pair["access_token"].as_str().unwrap();
    for app in [b, c] {
        let r = app
            .get("/v1/auth/validate")
            .bearer_auth(access)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-auth-username"], user.as_str());
        assert_eq!(r.headers()["x-auth-roles"], role.as_str());
        let claims: Value = r.json().await.unwrap();
        assert_eq!(claims["permissions"], json!(["docs:read"]));
        assert_eq!(claims["sid"], pair["session_id"]);
    }
    // Permission checks, and the gateway endpoint with any method and path.
    let r = b
        .get("/v1/auth/validate?permission=docs:write")
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .client
        .request(
            reqwest::Method::DELETE,
            format!(
                "{}/v1/auth/forward-auth/some/app/path?permission=docs:read",
                c.url
            ),
        )
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-auth-username"], user.as_str());
    assert!(r.bytes().await.unwrap().is_empty());
    let r = b
        .post("/v1/auth/validate")
        .json(&json!({"token": access}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Refresh on C; the old refresh token presented again on A is reuse.
    let old_refresh = pair["refresh_token"].as_str().unwrap();
    let r = refresh(c, old_refresh).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let second: Value = r.json().await.unwrap();
    assert_eq!(second["session_id"], pair["session_id"]);
    let new_access = second["access_token"].as_str().unwrap();
    assert_eq!(kit::validate_status(a, new_access).await, 200);
    let r = refresh(a, old_refresh).await;
    assert_eq!(r.status(), 401);
    for app in [a, b, c] {
        assert_eq!(
            kit::validate_status(app, new_access).await,
            401,
            "revoked session still valid"
        );
    }
    assert_eq!(
        refresh(b, second["refresh_token"].as_str().unwrap())
            .await
            .status(),
        401
    );
    let metrics = a
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("auth_refresh_reuse_detected_total 1"));

    // Logout on A is in force on B at once.
    let pair = kit::login(b, &user).await;
    let access = pair["access_token"].as_str().unwrap();
    let r = a
        .post("/v1/auth/logout")
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = b
        .get("/v1/auth/validate")
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );

    for app in apps {
        app.stop().await;
    }
}

#[tokio::test]
async fn sessions_can_be_listed_revoked_and_ended_together() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    let user = kit::create_user(&app, &[]).await;
    let first = kit::login(&app, &user).await;
    let second = kit::login(&app, &user).await;
    let token = first["access_token"].as_str().unwrap();
    let list: Value = app
        .get("/v1/auth/sessions")
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["current"] == true));
    let other = second["session_id"].as_str().unwrap();
    let r = app
        .delete(&format!("/v1/auth/sessions/{other}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        kit::validate_status(&app, second["access_token"].as_str().unwrap()).await,
        401
    );
    let r = app
        .delete(&format!("/v1/auth/sessions/{other}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let me: Value = app
        .get("/v1/auth/me")
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["username"], user.as_str());
    assert!(me.get("password_hash").is_none());
    let r = app
        .post("/v1/auth/logout-all")
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(kit::validate_status(&app, token).await, 401);
    app.stop().await;
}

#[tokio::test]
async fn password_change_ends_other_sessions() {
    let url = kit::fresh_database().await;
    let app = TestApp::spawn(kit::postgres_config(&url)).await;
    let user = kit::create_user(&app, &[]).await;
    let keep = kit::login(&app, &user).await;
    let other = kit::login(&app, &user).await;
    let token = keep["access_token"].as_str().unwrap();
    let change = |current: &str, new: &str| {
        app.post("/v1/auth/password")
            .bearer_auth(token)
            .json(&json!({"current_password": current, "new_password": new}))
    };
    assert_eq!(
        change("wrong", "another long passphrase 77")
            .send()
            .await
            .unwrap()
            .status(),
        422
    );
    assert_eq!(
        change(kit::PASSWORD, "password")
            .send()
            .await
            .unwrap()
            .status(),
        422
    );
    let new = "another long passphrase 77";
    assert_eq!(
        change(kit::PASSWORD, new).send().await.unwrap().status(),
        204
    );
    // Tokens minted before the change stop validating, the caller's too; the
    // caller's session goes on with its next refresh, the others' are ended.
    assert_eq!(kit::validate_status(&app, token).await, 401);
    assert_eq!(
        kit::validate_status(&app, other["access_token"].as_str().unwrap()).await,
        401
    );
    let renewed: Value = refresh(&app, keep["refresh_token"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        kit::validate_status(&app, renewed["access_token"].as_str().unwrap()).await,
        200
    );
    assert_eq!(
        refresh(&app, other["refresh_token"].as_str().unwrap())
            .await
            .status(),
        401
    );
    let r = app
        .post("/v1/auth/login")
        .json(&json!({"username": user, "password": new}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

/// Signs `claims` with the app's current key, with a chosen header.
fn sign(app: &TestApp, claims: &Value, kid: Option<&str>) -> String {
    let keys = app.state.tokens.keys.keys();
    let key = keys.signing_key(chrono::Utc::now()).unwrap();
    let mut header = jsonwebtoken::Header::new(key.algorithm);
    header.typ = Some("at+jwt".into());
    header.kid = Some(kid.unwrap_or(&key.kid).to_owned());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

#[tokio::test]
async fn forged_and_stale_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    let user = kit::create_user(&app, &[]).await;
    let pair = kit::login(&app, &user).await;
    let good = pair["access_token"].as_str().unwrap();
    assert_eq!(kit::validate_status(&app, good).await, 200);
    let parts: Vec<&str> = good.split('.').collect();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let now = chrono::Utc::now().timestamp();

    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": header["kid"]})),
        parts[1]
    );
    let jwks: Value = app
        .get("/.well-known/jwks.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let public_x = jwks["keys"][0]["x"].as_str().unwrap().to_owned();
    let mut hs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs_header.kid = header["kid"].as_str().map(str::to_owned);
    let hmac_confusion = jsonwebtoken::encode(
        &hs_header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(public_x.as_bytes()),
    )
    .unwrap();
    let mut tampered_claims = claims.clone();
    tampered_claims["roles"] = json!(["admin"]);
    let tampered = format!("{}.{}.{}", parts[0], b64(&tampered_claims), parts[2]);
    let with = |field: &str, value: Value| {
        let mut c = claims.clone();
        c[field] = value;
        sign(&app, &c, None)
    };
    let cases = [
        ("alg none", none),
        ("HS256 with the public key", hmac_confusion),
        ("tampered payload", tampered),
        ("unknown kid", sign(&app, &claims, Some("no-such-kid"))),
        ("wrong iss", with("iss", json!("https://evil.example"))),
        ("wrong aud", with("aud", json!("someone-else"))),
        ("expired", with("exp", json!(now - 60))),
        ("not yet valid", with("nbf", json!(now + 600))),
        ("garbage", "not.a.token".to_owned()),
        ("empty", String::new()),
    ];
    for (name, token) in cases {
        let r = app
            .get("/v1/auth/validate")
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{name} was accepted");
        assert!(r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
    }
    // Sanity: the same re-signing path accepts an unmodified token.
    assert_eq!(
        kit::validate_status(&app, &sign(&app, &claims, None)).await,
        200
    );
    app.stop().await;
}

#[tokio::test]
async fn an_independent_verifier_checks_tokens_from_discovery_alone() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    let user = kit::create_user(&app, &[]).await;
    let token = kit::login(&app, &user).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let discovery: Value = app
        .get("/.well-known/openid-configuration")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], "http://localhost:8080");
    // The issuer is the public URL; fetch the JWKS path from this instance.
    let jwks_path = discovery["jwks_uri"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://localhost:8080");
    let r = app.get(jwks_path).send().await.unwrap();
    assert!(r.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("max-age="));
    let jwks: Value = r.json().await.unwrap();
    // Verify with ring directly: no jsonwebtoken involved.
    let (signing_input, signature) = token.rsplit_once('.').unwrap();
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(signing_input.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "EdDSA");
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .unwrap();
    assert_eq!(jwk["kty"], "OKP");
    let public = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public)
        .verify(signing_input.as_bytes(), &signature)
        .expect("signature verifies with the published key");
    let payload: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(signing_input.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    for claim in [
        "iss",
        "aud",
        "sub",
        "sid",
        "jti",
        "iat",
        "nbf",
        "exp",
        "username",
        "roles",
        "permissions",
    ] {
        assert!(payload.get(claim).is_some(), "claim {claim} missing");
    }
    app.stop().await;
}

#[tokio::test]
async fn lockout_is_shared_across_replicas_and_unknown_users_look_the_same() {
    let apps = three_replicas().await;
    let user = kit::create_user(&apps[0], &[]).await;
    let attempt = |app: &TestApp, name: &str, password: &str| {
        app.post("/v1/auth/login")
            .json(&json!({"username": name, "password": password}))
            .send()
    };
    let wrong = attempt(&apps[0], &user, "wrong password 1").await.unwrap();
    assert_eq!(wrong.status(), 401);
    let wrong_body: Value = wrong.json().await.unwrap();
    let ghost = kit::username("ghost");
    let unknown = attempt(&apps[1], &ghost, "wrong password 1").await.unwrap();
    assert_eq!(unknown.status(), 401);
    assert_eq!(
        unknown.json::<Value>().await.unwrap(),
        wrong_body,
        "bodies differ"
    );
    // Four more failures, spread over the replicas, reach the threshold of 5.
    for i in 0..4 {
        let r = attempt(&apps[i % 3], &user, "wrong password 2")
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    for app in &apps {
        let r = attempt(app, &user.to_uppercase(), kit::PASSWORD)
            .await
            .unwrap();
        assert_eq!(r.status(), 429, "lockout not shared");
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry > 0);
    }
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test]
async fn a_login_storm_sheds_load_while_validation_stays_served() {
    let url = kit::fresh_database().await;
    let mut config = kit::postgres_config(&url);
    config.password_hash.concurrency = 1;
    config.password_hash.queue = 1;
    // Expensive enough that 64 logins cannot all be admitted.
    config.password_hash.memory_kib = 8 * 1024;
    config.password_hash.iterations = 2;
    let app = TestApp::spawn(config).await;
    let user = kit::create_user(&app, &[]).await;
    let token = kit::login(&app, &user).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();

    let logins: Vec<_> = (0..64)
        .map(|_| {
            app.post("/v1/auth/login")
                .json(&json!({"username": user, "password": kit::PASSWORD}))
                .send()
        })
        .collect();
    let validations: Vec<_> = (0..64)
        .map(|_| app.get("/v1/auth/validate").bearer_auth(&token).send())
        .collect();
    let (logins, validations) = tokio::join!(
        futures::future::join_all(logins),
        futures::future::join_all(validations)
    );
    let mut shed = 0;
    let mut ok = 0;
    for r in logins {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            503 => {
                assert!(r.headers().contains_key("retry-after"));
                shed += 1;
            }
            other => panic!("unexpected login status {other}"),
        }
    }
    assert!(ok >= 1, "no login got through");
    assert!(shed >= 1, "nothing was shed");
    for r in validations {
        assert_eq!(r.unwrap().status(), 200);
    }
    app.stop().await;
}

#[tokio::test]
async fn redis_cluster_outage_follows_the_session_outage_policy() {
    let url = kit::fresh_database().await;
    for policy in [
        auth_service::config::OutagePolicy::Degraded,
        auth_service::config::OutagePolicy::Strict,
    ] {
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
        config.session_outage_policy = policy;
        let app = TestApp::spawn(config).await;
        let user = kit::create_user(&app, &[]).await;
        let pair = kit::login(&app, &user).await;
        let token = pair["access_token"].as_str().unwrap();
        // The whole cluster goes down.
        for port in cluster.ports() {
            cluster.kill(port);
        }
        let started = Instant::now();
        let r = app
            .get("/v1/auth/validate")
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        match policy {
            auth_service::config::OutagePolicy::Degraded => {
                assert_eq!(r.status(), 200);
                let metrics = app
                    .get("/metrics")
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                assert!(
                    metrics.contains("auth_degraded_validations_total 1"),
                    "{metrics}"
                );
            }
            auth_service::config::OutagePolicy::Strict => {
                assert_eq!(r.status(), 503);
                assert!(r.headers().contains_key("retry-after"));
            }
        }
        let r = app
            .post("/v1/auth/login")
            .json(&json!({"username": user, "password": kit::PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        let r = refresh(&app, pair["refresh_token"].as_str().unwrap()).await;
        assert_eq!(r.status(), 503);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "outage answers were slow"
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn key_rotation_under_load_fails_nothing() {
    let url = kit::fresh_database().await;
    let config = || {
        let mut c = kit::postgres_config(&url);
        c.key_publish_lead = Duration::from_millis(1500);
        c
    };
    let apps = kit::replicas(2, config).await;
    let user = kit::create_user(&apps[0], &[]).await;
    let first = kit::login(&apps[0], &user).await;
    let old_token = first["access_token"].as_str().unwrap().to_owned();
    let old_kid = apps[0]
        .state
        .tokens
        .keys
        .keys()
        .signing_key(chrono::Utc::now())
        .unwrap()
        .kid
        .clone();

    let added = auth_service::app::maintain_keys(&apps[0].state, true)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(added, old_kid);
    // Load through the publish lead and past it: validations and refreshes on
    // both replicas, none may fail.
    let mut refresh_token = first["refresh_token"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut rounds = 0;
    let mut new_kid_seen = false;
    while Instant::now() < deadline {
        for app in &apps {
            let r = refresh(app, &refresh_token).await;
            assert_eq!(r.status(), 200, "refresh failed during rotation");
            let pair: Value = r.json().await.unwrap();
            refresh_token = pair["refresh_token"].as_str().unwrap().to_owned();
            let token = pair["access_token"].as_str().unwrap();
            for other in &apps {
                assert_eq!(
                    kit::validate_status(other, token).await,
                    200,
                    "validation failed during rotation"
                );
            }
            let header: Value = serde_json::from_slice(
                &URL_SAFE_NO_PAD
                    .decode(token.split('.').next().unwrap())
                    .unwrap(),
            )
            .unwrap();
            new_kid_seen |= header["kid"] == added.as_str();
            assert_eq!(
                kit::validate_status(app, &old_token).await,
                200,
                "old-key token refused"
            );
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rounds > 5);
    assert!(new_kid_seen, "the new key never signed");
    let jwks: Value = apps[1]
        .get("/.well-known/jwks.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(kids.contains(&old_kid.as_str()) && kids.contains(&added.as_str()));
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test]
async fn postgres_down_keeps_validate_refresh_and_logout_working() {
    let mut pg = tokio::task::spawn_blocking(kit::PrivatePostgres::start)
        .await
        .unwrap();
    let app = TestApp::spawn(kit::postgres_config(&pg.url)).await;
    let user = kit::create_user(&app, &[]).await;
    let first = kit::login(&app, &user).await;
    let second = kit::login(&app, &user).await;
    let mut pg_stop = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    });
    let _pg = (&mut pg_stop).await.unwrap();

    let token = first["access_token"].as_str().unwrap();
    assert_eq!(kit::validate_status(&app, token).await, 200);
    let r = refresh(&app, first["refresh_token"].as_str().unwrap()).await;
    assert_eq!(
        r.status(),
        200,
        "refresh must fall back to the session snapshot"
    );
    let pair: Value = r.json().await.unwrap();
    assert_eq!(
        kit::validate_status(&app, pair["access_token"].as_str().unwrap()).await,
        200
    );
    let r = app
        .post("/v1/auth/logout")
        .bearer_auth(second["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    for _ in 0..3 {
        let started = Instant::now();
        let r = app
            .post("/v1/auth/login")
            .json(&json!({"username": user, "password": kit::PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "login took {:?}",
            started.elapsed()
        );
    }
    let health: Value = app
        .get("/health")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "degraded");
    app.stop().await;
}

// Regression (scripts/eviction-drill, PostgreSQL outage): after each cool-down of
// the circuit breaker every login went to PostgreSQL and waited out the whole
// dependency timeout, so during an outage most logins took a second instead of
// failing fast. Several clients log in for longer than a few cool-downs.
#[tokio::test]
async fn logins_fail_fast_for_the_whole_postgres_outage() {
    let mut pg = tokio::task::spawn_blocking(kit::PrivatePostgres::start)
        .await
        .unwrap();
    let app = TestApp::spawn(kit::postgres_config(&pg.url)).await;
    let user = kit::create_user(&app, &[]).await;
    kit::login(&app, &user).await;
    let _pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(3);
    let clients = (0..4).map(|_| async {
        let mut slowest = Duration::ZERO;
        let mut logins = 0;
        while Instant::now() < deadline {
            let started = Instant::now();
            let r = app
                .post("/v1/auth/login")
                .json(&json!({"username": user, "password": kit::PASSWORD}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 503);
            assert!(r.headers().contains_key("retry-after"));
            slowest = slowest.max(started.elapsed());
            logins += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (logins, slowest)
    });
    for (logins, slowest) in futures::future::join_all(clients).await {
        assert!(logins > 5, "only {logins} logins");
        assert!(
            slowest < Duration::from_millis(900),
            "a login during the outage took {slowest:?}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn sessions_survive_the_loss_of_a_redis_master() {
    let cluster = tokio::task::spawn_blocking(kit::PrivateCluster::start)
        .await
        .unwrap();
    let url = kit::fresh_database().await;
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
    let app = TestApp::spawn(config).await;
    // Enough users that every master holds some sessions.
    let mut tokens = Vec::new();
    for _ in 0..24 {
        let user = kit::create_user(&app, &[]).await;
        tokens.push(kit::login(&app, &user).await);
    }
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    cluster.kill(masters[0]);
    // Wait for a replica to take over (node timeout 2 s), then every session
    // acknowledged before the kill must still validate and refresh.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending: Vec<usize> = (0..tokens.len()).collect();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} sessions lost after failover",
            pending.len()
        );
        let mut still = Vec::new();
        for i in pending {
            let status =
                kit::validate_status(&app, tokens[i]["access_token"].as_str().unwrap()).await;
            match status {
                200 => {}
                // Degraded acceptance during the failover window proves nothing.
                _ => still.push(i),
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // After promotion, sessions are checked for real (not degraded): a refresh
    // works for every one of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    for pair in &tokens {
        loop {
            let r = refresh(&app, pair["refresh_token"].as_str().unwrap()).await;
            match r.status().as_u16() {
                200 => break,
                503 if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                other => panic!("session lost after failover: refresh answered {other}"),
            }
        }
    }
    app.stop().await;
}
