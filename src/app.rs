//! Building and running one instance: state, listener, startup work, shutdown.
//!
//! [`Application::build`] binds the port (0 in tests) and wires the state without
//! waiting for any dependency; [`Application::run_until_stopped`] serves at once
//! (liveness answers from the first millisecond) while startup work — migrations,
//! then readiness — runs beside it, retrying while PostgreSQL is unreachable.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpListener;

use crate::{
    config::{Config, DatabaseConfig},
    http::{self, health::HealthCache},
    metrics::Metrics,
    shutdown::Lifecycle,
    store::{Database, Redis, StoreError},
};

/// Everything a request handler may need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Database,
    /// None in embedded mode, where sessions live in the database.
    pub redis: Option<Redis>,
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
}

/// A built, not yet running, instance.
pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        let started = Instant::now();
        let listener = TcpListener::bind(config.listen)
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
        let state = AppState {
            config: Arc::new(config),
            db,
            redis,
            lifecycle: Arc::new(Lifecycle::new()),
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(HealthCache::default()),
            started,
        };
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
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(graceful);
        let mut server = tokio::spawn(async move { server.await });

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
        state.db.close().await;
        tracing::info!("stopped");
        result
    }
}

fn flatten(joined: Result<std::io::Result<()>, tokio::task::JoinError>) -> std::io::Result<()> {
    joined.map_err(std::io::Error::other)?
}

/// Startup work that gates readiness. Retries while PostgreSQL is unreachable, so
/// a replica started during a database outage becomes ready when it returns.
async fn startup(state: AppState) {
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match state.db.migrate().await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(0), "migrations failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
    state.lifecycle.set_ready();
    tracing::info!(
        startup_ms = u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "ready"
    );
}
