//! Discovery and the JWKS cache: the public keys that local validation needs.
//!
//! - The issuer and `jwks_uri` come from `/.well-known/openid-configuration`
//!   (unless the issuer is configured, in which case the contract's JWKS path is
//!   used and discovery is skipped). Endpoint URLs under the issuer are rebased
//!   onto the client's base URL: the service advertises its *public* URL, while an
//!   app in the cluster reaches it at an internal one.
//! - The JWKS is cached for its `Cache-Control: max-age` (clamped to
//!   [`MIN_TTL`]..[`MAX_TTL`]). The service publishes a new key for longer than
//!   that before signing with it, so a cache that honours `max-age` knows every
//!   key before it is used.
//! - A token whose `kid` is unknown triggers a refetch anyway (a cache that is
//!   behind, a key the service was forced to add), but at most once per
//!   `unknown_kid_interval`, so forged kids cannot make the app hammer the service.
//! - When a refetch fails, the cached keys stay in use, however old: keys are
//!   public and only published keys are cached, so an outage of the service does
//!   not stop the app from verifying the tokens it already can.
//! - Fetches are single-flight: concurrent requests that need one wait for the
//!   same fetch. Requests that merely find the cache stale don't wait at all: they
//!   use the cached key while one background task refetches (stale while
//!   revalidate), so a service that hangs costs the app no latency.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    client::{status_error, transport_error},
    Error, InvalidReason, UnavailableReason,
};

/// A `max-age` below this is raised to it (the service says `max-age=0` when its
/// publish lead is very short, and refetching on every request would be absurd).
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// A `max-age` above this is lowered to it.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// The TTL when the JWKS response has no usable `Cache-Control`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// After a failed fetch, the next one waits at least this long.
const FAILED_FETCH_SPACING: Duration = Duration::from_secs(1);

/// The freshness lifetime a `Cache-Control` header grants: `Some(max-age)`,
/// `Some(0)` for `no-store`/`no-cache` or an unparsable `max-age` (RFC 9111 says
/// to treat it as stale), `None` when it says nothing about freshness.
pub fn cache_control_max_age(value: &str) -> Option<Duration> {
    let mut max_age = None;
    for directive in value.split(',') {
        let (name, arg) = match directive.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
            None => (directive.trim(), None),
        };
        if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
            return Some(Duration::ZERO);
        }
        if name.eq_ignore_ascii_case("max-age") && max_age.is_none() {
            max_age = Some(
                arg.and_then(|a| a.parse::<u64>().ok())
                    .map_or(Duration::ZERO, Duration::from_secs),
            );
        }
    }
    max_age
}

/// How long a JWKS response may be used before it is refetched.
pub fn jwks_ttl(cache_control: Option<&str>) -> Duration {
    cache_control
        .and_then(cache_control_max_age)
        .unwrap_or(DEFAULT_TTL)
        .clamp(MIN_TTL, MAX_TTL)
}

/// A public key and the one algorithm it verifies.
pub(crate) struct VerifyingKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

/// Parses one JWK. Only the key types the service issues are accepted — Ed25519
/// (`EdDSA`) and P-256 (`ES256`) — and the algorithm is taken from the key (its
/// `alg`, or the one its type implies), never from a token. Anything else (RSA,
/// symmetric `oct` keys, encryption keys) is skipped.
pub(crate) fn parse_jwk(jwk: &Value) -> Option<(String, VerifyingKey)> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    let kid = field("kid")?;
    if field("use").is_some_and(|u| u != "sig") {
        return None;
    }
    let (algorithm, key) = match (field("kty")?, field("crv")?) {
        ("OKP", "Ed25519") => (
            Algorithm::EdDSA,
            DecodingKey::from_ed_components(field("x")?).ok()?,
        ),
        ("EC", "P-256") => (
            Algorithm::ES256,
            DecodingKey::from_ec_components(field("x")?, field("y")?).ok()?,
        ),
        _ => return None,
    };
    let declared = match field("alg") {
        None => algorithm,
        Some("EdDSA") => Algorithm::EdDSA,
        Some("ES256") => Algorithm::ES256,
        Some(_) => return None,
    };
    if declared != algorithm {
        return None;
    }
    Some((kid.to_owned(), VerifyingKey { algorithm, key }))
}

/// `url` with a leading `issuer` replaced by `base` (see the module doc).
pub fn rebase(url: &str, issuer: &str, base: &str) -> String {
    let issuer = issuer.trim_end_matches('/');
    match url.strip_prefix(issuer) {
        Some(rest) if !issuer.is_empty() && (rest.is_empty() || rest.starts_with('/')) => {
            format!("{}{rest}", base.trim_end_matches('/'))
        }
        _ => url.to_owned(),
    }
}

