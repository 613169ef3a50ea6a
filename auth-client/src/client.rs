//! [`AuthClient`]: one handle per app, cheap to clone, holding the HTTP client,
//! the JWKS cache and the circuit breaker, and the three ways to validate a token.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use jsonwebtoken::{errors::ErrorKind, Validation};
use reqwest::{header, Method, RequestBuilder, Response, StatusCode};

use crate::{
    breaker::{Admission, Breaker, BreakerConfig, BreakerState},
    jwks::KeyCache,
    retry::{parse_retry_after, RetryPolicy},
    Claims, Error, InvalidReason, UnavailableReason,
};

/// Tokens longer than this are refused before any parsing (ours are a few
/// hundred bytes; the service has the same limit).
const MAX_TOKEN_LEN: usize = 8192;

/// Tokens of service releases before 2026-12 say `typ: JWT`; they pass only if
/// issued before 2027-01-01T00:00:00Z (Unix s), so that a rolling update of the
/// service refuses none that is still valid, and none minted later can pass.
const LEGACY_TYPE_ISSUED_BEFORE: i64 = 1_798_761_600;

/// How [`AuthClient::validate`] (and so the layer and the extractor) decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ValidationMode {
    /// Verify the signature and claims against the cached JWKS: no call to the
    /// service per request, so its outages and evictions do not reach the app.
    /// A logged-out session's tokens stay valid until they expire (the access
    /// token lifetime, 15 minutes by default).
    #[default]
    Local,
    /// Ask the service (`GET /v1/auth/validate`) every time: revocation is seen
    /// at once, and when the service cannot answer, the request fails with 503.
    Remote,
    /// Ask the service, and when it cannot answer (unreachable after retries, or
    /// the circuit is open) verify locally instead: availability over immediate
    /// revocation during an outage.
    RemoteWithLocalFallback,
}

/// Builds an [`AuthClient`]; see [`AuthClient::builder`].
#[derive(Debug, Clone)]
pub struct AuthClientBuilder {
    base_url: String,
    audience: String,
    issuer: Option<String>,
    mode: ValidationMode,
    leeway: Duration,
    unknown_kid_interval: Duration,
    connect_timeout: Duration,
    request_timeout: Duration,
    retry: RetryPolicy,
    breaker: BreakerConfig,
    http: Option<reqwest::Client>,
}

impl AuthClientBuilder {
    /// The expected `aud` (the service's `AUTH_AUDIENCE`). Default `auth-service`.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = audience.into();
        self
    }

    /// The expected `iss` (the service's `AUTH_ISSUER`). Default: the `issuer` of
    /// the discovery document. Setting it skips discovery; the JWKS is then read
    /// from the base URL's `/.well-known/jwks.json`.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    pub fn mode(mut self, mode: ValidationMode) -> Self {
        self.mode = mode;
        self
    }

    /// Clock-skew allowance for `exp` and `nbf` in local validation. Default 5 s.
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// The least time between two JWKS fetches caused by unknown kids. Default 3 s.
    pub fn unknown_kid_refetch_interval(mut self, interval: Duration) -> Self {
        self.unknown_kid_interval = interval;
        self
    }

    /// Connect timeout of the HTTP client this builder makes (not of one passed
    /// with [`http_client`](Self::http_client)). Default 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Upper bound of one attempt of any call to the service. Default 2 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The circuit breaker of remote validation.
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Use this HTTP client (its own pool, proxy and TLS settings). Request
    /// timeouts are still applied per call.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    pub fn build(self) -> Result<AuthClient, Error> {
        let url = reqwest::Url::parse(&self.base_url)
            .map_err(|e| Error::Config(format!("base URL {:?}: {e}", self.base_url)))?;
        match url.scheme() {
            "http" => {}
            // An app may enable TLS in reqwest itself and pass its own client.
            "https" if cfg!(feature = "rustls") || self.http.is_some() => {}
            "https" => {
                return Err(Error::Config(
                    "an https base URL needs the auth-client feature `rustls` \
                     (or an HTTP client with TLS passed to `http_client`)"
                        .into(),
                ))
            }
            other => return Err(Error::Config(format!("unsupported URL scheme {other:?}"))),
        }
        let base_url = self.base_url.trim_end_matches('/').to_owned();
        let http = match self.http {
            Some(http) => http,
            None => reqwest::Client::builder()
                .connect_timeout(self.connect_timeout)
                .user_agent(concat!("auth-client/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| Error::Config(format!("HTTP client: {e}")))?,
        };
        let keys = Arc::new(KeyCache::new(
            http.clone(),
            base_url.clone(),
            self.issuer,
            self.request_timeout,
            self.unknown_kid_interval,
        ));
        Ok(AuthClient {
            inner: Arc::new(Inner {
                http,
                base_url,
                audience: self.audience,
                mode: self.mode,
                leeway: self.leeway,
                request_timeout: self.request_timeout,
                retry: self.retry,
                keys,
                breaker: Breaker::new(self.breaker),
                fallbacks: AtomicU64::new(0),
            }),
        })
    }
}

