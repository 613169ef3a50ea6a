//! The operator commands `create-user` and `rotate-keys`, run as the real binary
//! against the same storage a server then uses. Every test name starts with
//! `cli_` so `scripts/test cli` picks them out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Write,
    path::Path,
    process::{Command, Output, Stdio},
};

use serde_json::Value;

use crate::kit::{self, TestApp};

/// The test KEK (`kit::test_kek`, 32 bytes of 7) in base64, as the binary reads it.
const TEST_KEK_BASE64: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

/// Runs the binary in `dir` with only `vars` set (plus cheap argon2 parameters:
/// the binary's defaults cost ~50 ms a hash, and hashes verify whatever the
/// parameters), writing `stdin` to it when given.
fn run(dir: &Path, vars: &[(&str, &str)], args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(kit::binary())
        .args(args)
        .env_clear()
        .env("AUTH_PASSWORD_HASH_MEMORY_KIB", "1024")
        .env("AUTH_PASSWORD_HASH_ITERATIONS", "1")
        .envs(vars.iter().copied())
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// Runs in embedded mode with the data directory `dir/data` (the default).
fn run_embedded(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    run(dir, &[], args, stdin)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a run failed with exit code 1 and `message` on stderr; returns stderr.
fn assert_refused(out: &Output, message: &str) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(message), "{message:?} not in: {stderr}");
    stderr
}

#[tokio::test]
async fn cli_create_user_takes_the_password_from_stdin_and_the_user_can_log_in() {
    let dir = tempfile::tempdir().unwrap();
    let name = kit::username("ops");
    let out = run_embedded(
        dir.path(),
        &[
            "create-user",
            "--username",
            &name,
            "--email",
            "ops@example.com",
            "--role",
            "admin",
        ],
        Some(&format!("{}\n", kit::PASSWORD)),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stderr: {stderr}");
    let id: uuid::Uuid = stdout.trim().parse().expect("stdout is the new user's id");
    for printed in [&stdout, &stderr] {
        assert!(!printed.contains(kit::PASSWORD), "password printed");
    }

    // The same name again, in another letter case: refused, nothing created.
    let again = run_embedded(
        dir.path(),
        &["create-user", "--username", &name.to_uppercase()],
        Some(kit::PASSWORD),
    );
    assert_refused(&again, "user already exists");
    let unknown_role = run_embedded(
        dir.path(),
        &[
            "create-user",
            "--username",
            &kit::username("x"),
            "--role",
            "no-such-role",
        ],
        Some(kit::PASSWORD),
    );
    assert_refused(&unknown_role, "unknown role: no-such-role");

    // A server on the same data directory: the user logs in, and the built-in
    // admin role the command created opens the admin API.
    let app = TestApp::spawn(kit::embedded_config(&dir.path().join("data"))).await;
    let pair = kit::login(&app, &name).await;
    let token = pair["access_token"].as_str().unwrap();
    let me: Value = app
        .get("/v1/auth/me")
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["id"], id.to_string(), "{me}");
    assert_eq!(me["email"], "ops@example.com");
    let users = app
        .get("/v1/admin/users")
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(users.status(), 200);
    let audit: Value = app
        .get("/v1/admin/audit")
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "cli_user_create" && e["username"] == name.as_str()),
        "{audit}"
    );
    app.stop().await;
}

#[test]
fn cli_create_user_refuses_weak_missing_and_invalid_input_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let name = kit::username("weak");
    // Long enough, but a keyboard walk: the policy's strength check refuses it.
    let weak = "qwertyuiop12";
    let out = run_embedded(
        dir.path(),
        &["create-user", "--username", &name],
        Some(&format!("{weak}\n")),
    );
    let stderr = assert_refused(&out, "password refused");
    assert!(text(&out.stdout).is_empty());
    assert!(!stderr.contains(weak), "password echoed: {stderr}");

    let short = run_embedded(
        dir.path(),
        &["create-user", "--username", &name],
        Some("Xq9#vT2\n"),
    );
    let stderr = assert_refused(&short, "must be at least 12 characters");
    assert!(!stderr.contains("Xq9#vT2"));

    // No stdin at all, and an empty first line.
    let none = run_embedded(dir.path(), &["create-user", "--username", &name], None);
    assert_refused(&none, "no password on stdin");
    let empty = run_embedded(
        dir.path(),
        &["create-user", "--username", &name],
        Some("\n"),
    );
    assert_refused(&empty, "no password on stdin");

    let bad_name = run_embedded(
        dir.path(),
        &["create-user", "--username", "has space"],
        Some(kit::PASSWORD),
    );
    assert_refused(&bad_name, "username");
    // The password is never an argument.
    let argv = run_embedded(
        dir.path(),
        &["create-user", "--username", &name, "--password", "x"],
        Some(kit::PASSWORD),
    );
    assert_ne!(argv.status.code(), Some(0));
}

