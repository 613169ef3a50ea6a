//! The test kit: real datastores and real instances of the service.
//!
//! `scripts/test` starts one PostgreSQL and one 6-node Redis Cluster for the whole
//! run and exports their addresses. Each test isolates itself: a fresh database
//! per test, fresh usernames (and so fresh Redis keys, which hash-tag the user),
//! OS-chosen ports. Tests that must stop a datastore start a private one.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use auth_service::{
    app::{AppState, Application},
    config::{Config, DatabaseConfig, KeyEncryptionKey, RedisConfig},
};
use secrecy::SecretString;
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::oneshot;

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the integration tests through `scripts/test`, which \
             starts PostgreSQL and a Redis Cluster and exports their addresses"
        )
    })
}

/// URL of the shared test PostgreSQL's maintenance database (superuser).
pub fn admin_database_url() -> String {
    required_env("AUTH_TEST_DATABASE_URL")
}

/// Seed URLs of the shared 6-node test Redis Cluster.
pub fn redis_cluster_urls() -> Vec<String> {
    required_env("AUTH_TEST_REDIS_URLS")
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// A new, empty database on the shared PostgreSQL; returns its URL.
pub async fn fresh_database() -> String {
    let admin = admin_database_url();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&admin)
        .await
        .expect("connect to test PostgreSQL");
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

/// A fresh username, so tests sharing Redis and a database never collide.
pub fn username(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A password that passes the default policy.
pub const PASSWORD: &str = "correct horse battery staple 42";

pub fn test_kek() -> KeyEncryptionKey {
    KeyEncryptionKey::new([7u8; 32])
}

/// Configuration for an instance on PostgreSQL `db_url` and the shared cluster.
pub fn postgres_config(db_url: &str) -> Config {
    let mut config = Config::for_storage(
        DatabaseConfig::Postgres {
            url: SecretString::from(db_url.to_owned()),
        },
        Some(RedisConfig {
            urls: redis_cluster_urls()
                .into_iter()
                .map(SecretString::from)
                .collect(),
            cluster: true,
        }),
        std::env::temp_dir(),
    )
    .unwrap();
    config.key_encryption_key = Some(test_kek());
    fast(&mut config);
    config
}

/// Configuration for an embedded-mode instance in `dir`.
pub fn embedded_config(dir: &std::path::Path) -> Config {
    let mut config =
        Config::for_storage(DatabaseConfig::Embedded, None, dir.to_path_buf()).unwrap();
    fast(&mut config);
    config
}

/// Test speed: a short shutdown delay and cheap password hashing.
fn fast(config: &mut Config) {
    config.shutdown_delay = Duration::from_millis(200);
    config.drain_timeout = Duration::from_secs(5);
    config.password_hash.memory_kib = 1024;
    config.password_hash.iterations = 1;
}

/// Sends the in-process apps' warnings and errors to the test's captured output,
/// so a failing test shows why the server answered as it did (`RUST_LOG` for more).
fn init_logging() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// One running instance in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    pub url: String,
    pub client: reqwest::Client,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    /// Builds and starts an instance, and waits until it is ready.
    pub async fn spawn(config: Config) -> Self {
        init_logging();
        let app = Application::build(config).await.expect("build app");
        let addr = app.local_addr();
        let state = app.state().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        let this = Self {
            addr,
            url: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            state,
            stop: Some(stop),
            task: Some(task),
        };
        this.wait_ready().await;
        this
    }

    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.client.get(format!("{}/health", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.url))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{path}", self.url))
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.put(format!("{}{path}", self.url))
    }

    pub fn patch(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.patch(format!("{}{path}", self.url))
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.delete(format!("{}{path}", self.url))
    }

    /// Shuts the instance down as SIGTERM would and waits for it to stop.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The release-or-debug binary Cargo built for this test run.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_auth-service"))
}

