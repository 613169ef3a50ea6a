//! The one error type of the crate, and the reasons inside it.
//!
//! Callers mostly need three answers — the token is bad (401), the token lacks a
//! permission (403), or nobody could say (503) — so those are the variants to
//! match on; the reasons are there for logs and tests, not for the HTTP answer
//! (telling a client *why* its token failed helps an attacker more than a user).

use std::{fmt, time::Duration};

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The token is not valid: 401 with `WWW-Authenticate: Bearer error="invalid_token"`.
    #[error("invalid token: {0}")]
    InvalidToken(InvalidReason),
    /// The token is valid but lacks this permission: 403 with
    /// `WWW-Authenticate: Bearer error="insufficient_scope"`.
    #[error("the token lacks the permission {0:?}")]
    Forbidden(String),
    /// Login refused: wrong username or password.
    #[error("invalid username or password")]
    InvalidCredentials,
    /// The refresh token was refused (expired, revoked, or the session ended):
    /// the user has to log in again.
    #[error("the session has ended")]
    SessionEnded,
    /// Login is locked out or rate limited.
    #[error("rate limited")]
    RateLimited {
        /// The service's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// Nobody could decide: the service is unreachable or overloaded, its circuit
    /// is open, or there are no keys to verify with yet. Worth a 503, not a 401.
    #[error("the auth service is unavailable: {reason}")]
    Unavailable {
        reason: UnavailableReason,
        /// When to try again, if known (the service's `Retry-After`, or the time
        /// left before the circuit breaker lets a probe through).
        retry_after: Option<Duration>,
    },
    /// The service answered something this client does not understand.
    #[error("unexpected answer from the auth service: {0}")]
    Protocol(String),
    /// The client was built with a setting that cannot work.
    #[error("auth client configuration: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn invalid(reason: InvalidReason) -> Self {
        Self::InvalidToken(reason)
    }

    pub(crate) fn unavailable(reason: UnavailableReason, retry_after: Option<Duration>) -> Self {
        Self::Unavailable {
            reason,
            retry_after,
        }
    }

    /// Whether this is a verdict on the token (401/403) rather than a failure to
    /// reach one.
    pub fn is_verdict(&self) -> bool {
        matches!(self, Self::InvalidToken(_) | Self::Forbidden(_))
    }

    /// Whether the service could not be asked (see [`Error::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidReason {
    /// No bearer token in the request.
    Missing,
    /// Not a JWT, too long, no `kid`, or claims of the wrong shape.
    Malformed,
    /// The `kid` is not in the service's JWKS, even after a refetch.
    UnknownKey,
    /// The header's `alg` is not the algorithm of the key named by `kid`
    /// (`none`, HMAC with the public key, or any other confusion).
    AlgorithmMismatch,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    /// The header's `typ` is not `at+jwt` (RFC 9068): another kind of JWT.
    WrongType,
    /// The service said no (remote validation): revoked session, disabled user,
    /// or any of the reasons above.
    Rejected,
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Missing => "no bearer token",
            Self::Malformed => "malformed token",
            Self::UnknownKey => "unknown signing key",
            Self::AlgorithmMismatch => "algorithm does not match the key",
            Self::BadSignature => "bad signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not yet valid",
            Self::WrongIssuer => "wrong issuer",
            Self::WrongType => "not an access token (typ is not at+jwt)",
            Self::WrongAudience => "wrong audience",
            Self::Rejected => "rejected by the auth service",
        })
    }
}

/// Why the service could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnavailableReason {
    /// Connecting failed, or the connection broke before an answer.
    Connection,
    /// No answer within the request timeout.
    Timeout,
    /// The service (or a proxy in front of it) answered with this status: 503
    /// while it starts, drains or sheds load, 502/504 from a gateway.
    Status(u16),
    /// The circuit breaker is open: recent calls failed, so this one was not made.
    CircuitOpen,
    /// No signing keys are cached yet and the JWKS could not be fetched.
    NoKeys,
}

impl fmt::Display for UnavailableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connection => f.write_str("connection failed"),
            Self::Timeout => f.write_str("timed out"),
            Self::Status(s) => write!(f, "status {s}"),
            Self::CircuitOpen => f.write_str("circuit open"),
            Self::NoKeys => f.write_str("no signing keys available"),
        }
    }
}
