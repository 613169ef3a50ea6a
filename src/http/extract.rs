//! Extractors whose rejections are our own problem responses.
//!
//! axum's `Json` rejects with plain-text bodies; wrapping it keeps every failure
//! of the API in the problem+json shape with a stable code: malformed JSON 400,
//! wrong types or unknown fields 422, wrong Content-Type 415, too large 413, a
//! body that does not arrive in time 408, nesting deeper than [`MAX_JSON_DEPTH`] 400.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::{
        rejection::{BytesRejection, JsonRejection},
        ConnectInfo, FromRequest, FromRequestParts, Request,
    },
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

/// Deepest nesting of arrays and objects a request body may have. Our bodies are
/// at most three levels deep; serde_json's own limit (128) keeps the parser's
/// stack safe, this one keeps deep inputs from reaching any `Value` we store.
pub const MAX_JSON_DEPTH: usize = 32;

/// How long the whole body may take to arrive, set per request by the router
/// (from `AUTH_BODY_READ_TIMEOUT`). A total deadline, not an idle timeout: a
/// client dribbling one byte a second would never trip an idle timeout.
#[derive(Debug, Clone, Copy)]
pub struct BodyReadTimeout(pub Duration);

/// Used when no [`BodyReadTimeout`] is set (extractor tests).
const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A JSON request body, deserialized into `T`.
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Content type first, as axum does: a wrong one is 415 whatever the body.
        if !is_json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let deadline = req
            .extensions()
            .get::<BodyReadTimeout>()
            .map_or(DEFAULT_BODY_READ_TIMEOUT, |t| t.0);
        let bytes = match tokio::time::timeout(deadline, Bytes::from_request(req, state)).await {
            Err(_) => return Err(ApiError::RequestTimeout),
            Ok(Err(rejection)) => return Err(map_bytes_rejection(&rejection)),
            Ok(Ok(bytes)) => bytes,
        };
        Self::from_bytes(&bytes)
    }
}

impl<T: DeserializeOwned> Json<T> {
    /// Parses a complete body: the part of the extractor that sees client bytes,
    /// exposed for the fuzz harnesses.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ApiError> {
        if nesting_exceeds(bytes, MAX_JSON_DEPTH) {
            return Err(ApiError::MalformedBody(format!(
                "the body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels"
            )));
        }
        // PostgreSQL text cannot hold NUL ("invalid byte sequence"): refused here,
        // once, rather than as a 500 from whichever query meets it first
        // (schemathesis found one through a query string).
        if has_nul_escape(bytes) {
            return Err(ApiError::validation(
                "body",
                "strings must not contain NUL characters",
            ));
        }
        // Every body of this API is an object. serde would also fill a struct
        // from an array of its fields in order (`[null, null]` was a valid role
        // update: schemathesis found it), which no client means to send.
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                    Err(_) => ApiError::MalformedBody("the body is not valid JSON".into()),
                    Ok(_) => ApiError::validation("body", "must be a JSON object"),
                },
            );
        }
        axum::Json::<T>::from_bytes(bytes)
            .map(|axum::Json(value)| Self(value))
            .map_err(map_rejection)
    }
}

/// `application/json` or `application/<anything>+json`, parameters ignored.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

