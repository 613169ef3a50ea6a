//! [`Session`]: a logged-in client that always has a usable access token.
//!
//! It refreshes shortly before the access token expires, and it serialises
//! refreshes: refresh tokens are single-use, and presenting one twice is how the
//! service detects a stolen token — it revokes the whole session. Two tasks of
//! one client refreshing at once with the same refresh token would trip exactly
//! that, so every refresh of a session happens under one lock, and a task that
//! waited for the lock finds the token already renewed instead of refreshing
//! again (single-flight).
//!
//! One case no client can rule out: a refresh whose answer is lost (the
//! connection drops after the service rotated the token). The client then holds
//! a used token, and its next refresh is reuse. Such failures are not retried
//! automatically; the service's `refresh_reuse_grace_seconds` (a few seconds)
//! makes them harmless, and is worth setting for clients on unreliable networks.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::{
    client::{AuthClient, Idempotence},
    retry::parse_retry_after,
    Error,
};

/// After a failed refresh, calls keep using the still-valid access token and
/// try again only after this long, instead of on every call.
const RETRY_REFRESH_AFTER: Duration = Duration::from_secs(1);

/// The service's token pair.
#[derive(Deserialize)]
struct TokenPair {
    access_token: String,
    expires_in: u64,
    refresh_token: String,
    session_id: String,
}

/// A secret string whose `Debug` does not show it.
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

struct Tokens {
    access_token: Secret,
    /// When the access token expires, by this process's monotonic clock
    /// (measured from when the request that got it was sent, so it errs early).
    expires_at: Instant,
    lifetime: Duration,
    refresh_token: Secret,
    /// The session is over (refresh refused, or logged out).
    ended: bool,
    /// No refresh attempt before this (set after a failed one).
    not_before: Option<Instant>,
}