/// A client of auth-service. Clone it freely: clones share the key cache, the
/// connection pool and the circuit breaker.
#[derive(Clone)]
pub struct AuthClient {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub http: reqwest::Client,
    pub base_url: String,
    audience: String,
    mode: ValidationMode,
    leeway: Duration,
    request_timeout: Duration,
    pub retry: RetryPolicy,
    keys: Arc<KeyCache>,
    breaker: Breaker,
    fallbacks: AtomicU64,
}

impl std::fmt::Debug for AuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthClient")
            .field("base_url", &self.inner.base_url)
            .field("mode", &self.inner.mode)
            .finish_non_exhaustive()
    }
}

/// Which calls may be retried after a failure that leaves it unknown whether the
/// service acted on the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idempotence {
    /// Reads: retry on any transport failure or 5xx.
    Idempotent,
    /// Login and refresh: retry only when the request surely was not acted on —
    /// the connection was never made, or the service answered 503.
    NotIdempotent,
}

impl AuthClient {
    /// A builder for a client of the service at `base_url` (how this app reaches
    /// it, e.g. `http://auth-service.auth-service.svc:8080`).
    pub fn builder(base_url: impl Into<String>) -> AuthClientBuilder {
        AuthClientBuilder {
            base_url: base_url.into(),
            audience: "auth-service".into(),
            issuer: None,
            mode: ValidationMode::default(),
            leeway: Duration::from_secs(5),
            unknown_kid_interval: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            retry: RetryPolicy::default(),
            breaker: BreakerConfig::default(),
            http: None,
        }
    }

    /// A client with the defaults (local validation).
    pub fn new(base_url: impl Into<String>) -> Result<Self, Error> {
        Self::builder(base_url).build()
    }

    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    pub fn mode(&self) -> ValidationMode {
        self.inner.mode
    }

