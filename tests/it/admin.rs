//! The admin API and identity rules over HTTP: access control, conflicts, the
//! password policy, roles in tokens, disabling, runtime configuration reaching
//! every replica, and bootstrap from several replicas at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::kit::{self, TestApp};

#[tokio::test]
async fn admin_api_guards_and_validates() {
    let url = kit::fresh_database().await;
    let app = TestApp::spawn(kit::postgres_config(&url)).await;
    let admin = kit::admin_token(&app).await;
    let plain_user = kit::create_user(&app, &[]).await;
    let plain = kit::login(&app, &plain_user).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();

    assert_eq!(
        app.get("/v1/admin/users").send().await.unwrap().status(),
        401
    );
    assert_eq!(
        app.get("/v1/admin/users")
            .bearer_auth(&plain)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        app.get("/v1/admin/users")
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let role = kit::username("editors");
    let r = app
        .post("/v1/admin/roles")
        .bearer_auth(&admin)
        .json(&json!({"name": role, "permissions": ["docs:write", "docs:read"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let name = kit::username("Carol");
    let create = |username: &str, password: &str| {
        app.post("/v1/admin/users")
            .bearer_auth(&admin)
            .json(&json!({"username": username, "password": password, "roles": [role]}))
            .send()
    };
    let r = create(&name, kit::PASSWORD).await.unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["permissions"], json!(["docs:read", "docs:write"]));
    let id = created["id"].as_str().unwrap().to_owned();

    let r = create(&name.to_lowercase(), kit::PASSWORD).await.unwrap();
    assert_eq!(r.status(), 409, "duplicate in another case");
    let r = create(&kit::username("d"), "password123456").await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "password");
    let huge = "x".repeat(60_000);
    let started = Instant::now();
    let r = create(&kit::username("e"), &huge).await.unwrap();
    assert_eq!(r.status(), 422);
    assert!(started.elapsed() < Duration::from_secs(2));

    let fetched: Value = app
        .get(&format!("/v1/admin/users/{id}"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["roles"], json!([role]));
    assert_eq!(fetched["permissions"], json!(["docs:read", "docs:write"]));
    let token = kit::login(&app, &name).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let claims: Value = app
        .get("/v1/auth/validate")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(claims["permissions"], json!(["docs:read", "docs:write"]));

    // Disabling ends the user's sessions and logins at once.
    let r = app
        .patch(&format!("/v1/admin/users/{id}"))
        .bearer_auth(&admin)
        .json(&json!({"disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(kit::validate_status(&app, &token).await, 401);
    let r = app
        .post("/v1/auth/login")
        .json(&json!({"username": name, "password": kit::PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let r = app
        .put("/v1/admin/config/no_such_key")
        .bearer_auth(&admin)
        .json(&json!({"value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let r = app
        .put("/v1/admin/config/lockout_threshold")
        .bearer_auth(&admin)
        .json(&json!({"value": "five"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    let r = app
        .delete(&format!("/v1/admin/users/{id}"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = app
        .get(&format!("/v1/admin/users/{id}"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let audit: Value = app
        .get("/v1/admin/audit")
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for kind in [
        "admin_user_create",
        "admin_user_update",
        "admin_user_delete",
        "login",
    ] {
        assert!(kinds.contains(&kind), "{kind} not audited: {kinds:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_config_change_on_one_replica_is_in_force_on_another_within_5s() {
    let url = kit::fresh_database().await;
    let apps = kit::replicas(2, || kit::postgres_config(&url)).await;
    let admin = kit::admin_token(&apps[0]).await;
    let register = |app: &TestApp| {
        app.post("/v1/auth/register")
            .json(&json!({"username": kit::username("self"), "password": kit::PASSWORD}))
            .send()
    };
    assert_eq!(register(&apps[1]).await.unwrap().status(), 404);
    let r = apps[0]
        .put("/v1/admin/config/registration_enabled")
        .bearer_auth(&admin)
        .json(&json!({"value": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set = Instant::now();
    loop {
        let status = register(&apps[1]).await.unwrap().status();
        if status == 201 {
            break;
        }
        assert!(
            set.elapsed() < Duration::from_secs(5),
            "not in force on B after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let config: Value = apps[1]
        .get("/v1/admin/config")
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["registration_enabled"], true);
    assert_eq!(config["access_token_ttl_seconds"], 900);
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test]
async fn bootstrap_from_three_replicas_creates_one_admin() {
    let url = kit::fresh_database().await;
    let config = || {
        let mut c = kit::postgres_config(&url);
        c.bootstrap_admin = Some(auth_service::config::BootstrapAdmin {
            username: "root".into(),
            password: secrecy::SecretString::from(kit::PASSWORD),
        });
        c
    };
    let (a, b, c) = tokio::join!(
        TestApp::spawn(config()),
        TestApp::spawn(config()),
        TestApp::spawn(config())
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let (users,): (i64,) = sqlx::query_as("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(users, 1);
    let token = kit::login(&b, "root").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = c
        .get("/v1/admin/users")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for app in [a, b, c] {
        app.stop().await;
    }
}
