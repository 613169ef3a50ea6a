//! The HTTP edge: routes, extractors, middleware and the problem+json mapping.
//!
//! One module per resource, each exporting a `router()`; this module stacks the
//! cross-cutting tower layers around them. Route annotations feed the OpenAPI
//! document served at `/openapi.json`, so the description cannot drift from the
//! routes; [`finish_document`] adds what every operation shares (the problem
//! responses of the extractors and middleware, the forward-auth methods).
//!
//! Limits on hostile clients live in three places: header size, header count and
//! the header-read timeout in the connection loop ([`crate::app`]), body size and
//! the body-read deadline here and in [`extract`], and the per-request timeout and
//! concurrency limit on the API routes below.

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
    http::{header, HeaderName, HeaderValue, Method},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    BoxError, Extension, Json, Router,
};
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    sensitive_headers::SetSensitiveRequestHeadersLayer,
    set_header::SetResponseHeaderLayer,
    trace::{DefaultOnResponse, TraceLayer},
};
use tracing::Level;
use utoipa::{
    openapi::{
        path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem},
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
        ContentBuilder, Ref, RefOr, Required, ResponseBuilder,
    },
    OpenApi,
};
use utoipa_axum::router::OpenApiRouter;

use crate::{app::AppState, config::CorsOrigins, shutdown::Phase};
pub use error::ApiError;
use extract::BodyReadTimeout;

/// Largest request body any route accepts; JSON bodies here are small. Routes
/// anyone may call without a token take less (see [`PUBLIC_BODY_LIMIT`]).
pub const BODY_LIMIT: usize = 64 * 1024;

/// Body limit of the routes that need no token (login, register, refresh,
/// validate): their bodies are a few hundred bytes, and they are the ones an
/// anonymous client can hammer.
pub const PUBLIC_BODY_LIMIT: usize = 16 * 1024;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(OpenApi)]
#[openapi(
    info(
        title = "auth-service",
        description = "Authentication: tokens, sessions, identity. Every error is an \
            `application/problem+json` document (schema `Problem`) whose `code` is stable."
    ),
    components(schemas(error::Problem)),
    paths(auth::forward_auth, openapi_json),
    tags(
        (name = "auth", description = "Log in, refresh, log out, password, sessions"),
        (name = "validate", description = "Token validation for apps and gateways"),
        (name = "admin", description = "Users, roles, runtime configuration (permission auth:admin)"),
        (name = "discovery", description = "Public keys, discovery document, this description"),
        (name = "health", description = "Probes and metrics"),
    )
)]
struct ApiDoc;

/// This API's OpenAPI 3.1 description.
#[utoipa::path(get, path = "/openapi.json", tag = "discovery",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
async fn openapi_json(Extension(doc): Extension<Arc<utoipa::openapi::OpenApi>>) -> Response {
    Json(doc.as_ref().clone()).into_response()
}

/// The API routes (those behind the concurrency limit) and their description.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(auth::router())
        .merge(admin::router())
        .merge(wellknown::router())
}

/// The routes, split into the API for browsers and apps, the gateway checks
/// (forward-auth; both behind the limits) and the probes, and the finished
/// document describing them all.
fn parts() -> (
    Router<AppState>,
    Router<AppState>,
    Router<AppState>,
    utoipa::openapi::OpenApi,
) {
    let (api, mut doc) = api_routes().split_for_parts();
    let (probes, probe_doc) = health::router().split_for_parts();
    doc.merge(probe_doc);
    finish_document(&mut doc);
    (api, auth::forward_auth_router(), probes, doc)
}

/// The OpenAPI document exactly as `/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().3
}

