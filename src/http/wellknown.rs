//! `/.well-known/*`: the public keys (JWKS) and the discovery document, so
//! standard JWT libraries find and verify our tokens offline.

use axum::{
    extract::State,
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
};
use serde_json::{json, Value};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::app::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(jwks))
        .routes(routes!(openid_configuration))
}

/// The public signing keys, including ones about to sign and ones whose tokens
/// may still be live. Cacheable for well under the publish lead of a new key.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "discovery",
    responses((status = 200, description = "JSON Web Key Set", body = Object)))]
pub async fn jwks(State(state): State<AppState>) -> Response {
    let max_age = state.tokens.keys.timing.jwks_max_age().as_secs();
    let mut response = axum::Json(state.tokens.keys.keys().jwks()).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={max_age}")) {
        response.headers_mut().insert(header::CACHE_CONTROL, v);
    }
    response
}

/// OpenID-style discovery: issuer, `jwks_uri` and the endpoints.
#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "discovery",
    responses((status = 200, description = "Discovery document", body = Object)))]
pub async fn openid_configuration(State(state): State<AppState>) -> axum::Json<Value> {
    let issuer = &state.config.issuer;
    let algs: Vec<&str> = match state.tokens.keys.keys().signing_key(chrono::Utc::now()) {
        Some(k) if k.algorithm == jsonwebtoken::Algorithm::ES256 => vec!["ES256"],
        _ => vec!["EdDSA"],
    };
    axum::Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "token_endpoint": format!("{issuer}/v1/auth/login"),
        "refresh_endpoint": format!("{issuer}/v1/auth/refresh"),
        "revocation_endpoint": format!("{issuer}/v1/auth/logout"),
        "userinfo_endpoint": format!("{issuer}/v1/auth/me"),
        "introspection_endpoint": format!("{issuer}/v1/auth/validate"),
        "registration_endpoint": format!("{issuer}/v1/auth/register"),
        "forward_auth_endpoint": format!("{issuer}/v1/auth/forward-auth"),
        "id_token_signing_alg_values_supported": algs,
        "token_endpoint_auth_methods_supported": ["none"],
        "grant_types_supported": ["password", "refresh_token"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "claims_supported": ["iss", "aud", "sub", "sid", "jti", "iat", "nbf", "exp", "username", "roles", "permissions"],
    }))
}
