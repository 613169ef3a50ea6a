//! The claims of an auth-service access token, as this crate hands them to apps.
//!
//! The same shape comes from local verification (the JWT payload) and from
//! remote validation (the JSON body of `GET /v1/auth/validate`), so an app does
//! not care which path produced them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::Error;

/// A validated access token's claims. Put in request extensions by
/// [`AuthLayer`](crate::AuthLayer) and handed out by `AuthUser`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer: the service's public URL (`AUTH_ISSUER`).
    pub iss: String,
    /// Audience (`AUTH_AUDIENCE`).
    pub aud: String,
    /// The user's id (a UUID).
    pub sub: String,
    /// The session's id (a UUID); logout ends it.
    pub sid: String,
    /// This token's id.
    pub jti: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not before, Unix seconds.
    pub nbf: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    pub username: String,
    pub roles: Vec<String>,
    /// The union of the roles' permissions when the token was issued.
    pub permissions: Vec<String>,
}

impl Claims {
    pub fn has_permission(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// `exp` as a time.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(self.exp).unwrap_or(0))
    }
}

/// `Ok` when `claims` grant `permission`, else [`Error::Forbidden`] (a 403 with
/// `WWW-Authenticate: Bearer error="insufficient_scope"` when answered by the
/// layer or the extractor). For a whole route, see
/// [`require_permission`](crate::require_permission).
pub fn check_permission(claims: &Claims, permission: &str) -> Result<(), Error> {
    if claims.has_permission(permission) {
        Ok(())
    } else {
        Err(Error::Forbidden(permission.to_owned()))
    }
}