/// A logged-in session. Share it between tasks behind an `Arc`.
pub struct Session {
    client: AuthClient,
    session_id: String,
    refresh_before: Duration,
    tokens: tokio::sync::Mutex<Tokens>,
    refreshes: AtomicU64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Logs in (`POST /v1/auth/login`). Retries only when the service surely did
    /// not see the attempt (no connection) or answered 503.
    pub async fn login(client: &AuthClient, username: &str, password: &str) -> Result<Self, Error> {
        let url = format!("{}/v1/auth/login", client.inner.base_url);
        let body = json!({ "username": username, "password": password });
        let sent = Instant::now();
        let response = client
            .send(None, Idempotence::NotIdempotent, || {
                client.inner.http.request(Method::POST, &url).json(&body)
            })
            .await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err(Error::InvalidCredentials),
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(Error::RateLimited {
                    retry_after: response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after),
                })
            }
            other => return Err(Error::Protocol(format!("login answered {other}"))),
        }
        let pair: TokenPair = response
            .json()
            .await
            .map_err(|e| Error::Protocol(format!("login answered an unreadable pair: {e}")))?;
        let lifetime = Duration::from_secs(pair.expires_in);
        Ok(Self {
            client: client.clone(),
            session_id: pair.session_id,
            refresh_before: Duration::from_secs(30),
            tokens: tokio::sync::Mutex::new(Tokens {
                access_token: Secret(pair.access_token),
                expires_at: sent + lifetime,
                lifetime,
                refresh_token: Secret(pair.refresh_token),
                ended: false,
                not_before: None,
            }),
            refreshes: AtomicU64::new(0),
        })
    }

    /// Refresh this long before the access token expires (at most half its
    /// lifetime before). Default 30 s.
    pub fn refresh_before(mut self, margin: Duration) -> Self {
        self.refresh_before = margin;
        self
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// How many refreshes this session has made.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// A valid access token, refreshed first when it is about to expire. When the
    /// refresh fails but the current token has not expired yet, that token is
    /// returned (and the refresh retried on a later call).
    pub async fn access_token(&self) -> Result<String, Error> {
        let mut tokens = self.tokens.lock().await;
        if tokens.ended {
            return Err(Error::SessionEnded);
        }
        let now = Instant::now();
        let margin = self.refresh_before.min(tokens.lifetime / 2);
        if now + margin < tokens.expires_at {
            return Ok(tokens.access_token.0.clone());
        }
        let still_valid = now < tokens.expires_at;
        if still_valid && tokens.not_before.is_some_and(|t| now < t) {
            return Ok(tokens.access_token.0.clone());
        }
        match self.refresh_locked(&mut tokens).await {
            Ok(()) => Ok(tokens.access_token.0.clone()),
            Err(e) if still_valid && e.is_unavailable() => {
                tracing::warn!(error = %e, "token refresh failed; using the current token meanwhile");
                Ok(tokens.access_token.0.clone())
            }
            Err(e) => Err(e),
        }
    }

    /// Refreshes because a server refused `stale` — unless the session already
    /// holds a newer token, which is returned instead. Many tasks that saw the
    /// same token refused cause one refresh, not one each.
    pub async fn refresh_if_current(&self, stale: &str) -> Result<String, Error> {
        let mut tokens = self.tokens.lock().await;
        if tokens.ended {
            return Err(Error::SessionEnded);
        }
        if tokens.access_token.0 != stale {
            return Ok(tokens.access_token.0.clone());
        }
        self.refresh_locked(&mut tokens).await?;
        Ok(tokens.access_token.0.clone())
    }

    /// Refreshes now (still one refresh at a time).
    pub async fn refresh(&self) -> Result<String, Error> {
        let mut tokens = self.tokens.lock().await;
        if tokens.ended {
            return Err(Error::SessionEnded);
        }
        self.refresh_locked(&mut tokens).await?;
        Ok(tokens.access_token.0.clone())
    }

    /// Ends the session at the service (`POST /v1/auth/logout`).
    pub async fn logout(&self) -> Result<(), Error> {
        let token = self.access_token().await?;
        let url = format!("{}/v1/auth/logout", self.client.inner.base_url);
        let response = self
            .client
            .send(None, Idempotence::Idempotent, || {
                self.client
                    .inner
                    .http
                    .request(Method::POST, &url)
                    .bearer_auth(&token)
            })
            .await?;
        match response.status() {
            // 401: the session had already ended.
            StatusCode::NO_CONTENT | StatusCode::UNAUTHORIZED => {
                self.tokens.lock().await.ended = true;
                Ok(())
            }
            other => Err(Error::Protocol(format!("logout answered {other}"))),
        }
    }

    /// One refresh; the caller holds the lock, which is what makes it single-flight.
    async fn refresh_locked(&self, tokens: &mut Tokens) -> Result<(), Error> {
        let url = format!("{}/v1/auth/refresh", self.client.inner.base_url);
        let body = json!({ "refresh_token": tokens.refresh_token.0 });
        let sent = Instant::now();
        let result = self
            .client
            .send(None, Idempotence::NotIdempotent, || {
                self.client
                    .inner
                    .http
                    .request(Method::POST, &url)
                    .json(&body)
            })
            .await;
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                tokens.not_before = Some(Instant::now() + RETRY_REFRESH_AFTER);
                return Err(e);
            }
        };
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => {
                tokens.ended = true;
                return Err(Error::SessionEnded);
            }
            other => return Err(Error::Protocol(format!("refresh answered {other}"))),
        }
        let pair: TokenPair = response
            .json()
            .await
            .map_err(|e| Error::Protocol(format!("refresh answered an unreadable pair: {e}")))?;
        if pair.session_id != self.session_id {
            tracing::warn!("refresh answered a pair of another session");
        }
        tokens.lifetime = Duration::from_secs(pair.expires_in);
        tokens.expires_at = sent + tokens.lifetime;
        tokens.access_token = Secret(pair.access_token);
        tokens.refresh_token = Secret(pair.refresh_token);
        tokens.not_before = None;
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
