//! The HTTP edge: routes, extractors, middleware and the problem+json mapping.
//!
//! One module per resource, each exporting a `router()`; this module stacks the
//! cross-cutting tower layers around them. Route annotations feed the OpenAPI
//! document served at `/openapi.json`, so the description cannot drift from the
//! routes.

pub mod admin;
pub mod auth;
pub mod error;
pub mod extract;
pub mod health;
pub mod wellknown;

use std::{sync::Arc, time::Instant};

use axum::{
    error_handling::HandleErrorLayer,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{header, HeaderName, HeaderValue},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    BoxError, Json, Router,
};
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::{DefaultOnResponse, TraceLayer},
};
use tracing::Level;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::{app::AppState, shutdown::Phase};
pub use error::ApiError;

/// Largest request body any route accepts; JSON bodies here are small.
const BODY_LIMIT: usize = 64 * 1024;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(OpenApi)]
#[openapi(
    info(title = "auth-service", description = "Authentication: tokens, sessions, identity."),
    components(schemas(error::Problem)),
    paths(auth::forward_auth),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The API routes (those behind the concurrency limit) and their description.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(auth::router())
        .merge(admin::router())
        .merge(wellknown::router())
}

/// The whole application: routes, the OpenAPI document and every layer.
pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
    let (api, mut doc) = api_routes().split_for_parts();
    let api = api.merge(auth::forward_auth_router());
    let (probes, probe_doc) = health::router().split_for_parts();
    doc.merge(probe_doc);
    let doc = Arc::new(doc);

    // API routes get a timeout and a concurrency limit that sheds load with 503
    // instead of queueing. Probes stay outside both: an overloaded replica is not
    // an unready one, and a probe must never wait behind user traffic.
    let api = if !api.has_routes() {
        api
    } else {
        api.layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(middleware_error))
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    config.max_concurrent_requests,
                ))
                .timeout(config.request_timeout),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_started,
        ))
    };

    Router::new()
        .merge(api)
        .merge(probes)
        .route(
            "/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(
                    X_REQUEST_ID.clone(),
                    MakeRequestUuid,
                ))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|req: &Request| {
                            let request_id = req
                                .headers()
                                .get(&X_REQUEST_ID)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default();
                            // The path only: query strings are the client's business.
                            tracing::info_span!(
                                "request",
                                method = %req.method(),
                                path = %req.uri().path(),
                                request_id = %request_id,
                            )
                        })
                        .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(X_REQUEST_ID.clone()))
                .layer(CatchPanicLayer::custom(panic_response)),
        )
        .with_state(state)
}

/// Answers the API with 503 until startup (migrations, keys) has finished.
async fn require_started(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.lifecycle.phase() == Phase::Starting {
        return ApiError::Starting.into_response();
    }
    next.run(req).await
}

/// Request metrics, by route template; and `Connection: close` while draining, so
/// keep-alive clients reconnect through the load balancer to another replica.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    // The template, never the raw path: raw paths would give every user id its
    // own time series.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let metrics = &state.metrics;
    metrics.http_in_flight.inc();
    let mut response = next.run(req).await;
    metrics.http_in_flight.dec();
    let status = response.status();
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), method.as_str(), status.as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route.as_str(), method.as_str()])
        .observe(start.elapsed().as_secs_f64());
    if state.lifecycle.is_draining() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn middleware_error(err: BoxError) -> ApiError {
    if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::Timeout
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Overloaded
    } else {
        ApiError::Internal(err.to_string())
    }
}

fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // The panic message may hold request data; it is logged by the panic hook's
    // default output only in development, never sent.
    ApiError::Internal("handler panicked".into()).into_response()
}
