//! Building and running one instance: state, listener, startup work, shutdown.
//!
//! [`Application::build`] binds the port (0 in tests) and wires the state without
//! waiting for any dependency; [`Application::run_until_stopped`] serves at once
//! (liveness answers from the first millisecond) while startup work — migrations,
//! then readiness — runs beside it, retrying while PostgreSQL is unreachable.
//!
//! Connections are served by our own accept loop ([`serve`]) rather than
//! `axum::serve`, which cannot time out a client that never finishes its headers.

use std::{
    future::Future,
    net::SocketAddr,
    pin::pin,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{extract::ConnectInfo, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tower::ServiceExt as _;

use crate::{
    config::{Config, DatabaseConfig},
    http::{self, health::HealthCache},
    metrics::Metrics,
    passwords::{HashError, PasswordHasher},
    runtime_config::RuntimeConfigHandle,
    sessions::{redis::RedisSessions, sqlite::SqliteSessions, Sessions},
    shutdown::Lifecycle,
    store::{database::Pool, Database, IdentityStore, Redis, StoreError},
    tokens::{
        keys::{embedded_key_encryption_key, KeyRing, KeyTiming},
        refresh::RefreshTokens,
        AccessTokens,
    },
};

/// Everything a request handler may need. One `Arc`: a request clones the state
/// several times on its way through the layers, and one reference count costs a
/// fraction of the dozen a field-by-field clone took.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The shared parts of [`AppState`].
pub struct Services {
    pub config: Arc<Config>,
    pub db: Database,
    /// None in embedded mode, where sessions live in the database.
    pub redis: Option<Redis>,
    pub sessions: Sessions,
    pub runtime: Arc<RuntimeConfigHandle>,
    pub hasher: Arc<PasswordHasher>,
    pub tokens: Arc<AccessTokens>,
    pub refresh_tokens: RefreshTokens,
    /// Places for attempts waiting their turn in a client IP's slow lane (see
    /// `auth::admit_ip`): bounded, so that many IPs over their limits cannot
    /// hold the request slots every other request needs.
    pub slow_lane: tokio::sync::Semaphore,
    pub lifecycle: Arc<Lifecycle>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<HealthCache>,
    pub started: Instant,
}

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("password hashing: {0}")]
    Hash(#[from] HashError),
    #[error("key-encryption key file in AUTH_DATA_DIR: {0}")]
    KeyFile(std::io::Error),
}

/// Attempts a replica lets wait in client IPs' slow lanes at once; beyond it they
/// are refused (429) at once rather than hold a request slot for seconds.
const SLOW_LANE_WAITERS: usize = 64;

/// A built, not yet running, instance.
pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let started = Instant::now();
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: config.listen,
                    source,
                })?;
        if matches!(config.database, DatabaseConfig::Embedded) {
            tracing::warn!(
                data_dir = %config.data_dir.display(),
                "embedded mode: SQLite in AUTH_DATA_DIR holds users, keys and sessions; \
                 for development and single-instance use only (set AUTH_DATABASE_URL and \
                 AUTH_REDIS_URLS to run replicas)"
            );
        }
        let db = Database::connect_lazy(&config)?;
        let redis = match &config.redis {
            Some(redis) => Some(Redis::new(redis, config.dependency_timeout)?),
            None => None,
        };
        let sessions = match (&redis, &db.pool) {
            // A cluster has replicas to wait for; a single node may not.
            (Some(redis), _) => Sessions::Redis(RedisSessions::new(
                redis.clone(),
                u32::from(config.redis.as_ref().is_some_and(|r| r.cluster)),
            )),
            (None, Pool::Sqlite(pool)) => Sessions::Embedded(SqliteSessions::new(pool.clone())),
            (None, Pool::Postgres(_)) => {
                return Err(StoreError::Corrupt(
                    "PostgreSQL needs Redis for sessions (AUTH_REDIS_URLS)".into(),
                )
                .into())
            }
        };
        let kek = match &config.key_encryption_key {
            Some(kek) => kek.clone(),
            None => embedded_key_encryption_key(&config.data_dir).map_err(StartupError::KeyFile)?,
        };
        let metrics = Arc::new(Metrics::new());
        let refresh_tokens = RefreshTokens::new(&kek);
        let keys = Arc::new(KeyRing::new(
            kek,
            config.signing_algorithm,
            KeyTiming {
                publish_lead: config.key_publish_lead,
            },
        ));
        let tokens = Arc::new(AccessTokens::new(
            keys,
            config.issuer.clone(),
            config.audience.clone(),
        ));
        let hasher = Arc::new(PasswordHasher::new(&config.password_hash, metrics.clone())?);
        let state = AppState(Arc::new(Services {
            config: Arc::new(config),
            db,
            redis,
            sessions,
            runtime: Arc::new(RuntimeConfigHandle::default()),
            hasher,
            tokens,
            refresh_tokens,
            slow_lane: tokio::sync::Semaphore::new(SLOW_LANE_WAITERS),
            lifecycle: Arc::new(Lifecycle::new()),
            metrics,
            health: Arc::new(HealthCache::default()),
            started,
        }));
        Ok(Self { listener, state })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound TcpListener always has a local address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.state.config.listen)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then follows the contract's shutdown: 503
    /// draining at once, keep serving for the shutdown delay, stop accepting and
    /// drain in-flight requests for at most the drain timeout, close the pools.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Self { listener, state } = self;
        let startup = tokio::spawn(startup(state.clone()));
        let background = tokio::spawn(background(state.clone()));

        let lifecycle = state.lifecycle.clone();
        let metrics = state.metrics.clone();
        let delay = state.config.shutdown_delay;
        let drain_timeout = state.config.drain_timeout;
        let (stop_accepting_tx, stop_accepting_rx) = tokio::sync::oneshot::channel::<()>();
        let graceful = async move {
            shutdown.await;
            lifecycle.begin_draining();
            metrics.draining.set(1);
            tracing::info!(
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "draining: readiness is 503; still serving while load balancers let go"
            );
            tokio::time::sleep(delay).await;
            tracing::info!("no longer accepting connections; finishing in-flight requests");
            let _ = stop_accepting_tx.send(());
        };

        let app = http::router(state.clone());
        let server = serve(listener, app, graceful, state.config.header_read_timeout);
        // Aborting this task (drain timeout) drops its connections with it.
        let mut server = tokio::spawn(server);

        let result = tokio::select! {
            // The server only ends by itself on an accept-loop error.
            joined = &mut server => flatten(joined),
            _ = stop_accepting_rx => {
                match tokio::time::timeout(drain_timeout, &mut server).await {
                    Ok(joined) => flatten(joined),
                    Err(_) => {
                        tracing::warn!("drain timeout reached; closing remaining connections");
                        server.abort();
                        Ok(())
                    }
                }
            }
        };
        startup.abort();
        background.abort();
        state.db.close().await;
        tracing::info!("stopped");
        result
    }
}

