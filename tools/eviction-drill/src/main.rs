//! The eviction drill: proves, on one machine, that evictions, crashes and
//! datastore failovers are invisible to the users of auth-service (or shows
//! where they are not).
//!
//! Run it through `scripts/eviction-drill`, which starts PostgreSQL and a
//! 6-node Redis Cluster (scripts/lib/datastores.sh), builds the release binaries
//! and passes their addresses in the environment. This program then starts three
//! replicas and HAProxy (haproxy.rs), creates users, runs a steady mixed load
//! (load.rs), plays each scenario (scenarios.rs) and prints a table per scenario
//! (report.rs). It exits 1 when an expectation failed, 2 when the drill itself
//! could not run. docs/resilience.md explains the scenarios and the numbers.

mod datastores;
mod haproxy;
mod load;
mod procs;
mod report;
mod scenarios;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use clap::Parser;
use serde_json::json;

use crate::{
    datastores::{Postgres, RedisCluster},
    haproxy::{Frontends, Haproxy, BACKEND, STRICT_BACKEND},
    load::{Crowd, Load, Mix, Recorder, Target, User},
    procs::Replica,
    report::Outcome,
};

/// Command line. The datastores come from the environment (see `Env`).
#[derive(Parser, Debug)]
#[command(
    name = "eviction-drill",
    about = "Evictions, crashes and datastore failovers under load"
)]
struct Args {
    /// The short version CI runs (about 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (comma-separated names, see --list).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// The auth-service binary to run as replicas.
    #[arg(long, default_value = "target/release/auth-service")]
    service: PathBuf,
    /// The haproxy binary.
    #[arg(long, default_value = "haproxy")]
    haproxy: String,
    /// Where configuration files and logs go (emptied first).
    #[arg(long, default_value = "target/eviction-drill")]
    work_dir: PathBuf,
    /// Data directory of the PostgreSQL that scripts/lib/datastores.sh started.
    #[arg(long)]
    pg_data_dir: Option<PathBuf>,
    /// Steady virtual users (default: 12 quick, 24 full).
    #[arg(long)]
    users: Option<usize>,
    /// Set the runtime configuration `refresh_reuse_grace_seconds` (default: the
    /// service's default, 0). See docs/resilience.md, "Refresh in flight".
    #[arg(long)]
    refresh_reuse_grace: Option<u64>,
    /// Upper bound for the validate p99 during the login storm, in ms.
    #[arg(long, default_value_t = 500.0)]
    storm_validate_p99_ms: f64,
}

/// What scripts/eviction-drill exports (from scripts/lib/datastores.sh).
struct Env {
    database_url: String,
    redis_urls: String,
    pg_bin_dir: PathBuf,
    pg_os_user: String,
}

impl Env {
    fn read() -> Result<Self> {
        let get = |name: &str| {
            std::env::var(name).map_err(|_| {
                anyhow!("{name} is not set: run the drill through scripts/eviction-drill")
            })
        };
        Ok(Self {
            database_url: get("AUTH_TEST_DATABASE_URL")?,
            redis_urls: get("AUTH_TEST_REDIS_URLS")?,
            pg_bin_dir: get("AUTH_TEST_PG_BIN_DIR")?.into(),
            pg_os_user: get("AUTH_TEST_PG_OS_USER")?,
        })
    }
}

/// Durations of the scenario phases, quick (CI) or full (the report).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Steady load before each scenario's first action.
    pub before: Duration,
    /// Steady load after a scenario's last action.
    pub after: Duration,
    /// The baseline scenario's length.
    pub baseline: Duration,
    /// Between the replacement being in the balancer and the next eviction
    /// (PodDisruptionBudget: the next eviction waits for a Ready replacement).
    pub between_evictions: Duration,
    /// How long a crashed replica stays dead before its restart.
    pub crash_restart_after: Duration,
    /// Observation after a Redis replica's promotion.
    pub after_promotion: Duration,
    /// How long PostgreSQL, then Redis, stay down.
    pub outage: Duration,
    /// Rolling-eviction rounds.
    pub rounds: usize,
}