/// The whole application: routes, the OpenAPI document and every layer.
pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
    let (api, forward_auth, probes, doc) = parts();
    let doc = Arc::new(doc);
    // API routes get a timeout and a concurrency limit (one for all of them)
    // that sheds load with 503 instead of queueing. Probes stay outside both: an
    // overloaded replica is not an unready one, and a probe must never wait
    // behind user traffic.
    let limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(middleware_error))
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            config.max_concurrent_requests,
        ))
        .timeout(config.request_timeout);
    let started = middleware::from_fn_with_state(state.clone(), require_started);
    let limited = |routes: Router<AppState>| {
        if routes.has_routes() {
            routes.layer(limits.clone()).route_layer(started.clone())
        } else {
            routes
        }
    };
    // CORS only when configured (without it no Access-Control-* header is ever
    // sent, and browsers keep the same-origin policy), and only on the API:
    // never on forward-auth, whose OPTIONS requests are a gateway's check of a
    // browser's request (Envoy forwards the original method), not a preflight.
    // Outside the limits, so a browser can read their 503s too.
    let api = match &config.cors_origins {
        // The fallback first: a router's method-not-allowed fallback set after a
        // layer is not wrapped by it, and preflights reach the routes through it.
        Some(origins) => {
            limited(api.method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed }))
                .layer(cors(origins))
                .layer(middleware::from_fn(only_preflights_are_options))
        }
        None => limited(api),
    };
    let api = api.merge(limited(forward_auth));

    let router = Router::new()
        .merge(api)
        .merge(probes)
        .route("/openapi.json", get(openapi_json))
        .layer(Extension(doc))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(Extension(BodyReadTimeout(config.body_read_timeout)))
        .layer(middleware::from_fn_with_state(state.clone(), observe));
    router
        .layer(
            ServiceBuilder::new()
                // Marked before anything can log or Debug-print the request, so the
                // bearer token prints as `Sensitive` (tower-http and http honour it).
                .layer(SetSensitiveRequestHeadersLayer::new([
                    header::AUTHORIZATION,
                    header::PROXY_AUTHORIZATION,
                    header::COOKIE,
                ]))
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
                                method = method_label(req.method()),
                                path = %req.uri().path(),
                                request_id = %request_id,
                            )
                        })
                        .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(X_REQUEST_ID.clone()))
                .layer(middleware::map_response(security_headers))
                // Browsers that reached us over https keep to https for a year.
                // Only when the issuer (our public URL) is https: HSTS over plain
                // http is ignored by browsers, and would be wrong in development.
                .option_layer(config.issuer.starts_with("https://").then(|| {
                    SetResponseHeaderLayer::if_not_present(
                        header::STRICT_TRANSPORT_SECURITY,
                        HeaderValue::from_static("max-age=31536000"),
                    )
                }))
                .layer(CatchPanicLayer::custom(panic_response)),
        )
        .with_state(state)
}

/// Headers on every response, errors, probes and panics included. A handler's own
/// value wins (JWKS sets a public `Cache-Control`).
///
/// The API serves no HTML, so the policy forbids everything: a response that a
/// browser is tricked into rendering can load nothing, run nothing and be framed
/// by nobody. No `Server` header is sent (hyper adds none).
async fn security_headers<B>(mut response: axum::http::Response<B>) -> axum::http::Response<B> {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        // Responses carry tokens, identities and policy: nothing is cacheable
        // unless its handler says so.
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    response
}

