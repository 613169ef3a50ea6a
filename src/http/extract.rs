//! Extractors whose rejections are our own problem responses.
//!
//! axum's `Json` rejects with plain-text bodies; wrapping it keeps every failure
//! of the API in the problem+json shape with a stable code: malformed JSON 400,
//! wrong types or unknown fields 422, wrong Content-Type 415, too large 413.

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{rejection::JsonRejection, ConnectInfo, FromRequest, FromRequestParts, Request},
    http::{header, request::Parts, HeaderMap, StatusCode},
};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::{
    app::AppState,
    auth::{self, ClientInfo},
    config::Config,
    tokens::Claims,
    users::ADMIN_PERMISSION,
};

/// A JSON request body, deserialized into `T`.
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(map_rejection(rejection)),
        }
    }
}

fn map_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            // serde's message names the field and the expected type, never echoes a
            // whole value; the body text itself is not included.
            ApiError::validation(
                "body",
                e.body_text().trim_start_matches(
                    "Failed to deserialize the JSON body into the target type: ",
                ),
            )
        }
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::MalformedBody("the body is not valid JSON".into())
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge
        }
        other => ApiError::MalformedBody(other.body_text()),
    }
}

/// The caller's address and user agent. The IP is the connection's peer, or — when
/// the peer is a trusted proxy — the right-most `X-Forwarded-For` entry that is not
/// itself a trusted proxy (entries further left are client-supplied and forgeable).
pub struct Client(pub ClientInfo);

impl FromRequestParts<AppState> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let ip = peer.map(|peer| client_ip(peer, &parts.headers, &state.config));
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| ua.chars().take(256).collect());
        Ok(Self(ClientInfo { ip, user_agent }))
    }
}

fn client_ip(peer: IpAddr, headers: &HeaderMap, config: &Config) -> IpAddr {
    if !config.is_trusted_proxy(peer) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !config.is_trusted_proxy(ip) {
                    break;
                }
            }
            // Garbage from an untrusted hop: stop at the last address we trust.
            Err(_) => break,
        }
    }
    client
}

/// The bearer token of the `Authorization` header, unverified.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::MissingToken)?
        .to_str()
        .map_err(|_| ApiError::InvalidToken)?;
    let (scheme, token) = value.split_once(' ').ok_or(ApiError::InvalidToken)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::InvalidToken);
    }
    Ok(token.trim())
}

/// A caller with a valid access token and a live session.
pub struct Authenticated(pub Claims);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer_token(&parts.headers)?;
        let claims = auth::validate(state, token, None).await?;
        Ok(Self(claims))
    }
}

/// A caller whose token grants `auth:admin`.
pub struct Admin(pub Claims);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer_token(&parts.headers)?;
        let claims = auth::validate(state, token, Some(ADMIN_PERMISSION)).await?;
        Ok(Self(claims))
    }
}

/// Path parameters; a malformed one (e.g. not a UUID) is a 404 problem, since no
/// resource can live at that path.
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Self(v))
            .map_err(|_| ApiError::NotFound)
    }
}

/// Query parameters; wrong types are a 422 problem naming the problem.
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Self(v))
            .map_err(|e| ApiError::validation("query", e.body_text()))
    }
}

#[cfg(test)]
mod client_ip_tests {
    use super::*;

    fn config(trusted: &str) -> Config {
        Config::from_lookup(|name| (name == "AUTH_TRUSTED_PROXIES").then(|| trusted.to_owned()))
            .unwrap()
    }

    fn headers(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", xff.parse().unwrap());
        h
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let c = config("10.0.0.0/8");
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(peer, &headers("1.2.3.4"), &c), peer);
    }

    #[test]
    fn the_right_most_untrusted_hop_behind_trusted_proxies_is_the_client() {
        let c = config("10.0.0.0/8");
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        // The left-most entry is client-supplied and forgeable.
        let ip = client_ip(peer, &headers("6.6.6.6, 198.51.100.7, 10.0.0.1"), &c);
        assert_eq!(ip, "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(peer, &HeaderMap::new(), &c), peer);
        assert_eq!(client_ip(peer, &headers("garbage"), &c), peer);
    }
}