/// A free loopback port (bound and released; good enough for a child process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private single-node Redis that a test may stop.
pub struct PrivateRedis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let bin =
            std::env::var("AUTH_TEST_REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = std::process::Command::new(&bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}); install it with `apt-get install redis-server`")
            });
        let this = Self {
            port,
            dir,
            child: Some(child),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "private redis did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        this
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `n` replicas sharing one database and the shared Redis Cluster.
pub async fn replicas(n: usize, config: impl Fn() -> Config) -> Vec<TestApp> {
    let mut apps = Vec::with_capacity(n);
    for _ in 0..n {
        apps.push(TestApp::spawn(config()).await);
    }
    apps
}

/// Creates a role straight in the store (tests of other things need one fast).
pub async fn create_role(app: &TestApp, name: &str, permissions: &[&str]) {
    use auth_service::store::IdentityStore;
    app.state
        .db
        .create_role(
            &auth_service::users::Role {
                name: name.into(),
                description: String::new(),
                permissions: permissions.iter().map(|p| p.to_string()).collect(),
            },
            &auth_service::users::AuditEvent::new("test", "success"),
        )
        .await
        .unwrap();
}

/// Creates a user with `PASSWORD` and the given roles; returns the username.
pub async fn create_user(app: &TestApp, roles: &[&str]) -> String {
    use auth_service::store::IdentityStore;
    let username = username("u");
    let phc = app
        .state
        .hasher
        .hash(SecretString::from(PASSWORD))
        .await
        .unwrap();
    app.state
        .db
        .create_user(
            &auth_service::users::NewUser {
                username: username.clone(),
                email: None,
                password_hash: phc,
                roles: roles.iter().map(|r| r.to_string()).collect(),
            },
            &auth_service::users::AuditEvent::new("test", "success"),
        )
        .await
        .unwrap();
    username
}

/// Logs in and returns the token pair; panics unless it succeeds.
pub async fn login(app: &TestApp, username: &str) -> serde_json::Value {
    let r = app
        .post("/v1/auth/login")
        .json(&serde_json::json!({"username": username, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "login of {username} failed");
    r.json().await.unwrap()
}

/// An access token of a fresh user holding `auth:admin`.
pub async fn admin_token(app: &TestApp) -> String {
    let role = username("admins");
    create_role(app, &role, &["auth:admin"]).await;
    let admin = create_user(app, &[&role]).await;
    login(app, &admin).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Status of GET /v1/auth/validate with `token`.
pub async fn validate_status(app: &TestApp, token: &str) -> u16 {
    app.get("/v1/auth/validate")
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Runs `script` in bash with the repository's datastore library loaded, and
/// returns its stdout. The library is what `scripts/test` uses, so tests that
/// need a private datastore start it exactly the same way.
fn datastore_script(script: &str) -> String {
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/lib/datastores.sh");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; source '{lib}'; {script}"))
        .stdin(Stdio::null())
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "datastore script failed: {script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A private PostgreSQL that a test may stop.
pub struct PrivatePostgres {
    pub url: String,
    dir: tempfile::TempDir,
    stopped: bool,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = datastore_script(&format!(
            "start_postgres '{}' >&2; echo \"$AUTH_TEST_DATABASE_URL\"",
            dir.path().display()
        ));
        Self {
            url,
            dir,
            stopped: false,
        }
    }

    /// Stops the server at once, as a crash or failover would.
    pub fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let data = self.dir.path().join("pg").join("data");
            let _ = datastore_script(&format!(
                "bin=$(_ds_pg_bin_dir); _ds_as_pg_user '{}' \"$bin/pg_ctl\" -D '{}' -m immediate -w stop >&2",
                self.dir.path().join("pg").display(),
                data.display()
            ));
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private Redis Cluster (3 masters, 1 replica each) that a test may break.
pub struct PrivateCluster {
    pub urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl PrivateCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let urls = datastore_script(&format!(
            "start_redis_cluster '{}' 3 1 >&2; echo \"$AUTH_TEST_REDIS_URLS\"",
            dir.path().display()
        ));
        Self {
            urls: urls.split(',').map(str::to_owned).collect(),
            _dir: dir,
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.urls
            .iter()
            .filter_map(|u| u.rsplit(':').next()?.parse().ok())
            .collect()
    }

    /// `redis-cli -p port args...`, stdout.
    pub fn cli(port: u16, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .arg("-p")
            .arg(port.to_string())
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The ports of the current masters.
    pub fn masters(&self) -> Vec<u16> {
        self.ports()
            .into_iter()
            .filter(|p| Self::cli(*p, &["role"]).starts_with("master"))
            .collect()
    }

    /// Kills one node with SIGKILL (no shutdown, no save).
    pub fn kill(&self, port: u16) {
        let pid = Self::cli(port, &["info", "server"])
            .lines()
            .find_map(|l| l.strip_prefix("process_id:").map(|p| p.trim().to_owned()))
            .expect("redis pid");
        std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap();
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for port in self.ports() {
            let _ = Self::cli(port, &["shutdown", "nosave"]);
        }
    }
}

/// Sets runtime configuration `key` in the shared database and makes each of
/// `apps` apply it now (they would within a second or two anyway).
pub async fn set_config(apps: &[&TestApp], key: &str, value: serde_json::Value) {
    use auth_service::store::IdentityStore;
    let first = apps.first().expect("at least one app");
    first
        .state
        .db
        .set_configuration(
            key,
            &value,
            &auth_service::users::AuditEvent::new("test", "success"),
        )
        .await
        .unwrap();
    for app in apps {
        app.state.runtime.refresh(&app.state.db).await.unwrap();
    }
}

/// Makes `config` believe `X-Forwarded-For` from loopback, so a test can speak for
/// a client IP of its own (see [`client_ip`]) instead of sharing 127.0.0.1's
/// failed-login budget with every other test of the run.
pub fn trusting_loopback(mut config: Config) -> Config {
    config.trusted_proxies =
        Config::from_lookup(|name| (name == "AUTH_TRUSTED_PROXIES").then(|| "127.0.0.1/32".into()))
            .unwrap()
            .trusted_proxies;
    config
}

/// A client IP of the documentation range that no other test uses.
pub fn client_ip() -> String {
    let id = uuid::Uuid::new_v4();
    let b = id.as_bytes();
    format!(
        "2001:db8:{:x}:{:x}:{:x}::1",
        u16::from_be_bytes([b[0], b[1]]),
        u16::from_be_bytes([b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]])
    )
}