impl Timing {
    fn quick() -> Self {
        Self {
            before: Duration::from_secs(2),
            after: Duration::from_secs(2),
            baseline: Duration::from_secs(4),
            between_evictions: Duration::from_secs(1),
            crash_restart_after: Duration::from_secs(2),
            after_promotion: Duration::from_secs(6),
            outage: Duration::from_secs(10),
            rounds: 1,
        }
    }

    fn full() -> Self {
        Self {
            before: Duration::from_secs(5),
            after: Duration::from_secs(5),
            baseline: Duration::from_secs(20),
            between_evictions: Duration::from_secs(5),
            crash_restart_after: Duration::from_secs(5),
            after_promotion: Duration::from_secs(15),
            outage: Duration::from_secs(10),
            rounds: 2,
        }
    }
}

/// The service's shutdown phases in the drill: HAProxy's 1 s checks see the 503
/// well before the listener closes.
pub const SHUTDOWN_DELAY: Duration = Duration::from_secs(3);
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// AUTH_DEPENDENCY_TIMEOUT, the service default.
pub const DEPENDENCY_TIMEOUT_MS: f64 = 1000.0;

/// Everything a scenario acts on.
pub struct Drill {
    pub quick: bool,
    pub timing: Timing,
    pub load: Arc<Load>,
    pub replicas: Vec<Replica>,
    pub strict: Replica,
    pub haproxy: Haproxy,
    pub redis: RedisCluster,
    pub pg: Postgres,
    pub steady: Option<Crowd>,
    pub storm_users: Vec<User>,
    pub strict_users: Vec<User>,
    pub probe: reqwest::Client,
    pub storm_clients: usize,
    pub storm_validate_p99_ms: f64,
}

impl Drill {
    pub fn now(&self) -> f64 {
        self.load.rec.now()
    }

    /// A progress line on stderr, stamped with the drill's clock.
    pub fn say(&self, msg: impl AsRef<str>) {
        eprintln!("[{:>7.1}s] {}", self.now() / 1000.0, msg.as_ref());
    }
}

fn random_secret(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes);
    while out.len() < bytes {
        out.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    out.truncate(bytes);
    out
}