/// Whether `bytes`, read as JSON, nests deeper than `max`. A linear scan that
/// skips strings; malformed input is left for the parser to reject.
fn nesting_exceeds(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Whether a JSON string in `bytes` holds `\u0000` (the only way JSON can carry
/// NUL: a raw one is invalid JSON). Escaped backslashes are skipped properly.
fn has_nul_escape(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'u') && bytes.get(i + 2..i + 6) == Some(b"0000") {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// Whether a raw (still percent-encoded) URI part decodes to a NUL somewhere.
fn has_encoded_nul(raw: &str) -> bool {
    raw.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
}

fn map_bytes_rejection(rejection: &BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else {
        // The connection broke or the body was malformed (e.g. bad chunking).
        ApiError::MalformedBody("the body could not be read".into())
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

/// The request's bearer token, unverified, for handlers that verify it
/// themselves: a copy of the token rather than the whole `HeaderMap`, which axum
/// would clone.
pub struct Bearer(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        bearer_token(&parts.headers).map(|token| Self(token.to_owned()))
    }
}

/// A caller with a valid access token and a session checked now: while the
/// session store is unreachable this is 503, whatever the outage policy (only
/// the validation endpoints for gateways accept unchecked tokens).
pub struct Authenticated(pub Claims);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer_token(&parts.headers)?;
        let claims = auth::authenticate(state, token, None).await?;
        Ok(Self(claims))
    }
}

/// A caller whose token grants `auth:admin`, with its session checked now (see
/// [`Authenticated`]).
pub struct Admin(pub Claims);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer_token(&parts.headers)?;
        let claims = auth::authenticate(state, token, Some(ADMIN_PERMISSION)).await?;
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
        // No resource's id or name holds a NUL (and PostgreSQL could not take it).
        if has_encoded_nul(parts.uri.path()) {
            return Err(ApiError::NotFound);
        }
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
        if parts.uri.query().is_some_and(has_encoded_nul) {
            return Err(ApiError::validation(
                "query",
                "parameters must not contain NUL characters",
            ));
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Self(v))
            .map_err(|e| ApiError::validation("query", e.body_text()))
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn nesting_is_measured_outside_strings() {
        assert!(!nesting_exceeds(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(nesting_exceeds(br#"{"a":[1,{"b":[2]}]}"#, 3));
        // Brackets inside strings, escaped quotes included, do not count.
        assert!(!nesting_exceeds(br#"{"a":"[[[[\"[[[["}"#, 1));
        let deep = "[".repeat(MAX_JSON_DEPTH + 1);
        assert!(nesting_exceeds(deep.as_bytes(), MAX_JSON_DEPTH));
        assert!(!nesting_exceeds(
            "[".repeat(MAX_JSON_DEPTH).as_bytes(),
            MAX_JSON_DEPTH
        ));
    }

    #[test]
    fn deep_bodies_are_400_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let err = Json::<serde_json::Value>::from_bytes(deep.as_bytes())
            .err()
            .unwrap();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn nul_characters_are_found_in_strings_and_uris() {
        assert!(has_nul_escape(br#"{"a":"x\u0000y"}"#));
        assert!(
            !has_nul_escape(br#"{"a":"x\\u0000y"}"#),
            "an escaped backslash"
        );
        assert!(has_nul_escape(br#"{"a":"\\\u0000"}"#));
        assert!(!has_nul_escape(br#"{"a":"\u00001"}"#.split_at(8).0));
        let err = Json::<serde_json::Value>::from_bytes(br#"{"cursor":"\u0000"}"#)
            .err()
            .unwrap();
        assert_eq!(err.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(has_encoded_nul("cursor=a%00b"));
        assert!(!has_encoded_nul("cursor=a%000"[..9].as_ref()));
        assert!(!has_encoded_nul("cursor=%2500"));
    }

    #[test]
    fn only_objects_are_bodies() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Patch {
            a: Option<u8>,
            b: Option<u8>,
        }
        assert!(Json::<Patch>::from_bytes(b" {\"a\": 1}").is_ok());
        for (body, status) in [
            (&b"[null, null]"[..], StatusCode::UNPROCESSABLE_ENTITY),
            (b"[1, 2]", StatusCode::UNPROCESSABLE_ENTITY),
            (b"\"x\"", StatusCode::UNPROCESSABLE_ENTITY),
            (b"", StatusCode::BAD_REQUEST),
            (b"[1,", StatusCode::BAD_REQUEST),
        ] {
            let err = Json::<Patch>::from_bytes(body).err().unwrap();
            assert_eq!(err.status(), status, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn json_content_types() {
        let check = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            is_json_content_type(&h)
        };
        assert!(check("application/json"));
        assert!(check("Application/JSON; charset=utf-8"));
        assert!(check("application/merge-patch+json"));
        assert!(!check("text/plain"));
        assert!(!check("application/jsonx"));
        assert!(!check("text/json+xml"));
        assert!(!is_json_content_type(&HeaderMap::new()));
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
