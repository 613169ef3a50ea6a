//! Hostile clients: slow and oversized requests, malformed input, security
//! headers and CORS, secrets in logs and metrics, the OpenAPI document against
//! the router, and property-based fuzzing of every parser that sees client or
//! operator bytes.
//!
//! The fuzz harnesses are proptest runs with bounded case counts, so they run on
//! the stable toolchain in every `cargo test` (80,000 cases, a few seconds; for a
//! longer run, `PROPTEST_CASES=1000000 scripts/test fuzz_` took about three
//! minutes here). cargo-fuzz would need a nightly compiler and a sanitizer build.
//! Inputs that once failed are kept in `proptest-regressions/` and tried first on
//! every run; `SEEDS_TEXT` and the seeds in each harness are the hand-written
//! corpus.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeSet, HashMap},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use auth_service::{
    app::Application,
    config::{Config, CorsOrigins},
    http::{self, extract::Json as ApiJson},
    tokens::refresh::RefreshTokens,
};
use proptest::{prelude::*, test_runner::TestRunner};
use secrecy::ExposeSecret;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tower::ServiceExt as _;

use crate::kit::{self, TestApp};

// ---------------------------------------------------------------------------
// Slow and oversized clients
// ---------------------------------------------------------------------------

/// Reads from `stream` until the peer closes it (or `within` passes) and
/// returns what arrived; `None` if it was still open at the deadline.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(received),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status line of the first response on `stream`.
async fn status_line(stream: &mut TcpStream, within: Duration) -> String {
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = tokio::time::Instant::now() + within;
    while !received.ends_with(b"\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut byte)).await {
            Ok(Ok(1)) => received.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&received).trim().to_owned()
}

/// Sends `head` (and nothing else) on a new connection; returns the status line.
async fn raw_request(app: &TestApp, head: &[u8]) -> String {
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(head).await.unwrap();
    status_line(&mut s, Duration::from_secs(10)).await
}