fn service_env(env: &Env, main_port: u16, admin: &User, policy: &str) -> BTreeMap<String, String> {
    let kek = base64::engine::general_purpose::STANDARD.encode(random_secret(32));
    [
        ("AUTH_DATABASE_URL", env.database_url.clone()),
        ("AUTH_REDIS_URLS", env.redis_urls.clone()),
        ("AUTH_KEY_ENCRYPTION_KEY", kek),
        ("AUTH_ISSUER", format!("http://127.0.0.1:{main_port}")),
        ("AUTH_BOOTSTRAP_ADMIN_USERNAME", admin.username.clone()),
        ("AUTH_BOOTSTRAP_ADMIN_PASSWORD", admin.password.clone()),
        ("AUTH_SESSION_OUTAGE_POLICY", policy.to_owned()),
        (
            "AUTH_SHUTDOWN_DELAY",
            format!("{}s", SHUTDOWN_DELAY.as_secs()),
        ),
        (
            "AUTH_DRAIN_TIMEOUT",
            format!("{}s", DRAIN_TIMEOUT.as_secs()),
        ),
        // Production argon2 parameters (the defaults), one hashing thread and a
        // queue of 4 per replica: three replicas share this machine's cores.
        ("AUTH_PASSWORD_HASH_CONCURRENCY", "1".to_owned()),
        ("AUTH_PASSWORD_HASH_QUEUE", "4".to_owned()),
        ("AUTH_LOG_FORMAT", "json".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Logs in as the bootstrap administrator; returns the access token.
async fn admin_token(client: &reqwest::Client, base: &str, admin: &User) -> Result<String> {
    let r = client
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({"username": admin.username, "password": admin.password}))
        .send()
        .await?;
    if r.status() != 200 {
        bail!("admin login: {}", r.status());
    }
    let body: serde_json::Value = r.json().await?;
    body.get("access_token")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("admin login: no access_token"))
}

/// Creates `n` users named `<prefix>-<i>`, four requests at a time.
async fn create_users(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    prefix: &str,
    n: usize,
) -> Result<Vec<User>> {
    let users: Vec<User> = (0..n)
        .map(|i| User {
            username: format!("{prefix}-{i}"),
            password: format!(
                "drill {} Pw-{i}",
                uuid::Uuid::new_v4()
                    .simple()
                    .to_string()
                    .get(..16)
                    .unwrap_or("x")
            ),
        })
        .collect();
    for chunk in users.chunks(4) {
        let mut pending = Vec::new();
        for u in chunk {
            pending.push(
                client
                    .post(format!("{base}/v1/admin/users"))
                    .bearer_auth(token)
                    .json(&json!({"username": u.username, "password": u.password}))
                    .send(),
            );
        }
        for (u, r) in chunk.iter().zip(futures_join(pending).await) {
            let r = r?;
            if r.status() != 201 {
                bail!(
                    "create user {}: {} {}",
                    u.username,
                    r.status(),
                    r.text().await?
                );
            }
        }
    }
    Ok(users)
}

/// Awaits request futures concurrently (no futures crate needed for four).
async fn futures_join<F: std::future::Future + Send + 'static>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

fn prepare_work_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("empty {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    Ok(())
}

async fn setup(args: &Args) -> Result<Drill> {
    let env = Env::read()?;
    let quick = args.quick;
    let timing = if quick {
        Timing::quick()
    } else {
        Timing::full()
    };
    let work_dir = std::path::absolute(&args.work_dir)?;
    prepare_work_dir(&work_dir)?;
    let service = std::path::absolute(&args.service)?;
    if !service.is_file() {
        bail!(
            "{} not found: build it with cargo build --release",
            service.display()
        );
    }
    let rec = Arc::new(Recorder::new());
    let say = |msg: &str| eprintln!("[{:>7.1}s] {msg}", rec.now() / 1000.0);

    let mut redis = RedisCluster::from_urls(&env.redis_urls)?;
    redis.configure_like_production().await?;
    say("Redis Cluster: append-only file on, node timeout 5 s, partial coverage allowed (as k8s/overlays/self-hosted/redis.conf)");
    let pg_data_dir = args
        .pg_data_dir
        .clone()
        .ok_or_else(|| anyhow!("--pg-data-dir is required (scripts/eviction-drill passes it)"))?;
    let pg = Postgres::new(
        pg_data_dir,
        &env.database_url,
        env.pg_bin_dir.clone(),
        env.pg_os_user.clone(),
    )?;

    let mut taken: Vec<u16> = redis.ports.clone();
    taken.push(pg.port);
    let mut seed = u64::from_le_bytes(random_secret(8).try_into().unwrap_or([3; 8])) | 1;
    let mut port = || procs::free_port(&mut taken, &mut seed);
    let frontends = Frontends {
        main: port()?,
        mesh: port()?,
        strict: port()?,
        l4: port()?,
    };
    let replica_ports = [port()?, port()?, port()?];
    let strict_port = port()?;

    let admin = User {
        username: "drill-admin".into(),
        password: format!("drill admin {}", uuid::Uuid::new_v4().simple()),
    };
    let base_env = service_env(&env, frontends.main, &admin, "degraded");
    let mut strict_env = base_env.clone();
    strict_env.insert("AUTH_SESSION_OUTAGE_POLICY".into(), "strict".into());

    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let mut replicas: Vec<Replica> = replica_ports
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            Replica::new(
                &format!("r{}", i + 1),
                p,
                &service,
                base_env.clone(),
                &work_dir,
            )
        })
        .collect();
    // The first one alone migrates the empty database and creates the keys and
    // the administrator; the others then start against a ready schema.
    for r in &mut replicas {
        r.start()?;
        r.wait_ready(&probe, Duration::from_secs(60)).await?;
        say(&format!("replica {} ready on port {}", r.name, r.port));
    }
    let strict = Replica::new("s1", strict_port, &service, strict_env, &work_dir);

    let servers: Vec<(String, u16)> = replicas.iter().map(|r| (r.name.clone(), r.port)).collect();
    let haproxy = Haproxy::start(
        &args.haproxy,
        &work_dir,
        frontends,
        &servers,
        ("s1", strict_port),
    )
    .await?;
    for r in &replicas {
        haproxy
            .wait_status(BACKEND, &r.name, haproxy::is_up, Duration::from_secs(10))
            .await?;
    }
    // The strict replica is not running yet: make sure HAProxy has noticed.
    haproxy
        .wait_status(
            STRICT_BACKEND,
            "s1",
            haproxy::is_down,
            Duration::from_secs(10),
        )
        .await?;
    say(&format!(
        "HAProxy up: main (http) :{}, l4 (tcp) :{}, mesh :{}, strict :{}",
        frontends.main, frontends.l4, frontends.mesh, frontends.strict
    ));

    let base = format!("http://127.0.0.1:{}", frontends.main);
    let token = admin_token(&probe, &base, &admin).await?;
    if let Some(grace) = args.refresh_reuse_grace {
        let r = probe
            .put(format!(
                "{base}/v1/admin/config/refresh_reuse_grace_seconds"
            ))
            .bearer_auth(&token)
            .json(&json!({"value": grace}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("set refresh_reuse_grace_seconds: {}", r.status());
        }
        say(&format!(
            "runtime configuration: refresh_reuse_grace_seconds = {grace}"
        ));
    }
    let n_users = args.users.unwrap_or(if quick { 12 } else { 24 });
    let storm_clients = if quick { 24 } else { 48 };
    let users = create_users(&probe, &base, &token, "steady", n_users).await?;
    let storm_users = create_users(&probe, &base, &token, "storm", 32).await?;
    let strict_users = create_users(&probe, &base, &token, "strict", 4).await?;
    say(&format!(
        "created {} users ({n_users} steady, 32 for the storm, 4 for the strict replica)",
        n_users + 36
    ));

    let target = Arc::new(Target::new(frontends));
    let load = Arc::new(Load { rec, target });
    let mix = Mix {
        think_ms: (40, 80),
        validate: 0.85,
        refresh: 0.10,
    };
    let steady = load::steady(&load, &users, mix);
    Ok(Drill {
        quick,
        timing,
        load,
        replicas,
        strict,
        haproxy,
        redis,
        pg,
        steady: Some(steady),
        storm_users,
        strict_users,
        probe,
        storm_clients,
        storm_validate_p99_ms: args.storm_validate_p99_ms,
    })
}

