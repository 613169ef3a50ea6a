//! Tower middleware: [`AuthLayer`] validates the bearer token of every request
//! and puts the [`Claims`] in the request's extensions; [`require_permission`]
//! refuses requests whose claims lack a permission. Refusals are
//! `application/problem+json` answers shaped like the service's own:
//!
//! | why | status | headers |
//! | --- | --- | --- |
//! | no, malformed, invalid, expired or revoked token | 401 | `WWW-Authenticate: Bearer error="invalid_token"` |
//! | the token lacks the permission | 403 | `WWW-Authenticate: Bearer error="insufficient_scope"` |
//! | the service or the keys could not be reached | 503 | `Retry-After` |
//!
//! Every refusal gets the same 401 whatever the reason, as the service does:
//! the reason is logged (at debug), not told to the client.
//!
//! The middleware works with any `http` service whose response body can be
//! made from a `String` (axum's `Body` can).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::{AuthClient, Claims, Error, InvalidReason};

/// Why a request was refused, and the answer to give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRejection {
    kind: RejectionKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RejectionKind {
    Unauthorized,
    Forbidden(String),
    Unavailable(Option<Duration>),
    /// A handler asked for claims that no layer put there: a wiring bug.
    Misconfigured(&'static str),
}

impl AuthRejection {
    pub(crate) fn misconfigured(what: &'static str) -> Self {
        Self {
            kind: RejectionKind::Misconfigured(what),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self.kind {
            RejectionKind::Unauthorized => StatusCode::UNAUTHORIZED,
            RejectionKind::Forbidden(_) => StatusCode::FORBIDDEN,
            RejectionKind::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RejectionKind::Misconfigured(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The HTTP answer, with any body type that can be made from a `String`.
    pub fn into_http<B: From<String>>(self) -> Response<B> {
        let status = self.status();
        let (code, detail) = match &self.kind {
            RejectionKind::Unauthorized => ("invalid_token", "invalid or expired token".to_owned()),
            RejectionKind::Forbidden(p) => {
                ("forbidden", format!("the token lacks the permission {p:?}"))
            }
            RejectionKind::Unavailable(_) => (
                "unavailable",
                "authentication is temporarily unavailable".to_owned(),
            ),
            RejectionKind::Misconfigured(_) => ("internal", "internal error".to_owned()),
        };
        let body = serde_json::json!({
            "type": format!("urn:auth-service:problem:{code}"),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": detail,
            "code": code,
        })
        .to_string();
        let mut response = Response::new(B::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self.kind {
            RejectionKind::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            RejectionKind::Forbidden(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
                );
            }
            RejectionKind::Unavailable(retry_after) => {
                // Whole seconds, rounded up, at least 1.
                let secs = retry_after
                    .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
                    .unwrap_or(1)
                    .max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            RejectionKind::Misconfigured(_) => {}
        }
        response
    }
}

impl From<Error> for AuthRejection {
    fn from(e: Error) -> Self {
        let kind = match e {
            Error::InvalidToken(reason) => {
                tracing::debug!(%reason, "token refused");
                RejectionKind::Unauthorized
            }
            Error::Forbidden(permission) => RejectionKind::Forbidden(permission),
            Error::Unavailable {
                reason,
                retry_after,
            } => {
                tracing::warn!(%reason, "cannot validate tokens: auth service unavailable");
                RejectionKind::Unavailable(retry_after)
            }
            other => {
                tracing::error!(error = %other, "token validation failed");
                RejectionKind::Unavailable(None)
            }
        };
        Self { kind }
    }
}

impl std::fmt::Display for AuthRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            RejectionKind::Unauthorized => f.write_str("invalid or expired token"),
            RejectionKind::Forbidden(p) => write!(f, "the token lacks the permission {p:?}"),
            RejectionKind::Unavailable(_) => f.write_str("authentication unavailable"),
            RejectionKind::Misconfigured(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for AuthRejection {}

/// The bearer token of a request's `Authorization` header.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, Error> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(Error::InvalidToken(InvalidReason::Missing))?
        .to_str()
        .map_err(|_| Error::InvalidToken(InvalidReason::Malformed))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(Error::InvalidToken(InvalidReason::Malformed))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(Error::InvalidToken(InvalidReason::Malformed));
    }
    Ok(token)
}

/// Validates the bearer token of every request with an [`AuthClient`] (in its
/// [`ValidationMode`](crate::ValidationMode)); on success the [`Claims`] (and
/// the client) go into the request's extensions, otherwise the request is
/// answered 401 or 503 without reaching the inner service.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    client: AuthClient,
}

impl AuthLayer {
    pub fn new(client: AuthClient) -> Self {
        Self { client }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            client: self.client.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Authenticate<S> {
    inner: S,
    client: AuthClient,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ResBody> Service<Request<B>> for Authenticate<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // The clone is not ready; the one that was polled ready goes with the
        // request (tower's usual dance for services called from a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let client = self.client.clone();
        Box::pin(async move {
            let verdict = match bearer_token(request.headers()) {
                Ok(token) => client.validate(token).await,
                Err(e) => Err(e),
            };
            match verdict {
                Ok(claims) => {
                    request.extensions_mut().insert(claims);
                    request.extensions_mut().insert(client);
                    inner.call(request).await
                }
                Err(e) => Ok(AuthRejection::from(e).into_http()),
            }
        })
    }
}

/// A layer that answers 403 (`insufficient_scope`) unless the claims that
/// [`AuthLayer`] put in the request grant `permission`. Put it inside (after)
/// an `AuthLayer`; with none, requests are answered 500, loudly, rather than let
/// through.
pub fn require_permission(permission: impl Into<String>) -> RequirePermissionLayer {
    RequirePermissionLayer {
        permission: Arc::from(permission.into()),
    }
}

/// See [`require_permission`].
#[derive(Debug, Clone)]
pub struct RequirePermissionLayer {
    permission: Arc<str>,
}

impl<S> Layer<S> for RequirePermissionLayer {
    type Service = RequirePermission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequirePermission {
            inner,
            permission: self.permission.clone(),
        }
    }
}

/// The service made by [`RequirePermissionLayer`].
#[derive(Debug, Clone)]
pub struct RequirePermission<S> {
    inner: S,
    permission: Arc<str>,
}

impl<S, B, ResBody> Service<Request<B>> for RequirePermission<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let refusal = match request.extensions().get::<Claims>() {
            None => {
                tracing::error!("require_permission without an AuthLayer in front of it");
                Some(AuthRejection::misconfigured(
                    "require_permission needs an AuthLayer in front of it",
                ))
            }
            Some(claims) => crate::check_permission(claims, &self.permission)
                .err()
                .map(AuthRejection::from),
        };
        match refusal {
            Some(rejection) => Box::pin(std::future::ready(Ok(rejection.into_http()))),
            None => Box::pin(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(bearer_token(&with("Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(&with("bearer  abc ")), Ok("abc"));
        assert_eq!(
            bearer_token(&HeaderMap::new()),
            Err(Error::InvalidToken(InvalidReason::Missing))
        );
        for bad in ["Basic abc", "Bearer", "Bearer   ", "abc"] {
            assert_eq!(
                bearer_token(&with(bad)),
                Err(Error::InvalidToken(InvalidReason::Malformed)),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejections_map_to_the_contracts_answers() {
        let r: Response<String> =
            AuthRejection::from(Error::InvalidToken(InvalidReason::Expired)).into_http();
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body: serde_json::Value = serde_json::from_str(r.body()).unwrap();
        assert_eq!(body["code"], "invalid_token");
        let other: Response<String> =
            AuthRejection::from(Error::InvalidToken(InvalidReason::BadSignature)).into_http();
        assert_eq!(r.body(), other.body(), "the reason is not told");

        let r: Response<String> =
            AuthRejection::from(Error::Forbidden("docs:write".into())).into_http();
        assert_eq!(r.status(), 403);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer error=\"insufficient_scope\""
        );

        let r: Response<String> = AuthRejection::from(Error::Unavailable {
            reason: crate::UnavailableReason::CircuitOpen,
            retry_after: Some(Duration::from_millis(1500)),
        })
        .into_http();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());

        let r: Response<String> = AuthRejection::from(Error::Unavailable {
            reason: crate::UnavailableReason::NoKeys,
            retry_after: None,
        })
        .into_http();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