#[tokio::test]
async fn slowloris_clients_are_cut_off_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = kit::embedded_config(dir.path());
    config.header_read_timeout = Duration::from_secs(1);
    config.body_read_timeout = Duration::from_secs(1);
    let app = TestApp::spawn(config).await;

    // 200 connections that start a request and never finish its headers...
    let mut header_loris = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            .await
            .unwrap();
        header_loris.push(s);
    }
    // ...and 20 that send their headers but only part of the body.
    let mut body_loris = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        s.write_all(
            b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n{\"username\":",
        )
        .await
        .unwrap();
        body_loris.push(s);
    }

    // Everyone else is served as usual meanwhile.
    let started = Instant::now();
    for _ in 0..10 {
        let r = app.get("/health/live").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = app
        .post("/v1/auth/login")
        .json(&serde_json::json!({"username": "nobody", "password": "wrong password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Generous: the point is "answered", not a latency target.
    assert!(started.elapsed() < Duration::from_secs(10));

    // The server hangs up on the header dribblers once the header-read timeout
    // passes (hyper may say 408 first), well before our generous deadline.
    let closed = futures::future::join_all(
        header_loris
            .iter_mut()
            .map(|s| read_until_closed(s, Duration::from_secs(15))),
    )
    .await;
    for received in closed {
        let received = received.expect("a slowloris connection was never closed");
        assert!(
            received.is_empty() || received.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&received)
        );
    }
    // Body dribblers get our own 408 problem once the body deadline passes.
    for s in &mut body_loris {
        let status = status_line(s, Duration::from_secs(15)).await;
        assert_eq!(status, "HTTP/1.1 408 Request Timeout");
    }
    assert_eq!(app.get("/health/live").send().await.unwrap().status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn oversized_and_malformed_requests_get_clear_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;

    // Header limits are hyper's: 431 and the connection closes.
    let huge_header = format!(
        "GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    assert_eq!(
        raw_request(&app, huge_header.as_bytes()).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let many_headers = format!(
        "GET /health/live HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..150)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    assert_eq!(
        raw_request(&app, many_headers.as_bytes()).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // Just under the limits is fine.
    let fine = format!(
        "GET /health/live HTTP/1.1\r\nHost: x\r\n{}X-Big: {}\r\n\r\n",
        (0..90)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>(),
        "a".repeat(32 * 1024)
    );
    assert_eq!(raw_request(&app, fine.as_bytes()).await, "HTTP/1.1 200 OK");
    let garbage = raw_request(&app, b"\x16\x03\x01\x00garbage\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");

    let admin = kit::admin_token(&app).await;
    let password = "x".repeat(20 * 1024);
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        (
            "login body over the public limit (16 KiB)",
            app.post("/v1/auth/login")
                .json(&serde_json::json!({"username": "a", "password": password})),
            413,
        ),
        (
            "admin body under the admin limit (64 KiB)",
            app.post("/v1/admin/users")
                .bearer_auth(&admin)
                .json(&serde_json::json!({"username": "big", "password": password})),
            422,
        ),
        (
            "admin body over the admin limit",
            app.post("/v1/admin/users")
                .bearer_auth(&admin)
                .json(&serde_json::json!({"username": "big", "password": "y".repeat(70 * 1024)})),
            413,
        ),
        (
            "text/plain",
            app.post("/v1/auth/login")
                .header("content-type", "text/plain")
                .body(r#"{"username":"a","password":"b"}"#),
            415,
        ),
        (
            "form",
            app.post("/v1/auth/refresh")
                .header("content-type", "application/x-www-form-urlencoded")
                .body("refresh_token=x"),
            415,
        ),
        (
            "nested too deep",
            app.post("/v1/auth/login")
                .header("content-type", "application/json")
                .body(format!(
                    r#"{{"username":{}1{},"password":"b"}}"#,
                    "[".repeat(40),
                    "]".repeat(40)
                )),
            400,
        ),
        (
            "nested far too deep",
            app.put("/v1/admin/config/lockout_threshold")
                .bearer_auth(&admin)
                .header("content-type", "application/json")
                .body(format!(
                    r#"{{"value":{}{}}}"#,
                    "[".repeat(20_000),
                    "]".repeat(20_000)
                )),
            400,
        ),
        (
            "not utf-8",
            app.post("/v1/auth/login")
                .header("content-type", "application/json")
                .body(vec![b'{', 0xff, 0xfe, b'}']),
            400,
        ),
        (
            "wrong query type",
            app.get("/v1/admin/users?limit=lots").bearer_auth(&admin),
            422,
        ),
    ];
    for (name, request, expected) in cases {
        let r = request.send().await.unwrap();
        assert_eq!(r.status().as_u16(), expected, "{name}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let problem: serde_json::Value = r.json().await.unwrap();
        assert_eq!(problem["status"], expected, "{name}");
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Security headers and CORS
// ---------------------------------------------------------------------------

fn assert_security_headers(name: &str, headers: &reqwest::header::HeaderMap) {
    assert_eq!(headers["x-content-type-options"], "nosniff", "{name}");
    assert_eq!(
        headers["content-security-policy"], "default-src 'none'; frame-ancestors 'none'",
        "{name}"
    );
    assert_eq!(headers["x-frame-options"], "DENY", "{name}");
    assert_eq!(headers["referrer-policy"], "no-referrer", "{name}");
    assert!(headers.contains_key("cache-control"), "{name}");
    assert!(
        !headers.contains_key("server"),
        "{name}: Server header sent"
    );
    assert!(
        !headers.contains_key("access-control-allow-origin"),
        "{name}: CORS must be off unless configured"
    );
}

#[tokio::test]
async fn every_response_carries_security_headers_and_no_cors_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(kit::embedded_config(dir.path())).await;
    let user = kit::create_user(&app, &[]).await;
    let origin = "https://evil.example";
    let cases = vec![
        ("live", app.get("/health/live")),
        ("health", app.get("/health")),
        ("metrics", app.get("/metrics")),
        ("openapi", app.get("/openapi.json")),
        ("jwks", app.get("/.well-known/jwks.json")),
        ("unknown route", app.get("/nope")),
        ("wrong method", app.delete("/v1/auth/login")),
        ("no token", app.get("/v1/auth/me").header("origin", origin)),
        (
            "preflight",
            app.client
                .request(reqwest::Method::OPTIONS, format!("{}/v1/auth/me", app.url))
                .header("origin", origin)
                .header("access-control-request-method", "GET"),
        ),
        (
            "login",
            app.post("/v1/auth/login")
                .header("origin", origin)
                .json(&serde_json::json!({"username": user, "password": kit::PASSWORD})),
        ),
    ];
    for (name, request) in cases {
        let r = request.send().await.unwrap();
        assert_security_headers(name, r.headers());
        if name == "login" {
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["cache-control"], "no-store");
            assert_eq!(r.headers()["pragma"], "no-cache");
        }
        if name == "jwks" {
            // A handler's own caching policy wins over the default.
            let cc = r.headers()["cache-control"].to_str().unwrap();
            assert!(cc.starts_with("public, max-age="), "{cc}");
        }
        if name == "preflight" {
            assert_eq!(r.status(), 405, "no CORS: OPTIONS is just a wrong method");
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn cors_answers_only_configured_origins() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = kit::embedded_config(dir.path());
    config.cors_origins = Some(CorsOrigins::List(vec!["https://app.example.com".into()]));
    let app = TestApp::spawn(config).await;
    let preflight = |origin: &str| {
        app.client
            .request(reqwest::Method::OPTIONS, format!("{}/v1/auth/me", app.url))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
    };
    let r = preflight("https://app.example.com").send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(!r.headers().contains_key("access-control-allow-credentials"));
    let allowed = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");

    let r = preflight("https://evil.example").send().await.unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));

    let r = app
        .get("/v1/auth/validate")
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("x-auth-user-id"), "{exposed}");
    assert!(exposed.contains("www-authenticate"), "{exposed}");
    app.stop().await;
}

// ---------------------------------------------------------------------------
// The OpenAPI document against the router
// ---------------------------------------------------------------------------

const METHODS: [&str; 7] = ["get", "post", "put", "patch", "delete", "head", "options"];

/// Sends `method path` to a router whose instance is still starting: every API
/// route then answers 503 `starting` before any extractor runs, so the answer
/// tells only whether the router matched the route (404/405 from the fallbacks
/// otherwise).
async fn probe_route(router: &axum::Router, method: &str, path: &str) -> (u16, String) {
    let request = axum::http::Request::builder()
        .method(method.to_ascii_uppercase().as_str())
        .uri(path)
        .body(axum::body::Body::empty())
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status, code)
}

#[tokio::test]
async fn openapi_documents_every_route_and_only_routes() {
    let dir = tempfile::tempdir().unwrap();
    // Built, not run: the instance stays in its starting phase.
    let app = Application::build(kit::embedded_config(dir.path()))
        .await
        .unwrap();
    let router = http::router(app.state().clone());
    let doc = serde_json::to_value(http::openapi()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();

    // Document -> router: every documented operation is routed, and on a
    // documented path every undocumented method is refused.
    let mut documented = BTreeSet::new();
    for (path, item) in paths {
        let concrete = path
            .replace("{id}", &uuid::Uuid::new_v4().to_string())
            .replace("{name}", "some-role")
            .replace("{key}", "lockout_threshold")
            .replace("{path}", "app/some/page");
        assert!(!concrete.contains('{'), "unhandled parameter in {path}");
        for method in METHODS {
            let is_documented = item.get(method).is_some();
            let (status, code) = probe_route(&router, method, &concrete).await;
            let routed = !(status == 404 && code == "not_found") && status != 405;
            if is_documented {
                documented.insert(format!("{} {path}", method.to_ascii_uppercase()));
                assert!(routed, "{method} {path} is documented but not routed");
            } else if method == "head" && item.get("get").is_some() {
                // axum answers HEAD wherever GET is routed; not documented twice.
            } else if path.starts_with("/v1/auth/forward-auth") {
                // Any method is accepted there, as its description says.
                assert!(routed, "{method} {path}");
            } else {
                assert!(!routed, "{method} {path} is routed but not documented");
            }
        }
    }
    // The contract's operations are all there.
    for op in [
        "POST /v1/auth/login",
        "POST /v1/auth/register",
        "POST /v1/auth/refresh",
        "POST /v1/auth/logout",
        "POST /v1/auth/logout-all",
        "GET /v1/auth/validate",
        "POST /v1/auth/validate",
        "GET /v1/auth/forward-auth",
        "POST /v1/auth/forward-auth/{path}",
        "GET /v1/auth/me",
        "POST /v1/auth/password",
        "GET /v1/auth/sessions",
        "DELETE /v1/auth/sessions/{id}",
        "GET /.well-known/jwks.json",
        "GET /.well-known/openid-configuration",
        "GET /v1/admin/users",
        "POST /v1/admin/users",
        "GET /v1/admin/users/{id}",
        "PATCH /v1/admin/users/{id}",
        "DELETE /v1/admin/users/{id}",
        "GET /v1/admin/roles",
        "POST /v1/admin/roles",
        "GET /v1/admin/roles/{name}",
        "PATCH /v1/admin/roles/{name}",
        "DELETE /v1/admin/roles/{name}",
        "GET /v1/admin/config",
        "PUT /v1/admin/config/{key}",
        "GET /v1/admin/audit",
        "GET /health",
        "GET /health/live",
        "GET /metrics",
        "GET /openapi.json",
    ] {
        assert!(documented.contains(op), "{op} is not documented");
    }

    // Router -> document: routes registered through utoipa-axum's `routes!` are
    // documented by construction; any registered with a plain `.route("...")`
    // must be documented by hand. Find them in the source.
    let sources = [
        include_str!("../../src/http/mod.rs"),
        include_str!("../../src/http/auth.rs"),
        include_str!("../../src/http/admin.rs"),
        include_str!("../../src/http/health.rs"),
        include_str!("../../src/http/wellknown.rs"),
    ];
    let mut plain_routes = 0;
    for source in sources {
        for (_, rest) in source
            .match_indices(".route(\"")
            .map(|(i, _)| source.split_at(i + 8))
        {
            let path = rest.split('"').next().unwrap().replace("{*path}", "{path}");
            plain_routes += 1;
            assert!(
                paths.contains_key(&path),
                "{path} is routed with .route() but not in the document"
            );
        }
        assert!(
            !source.contains(".nest(") && !source.contains(".route_service("),
            "nested routers would escape this check; extend it"
        );
    }
    assert!(plain_routes >= 3, "the source scan found too little");

    // Errors are problem+json with the shared schema; secured operations name
    // the bearer scheme; request bodies have examples.
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            if path == "/health" {
                // Readiness answers 503 with its own document, by design.
                continue;
            }
            let responses = op["responses"].as_object().unwrap();
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let content = &response["content"]["application/problem+json"];
                    assert_eq!(
                        content["schema"]["$ref"], "#/components/schemas/Problem",
                        "{method} {path} {status}"
                    );
                }
            }
            if let Some(security) = op.get("security") {
                assert!(security.to_string().contains("bearer"), "{method} {path}");
                assert!(responses.contains_key("401"), "{method} {path}");
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "415", "422"] {
                    assert!(responses.contains_key(status), "{method} {path} {status}");
                }
            }
        }
    }
    let login = &doc["components"]["schemas"]["LoginRequest"]["properties"];
    assert_eq!(login["username"]["example"], "alice");
}

