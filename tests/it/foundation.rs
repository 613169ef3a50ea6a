//! The foundation: configuration errors, embedded mode, migrations from several
//! replicas, health semantics, metrics, graceful shutdown and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::kit::{self, TestApp};

/// Runs the binary with exactly `vars` as its environment and returns
/// (exit status, stderr).
fn run_with_env(vars: &[(&str, &str)], args: &[&str], dir: &std::path::Path) -> (i32, String) {
    let out = Command::new(kit::binary())
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_exits_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("AUTH_LISTEN", "not-an-address")], "AUTH_LISTEN"),
        (
            &[("AUTH_REDIS_URLS", "http://localhost:6379")],
            "AUTH_REDIS_URLS",
        ),
        (
            &[("AUTH_KEY_ENCRYPTION_KEY", "c2hvcnQ=")],
            "AUTH_KEY_ENCRYPTION_KEY",
        ),
        (&[("AUTH_SHUTDOWN_DELAY", "soon")], "AUTH_SHUTDOWN_DELAY"),
    ];
    for (vars, variable) in cases {
        let (code, stderr) = run_with_env(vars, &[], dir.path());
        assert_ne!(code, 0, "{vars:?} should fail");
        assert!(
            stderr.contains(variable),
            "{variable} not named in: {stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "one line expected: {stderr}"
        );
    }
}

