//! Probes and metrics: `/health` (readiness), `/health/live` (liveness), `/metrics`.
//!
//! Readiness answers 503 only while this replica should get no traffic (starting
//! or draining). A dependency outage is shared by every replica, so it reports
//! `degraded` with 200: pulling all replicas out of the Service at once would turn
//! a partial outage into a total one. Dependency probes are cached for a second and
//! run by one request at a time, so a probe storm does not hammer the datastores.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    Json,
};
use serde::Serialize;
use tokio::sync::Mutex;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{app::AppState, shutdown::Phase, store::StoreError};

/// How long a dependency probe result is reused.
const PROBE_CACHE: Duration = Duration::from_secs(1);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(live))
        .routes(routes!(metrics))
}

/// Overall readiness of this replica.
#[derive(Debug, Clone, Copy, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Healthy,
    Degraded,
    Draining,
    Starting,
}

/// One component's health.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Component {
    /// `up` or `down`.
    pub status: &'static str,
    /// Round-trip time of the probe.
    pub latency_ms: f64,
    /// Backend or mode, e.g. `postgres`, `sqlite`, `cluster`, `single`, `embedded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
    /// Extra facts (system component only).
    #[serde(flatten)]
    pub facts: BTreeMap<&'static str, serde_json::Value>,
}

/// The `/health` document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    pub status: Status,
    pub components: BTreeMap<&'static str, Component>,
}

/// Cached dependency probes.
#[derive(Default)]
pub struct HealthCache {
    last: Mutex<Option<(Instant, BTreeMap<&'static str, Component>)>>,
}

impl HealthCache {
    /// The components, probing again if the cached result is older than a second.
    async fn components(&self, state: &AppState) -> BTreeMap<&'static str, Component> {
        // Holding the lock while probing makes concurrent probes wait for one
        // result instead of each hitting the datastores.
        let mut last = self.last.lock().await;
        if let Some((at, components)) = last.as_ref() {
            if at.elapsed() < PROBE_CACHE {
                return components.clone();
            }
        }
        let components = probe(state).await;
        *last = Some((Instant::now(), components.clone()));
        components
    }
}

async fn probe(state: &AppState) -> BTreeMap<&'static str, Component> {
    let db = &state.db;
    let (database, redis) = tokio::join!(timed(db.ping()), async {
        match &state.redis {
            Some(redis) => Some(timed(redis.ping()).await),
            None => None,
        }
    });
    let metrics = &state.metrics;
    let mut components = BTreeMap::new();

    let (ok, ms) = database;
    metrics
        .dependency_up
        .with_label_values(&["database"])
        .set(i64::from(ok));
    metrics
        .dependency_latency
        .with_label_values(&["database"])
        .set(ms / 1000.0);
    metrics
        .dependency_circuit_open
        .with_label_values(&["database"])
        .set(i64::from(db.guard.is_open()));
    components.insert(
        "database",
        component(
            ok,
            ms,
            if db.is_embedded() {
                "sqlite"
            } else {
                "postgres"
            },
        ),
    );

    let redis_component = match (redis, &state.redis) {
        (Some((ok, ms)), Some(client)) => {
            metrics
                .dependency_up
                .with_label_values(&["redis"])
                .set(i64::from(ok));
            metrics
                .dependency_latency
                .with_label_values(&["redis"])
                .set(ms / 1000.0);
            metrics
                .dependency_circuit_open
                .with_label_values(&["redis"])
                .set(i64::from(client.any_breaker_open()));
            let mode = if state.config.redis.as_ref().is_some_and(|r| r.cluster) {
                "cluster"
            } else {
                "single"
            };
            component(ok, ms, mode)
        }
        // Sessions live in the embedded database: its health is the database's.
        _ => component(ok, 0.0, "embedded"),
    };
    components.insert("redis", redis_component);

    let mut system = component(true, 0.0, "process");
    system.facts.insert(
        "uptime_seconds",
        serde_json::json!(state.started.elapsed().as_secs()),
    );
    if let Some(rss) = resident_memory_bytes() {
        system.facts.insert("rss_bytes", serde_json::json!(rss));
    }
    components.insert("system", system);
    components
}

fn component(up: bool, latency_ms: f64, mode: &'static str) -> Component {
    Component {
        status: if up { "up" } else { "down" },
        latency_ms: (latency_ms * 1000.0).round() / 1000.0,
        mode: Some(mode),
        facts: BTreeMap::new(),
    }
}

async fn timed(call: impl std::future::Future<Output = Result<(), StoreError>>) -> (bool, f64) {
    let start = Instant::now();
    let ok = call.await.is_ok();
    (ok, start.elapsed().as_secs_f64() * 1000.0)
}

/// Resident set size from /proc (Linux); None elsewhere.
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Readiness: 503 only while starting or draining.
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses(
        (status = 200, description = "Ready (healthy or degraded)", body = Health),
        (status = 503, description = "Starting or draining: send no traffic", body = Health),
    )
)]
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let components = state.health.components(&state).await;
    let all_up = components.values().all(|c| c.status == "up");
    let status = match state.lifecycle.phase() {
        Phase::Starting => Status::Starting,
        Phase::Draining => Status::Draining,
        Phase::Ready if all_up => Status::Healthy,
        Phase::Ready => Status::Degraded,
    };
    let code = match status {
        Status::Healthy | Status::Degraded => StatusCode::OK,
        Status::Starting | Status::Draining => StatusCode::SERVICE_UNAVAILABLE,
    };
    // No-store, as every response without its own Cache-Control (http::router).
    (code, Json(Health { status, components }))
}

/// Liveness: 200 whenever the process can serve HTTP; checks no dependency.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "health",
    responses((status = 200, description = "The process serves HTTP", body = serde_json::Value))
)]
pub async fn live() -> impl IntoResponse {
    Json(serde_json::json!({"status": "alive"}))
}

/// Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