/// Where the keys are and whose tokens they sign.
#[derive(Debug)]
struct Endpoints {
    issuer: Arc<str>,
    jwks_url: String,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// One fetched key set.
struct Snapshot {
    keys: HashMap<String, Arc<VerifyingKey>>,
    issuer: Arc<str>,
    fresh_until: Instant,
}

/// A key found for a token, with the issuer it signs for.
pub(crate) struct Resolved {
    pub key: Arc<VerifyingKey>,
    pub issuer: Arc<str>,
}

#[derive(Default)]
struct FetchState {
    /// When an unknown kid last caused a fetch.
    last_unknown_kid: Option<Instant>,
    /// No fetch before this (set after a failure).
    not_before: Option<Instant>,
}

impl FetchState {
    fn may_fetch(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }
}

/// Discovery plus the cached key set.
pub(crate) struct KeyCache {
    http: reqwest::Client,
    base_url: String,
    configured_issuer: Option<String>,
    timeout: Duration,
    unknown_kid_interval: Duration,
    endpoints: RwLock<Option<Arc<Endpoints>>>,
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    /// Held by whoever fetches; shared so a background refetch can own it.
    fetch: Arc<tokio::sync::Mutex<FetchState>>,
}

fn same(a: &Option<Arc<Snapshot>>, b: &Option<Arc<Snapshot>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl KeyCache {
    pub fn new(
        http: reqwest::Client,
        base_url: String,
        configured_issuer: Option<String>,
        timeout: Duration,
        unknown_kid_interval: Duration,
    ) -> Self {
        Self {
            http,
            base_url,
            configured_issuer,
            timeout,
            unknown_kid_interval,
            endpoints: RwLock::new(None),
            snapshot: RwLock::new(None),
            fetch: Arc::new(tokio::sync::Mutex::new(FetchState::default())),
        }
    }

    fn snapshot(&self) -> Option<Arc<Snapshot>> {
        match self.snapshot.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_snapshot(&self, snapshot: Arc<Snapshot>) {
        match self.snapshot.write() {
            Ok(mut g) => *g = Some(snapshot),
            Err(poisoned) => *poisoned.into_inner() = Some(snapshot),
        }
    }

    /// The kids currently cached (for diagnostics and tests).
    pub fn cached_kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self
            .snapshot()
            .map(|s| s.keys.keys().cloned().collect())
            .unwrap_or_default();
        kids.sort();
        kids
    }

    /// Fetches now (single-flight with any other fetch); for warming the cache
    /// at startup.
    pub async fn prefetch(&self) -> Result<(), Error> {
        let mut state = self.fetch.lock().await;
        self.fetch_locked(&mut state).await
    }

    /// The key for `kid`, fetching the key set when needed (see the module doc).
    pub async fn resolve(self: &Arc<Self>, kid: &str) -> Result<Resolved, Error> {
        let seen = self.snapshot();
        if let Some(snapshot) = &seen {
            if let Some(key) = snapshot.keys.get(kid) {
                if Instant::now() < snapshot.fresh_until {
                    return Ok(Resolved {
                        key: key.clone(),
                        issuer: snapshot.issuer.clone(),
                    });
                }
                self.refetch_in_background(snapshot);
                return Ok(Resolved {
                    key: key.clone(),
                    issuer: snapshot.issuer.clone(),
                });
            }
        }
        self.resolve_missing(&seen, kid).await
    }

    /// The cache is stale: start a refetch unless one is running or a recent one
    /// failed. Whatever happens to it, the cached keys stay in use.
    fn refetch_in_background(self: &Arc<Self>, snapshot: &Arc<Snapshot>) {
        let Ok(mut state) = self.fetch.clone().try_lock_owned() else {
            return; // someone is fetching already
        };
        let unchanged = same(&self.snapshot(), &Some(snapshot.clone()));
        if !unchanged || !state.may_fetch(Instant::now()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.fetch_locked(&mut state).await {
                tracing::warn!(error = %e, "JWKS refetch failed; still using the cached keys");
            }
        });
    }

    /// Nothing cached, or an unknown kid: only a fetch can answer, so wait for one.
    async fn resolve_missing(
        &self,
        seen: &Option<Arc<Snapshot>>,
        kid: &str,
    ) -> Result<Resolved, Error> {
        let mut state = self.fetch.lock().await;
        let now = Instant::now();
        let current = self.snapshot();
        if same(&current, seen) {
            match &current {
                None => {
                    if !state.may_fetch(now) {
                        let retry_after =
                            state.not_before.map(|t| t.saturating_duration_since(now));
                        return Err(Error::unavailable(UnavailableReason::NoKeys, retry_after));
                    }
                    self.fetch_locked(&mut state).await.map_err(|e| match e {
                        Error::Unavailable { retry_after, .. } => {
                            Error::unavailable(UnavailableReason::NoKeys, retry_after)
                        }
                        other => other,
                    })?;
                }
                Some(_) => {
                    let due = state.last_unknown_kid.is_none_or(|t| {
                        now.saturating_duration_since(t) >= self.unknown_kid_interval
                    });
                    if !due || !state.may_fetch(now) {
                        return Err(Error::invalid(InvalidReason::UnknownKey));
                    }
                    state.last_unknown_kid = Some(now);
                    self.fetch_locked(&mut state).await?;
                }
            }
        }
        // Either we fetched, or another request did while we waited: either way
        // the set is as fresh as it gets.
        let current = self.snapshot();
        match current.as_ref().and_then(|s| Some((s, s.keys.get(kid)?))) {
            Some((s, key)) => Ok(Resolved {
                key: key.clone(),
                issuer: s.issuer.clone(),
            }),
            None => Err(Error::invalid(InvalidReason::UnknownKey)),
        }
    }

    /// Fetches the key set (and discovery first, once); the caller holds the
    /// fetch lock. A failure spaces out the next attempt.
    async fn fetch_locked(&self, state: &mut FetchState) -> Result<(), Error> {
        match self.fetch_snapshot().await {
            Ok(snapshot) => {
                state.not_before = None;
                tracing::debug!(keys = snapshot.keys.len(), "JWKS fetched");
                self.set_snapshot(Arc::new(snapshot));
                Ok(())
            }
            Err(e) => {
                state.not_before = Some(Instant::now() + FAILED_FETCH_SPACING);
                Err(e)
            }
        }
    }

    async fn fetch_snapshot(&self) -> Result<Snapshot, Error> {
        let endpoints = self.endpoints().await?;
        let response = self
            .http
            .get(&endpoints.jwks_url)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| transport_error(&e))?;
        if !response.status().is_success() {
            return Err(status_error(&response, "JWKS"));
        }
        let ttl = jwks_ttl(
            response
                .headers()
                .get(reqwest::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok()),
        );
        let body: Value = response
            .json()
            .await
            .map_err(|e| Error::Protocol(format!("JWKS is not JSON: {e}")))?;
        let keys: HashMap<String, Arc<VerifyingKey>> = body
            .get("keys")
            .and_then(Value::as_array)
            .map(|keys| {
                keys.iter()
                    .filter_map(parse_jwk)
                    .map(|(kid, key)| (kid, Arc::new(key)))
                    .collect()
            })
            .unwrap_or_default();
        // An empty set would make every token unknown; keep what we have instead.
        if keys.is_empty() {
            return Err(Error::Protocol("the JWKS has no usable key".into()));
        }
        Ok(Snapshot {
            keys,
            issuer: endpoints.issuer.clone(),
            fresh_until: Instant::now() + ttl,
        })
    }