async fn run(args: Args) -> Result<Vec<Outcome>> {
    let mut drill = setup(&args).await?;
    drill.say(format!(
        "steady load: {} users through HAProxy ({} mode)",
        args.users.unwrap_or(if drill.quick { 12 } else { 24 }),
        if drill.quick { "quick" } else { "full" }
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut outcomes = Vec::new();
    for s in scenarios::ALL {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == s.name) {
            continue;
        }
        if s.full_only && drill.quick && args.only.is_empty() {
            continue;
        }
        drill.say(format!("scenario: {}", s.title));
        let outcome = (s.run)(&mut drill)
            .await
            .with_context(|| format!("scenario {}", s.name))?;
        report::print(&outcome);
        outcomes.push(outcome);
    }
    let outcome = scenarios::final_recheck(&mut drill).await?;
    report::print(&outcome);
    outcomes.push(outcome);
    let csv = args.work_dir.join("events.csv");
    if let Err(e) = drill.load.rec.write_csv(&csv) {
        drill.say(format!("could not write {}: {e}", csv.display()));
    }
    for r in &mut drill.replicas {
        r.kill().await;
    }
    drill.strict.kill().await;
    drill.haproxy.stop().await;
    Ok(outcomes)
}

async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.list {
        for s in scenarios::ALL {
            let full = if s.full_only { " (not in --quick)" } else { "" };
            println!("{:<14} {}{full}", s.name, s.title);
        }
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("eviction-drill: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(args) => r,
            // Dropping `run` drops the Drill, whose children are killed on drop.
            _ = interrupted() => Err(anyhow!("interrupted")),
        }
    });
    match result {
        Ok(outcomes) => {
            report::print_summary(&outcomes);
            if outcomes.iter().all(Outcome::passed) {
                println!("\neviction drill: every expectation held");
                std::process::ExitCode::SUCCESS
            } else {
                println!("\neviction drill: FAILED (see the FAIL lines above)");
                std::process::ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("eviction-drill: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
