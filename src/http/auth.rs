//! `/v1/auth/*`: login, registration, refresh, logout, validation for apps and
//! gateways, the caller's profile, password change and session management.

use axum::{
    extract::{DefaultBodyLimit, State},
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::any,
    Router,
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    error::{ApiError, Problem},
    // Ours, not axum's: their rejections are problem+json (axum's Path and Query
    // answer plain text; schemathesis found a 400 `Invalid URL` that way).
    extract::{Authenticated, Bearer, Client, Json, Path, Query},
};
use crate::{
    app::AppState,
    auth::{self, TokenPair},
    sessions::SessionStore,
    store::IdentityStore,
    tokens::Claims,
    users::User,
};

pub fn router() -> OpenApiRouter<AppState> {
    // Every body here is a few hundred bytes, and most of these routes need no
    // token: a tighter limit than the admin API's.
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(register))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(logout_all))
        .routes(routes!(validate_get, validate_post))
        .routes(routes!(me))
        .routes(routes!(change_password))
        .routes(routes!(list_sessions))
        .routes(routes!(revoke_session))
        .layer(DefaultBodyLimit::max(super::PUBLIC_BODY_LIMIT))
}

/// Gateways forward any method and path (Envoy's `path_prefix`), so these routes
/// take every method; they are described in the OpenAPI document by `forward_auth`.
pub fn forward_auth_router() -> Router<AppState> {
    Router::new()
        .route("/v1/auth/forward-auth", any(forward_auth))
        .route("/v1/auth/forward-auth/{*path}", any(forward_auth))
}

/// Token responses must never be cached by a browser or proxy.
const NO_STORE: [(HeaderName, &str); 2] = [
    (header::CACHE_CONTROL, "no-store"),
    (header::PRAGMA, "no-cache"),
];

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[schema(example = "alice")]
    username: String,
    #[schema(example = "correct horse battery staple")]
    password: String,
}

/// Log in with a username and password.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in", body = TokenPair),
        (status = 401, description = "Bad credentials (same answer whether or not the user exists)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Locked out or rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A dependency is down or hashing is saturated; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn login(
    State(state): State<AppState>,
    Client(client): Client,
    Json(body): Json<LoginRequest>,
) -> Result<Response, ApiError> {
    let pair = auth::login(
        &state,
        &body.username,
        SecretString::from(body.password),
        &client,
    )
    .await?;
    Ok((NO_STORE, axum::Json(pair)).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    #[schema(example = "alice", pattern = r"^[A-Za-z0-9._@+-]{1,64}$")]
    pub username: String,
    #[schema(example = "alice@example.com")]
    pub email: Option<String>,
    #[schema(example = "correct horse battery staple")]
    pub password: String,
}

/// Self-service registration, when runtime configuration enables it.
#[utoipa::path(post, path = "/v1/auth/register", tag = "auth", request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered", body = User),
        (status = 404, description = "Registration is disabled", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Username or email taken (counted against the client IP, like a failed login)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field or weak password", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many failures from this client IP; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn register(
    State(state): State<AppState>,
    Client(client): Client,
    body: Result<Json<RegisterRequest>, ApiError>,
) -> Result<Response, ApiError> {
    // While registration is off the endpoint does not exist, whatever the body.
    if !state.runtime.get().registration_enabled {
        return Err(ApiError::NotFound);
    }
    let Json(body) = body?;
    let user = auth::register(
        &state,
        &body.username,
        body.email.as_deref(),
        SecretString::from(body.password),
        &client,
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(user)).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token of the last pair; it is used up by this call.
    #[schema(
        example = "rt2.8c5b0a1de0ae4e5b9f8f6e07d4c1a2b3.0f1e2d3c4b5a49687766554433221100.BwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4_QEFCQ0RFRg"
    )]
    pub refresh_token: String,
}

