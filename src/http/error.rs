//! The HTTP layer's error, turned into `application/problem+json` in one place.
//!
//! Every handler, extractor and middleware answers failures with an [`ApiError`];
//! its `code` is the stable, machine-readable part of the contract, also carried
//! in `type` as `urn:auth-service:problem:<code>`. Server-side errors are logged
//! here, once, and their detail never reaches the client.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{auth::AuthError, store::StoreError};

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:auth-service:problem:<code>`.
    #[serde(rename = "type")]
    #[schema(example = "urn:auth-service:problem:validation_failed")]
    pub type_uri: String,
    /// Short human-readable summary of the problem type.
    #[schema(example = "Unprocessable Entity")]
    pub title: String,
    /// HTTP status code.
    #[schema(example = 422)]
    pub status: u16,
    /// Human-readable explanation of this occurrence.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "invalid value for username: must be 1 to 64 letters, digits or . _ @ + -")]
    pub detail: Option<String>,
    /// Stable machine-readable code.
    #[schema(example = "validation_failed")]
    pub code: String,
    /// The request field at fault, for validation errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "username")]
    pub field: Option<String>,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed request body: {0}")]
    MalformedBody(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid value for {field}: {message}")]
    Validation { field: String, message: String },
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("missing bearer token")]
    MissingToken,
    #[error("invalid or expired token")]
    InvalidToken,
    #[error("{0}")]
    Forbidden(String),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error(
        "the change would leave no enabled user with auth:admin; make another administrator first"
    )]
    LastAdmin,
    #[error("too many attempts; retry after {retry_after} s")]
    TooManyRequests { retry_after: u64 },
    #[error("{what} is temporarily unavailable")]
    Unavailable {
        what: &'static str,
        retry_after: u64,
    },
    #[error("the service is starting")]
    Starting,
    #[error("the service is overloaded")]
    Overloaded,
    #[error("the request took too long")]
    Timeout,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedBody(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::InvalidCredentials | Self::MissingToken | Self::InvalidToken => {
                StatusCode::UNAUTHORIZED
            }
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) | Self::LastAdmin => StatusCode::CONFLICT,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } | Self::Starting | Self::Overloaded | Self::Timeout => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients can switch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedBody(_) => "malformed_body",
            Self::BadRequest(_) => "bad_request",
            Self::Validation { .. } => "validation_failed",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RequestTimeout => "request_timeout",
            Self::InvalidCredentials => "invalid_credentials",
            Self::MissingToken => "missing_token",
            Self::InvalidToken => "invalid_token",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict(_) => "conflict",
            Self::LastAdmin => "last_admin",
            Self::TooManyRequests { .. } => "too_many_requests",
            Self::Unavailable { .. } => "unavailable",
            Self::Starting => "starting",
            Self::Overloaded => "overloaded",
            Self::Timeout => "timeout",
            Self::Internal(_) => "internal",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::TooManyRequests { retry_after } | Self::Unavailable { retry_after, .. } => {
                Some(*retry_after)
            }
            Self::Starting | Self::Overloaded | Self::Timeout => Some(1),
            _ => None,
        }
    }

    /// The problem document; server errors say nothing of their cause.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let detail = match self {
            Self::Internal(_) => None,
            other => Some(other.to_string()),
        };
        Problem {
            type_uri: format!("urn:auth-service:problem:{}", self.code()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            code: self.code().to_owned(),
            field: match self {
                Self::Validation { field, .. } => Some(field.clone()),
                _ => None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            tracing::error!(error = %cause, "request failed");
        }
        let problem = self.problem();
        let mut response = (self.status(), Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        match self {
            // The contract asks gateways to see `invalid_token` on every refusal,
            // a missing token included.
            Self::MissingToken | Self::InvalidToken => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            Self::Forbidden(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
                );
            }
            _ => {}
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            // Unguarded calls too (the embedded session store's busy lock).
            let what = match e {
                StoreError::Unavailable(dep) => dep.as_str(),
                StoreError::Redis(_) => "redis",
                _ => "database",
            };
            return Self::Unavailable {
                what,
                retry_after: 1,
            };
        }
        match e {
            StoreError::LastAdmin => Self::LastAdmin,
            StoreError::Conflict(what) => Self::Conflict(format!("already exists ({what})")),
            StoreError::NotFound => Self::NotFound,
            StoreError::Invalid { field, message } => Self::validation(field, message),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<crate::users::FieldError> for ApiError {
    fn from(e: crate::users::FieldError) -> Self {
        Self::validation(e.field, e.message)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::InvalidCredentials => Self::InvalidCredentials,
            AuthError::InvalidToken => Self::InvalidToken,
            AuthError::Forbidden(p) => Self::Forbidden(format!("missing permission {p}")),
            AuthError::Locked(seconds) => Self::TooManyRequests {
                retry_after: seconds,
            },
            AuthError::Invalid(field, message) => Self::validation(field, message),
            AuthError::Overloaded => Self::Unavailable {
                what: "password hashing",
                retry_after: 1,
            },
            AuthError::Store(e) => e.into(),
            AuthError::Internal(m) => Self::Internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Dependency;

    #[test]
    fn every_error_maps_to_its_status_and_code() {
        let cases = [
            (ApiError::MalformedBody("x".into()), 400, "malformed_body"),
            (
                ApiError::validation("password", "too short"),
                422,
                "validation_failed",
            ),
            (
                ApiError::UnsupportedMediaType,
                415,
                "unsupported_media_type",
            ),
            (ApiError::PayloadTooLarge, 413, "payload_too_large"),
            (ApiError::RequestTimeout, 408, "request_timeout"),
            (ApiError::InvalidCredentials, 401, "invalid_credentials"),
            (ApiError::InvalidToken, 401, "invalid_token"),
            (ApiError::Forbidden("no".into()), 403, "forbidden"),
            (ApiError::NotFound, 404, "not_found"),
            (ApiError::Conflict("x".into()), 409, "conflict"),
            (StoreError::LastAdmin.into(), 409, "last_admin"),
            (
                ApiError::TooManyRequests { retry_after: 3 },
                429,
                "too_many_requests",
            ),
            (
                StoreError::Unavailable(Dependency::Redis).into(),
                503,
                "unavailable",
            ),
            (ApiError::Internal("db exploded".into()), 500, "internal"),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code);
            let p = err.problem();
            assert_eq!(p.status, status);
            assert_eq!(p.type_uri, format!("urn:auth-service:problem:{code}"));
        }
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let p = ApiError::Internal("password=hunter2 at db".into()).problem();
        assert!(p.detail.is_none());
        assert!(!serde_json::to_string(&p).unwrap().contains("hunter2"));
    }

    #[test]
    fn retry_after_and_challenges_are_set() {
        let r = ApiError::TooManyRequests { retry_after: 7 }.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let r = ApiError::InvalidToken.into_response();
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
    }
}