#[tokio::test]
async fn cli_rotate_keys_adds_a_pending_key_once_and_servers_publish_it() {
    let dir = tempfile::tempdir().unwrap();
    // A fresh store has no key: the first run creates the one that signs now.
    let first = run_embedded(dir.path(), &["rotate-keys"], None);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let first_kid = text(&first.stdout).trim().to_owned();
    assert!(!first_kid.is_empty());
    assert!(text(&first.stderr).contains("signs now"));

    // Then a real rotation: a key published now that signs after the lead.
    let second = run_embedded(dir.path(), &["rotate-keys"], None);
    assert!(second.status.success(), "{}", text(&second.stderr));
    let second_kid = text(&second.stdout).trim().to_owned();
    assert!(!second_kid.is_empty());
    assert_ne!(second_kid, first_kid);
    assert!(text(&second.stderr).contains("signs from"));

    // While that key is pending, another rotation is a no-op that says so.
    let third = run_embedded(dir.path(), &["rotate-keys"], None);
    assert!(third.status.success(), "{}", text(&third.stderr));
    assert!(text(&third.stdout).trim().is_empty());
    let stderr = text(&third.stderr);
    assert!(stderr.contains("already pending"), "{stderr}");
    assert!(stderr.contains(&second_kid));

    // A server on the data directory publishes both and signs with the first.
    let app = TestApp::spawn(kit::embedded_config(&dir.path().join("data"))).await;
    let jwks: Value = app
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
    assert_eq!(kids, [first_kid.as_str(), second_kid.as_str()]);
    let signing = app
        .state
        .tokens
        .keys
        .keys()
        .signing_key(chrono::Utc::now())
        .map(|k| k.kid.clone());
    assert_eq!(signing.as_deref(), Some(first_kid.as_str()));
    app.stop().await;
}

#[test]
fn cli_rotate_keys_refuses_a_key_encryption_key_that_cannot_open_the_stored_keys() {
    let dir = tempfile::tempdir().unwrap();
    let with_kek = |kek: &str| {
        run(
            dir.path(),
            &[("AUTH_KEY_ENCRYPTION_KEY", kek)],
            &["rotate-keys"],
            None,
        )
    };
    let first = with_kek(TEST_KEK_BASE64);
    assert!(first.status.success(), "{}", text(&first.stderr));
    // Another 32-byte key: a key sealed under it would be useless to replicas.
    let wrong = with_kek("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
    assert_refused(&wrong, "cannot be decrypted");
    assert!(text(&wrong.stdout).is_empty());
}

/// The production path: on PostgreSQL, with no bootstrap administrator
/// configured, `create-user --role admin` is how the first operator gets in.
#[tokio::test]
async fn cli_create_user_makes_the_first_admin_on_postgres() {
    let url = kit::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let redis = kit::redis_cluster_urls().join(",");
    let name = kit::username("root");
    let vars = [
        ("AUTH_DATABASE_URL", url.as_str()),
        ("AUTH_REDIS_URLS", redis.as_str()),
        ("AUTH_KEY_ENCRYPTION_KEY", TEST_KEK_BASE64),
    ];
    let out = run(
        dir.path(),
        &vars,
        &["create-user", "--username", &name, "--role", "admin"],
        Some(kit::PASSWORD),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rotated = run(dir.path(), &vars, &["rotate-keys"], None);
    assert!(rotated.status.success(), "{}", text(&rotated.stderr));

    let app = TestApp::spawn(kit::postgres_config(&url)).await;
    let token = kit::login(&app, &name).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .get("/v1/admin/roles/admin")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let role: Value = r.json().await.unwrap();
    assert_eq!(role["permissions"], serde_json::json!(["auth:admin"]));
    app.stop().await;
}