    /// Validates `token` the configured way (see [`ValidationMode`]).
    pub async fn validate(&self, token: &str) -> Result<Claims, Error> {
        match self.inner.mode {
            ValidationMode::Local => self.validate_local(token).await,
            ValidationMode::Remote => self.validate_remote(token).await,
            ValidationMode::RemoteWithLocalFallback => match self.validate_remote(token).await {
                Err(e) if e.is_unavailable() => {
                    self.inner.fallbacks.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "remote validation unavailable; validating locally");
                    self.validate_local(token).await
                }
                other => other,
            },
        }
    }

    /// Verifies `token` against the service's published keys: signature with
    /// the algorithm of the key named by `kid` (never the one the token claims),
    /// `iss`, `aud`, `exp` and `nbf` (with the leeway), and the claims' shape.
    /// Does not see revocation (logout) before `exp`.
    pub async fn validate_local(&self, token: &str) -> Result<Claims, Error> {
        if token.is_empty() {
            return Err(Error::invalid(InvalidReason::Missing));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::invalid(InvalidReason::Malformed));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::invalid(InvalidReason::Malformed))?;
        // Explicitly typed (RFC 9068 §4): no other kind of JWT signed with the
        // service's keys passes for an access token. `JWT` is what releases of the
        // service before 2026-12 put there; see `LEGACY_TYPE_ISSUED_BEFORE`.
        let typed = match header.typ.as_deref() {
            Some(t)
                if t.eq_ignore_ascii_case("at+jwt")
                    || t.eq_ignore_ascii_case("application/at+jwt") =>
            {
                true
            }
            Some("JWT") => false,
            _ => return Err(Error::invalid(InvalidReason::WrongType)),
        };
        let kid = header.kid.ok_or(Error::invalid(InvalidReason::Malformed))?;
        let resolved = self.inner.keys.resolve(&kid).await?;
        if header.alg != resolved.key.algorithm {
            return Err(Error::invalid(InvalidReason::AlgorithmMismatch));
        }
        let mut validation = Validation::new(resolved.key.algorithm);
        validation.leeway = self.inner.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&*resolved.issuer]);
        validation.set_audience(&[&self.inner.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &resolved.key.key, &validation)
            .map(|data| data.claims)
            .map_err(|e| {
                Error::invalid(match e.kind() {
                    ErrorKind::InvalidSignature => InvalidReason::BadSignature,
                    ErrorKind::ExpiredSignature => InvalidReason::Expired,
                    ErrorKind::ImmatureSignature => InvalidReason::NotYetValid,
                    ErrorKind::InvalidIssuer => InvalidReason::WrongIssuer,
                    ErrorKind::InvalidAudience => InvalidReason::WrongAudience,
                    ErrorKind::InvalidAlgorithm => InvalidReason::AlgorithmMismatch,
                    _ => InvalidReason::Malformed,
                })
            })?;
        if !typed && claims.iat >= LEGACY_TYPE_ISSUED_BEFORE {
            return Err(Error::invalid(InvalidReason::WrongType));
        }
        Ok(claims)
    }

    /// Asks the service (`GET /v1/auth/validate`), which also checks that the
    /// session is alive. Retries connection failures and 5xx with jittered
    /// backoff (honouring `Retry-After` up to the policy's cap), each attempt
    /// within the request timeout and admitted by the circuit breaker. No
    /// fallback here; see [`ValidationMode::RemoteWithLocalFallback`].
    pub async fn validate_remote(&self, token: &str) -> Result<Claims, Error> {
        if token.is_empty() {
            return Err(Error::invalid(InvalidReason::Missing));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::invalid(InvalidReason::Malformed));
        }
        let url = format!("{}/v1/auth/validate", self.inner.base_url);
        let response = self
            .send(Some(&self.inner.breaker), Idempotence::Idempotent, || {
                self.inner
                    .http
                    .request(Method::GET, &url)
                    .bearer_auth(token)
            })
            .await?;
        match response.status() {
            StatusCode::OK => response
                .json::<Claims>()
                .await
                .map_err(|e| Error::Protocol(format!("validate answered unreadable claims: {e}"))),
            StatusCode::UNAUTHORIZED => Err(Error::invalid(InvalidReason::Rejected)),
            other => Err(Error::Protocol(format!("validate answered {other}"))),
        }
    }

    /// Fetches discovery and the JWKS now, so the first request does not wait for
    /// them. Failing is not fatal: the next validation tries again.
    pub async fn prefetch_keys(&self) -> Result<(), Error> {
        self.inner.keys.prefetch().await
    }

    /// The kids in the key cache, sorted.
    pub fn cached_kids(&self) -> Vec<String> {
        self.inner.keys.cached_kids()
    }

    /// The state of the remote-validation circuit breaker.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// How many validations fell back to local verification because the service
    /// could not answer.
    pub fn local_fallbacks(&self) -> u64 {
        self.inner.fallbacks.load(Ordering::Relaxed)
    }

    /// Sends the request that `build` makes, with the retry policy and, when
    /// given, the circuit breaker. Returns the first deliberate answer (any
    /// status but 5xx); a 5xx or transport failure that outlasts the retries
    /// becomes [`Error::Unavailable`].
    pub(crate) async fn send(
        &self,
        breaker: Option<&Breaker>,
        idempotence: Idempotence,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, Error> {
        let mut retry = 0;
        loop {
            if let Some(breaker) = breaker {
                if let Admission::Rejected { retry_in } = breaker.admit() {
                    return Err(Error::unavailable(
                        UnavailableReason::CircuitOpen,
                        Some(retry_in),
                    ));
                }
            }
            let (reason, retry_after, retryable) =
                match build().timeout(self.inner.request_timeout).send().await {
                    Ok(response) if !response.status().is_server_error() => {
                        if let Some(breaker) = breaker {
                            breaker.on_success();
                        }
                        return Ok(response);
                    }
                    Ok(response) => {
                        let status = response.status();
                        (
                            UnavailableReason::Status(status.as_u16()),
                            retry_after(&response),
                            idempotence == Idempotence::Idempotent
                                || status == StatusCode::SERVICE_UNAVAILABLE,
                        )
                    }
                    Err(e) => (
                        transport_reason(&e),
                        None,
                        idempotence == Idempotence::Idempotent || e.is_connect(),
                    ),
                };
            if let Some(breaker) = breaker {
                breaker.on_failure();
            }
            retry += 1;
            let delay = retryable
                .then(|| self.inner.retry.delay(retry, retry_after, fastrand::f64()))
                .flatten();
            match delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(Error::unavailable(reason, retry_after)),
            }
        }
    }
}

fn retry_after(response: &Response) -> Option<Duration> {
    response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
}

fn transport_reason(e: &reqwest::Error) -> UnavailableReason {
    if e.is_timeout() {
        UnavailableReason::Timeout
    } else {
        UnavailableReason::Connection
    }
}

/// A transport failure as an [`Error::Unavailable`].
pub(crate) fn transport_error(e: &reqwest::Error) -> Error {
    Error::unavailable(transport_reason(e), None)
}

/// A non-success answer to a plain GET (discovery, JWKS) as an error.
pub(crate) fn status_error(response: &Response, what: &str) -> Error {
    let status = response.status();
    if status.is_server_error() {
        Error::unavailable(
            UnavailableReason::Status(status.as_u16()),
            retry_after(response),
        )
    } else {
        Error::Protocol(format!("{what} answered {status}"))
    }
}
