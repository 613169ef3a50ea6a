//! The axum extractor [`AuthUser`].
//!
//! Behind an [`AuthLayer`](crate::AuthLayer) it hands the handler the claims the
//! layer validated. Without the layer, it validates the bearer token itself with
//! an [`AuthClient`] found in the request extensions (add one with
//! `Extension(client)`), so single routes can be protected by their signature
//! alone. Rejections are the same 401/403/503 answers as the layer's.

use std::ops::Deref;

use axum_core::{
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use http::request::Parts;

use crate::{layer::bearer_token, AuthClient, AuthRejection, Claims};

/// The authenticated caller: the claims of a valid access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser(pub Claims);

impl AuthUser {
    /// `Ok` when the caller has `permission`; the `Err` answers 403 with
    /// `WWW-Authenticate: Bearer error="insufficient_scope"`, so a handler can
    /// write `user.require_permission("docs:write")?`.
    pub fn require_permission(&self, permission: &str) -> Result<(), AuthRejection> {
        crate::check_permission(&self.0, permission).map_err(AuthRejection::from)
    }
}

impl Deref for AuthUser {
    type Target = Claims;

    fn deref(&self) -> &Claims {
        &self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = AuthRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(claims) = parts.extensions.get::<Claims>() {
            return Ok(Self(claims.clone()));
        }
        let Some(client) = parts.extensions.get::<AuthClient>().cloned() else {
            tracing::error!("AuthUser needs an AuthLayer or an AuthClient extension");
            return Err(AuthRejection::misconfigured(
                "AuthUser needs an AuthLayer or an AuthClient extension",
            ));
        };
        let token = bearer_token(&parts.headers)?;
        let claims = client.validate(token).await?;
        parts.extensions.insert(claims.clone());
        Ok(Self(claims))
    }
}

impl IntoResponse for AuthRejection {
    fn into_response(self) -> Response {
        self.into_http()
    }
}