/// Largest request head (request line and headers) a client may send; beyond it
/// hyper answers 431 and closes. Gateways forward the original request's headers
/// (cookies included) to forward-auth, so this is generous next to our own needs.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Most header fields in one request; beyond it 431.
const MAX_HEADERS: usize = 100;

/// Serves HTTP/1.1 on `listener` until `stop_accepting` resolves, then stops
/// accepting, lets every connection finish its in-flight request (idle keep-alive
/// connections close at once, busy ones after their response) and returns when
/// all are gone. The same semantics as `axum::serve(..).with_graceful_shutdown`,
/// plus what it cannot configure:
///
/// - a header-read timeout, so connections that never finish their headers
///   (slowloris) are closed instead of held forever; hyper also applies it to
///   idle keep-alive connections, which is fine for a service behind load
///   balancers that reconnect;
/// - limits on header size and count.
///
/// Every connection task lives in a `JoinSet`: dropping this future (the drain
/// timeout aborts it) closes them all.
async fn serve(
    listener: TcpListener,
    app: Router,
    stop_accepting: impl Future<Output = ()> + Send + 'static,
    header_read_timeout: Duration,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut stop_accepting = pin!(stop_accepting);
    loop {
        tokio::select! {
            () = &mut stop_accepting => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_error(e).await;
                        continue;
                    }
                };
                // Responses are small and written whole: send them at once.
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    // What `into_make_service_with_connect_info` would insert: the
                    // client IP extractor reads it.
                    req.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().oneshot(req)
                });
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let mut shutdown = shutdown_rx.clone();
                connections.spawn(async move {
                    let mut conn = pin!(conn);
                    let result = tokio::select! {
                        result = conn.as_mut() => result,
                        () = async {
                            // The guard wait_for returns must not live across the
                            // drain below (it is not Send).
                            let _ = shutdown.wait_for(|stop| *stop).await;
                        } => {
                            // Closes an idle connection now, a busy one after the
                            // response it is working on.
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = result {
                        // Timeouts, resets, malformed requests: the client's
                        // business. hyper's errors never carry header values.
                        tracing::debug!(error = %e, "connection closed with an error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = shutdown_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Connection-level accept errors are the client's; anything else (out of file
/// descriptors) is ours, and retrying at once would spin: wait a second, as
/// axum::serve does.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

fn flatten(joined: Result<std::io::Result<()>, tokio::task::JoinError>) -> std::io::Result<()> {
    joined.map_err(std::io::Error::other)?
}

/// Retries `step` with capped exponential backoff until it succeeds.
async fn until_ok<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut step: impl FnMut() -> F,
) -> T {
    let mut backoff = Duration::from_millis(100);
    loop {
        match step().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(step = what, error = %e, retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(0), "startup step failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Startup work that gates readiness: migrations, runtime configuration, signing
/// keys, the bootstrap administrator. Each step retries while PostgreSQL is
/// unreachable, so a replica started during an outage becomes ready when it
/// returns.
async fn startup(state: AppState) {
    until_ok("migrate", || state.db.migrate()).await;
    until_ok("runtime configuration", || state.runtime.refresh(&state.db)).await;
    until_ok("signing keys", || maintain_keys(&state, false)).await;
    until_ok("bootstrap", || bootstrap(&state)).await;
    state.lifecycle.set_ready();
    tracing::info!(
        startup_ms = u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "ready"
    );
}

/// Creates, rotates and prunes signing keys as the schedule says, then reloads.
pub async fn maintain_keys(
    state: &AppState,
    force: bool,
) -> Result<Option<String>, crate::tokens::keys::KeyError> {
    let policy = state.runtime.get();
    let rotation = Duration::from_secs(policy.key_rotation_days.saturating_mul(86_400));
    let token_lifetime = Duration::from_secs(policy.access_token_ttl_seconds);
    let added = state
        .tokens
        .keys
        .maintain(&state.db, rotation, token_lifetime, force)
        .await?;
    record_key_metrics(state);
    Ok(added)
}

fn record_key_metrics(state: &AppState) {
    let keys = state.tokens.keys.keys();
    let now = chrono::Utc::now();
    state
        .metrics
        .signing_keys
        .with_label_values(&["published"])
        .set(i64::try_from(keys.len()).unwrap_or(0));
    if let Some(active) = keys.signing_key(now) {
        state
            .metrics
            .signing_key_age
            .set((now - active.activates_at).num_seconds().max(0) as f64);
    }
}

/// Creates the first administrator when no user exists: from
/// AUTH_BOOTSTRAP_ADMIN_* (checked with the account rules when the configuration
/// was read), or in embedded mode with neither set, `admin` with a random
/// password written to a file of its own. Exactly one of several replicas
/// starting at once creates it (see `IdentityStore::create_first_user`).
async fn bootstrap(state: &AppState) -> Result<(), crate::auth::AuthError> {
    if state.db.count_users().await? > 0 {
        return Ok(());
    }
    let (username, password, generated) = match &state.config.bootstrap_admin {
        Some(admin) => (admin.username.clone(), admin.password.clone(), None),
        None if state.db.is_embedded() => {
            let password = crate::passwords::generate_password();
            // Written before the account exists: an account whose password was
            // lost would need the CLI to recover from.
            let file = write_initial_password(&state.config.data_dir, &password).map_err(|e| {
                crate::auth::AuthError::Internal(format!("initial password file: {e}"))
            })?;
            (
                "admin".to_owned(),
                secrecy::SecretString::from(password),
                Some(file),
            )
        }
        None => return Ok(()),
    };
    match crate::auth::create_first_admin(state, &username, password).await {
        Ok(Some(_)) => {
            tracing::info!(username = %username, "created the bootstrap administrator");
            if let Some(file) = generated {
                // The path only: the password never goes to stderr or the logs,
                // which are collected, kept and read by others.
                tracing::warn!(username = %username, password_file = %file.display(), "embedded mode: created an administrator; its password is in the file (readable by this user only); log in, change it with POST /v1/auth/password, then delete the file");
                eprintln!(
                    "\n  embedded mode: created administrator `{username}`; its password is in {}\n  (readable by this user only; change it with POST /v1/auth/password, then delete the file)\n",
                    file.display()
                );
            }
            Ok(())
        }
        Ok(None) => Ok(()),
        // A rule of the stored password policy, stricter than the default the
        // configuration was checked against: retrying cannot help.
        Err(e @ crate::auth::AuthError::Invalid(..)) => {
            tracing::error!(error = %e, "bootstrap administrator refused by the password policy in force; create one with `auth-service create-user --role admin`");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Writes the generated administrator password to `initial-admin-password` in
/// the data directory, readable by this user only; returns the file's path.
fn write_initial_password(
    dir: &std::path::Path,
    password: &str,
) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write as _;
    let path = dir.join("initial-admin-password");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    // A file left by an earlier start was made 0600 with the rest of the data
    // directory (`store::database`), before this runs.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    writeln!(options.open(&path)?, "{password}")?;
    Ok(path)
}

/// How often each replica prunes expired audit events (one at a time, see
/// `auth::prune_audit`).
const AUDIT_PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// Work every replica repeats while it runs: pick up runtime configuration
/// changes (every second), reload signing keys, keep the key schedule, and
/// prune audit events past their retention.
async fn background(state: AppState) {
    let mut config_tick = tokio::time::interval(Duration::from_secs(1));
    let mut key_reload_tick = tokio::time::interval(state.tokens.keys.timing.reload_interval());
    let mut audit_prune_tick = tokio::time::interval(AUDIT_PRUNE_INTERVAL);
    let mut maintain_tick = tokio::time::interval(
        state
            .tokens
            .keys
            .timing
            .reload_interval()
            .max(Duration::from_secs(1))
            * 2,
    );
    for tick in [
        &mut config_tick,
        &mut key_reload_tick,
        &mut maintain_tick,
        &mut audit_prune_tick,
    ] {
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = config_tick.tick() => {
                if let Err(e) = state.runtime.refresh(&state.db).await {
                    tracing::debug!(error = %e, "runtime configuration poll failed");
                }
            }
            _ = key_reload_tick.tick() => {
                if let Err(e) = state.tokens.keys.reload(&state.db).await {
                    tracing::debug!(error = %e, "key reload failed; keeping the keys in memory");
                }
                record_key_metrics(&state);
            }
            _ = maintain_tick.tick() => {
                if state.lifecycle.phase() == crate::shutdown::Phase::Ready {
                    if let Err(e) = maintain_keys(&state, false).await {
                        tracing::debug!(error = %e, "key maintenance failed");
                    }
                }
            }
            _ = audit_prune_tick.tick() => {
                if state.lifecycle.phase() == crate::shutdown::Phase::Ready {
                    match crate::auth::prune_audit(&state).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(deleted = n, "pruned audit events past audit_retention_days"),
                        Err(e) => tracing::debug!(error = %e, "audit pruning failed"),
                    }
                }
            }
        }
    }
}