    async fn endpoints(&self) -> Result<Arc<Endpoints>, Error> {
        let cached = match self.endpoints.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if let Some(endpoints) = cached {
            return Ok(endpoints);
        }
        let endpoints = Arc::new(match &self.configured_issuer {
            Some(issuer) => Endpoints {
                issuer: issuer.as_str().into(),
                jwks_url: format!("{}/.well-known/jwks.json", self.base_url),
            },
            None => self.discover().await?,
        });
        match self.endpoints.write() {
            Ok(mut g) => *g = Some(endpoints.clone()),
            Err(poisoned) => *poisoned.into_inner() = Some(endpoints.clone()),
        }
        Ok(endpoints)
    }

    async fn discover(&self) -> Result<Endpoints, Error> {
        let response = self
            .http
            .get(format!(
                "{}/.well-known/openid-configuration",
                self.base_url
            ))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| transport_error(&e))?;
        if !response.status().is_success() {
            return Err(status_error(&response, "discovery"));
        }
        let doc: Discovery = response
            .json()
            .await
            .map_err(|e| Error::Protocol(format!("bad discovery document: {e}")))?;
        Ok(Endpoints {
            jwks_url: rebase(&doc.jwks_uri, &doc.issuer, &self.base_url),
            issuer: doc.issuer.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn cache_control_max_age_is_parsed() {
        let s = Duration::from_secs;
        assert_eq!(cache_control_max_age("public, max-age=120"), Some(s(120)));
        assert_eq!(cache_control_max_age("MAX-AGE=7"), Some(s(7)));
        assert_eq!(cache_control_max_age("max-age=\"30\", public"), Some(s(30)));
        assert_eq!(cache_control_max_age(" max-age = 5 "), Some(s(5)));
        // The first max-age wins; s-maxage is for shared caches, not us.
        assert_eq!(
            cache_control_max_age("s-maxage=900, max-age=60, max-age=1"),
            Some(s(60))
        );
        // Stale by definition.
        assert_eq!(cache_control_max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(
            cache_control_max_age("max-age=600, no-cache"),
            Some(Duration::ZERO)
        );
        assert_eq!(cache_control_max_age("max-age=soon"), Some(Duration::ZERO));
        assert_eq!(cache_control_max_age("max-age=-1"), Some(Duration::ZERO));
        // Says nothing about freshness.
        assert_eq!(cache_control_max_age("public"), None);
        assert_eq!(cache_control_max_age(""), None);
    }

    #[test]
    fn jwks_ttl_is_clamped_and_defaults() {
        assert_eq!(jwks_ttl(None), DEFAULT_TTL);
        assert_eq!(jwks_ttl(Some("public")), DEFAULT_TTL);
        assert_eq!(jwks_ttl(Some("public, max-age=0")), MIN_TTL);
        assert_eq!(jwks_ttl(Some("no-store")), MIN_TTL);
        assert_eq!(jwks_ttl(Some("max-age=120")), Duration::from_secs(120));
        assert_eq!(jwks_ttl(Some("max-age=31536000")), MAX_TTL);
    }

    #[test]
    fn only_signing_keys_of_our_two_types_are_accepted_with_their_own_alg() {
        // A real Ed25519 public key (x is 32 bytes) and a P-256 point.
        let x_ed = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
        let x_ec = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
        let y_ec = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
        let ed = json!({"kty": "OKP", "crv": "Ed25519", "x": x_ed, "kid": "a", "alg": "EdDSA", "use": "sig"});
        let (kid, key) = parse_jwk(&ed).unwrap();
        assert_eq!((kid.as_str(), key.algorithm), ("a", Algorithm::EdDSA));
        let ec = json!({"kty": "EC", "crv": "P-256", "x": x_ec, "y": y_ec, "kid": "b"});
        assert_eq!(
            parse_jwk(&ec).unwrap().1.algorithm,
            Algorithm::ES256,
            "alg implied by the type"
        );

        let rejected = [
            // alg contradicting the key type: the confusion we pin against.
            json!({"kty": "OKP", "crv": "Ed25519", "x": x_ed, "kid": "c", "alg": "ES256"}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": x_ed, "kid": "c", "alg": "HS256"}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": x_ed, "kid": "c", "alg": "none"}),
            // Symmetric keys never belong in a JWKS we verify with.
            json!({"kty": "oct", "k": "c2VjcmV0", "kid": "c", "alg": "HS256"}),
            json!({"kty": "EC", "crv": "P-384", "x": x_ec, "y": y_ec, "kid": "c"}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": x_ed, "kid": "c", "use": "enc"}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": x_ed}),
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "c"}),
            json!({"kty": "EC", "crv": "P-256", "x": x_ec, "kid": "c"}),
        ];
        for jwk in rejected {
            assert!(parse_jwk(&jwk).is_none(), "accepted {jwk}");
        }
    }

    #[test]
    fn endpoints_under_the_issuer_are_rebased_onto_the_base_url() {
        let base = "http://auth-service.auth:8080";
        assert_eq!(
            rebase(
                "https://auth.example.com/.well-known/jwks.json",
                "https://auth.example.com",
                base
            ),
            "http://auth-service.auth:8080/.well-known/jwks.json"
        );
        assert_eq!(
            rebase(
                "https://auth.example.com/.well-known/jwks.json",
                "https://auth.example.com/",
                base
            ),
            "http://auth-service.auth:8080/.well-known/jwks.json"
        );
        // Not under the issuer (a prefix that is not a path boundary, another host).
        assert_eq!(
            rebase(
                "https://auth.example.com.evil/jwks",
                "https://auth.example.com",
                base
            ),
            "https://auth.example.com.evil/jwks"
        );
        assert_eq!(
            rebase(
                "https://keys.example.com/jwks",
                "https://auth.example.com",
                base
            ),
            "https://keys.example.com/jwks"
        );
    }
}