/// Exchange a refresh token for a new pair; the presented token is used up.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses(
        (status = 200, description = "A new pair", body = TokenPair),
        (status = 401, description = "Unknown, expired or reused token (reuse revokes the session)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The session store is down", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn refresh(
    State(state): State<AppState>,
    Client(client): Client,
    Json(body): Json<RefreshRequest>,
) -> Result<Response, ApiError> {
    let pair = auth::refresh(&state, &body.refresh_token, &client).await?;
    Ok((NO_STORE, axum::Json(pair)).into_response())
}

/// End this session.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, description = "Invalid token", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn logout(
    State(state): State<AppState>,
    Authenticated(claims): Authenticated,
    Client(client): Client,
) -> Result<StatusCode, ApiError> {
    auth::logout(&state, &claims, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// End every session of the caller.
#[utoipa::path(post, path = "/v1/auth/logout-all", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 204, description = "All sessions ended"),
        (status = 401, description = "Invalid token", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn logout_all(
    State(state): State<AppState>,
    Authenticated(claims): Authenticated,
    Client(client): Client,
) -> Result<StatusCode, ApiError> {
    auth::logout_all(&state, &claims, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
pub struct PermissionQuery {
    /// Answer 403 unless the token grants this permission.
    pub permission: Option<String>,
}

/// The identity headers gateways copy to upstream requests.
fn identity_headers(claims: &Claims) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let pairs = [
        ("x-auth-user-id", claims.sub.clone()),
        ("x-auth-username", claims.username.clone()),
        ("x-auth-roles", claims.roles.join(",")),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
    headers
}

/// Validate the bearer token (for apps and gateways).
#[utoipa::path(get, path = "/v1/auth/validate", tag = "validate", security(("bearer" = [])), params(PermissionQuery),
    responses(
        (status = 200, description = "Valid; identity in X-Auth-User-Id, X-Auth-Username, X-Auth-Roles", body = Claims),
        (status = 401, description = "Invalid, expired or revoked token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the permission", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn validate_get(
    State(state): State<AppState>,
    Query(query): Query<PermissionQuery>,
    Bearer(token): Bearer,
) -> Result<Response, ApiError> {
    let claims = auth::validate(&state, &token, query.permission.as_deref()).await?;
    Ok((identity_headers(&claims), axum::Json(claims)).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateRequest {
    /// An access token (a JWT).
    #[schema(
        example = "eyJhbGciOiJFZERTQSIsImtpZCI6IjIwMjYtMDEtMDEiLCJ0eXAiOiJKV1QifQ.e30.c2lnbmF0dXJl"
    )]
    pub token: String,
}

/// Validate a token passed in the body (for services).
#[utoipa::path(post, path = "/v1/auth/validate", tag = "validate", params(PermissionQuery), request_body = ValidateRequest,
    responses(
        (status = 200, description = "Valid", body = Claims),
        (status = 401, description = "Invalid, expired or revoked token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the permission", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn validate_post(
    State(state): State<AppState>,
    Query(query): Query<PermissionQuery>,
    Json(body): Json<ValidateRequest>,
) -> Result<Response, ApiError> {
    let claims = auth::validate(&state, &body.token, query.permission.as_deref()).await?;
    Ok((identity_headers(&claims), axum::Json(claims)).into_response())
}

/// Gateway check (nginx `auth_request`, Traefik ForwardAuth, Envoy ext_authz): any
/// method, any path below; identity headers and an empty body.
///
/// Documented for every method OpenAPI names, on `/v1/auth/forward-auth` and on
/// `/v1/auth/forward-auth/{path}`; any other method is answered the same way.
#[utoipa::path(get, path = "/v1/auth/forward-auth", tag = "validate", security(("bearer" = [])), params(PermissionQuery),
    responses(
        (status = 200, description = "Valid; identity headers set, empty body"),
        (status = 401, description = "Invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the permission", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn forward_auth(
    State(state): State<AppState>,
    Query(query): Query<PermissionQuery>,
    Bearer(token): Bearer,
) -> Result<Response, ApiError> {
    let claims = auth::validate(&state, &token, query.permission.as_deref()).await?;
    Ok((StatusCode::OK, identity_headers(&claims)).into_response())
}

/// The caller's profile, roles and permissions.
#[utoipa::path(get, path = "/v1/auth/me", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "Profile", body = User),
        (status = 401, description = "Invalid token", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn me(
    State(state): State<AppState>,
    Authenticated(claims): Authenticated,
) -> Result<axum::Json<User>, ApiError> {
    let user_id = claims.user_id().ok_or(ApiError::InvalidToken)?;
    let user = state
        .db
        .get_user(user_id)
        .await?
        .ok_or(ApiError::InvalidToken)?;
    Ok(axum::Json(user))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    #[schema(example = "correct horse battery staple")]
    pub current_password: String,
    #[schema(example = "a much longer passphrase nobody guesses")]
    pub new_password: String,
}

/// Change one's password; ends every other session. Tokens minted before the
/// change stop validating, the caller's too: its refresh token goes on.
#[utoipa::path(post, path = "/v1/auth/password", tag = "auth", security(("bearer" = [])), request_body = PasswordChange,
    responses(
        (status = 204, description = "Changed"),
        (status = 401, description = "Invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Wrong current password or weak new one", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Locked out: too many wrong passwords, here or at login; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn change_password(
    State(state): State<AppState>,
    Authenticated(claims): Authenticated,
    Client(client): Client,
    Json(body): Json<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    auth::change_password(
        &state,
        &claims,
        SecretString::from(body.current_password),
        SecretString::from(body.new_password),
        &client,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A session as its owner sees it.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    pub id: Uuid,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub last_used_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    /// Whether this is the session of the token making the request.
    pub current: bool,
}

fn millis(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The caller's live sessions.
#[utoipa::path(get, path = "/v1/auth/sessions", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "Sessions", body = [SessionView]),
        (status = 401, description = "Invalid token", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_sessions(
    State(state): State<AppState>,
    Authenticated(claims): Authenticated,
) -> Result<axum::Json<Vec<SessionView>>, ApiError> {
    let user_id = claims.user_id().ok_or(ApiError::InvalidToken)?;
    let current = claims.session_id();
    let sessions = state.sessions.list(user_id, auth::now_ms()).await?;
    Ok(axum::Json(
        sessions
            .into_iter()
            .map(|s| SessionView {
                current: Some(s.id) == current,
                id: s.id,
                created_at: millis(s.created_at),
                last_used_at: millis(s.last_used_at),
                expires_at: millis(s.expires_at),
                client_ip: s.client_ip,
                user_agent: s.user_agent,
            })
            .collect(),
    ))
}

/// End one of the caller's sessions.
#[utoipa::path(delete, path = "/v1/auth/sessions/{id}", tag = "auth", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Session id")),
    responses(
        (status = 204, description = "Ended"),
        (status = 401, description = "Invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such session of the caller", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn revoke_session(
    State(state): State<AppState>,
    Authenticated(claims): Authenticated,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let user_id = claims.user_id().ok_or(ApiError::InvalidToken)?;
    if state.sessions.revoke(user_id, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound)
    }
}