// ---------------------------------------------------------------------------
// Secrets hygiene
// ---------------------------------------------------------------------------

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the real binary on PostgreSQL and the Redis Cluster with every log
/// target at trace, goes through every flow that handles a secret, and searches
/// the whole log output and `/metrics` for each secret it saw.
#[tokio::test]
async fn no_secret_reaches_logs_or_metrics_even_at_trace() {
    const KEK: &str = "SHlnaWVuZS10ZXN0LWtleS1lbmNyeXB0aW9uLWtleSE=";
    const ADMIN_PASSWORD: &str = "Orchid-Velvet-Compass-7f3a9c";
    const WRONG_PASSWORD: &str = "Marble-Thunder-Guess-b81d2e";
    const USER_PASSWORD: &str = "Tangerine-Quartz-Ladder-41c6aa";
    const NEW_PASSWORD: &str = "Saffron-Glacier-Lantern-9e0f13";
    const RESET_PASSWORD: &str = "Cobalt-Meadow-Harbor-c27b58";

    let db_url = kit::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let port = kit::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let stdout_path = dir.path().join("stdout.log");
    let stderr_path = dir.path().join("stderr.log");
    let mut child = Child(
        Command::new(kit::binary())
            .env_clear()
            .env("AUTH_LISTEN", format!("127.0.0.1:{port}"))
            .env("AUTH_DATABASE_URL", &db_url)
            .env("AUTH_REDIS_URLS", kit::redis_cluster_urls().join(","))
            .env("AUTH_KEY_ENCRYPTION_KEY", KEK)
            .env("AUTH_BOOTSTRAP_ADMIN_USERNAME", "hygiene-admin")
            .env("AUTH_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("AUTH_PASSWORD_HASH_MEMORY_KIB", "1024")
            .env("AUTH_PASSWORD_HASH_ITERATIONS", "1")
            .env("AUTH_SHUTDOWN_DELAY", "100ms")
            .env("AUTH_LOG_FORMAT", "json")
            .env("RUST_LOG", "trace")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            // Files, not pipes: trace output is large and a full pipe would
            // block the server.
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the server never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let post =
        |path: &str, body: serde_json::Value| client.post(format!("{base}{path}")).json(&body);
    let mut secrets: Vec<(String, String)> = [
        ("key-encryption key", KEK),
        ("admin password", ADMIN_PASSWORD),
        ("wrong password", WRONG_PASSWORD),
        ("user password", USER_PASSWORD),
        ("new password", NEW_PASSWORD),
        ("reset password", RESET_PASSWORD),
    ]
    .iter()
    .map(|(what, s)| ((*what).to_owned(), (*s).to_owned()))
    .collect();
    let mut remember_pair = |what: &str, pair: &serde_json::Value| {
        let access = pair["access_token"].as_str().unwrap().to_owned();
        let refresh = pair["refresh_token"].as_str().unwrap().to_owned();
        let signature = access.rsplit('.').next().unwrap().to_owned();
        let refresh_secret = refresh.rsplit('.').next().unwrap().to_owned();
        secrets.push((format!("{what} access token"), access.clone()));
        secrets.push((format!("{what} access token signature"), signature));
        // What Redis stores for it: the SHA-256 of the secret.
        let stored: String = ring::digest::digest(&ring::digest::SHA256, refresh_secret.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        secrets.push((format!("{what} refresh token"), refresh));
        secrets.push((format!("{what} refresh secret"), refresh_secret));
        secrets.push((format!("{what} refresh hash"), stored));
        access
    };

    // Log in, refresh, fail to log in (known and unknown user).
    let r = post(
        "/v1/auth/login",
        serde_json::json!({"username": "hygiene-admin", "password": ADMIN_PASSWORD}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let first: serde_json::Value = r.json().await.unwrap();
    remember_pair("first login", &first);
    let r = post(
        "/v1/auth/refresh",
        serde_json::json!({"refresh_token": first["refresh_token"]}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let refreshed: serde_json::Value = r.json().await.unwrap();
    let admin = remember_pair("refreshed", &refreshed);
    for username in ["hygiene-admin", "hygiene-nobody"] {
        let r = post(
            "/v1/auth/login",
            serde_json::json!({"username": username, "password": WRONG_PASSWORD}),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(r.status(), 401);
    }

    // Create a user through the admin API, log in as them, change the password,
    // then have the admin reset it.
    let r = post(
        "/v1/admin/users",
        serde_json::json!({"username": "hygiene-user", "password": USER_PASSWORD}),
    )
    .bearer_auth(&admin)
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let user_id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = post(
        "/v1/auth/login",
        serde_json::json!({"username": "hygiene-user", "password": USER_PASSWORD}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let user_pair: serde_json::Value = r.json().await.unwrap();
    let user = remember_pair("user", &user_pair);
    let r = post(
        "/v1/auth/password",
        serde_json::json!({"current_password": USER_PASSWORD, "new_password": NEW_PASSWORD}),
    )
    .bearer_auth(&user)
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    let r = client
        .patch(format!("{base}/v1/admin/users/{user_id}"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"password": RESET_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // Validation in every form, a reused refresh token, a garbage token.
    let r = client
        .get(format!("{base}/v1/auth/validate"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{base}/v1/auth/forward-auth/app/page"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post("/v1/auth/validate", serde_json::json!({"token": admin}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post(
        "/v1/auth/refresh",
        serde_json::json!({"refresh_token": first["refresh_token"]}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 401, "reuse is refused");
    let r = client
        .get(format!("{base}/v1/auth/me"))
        .bearer_auth(format!("{admin}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // What is stored: every password hash and every encrypted private key.
    let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
    let hashes: Vec<(String,)> = sqlx::query_as("SELECT password_hash FROM users")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(hashes.len() >= 2);
    for (phc,) in hashes {
        assert!(phc.starts_with("$argon2id$"));
        let digest = phc.rsplit('$').next().unwrap().to_owned();
        secrets.push(("password hash".into(), phc));
        secrets.push(("password hash digest".into(), digest));
    }
    let keys: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT private_key_encrypted FROM signing_keys")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for (encrypted,) in keys {
        use base64::Engine as _;
        let hex: String = encrypted.iter().map(|b| format!("{b:02x}")).collect();
        secrets.push(("encrypted private key (hex)".into(), hex));
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            secrets.push((
                "encrypted private key (base64)".into(),
                engine.encode(&encrypted),
            ));
        }
    }
    pool.close().await;

    // Stop the server so every log line is flushed.
    let ok = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = tokio::task::spawn_blocking(move || {
        let status = child.0.wait().unwrap();
        (status, child)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status:?}");

    let logs = format!(
        "{}\n{}",
        std::fs::read_to_string(&stdout_path).unwrap(),
        std::fs::read_to_string(&stderr_path).unwrap()
    );
    // What was searched, for `--nocapture` readers: lines per level and target.
    let mut per_target = std::collections::BTreeMap::<(String, String), usize>::new();
    for line in logs.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            let key = (
                v["level"].as_str().unwrap_or("?").to_owned(),
                v["target"].as_str().unwrap_or("?").to_owned(),
            );
            *per_target.entry(key).or_default() += 1;
        }
    }
    eprintln!("log lines searched, by level and target: {per_target:?}");
    // The test is only as strong as the logging it ran with.
    assert!(
        logs.contains("\"level\":\"TRACE\""),
        "RUST_LOG=trace produced no trace lines"
    );
    assert!(logs.lines().count() > 100, "suspiciously few log lines");
    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        assert!(secret.len() >= 16, "{what} is too short to search for");
        for (place, text) in [("logs", &logs), ("/metrics", &metrics)] {
            if let Some(at) = text.find(secret.as_str()) {
                let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                let line: String = text[line_start..line_end].chars().take(400).collect();
                leaks.push(format!("{what} in {place}: {line}"));
            }
        }
    }
    // PEM headers, and the base64 starts of Ed25519 and P-256 PKCS#8 private keys.
    for marker in [
        "$argon2",
        "PRIVATE KEY",
        "MC4CAQAwBQYDK2VwBCIEI",
        "MFMCAQEwBQYDK2VwBCIEI",
        "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg",
        "Bearer ey",
        "bearer ey",
    ] {
        if logs.contains(marker) || metrics.contains(marker) {
            leaks.push(format!("{marker:?} appears in the output"));
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}

// ---------------------------------------------------------------------------
// Fuzzing: parsers of client and operator input
// ---------------------------------------------------------------------------

/// Cases per harness: bounded so the four together take a few seconds of the
/// test run (80,000 cases; a million each took about three minutes here).
/// `PROPTEST_CASES` overrides it for longer runs.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A bounded run whose failures are saved to (and replayed first from)
/// `regressions`, a file under `tests/it/proptest-regressions/` kept in the repo.
fn fuzz_config(default_cases: u32, regressions: &'static str) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        // Shrinking a failure of a cheap parser is fast; cap it anyway.
        max_shrink_iters: 2_000,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(regressions),
        )),
        ..ProptestConfig::default()
    }
}

macro_rules! regressions {
    ($name:literal) => {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/it/proptest-regressions/",
            $name,
            ".txt"
        )
    };
}

/// Strings that have broken token and JSON parsers elsewhere.
const SEEDS_TEXT: &[&str] = &[
    "",
    ".",
    "..",
    "...",
    "....",
    "rt1",
    "rt1...",
    "rt1.0.0.0",
    "rt1.00000000000000000000000000000000.00000000000000000000000000000000.",
    "rt1.{00000000-0000-0000-0000-000000000000}.urn:uuid:00000000-0000-0000-0000-000000000000.AAAA",
    "rt2.00000000000000000000000000000000.00000000000000000000000000000000.",
    "rt2.00000000000000000000000000000000.00000000000000000000000000000000.AAAA.AAAA",
    "eyJhbGciOiJub25lIn0.e30.",
    "eyJhbGciOiJub25lIiwia2lkIjoiYSJ9.e30.",
    "eyJhbGciOiJIUzI1NiIsImtpZCI6ImEifQ.e30.c2ln",
    "eyJ9.eyJ9.eyJ9",
    "\u{0}\u{0}\u{0}",
    "\u{feff}eyJhbGciOiJFZERTQSJ9.e30.e30",
    "é.é.é",
    "😀.😀.😀.😀",
];

/// A valid token with one edit: a character replaced, inserted or removed, or
/// segments swapped or dropped.
fn mutated(token: String) -> impl Strategy<Value = String> {
    let len = token.len();
    let chars = prop::sample::select(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ %\u{e9}"
            .chars()
            .collect::<Vec<_>>(),
    );
    (0..len.max(1), chars, 0u8..6).prop_map(move |(at, c, how)| {
        let mut t = token.clone();
        let at = (0..=at).rev().find(|i| t.is_char_boundary(*i)).unwrap_or(0);
        match how {
            0 | 1 => {
                if at < t.len() {
                    let old = t[at..].chars().next().unwrap();
                    t.replace_range(at..at + old.len_utf8(), &c.to_string());
                }
            }
            2 => t.insert(at, c),
            3 => {
                if at < t.len() {
                    t.remove(at);
                }
            }
            4 => {
                let parts: Vec<&str> = t.split('.').collect();
                if parts.len() >= 2 {
                    let mut p = parts.clone();
                    p.swap(0, parts.len() - 1);
                    t = p.join(".");
                }
            }
            _ => t.truncate(at),
        }
        t
    })
}

#[test]
fn fuzz_refresh_token_parser() {
    let tokens = RefreshTokens::new(&kit::test_kek());
    let valid = tokens
        .generate(uuid::Uuid::new_v4(), uuid::Uuid::new_v4())
        .unwrap();
    let wire = valid.to_wire().expose_secret().to_owned();
    let check = |input: &str| {
        if let Some((parsed, authentic)) = tokens.parse(input) {
            // Whatever parses round-trips through the wire form to the same token.
            let (again, still) = tokens.parse(parsed.to_wire().expose_secret()).unwrap();
            assert_eq!(again.user_id, parsed.user_id);
            assert_eq!(again.session_id, parsed.session_id);
            assert_eq!(again.hash(), parsed.hash());
            assert_eq!(still, authentic);
        }
    };
    for seed in SEEDS_TEXT {
        check(seed);
    }
    check(&wire);
    let mut runner = TestRunner::new(fuzz_config(30_000, regressions!("refresh_token")));
    let strategy = prop_oneof![
        any::<String>(),
        "rt[12]\\.[0-9a-f-]{0,40}\\.[0-9a-f-]{0,40}\\.[A-Za-z0-9_=-]{0,90}",
        mutated(wire.clone()),
    ];
    runner
        .run(&strategy, |input| {
            check(&input);
            if input != wire {
                if let Some((other, authentic)) = tokens.parse(&input) {
                    // A one-character edit of a valid token may still parse (it is
                    // then simply another token), but must change what it proves,
                    // and cannot keep a valid tag: no edit passes for a token we
                    // issued.
                    prop_assert!(
                        other.hash() != valid.hash()
                            || other.user_id != valid.user_id
                            || other.session_id != valid.session_id
                            || input.eq_ignore_ascii_case(&wire)
                    );
                    prop_assert!(!authentic || input.eq_ignore_ascii_case(&wire));
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_access_token_verifier() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = runtime.block_on(TestApp::spawn(kit::embedded_config(dir.path())));
    let tokens = app.state.tokens.clone();
    let subject = auth_service::tokens::Subject {
        user_id: uuid::Uuid::new_v4(),
        session_id: uuid::Uuid::new_v4(),
        username: "fuzz",
        roles: &["r".to_owned()],
        permissions: &["p".to_owned()],
        authz_version: 0,
    };
    let (valid, _) = tokens.issue(&subject, 600).unwrap();
    assert!(tokens.verify(&valid).is_ok());
    for seed in SEEDS_TEXT {
        assert!(tokens.verify(seed).is_err(), "{seed}");
    }
    let mut runner = TestRunner::new(fuzz_config(20_000, regressions!("access_token")));
    let strategy = prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,100}",
        mutated(valid.clone()),
        mutated(valid.clone()),
    ];
    runner
        .run(&strategy, |input| {
            let verdict = tokens.verify(&input);
            // Any change to a signed token, however small, is refused.
            prop_assert!(
                input == valid || verdict.is_err(),
                "accepted an edited token: {input}"
            );
            Ok(())
        })
        .unwrap();
    runtime.block_on(app.stop());
}

/// Arbitrary JSON values, a few levels deep, with the field names our bodies use.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let key = prop_oneof![
        Just("username".to_owned()),
        Just("password".to_owned()),
        Just("email".to_owned()),
        Just("refresh_token".to_owned()),
        Just("token".to_owned()),
        Just("roles".to_owned()),
        Just("permissions".to_owned()),
        Just("value".to_owned()),
        Just("disabled".to_owned()),
        Just("current_password".to_owned()),
        Just("new_password".to_owned()),
        "\\PC{0,12}",
    ];
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "\\PC{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every error of the JSON extractor is the client's: 400 or 422, nothing else.
fn parse_as_every_body(bytes: &[u8]) -> Result<(), TestCaseError> {
    use auth_service::http::{admin, auth};
    fn check<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(), TestCaseError> {
        if let Err(e) = ApiJson::<T>::from_bytes(bytes) {
            let status = e.status().as_u16();
            prop_assert!(status == 400 || status == 422, "{status} for {bytes:?}");
        }
        Ok(())
    }
    check::<auth::LoginRequest>(bytes)?;
    check::<auth::RegisterRequest>(bytes)?;
    check::<auth::RefreshRequest>(bytes)?;
    check::<auth::ValidateRequest>(bytes)?;
    check::<auth::PasswordChange>(bytes)?;
    check::<admin::CreateUser>(bytes)?;
    check::<admin::PatchUser>(bytes)?;
    check::<admin::CreateRole>(bytes)?;
    check::<admin::PatchRole>(bytes)?;
    check::<admin::ConfigValue>(bytes)?;
    check::<serde_json::Value>(bytes)
}

#[test]
fn fuzz_json_request_bodies() {
    for seed in SEEDS_TEXT {
        parse_as_every_body(seed.as_bytes()).unwrap();
    }
    for seed in [
        r#"{"username":"a","password":"b"}"#,
        r#"{"username":"a","password":"b","password":"c"}"#,
        r#"{"username":"\ud800","password":"b"}"#,
        r#"{"value":1e999999}"#,
        r#"{"value":-0}"#,
        r#"{"roles":[null]}"#,
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        "{\"a\":\"\\",
        "\"\\u0000\"",
        "{} {}",
    ] {
        parse_as_every_body(seed.as_bytes()).unwrap();
    }
    let mut runner = TestRunner::new(fuzz_config(10_000, regressions!("json_bodies")));
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ];
    runner
        .run(&strategy, |bytes| parse_as_every_body(&bytes))
        .unwrap();
}

/// Every variable `Config::from_lookup` reads.
const VARIABLES: &[&str] = &[
    "AUTH_LISTEN",
    "AUTH_DATABASE_URL",
    "AUTH_DATA_DIR",
    "AUTH_REDIS_URLS",
    "AUTH_REDIS_CLUSTER",
    "AUTH_KEY_ENCRYPTION_KEY",
    "AUTH_ISSUER",
    "AUTH_AUDIENCE",
    "AUTH_SESSION_OUTAGE_POLICY",
    "AUTH_TRUSTED_PROXIES",
    "AUTH_SHUTDOWN_DELAY",
    "AUTH_DRAIN_TIMEOUT",
    "AUTH_BOOTSTRAP_ADMIN_USERNAME",
    "AUTH_BOOTSTRAP_ADMIN_PASSWORD",
    "AUTH_LOG_FORMAT",
    "AUTH_PASSWORD_HASH_MEMORY_KIB",
    "AUTH_PASSWORD_HASH_ITERATIONS",
    "AUTH_PASSWORD_HASH_PARALLELISM",
    "AUTH_PASSWORD_HASH_CONCURRENCY",
    "AUTH_PASSWORD_HASH_QUEUE",
    "AUTH_REQUEST_TIMEOUT",
    "AUTH_DEPENDENCY_TIMEOUT",
    "AUTH_MAX_CONCURRENT_REQUESTS",
    "AUTH_KEY_PUBLISH_LEAD",
    "AUTH_SIGNING_ALGORITHM",
    "AUTH_HEADER_READ_TIMEOUT",
    "AUTH_BODY_READ_TIMEOUT",
    "AUTH_CORS_ORIGINS",
];

#[test]
fn fuzz_configuration_parser() {
    // Values that look almost right are the interesting ones.
    let value = prop_oneof![
        any::<String>(),
        "[0-9]{0,25}(ms|s|m|h|d|us|ns|y)?",
        "-?[0-9]{1,22}",
        "(postgres|postgresql|redis|rediss|http|https)://[\\PC]{0,40}",
        "redis://[a-z:@\\[\\]0-9.]{0,30}(,redis://[a-z0-9:.]{0,20}){0,3}",
        "[0-9a-f:.]{0,20}(/[0-9]{1,3})?(,[0-9.]{0,15}/[0-9]{1,3}){0,3}",
        "[A-Za-z0-9+/=]{40,48}",
        // Marked values: a refusal must never echo a secret (see below).
        "(redis://|postgres://|)[a-z:@.]{0,12}s3cr3t[\\PC]{0,12}",
        prop::sample::select(vec![
            "true", "false", "json", "pretty", "strict", "degraded", "EdDSA", "ES256", "*", " ",
            ",", ",,,",
        ])
        .prop_map(str::to_owned),
    ];
    let env = prop::collection::hash_map(prop::sample::select(VARIABLES.to_vec()), value, 0..8);
    let mut runner = TestRunner::new(fuzz_config(20_000, regressions!("config")));
    runner
        .run(&env, |env: HashMap<&str, String>| {
            match Config::from_lookup(|name| env.get(name).cloned()) {
                // A refusal names one of our variables (the one set wrong, or the
                // one a setting requires) and is one line.
                Err(e) => {
                    prop_assert!(VARIABLES.contains(&e.variable), "{e} for {env:?}");
                    prop_assert!(!e.to_string().contains('\n'), "{e}");
                    // Values that may hold secrets are never echoed back: no
                    // message of ours contains the marker, so finding it means
                    // the value was copied in.
                    let secretive = [
                        "AUTH_KEY_ENCRYPTION_KEY",
                        "AUTH_BOOTSTRAP_ADMIN_PASSWORD",
                        "AUTH_DATABASE_URL",
                        "AUTH_REDIS_URLS",
                    ];
                    if secretive.contains(&e.variable)
                        && env.get(e.variable).is_some_and(|v| v.contains("s3cr3t"))
                    {
                        prop_assert!(!e.to_string().contains("s3cr3t"), "{e}");
                    }
                }
                Ok(config) => {
                    prop_assert!(!config.header_read_timeout.is_zero());
                    prop_assert!(!config.body_read_timeout.is_zero());
                    prop_assert!(config.password_hash.concurrency >= 1);
                }
            }
            Ok(())
        })
        .unwrap();
}