/// Waits for `url` to answer `status`, or panics after `within`.
async fn wait_for_status(client: &reqwest::Client, url: &str, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status() == status {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} never answered {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

#[tokio::test]
async fn embedded_mode_starts_with_no_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let port = kit::free_port();
    let listen = format!("127.0.0.1:{port}");
    // Only the listen address is set, so parallel tests do not fight over 8080.
    let child = Child(
        Command::new(kit::binary())
            .env_clear()
            .env("AUTH_LISTEN", &listen)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let base = format!("http://{listen}");
    wait_for_status(
        &client,
        &format!("{base}/health"),
        200,
        Duration::from_secs(20),
    )
    .await;
    let live = client
        .get(format!("{base}/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let health: serde_json::Value = client
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["components"]["redis"]["mode"], "embedded");
    assert!(dir.path().join("data").join("auth.db").exists());
    signal(&child.0, "TERM");
    let mut child = child;
    let status = child.0.wait().unwrap();
    assert!(status.success());
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("embedded mode"), "{stderr}");
    // The generated password is in a file of its own, never on stderr.
    assert!(
        stderr.contains("created administrator `admin`; its password is in"),
        "{stderr}"
    );
    let password =
        std::fs::read_to_string(dir.path().join("data").join("initial-admin-password")).unwrap();
    assert!(!stderr.contains(password.trim()), "{stderr}");
}

#[tokio::test]
async fn three_replicas_migrate_one_empty_database_at_once() {
    let url = kit::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let kek = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
    let redis = kit::redis_cluster_urls().join(",");
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(kit::binary())
                .arg("migrate")
                .env_clear()
                .env("AUTH_DATABASE_URL", &url)
                .env("AUTH_REDIS_URLS", &redis)
                .env("AUTH_KEY_ENCRYPTION_KEY", kek)
                .current_dir(dir.path())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let (applied,): (i64,) = sqlx::query_as("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!(applied, i64::try_from(files).unwrap());
}

#[tokio::test]
async fn health_is_healthy_then_degraded_when_redis_stops() {
    let url = kit::fresh_database().await;
    let app = TestApp::spawn(kit::postgres_config(&url)).await;
    let health: serde_json::Value = app
        .get("/health")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(health["components"]["redis"]["mode"], "cluster");
    assert_eq!(health["components"]["database"]["status"], "up");
    assert!(health["components"]["system"]["latency_ms"].is_number());
    app.stop().await;

    let mut redis = kit::PrivateRedis::start().await;
    let mut config = kit::postgres_config(&url);
    config.redis = Some(auth_service::config::RedisConfig {
        urls: vec![secrecy::SecretString::from(redis.url())],
        cluster: false,
    });
    let app = TestApp::spawn(config).await;
    redis.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = app.get("/health").send().await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "a dependency outage must not fail readiness"
        );
        let body: serde_json::Value = r.json().await.unwrap();
        if body["status"] == "degraded" {
            assert_eq!(body["components"]["redis"]["status"], "down");
            break;
        }
        assert!(Instant::now() < deadline, "never degraded: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.get("/health/live").send().await.unwrap().status(), 200);
    let metrics = app
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("auth_dependency_up{dependency=\"redis\"} 0"),
        "{metrics}"
    );
    app.stop().await;
}

/// Reads one HTTP/1.1 response's status line from a raw stream.
fn read_status(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => buf.push(byte[0]),
            Err(e) => panic!("read failed: {e}"),
        }
    }
    String::from_utf8_lossy(&buf).trim().to_owned()
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let port = kit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Child(
        Command::new(kit::binary())
            .env_clear()
            .env("AUTH_LISTEN", &listen)
            .env("AUTH_SHUTDOWN_DELAY", "1s")
            .env("AUTH_DRAIN_TIMEOUT", "10s")
            .env("AUTH_PASSWORD_HASH_MEMORY_KIB", "1024")
            .env("AUTH_PASSWORD_HASH_ITERATIONS", "1")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let base = format!("http://{listen}");
    wait_for_status(
        &client,
        &format!("{base}/health"),
        200,
        Duration::from_secs(20),
    )
    .await;

    // A request whose body is still arriving when the signal comes.
    let body = br#"{"username":"nobody","password":"wrong password here"}"#;
    let mut slow = TcpStream::connect(&listen).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    write!(
        slow,
        "POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    slow.write_all(&body[..10]).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let signalled = Instant::now();
    signal(&child.0, "TERM");
    let deadline = signalled + Duration::from_millis(100);
    loop {
        let r = client.get(format!("{base}/health")).send().await.unwrap();
        if r.status() == 503 {
            let j: serde_json::Value = r.json().await.unwrap();
            assert_eq!(j["status"], "draining");
            break;
        }
        assert!(Instant::now() < deadline, "readiness not 503 within 100 ms");
    }
    // A new request during the delay is still served.
    let live = client
        .get(format!("{base}/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("auth_draining 1"));

    // The in-flight request completes normally after the delay has passed.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    slow.write_all(&body[10..]).unwrap();
    let status = read_status(&mut slow);
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");

    let exit = tokio::task::spawn_blocking(move || {
        let status = child.0.wait().unwrap();
        (status, child)
    })
    .await
    .unwrap()
    .0;
    assert!(exit.success(), "exit status {exit:?}");
    assert!(signalled.elapsed() < Duration::from_secs(11));
}

#[tokio::test]
async fn metrics_use_route_templates_and_parse() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    let id = uuid::Uuid::new_v4();
    app.get(&format!("/v1/admin/users/{id}"))
        .send()
        .await
        .unwrap();
    app.get("/no/such/route").send().await.unwrap();
    let text = app
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("auth_draining 0"));
    assert!(text.contains(r#"route="/v1/admin/users/{id}""#), "{text}");
    assert!(text.contains(r#"route="unmatched""#));
    assert!(
        !text.contains(&id.to_string()),
        "raw path leaked into labels"
    );
    // The text format's rules, as promtool checks them: HELP and TYPE before each
    // family, counters end in _total, every sample line parses.
    let mut typed = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} lacks _total");
            }
            typed.insert(name.to_owned(), kind.to_owned());
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value in {line}"));
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(typed.contains_key(family), "{name} has no TYPE");
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn bad_input_gets_problem_json_never_5xx() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    let cases = vec![
        (
            "malformed",
            app.post("/v1/auth/login")
                .header("content-type", "application/json")
                .body("{not json"),
        ),
        (
            "wrong type",
            app.post("/v1/auth/login")
                .json(&serde_json::json!({"username": 5, "password": "x"})),
        ),
        (
            "unknown field",
            app.post("/v1/auth/login")
                .json(&serde_json::json!({"username": "a", "password": "b", "admin": true})),
        ),
        (
            "no content type",
            app.post("/v1/auth/login")
                .body(r#"{"username":"a","password":"b"}"#),
        ),
        (
            "oversized",
            app.post("/v1/auth/login")
                .header("content-type", "application/json")
                .body(vec![b' '; 2 * 1024 * 1024]),
        ),
        ("unknown route", app.get("/v1/nothing/here")),
        ("wrong method", app.delete("/v1/auth/login")),
        ("bad uuid", app.get("/v1/admin/users/not-a-uuid")),
    ];
    for (name, request) in cases {
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        assert!((400..500).contains(&status), "{name}: {status}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let problem: serde_json::Value = r.json().await.unwrap();
        assert!(problem["code"].is_string(), "{name}: {problem}");
        assert_eq!(problem["status"], status);
    }
    app.stop().await;
}
