//! A client of auth-service for Rust services.
//!
//! Most apps should validate access tokens **locally**: the service publishes its
//! public keys (JWKS), tokens are signed JWTs, and checking one needs no call to
//! the service — so the service's evictions, restarts and outages never reach
//! the app's hot path. Apps that must see a logout at once validate **remotely**
//! instead, with retries, a circuit breaker and an optional fallback to local
//! validation when the service cannot answer.
//!
//! ```no_run
//! # async fn demo() -> Result<(), auth_client::Error> {
//! use auth_client::{AuthClient, ValidationMode};
//!
//! let client = AuthClient::builder("http://auth-service.auth-service.svc:8080")
//!     .mode(ValidationMode::Local)
//!     .build()?;
//! let claims = client.validate("eyJ...").await?;
//! auth_client::check_permission(&claims, "docs:read")?;
//! # Ok(()) }
//! ```
//!
//! For HTTP apps, [`AuthLayer`] (tower) and `AuthUser` (axum, feature `axum`)
//! do this per request and answer 401/403/503 as the service would. For apps
//! that *call* other services with a user's or a service account's token,
//! [`Session`] logs in and keeps a fresh access token, refreshing one request
//! at a time so the service's refresh-token reuse detection never fires.
//!
//! | module | what |
//! | --- | --- |
//! | `client` | [`AuthClient`]: validation (local, remote, remote with fallback) |
//! | `jwks` | discovery and the JWKS cache (`Cache-Control`, unknown kids, outages) |
//! | `retry`, `breaker` | backoff with jitter and `Retry-After`; the circuit breaker |
//! | `layer`, `extract` | tower middleware, axum extractor, refusals |
//! | `session` | login and single-flight refresh |

mod breaker;
mod claims;
mod client;
mod error;
#[cfg(feature = "axum")]
mod extract;
pub mod jwks;
mod layer;
pub mod retry;
mod session;
#[cfg(test)]
mod tests;

pub use breaker::{Admission, BreakerConfig, BreakerState, CircuitBreaker};
pub use claims::{check_permission, Claims};
pub use client::{AuthClient, AuthClientBuilder, ValidationMode};
pub use error::{Error, InvalidReason, UnavailableReason};
#[cfg(feature = "axum")]
pub use extract::AuthUser;
pub use layer::{
    bearer_token, require_permission, AuthLayer, AuthRejection, Authenticate, RequirePermission,
    RequirePermissionLayer,
};
pub use retry::RetryPolicy;
pub use session::Session;