/// Browsers on `origins` may call the API with a bearer token. No credentials
/// mode: the API uses no cookies, so none are allowed.
fn cors(origins: &CorsOrigins) -> CorsLayer {
    let allow_origin = match origins {
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => {
            AllowOrigin::list(list.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        }
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            X_REQUEST_ID.clone(),
        ])
        .expose_headers([
            HeaderName::from_static("x-auth-user-id"),
            HeaderName::from_static("x-auth-username"),
            HeaderName::from_static("x-auth-roles"),
            header::RETRY_AFTER,
            header::WWW_AUTHENTICATE,
            X_REQUEST_ID.clone(),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// In front of the CORS layer, which answers every OPTIONS request as a
/// preflight: only a real one (with `Origin` and
/// `Access-Control-Request-Method`) gets that far. Any other OPTIONS request is
/// what it is, a method no API route serves.
async fn only_preflights_are_options(req: Request, next: Next) -> Response {
    let preflight = req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if req.method() == Method::OPTIONS && !preflight {
        return ApiError::MethodNotAllowed.into_response();
    }
    next.run(req).await
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
    let method = method_label(req.method());
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
        .with_label_values(&[route.as_str(), method, status.as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route.as_str(), method])
        .observe(start.elapsed().as_secs_f64());
    if state.lifecycle.is_draining() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The method as a metric label or log field: one of the standard methods, or
/// `other`. hyper accepts any token as a method (`EVIL`, 8,000 characters of it);
/// as a label, each would be a new time series kept for the life of the process.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
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

/// Methods the forward-auth routes are documented with: every method OpenAPI can
/// name, since they answer any method (Envoy forwards the original one).
const FORWARD_AUTH_METHODS: [&str; 8] = [
    "get", "post", "put", "patch", "delete", "head", "options", "trace",
];

/// Completes the generated document with what the annotations cannot say once
/// per operation: the bearer scheme; the forward-auth routes, registered with
/// `any()` and annotated once as GET, spelled out for each method and for the
/// `{path}` form; and the problem responses that extractors and middleware give
/// every operation of a kind, so a client (or schemathesis) can rely on every
/// status code it can get being documented.
fn finish_document(doc: &mut utoipa::openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "An access token from /v1/auth/login or /v1/auth/refresh",
                ))
                .build(),
        ),
    );

    let paths = &mut doc.paths.paths;
    if let Some(template) = paths
        .get("/v1/auth/forward-auth")
        .and_then(|item| item.get.clone())
    {
        let mut exact = PathItem::default();
        let mut below = PathItem::default();
        for method in FORWARD_AUTH_METHODS {
            let mut op = template.clone();
            op.operation_id = Some(format!("forward_auth_{method}"));
            *operation_slot(&mut exact, method) = Some(op.clone());
            let path_param: Parameter = ParameterBuilder::new()
                .name("path")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some(
                    "The original request's path (Envoy ext_authz `path_prefix`); any \
                     path below, slashes included",
                ))
                .schema(Some(
                    utoipa::openapi::ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::String),
                ))
                .build();
            op.parameters.get_or_insert_with(Vec::new).push(path_param);
            op.operation_id = Some(format!("forward_auth_path_{method}"));
            *operation_slot(&mut below, method) = Some(op);
        }
        paths.insert("/v1/auth/forward-auth".into(), exact);
        paths.insert("/v1/auth/forward-auth/{path}".into(), below);
    }

    for (path, item) in paths.iter_mut() {
        let api = path.starts_with("/v1/");
        for op in operations_mut(item) {
            let has_body = op.request_body.is_some();
            let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
            let params = op.parameters.as_deref().unwrap_or_default();
            let has_path_param = params
                .iter()
                .any(|p| matches!(p.parameter_in, ParameterIn::Path));
            let has_query = params
                .iter()
                .any(|p| matches!(p.parameter_in, ParameterIn::Query));
            let mut add = |status: &str, description: &str| {
                op.responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| problem_response(description));
            };
            if has_body {
                add("400", "Malformed JSON, or nested too deeply");
                add("408", "The body did not arrive in time");
                add("413", "The body is too large");
                add("415", "Content-Type is not application/json");
                add("422", "A field is missing, unknown or of the wrong type");
            }
            if has_query {
                add("422", "A query parameter is of the wrong type");
            }
            if has_path_param {
                add("404", "No such resource");
            }
            if secured {
                add(
                    "401",
                    "Missing, invalid, expired or revoked token (WWW-Authenticate: Bearer)",
                );
            }
            if api {
                add(
                    "503",
                    "Starting, overloaded, timed out, or a dependency is down; see Retry-After",
                );
            }
        }
    }
}

fn problem_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}

fn operation_slot<'a>(item: &'a mut PathItem, method: &str) -> &'a mut Option<Operation> {
    match method {
        "get" => &mut item.get,
        "post" => &mut item.post,
        "put" => &mut item.put,
        "patch" => &mut item.patch,
        "delete" => &mut item.delete,
        "head" => &mut item.head,
        "options" => &mut item.options,
        _ => &mut item.trace,
    }
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.post,
        &mut item.put,
        &mut item.patch,
        &mut item.delete,
        &mut item.head,
        &mut item.options,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}
