//! The client against a fake service whose answers the tests script and whose
//! calls they count: what the real replicas (tests/it/client.rs in the service
//! crate) cannot show cheaply — how many fetches an unknown kid causes, that a
//! stale key set is served while the service is down, how many attempts a
//! retry policy makes, and that an open breaker stops calls.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::{
    AuthClient, AuthClientBuilder, BreakerConfig, BreakerState, Claims, Error, InvalidReason,
    RetryPolicy, UnavailableReason, ValidationMode,
};

/// RFC 8037's Ed25519 test key: the seed and the public key.
const SEED: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
const PUBLIC_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
const ISSUER: &str = "https://auth.example.com";

fn signing_key() -> EncodingKey {
    // PKCS#8 v1 wrapping of an Ed25519 seed.
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend(URL_SAFE_NO_PAD.decode(SEED).unwrap());
    EncodingKey::from_ed_der(&der)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(nbf: i64, exp: i64) -> Claims {
    Claims {
        iss: ISSUER.into(),
        aud: "auth-service".into(),
        sub: "00000000-0000-4000-8000-000000000001".into(),
        sid: "00000000-0000-4000-8000-000000000002".into(),
        jti: "00000000-0000-4000-8000-000000000003".into(),
        iat: nbf,
        nbf,
        exp,
        username: "alice".into(),
        roles: vec!["readers".into()],
        permissions: vec!["docs:read".into()],
    }
}

fn token_typed(typ: Option<&str>, kid: &str, claims: &Claims) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = typ.map(str::to_owned);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &signing_key()).unwrap()
}

fn token_with(kid: &str, claims: &Claims) -> String {
    token_typed(Some("at+jwt"), kid, claims)
}

fn token() -> String {
    token_with("k1", &claims(now(), now() + 600))
}

/// What the fake answers, and what it saw.
struct Shared {
    jwks_fetches: AtomicU64,
    validate_calls: AtomicU64,
    down: Mutex<bool>,
    cache_control: Mutex<&'static str>,
    /// Scripted answers of `/v1/auth/validate` (status, Retry-After); when empty,
    /// 200 with the claims.
    validate_script: Mutex<VecDeque<(u16, Option<&'static str>)>>,
}

struct Fake {
    url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn discovery() -> Json<Value> {
    // The public issuer, as behind an ingress: the client must rebase.
    Json(json!({"issuer": ISSUER, "jwks_uri": format!("{ISSUER}/.well-known/jwks.json")}))
}

async fn jwks(State(shared): State<Arc<Shared>>) -> Response {
    shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    // Fetches take a moment, so concurrent requests overlap with them; a sick
    // service takes longer still before it fails.
    let down = *shared.down.lock().unwrap();
    tokio::time::sleep(Duration::from_millis(if down { 300 } else { 50 })).await;
    if down {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let cache_control = *shared.cache_control.lock().unwrap();
    (
        [(header::CACHE_CONTROL, cache_control)],
        Json(json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": PUBLIC_X, "kid": "k1", "alg": "EdDSA", "use": "sig"}
        ]})),
    )
        .into_response()
}

async fn validate(State(shared): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    shared.validate_calls.fetch_add(1, Ordering::SeqCst);
    let scripted = shared.validate_script.lock().unwrap().pop_front();
    match scripted {
        Some((status, retry_after)) => {
            let mut response = StatusCode::from_u16(status).unwrap().into_response();
            if let Some(value) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, value.parse().unwrap());
            }
            response
        }
        None => {
            assert!(headers[header::AUTHORIZATION]
                .to_str()
                .unwrap()
                .starts_with("Bearer "));
            Json(claims(now(), now() + 600)).into_response()
        }
    }
}

async fn fake() -> Fake {
    let shared = Arc::new(Shared {
        jwks_fetches: AtomicU64::new(0),
        validate_calls: AtomicU64::new(0),
        down: Mutex::new(false),
        cache_control: Mutex::new("public, max-age=300"),
        validate_script: Mutex::new(VecDeque::new()),
    });
    let app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/v1/auth/validate", get(validate))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Fake { url, shared, task }
}

impl Fake {
    fn client(&self) -> AuthClientBuilder {
        AuthClient::builder(self.url.as_str())
    }

    fn fetches(&self) -> u64 {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    fn calls(&self) -> u64 {
        self.shared.validate_calls.load(Ordering::SeqCst)
    }

    fn script(&self, answers: &[(u16, Option<&'static str>)]) {
        *self.shared.validate_script.lock().unwrap() = answers.iter().copied().collect();
    }
}

#[tokio::test]
async fn local_validation_checks_time_claims_with_the_leeway() {
    let fake = fake().await;
    let client = fake
        .client()
        .leeway(Duration::from_secs(5))
        .build()
        .unwrap();
    let t = now();
    assert_eq!(
        client.validate_local(&token()).await.unwrap().username,
        "alice"
    );
    // Within the leeway either side.
    client
        .validate_local(&token_with("k1", &claims(t - 600, t - 2)))
        .await
        .unwrap();
    client
        .validate_local(&token_with("k1", &claims(t + 2, t + 600)))
        .await
        .unwrap();
    assert_eq!(
        client
            .validate_local(&token_with("k1", &claims(t - 600, t - 30)))
            .await,
        Err(Error::InvalidToken(InvalidReason::Expired))
    );
    assert_eq!(
        client
            .validate_local(&token_with("k1", &claims(t + 30, t + 600)))
            .await,
        Err(Error::InvalidToken(InvalidReason::NotYetValid))
    );
    assert_eq!(
        client.validate_local("").await,
        Err(Error::InvalidToken(InvalidReason::Missing))
    );
    assert_eq!(
        client.validate_local(&"a".repeat(10_000)).await,
        Err(Error::InvalidToken(InvalidReason::Malformed))
    );
    assert_eq!(fake.fetches(), 1);
}

#[tokio::test]
async fn only_access_tokens_pass_local_validation() {
    let fake = fake().await;
    let client = fake.client().build().unwrap();
    let t = now();
    let current = claims(t, t + 600);
    for typ in ["at+jwt", "application/at+jwt"] {
        assert!(client
            .validate_local(&token_typed(Some(typ), "k1", &current))
            .await
            .is_ok());
    }
    for typ in [Some("id+jwt"), Some("dpop+jwt"), None] {
        assert_eq!(
            client
                .validate_local(&token_typed(typ, "k1", &current))
                .await,
            Err(Error::InvalidToken(InvalidReason::WrongType)),
            "{typ:?}"
        );
    }
    // The service's releases before 2026-12 typed theirs `JWT`: accepted while
    // such tokens can still be alive, never when issued later.
    let legacy = Claims {
        iat: 1_798_761_599,
        ..current.clone()
    };
    assert!(client
        .validate_local(&token_typed(Some("JWT"), "k1", &legacy))
        .await
        .is_ok());
    let late = Claims {
        iat: 1_798_761_600,
        ..current
    };
    assert_eq!(
        client
            .validate_local(&token_typed(Some("JWT"), "k1", &late))
            .await,
        Err(Error::InvalidToken(InvalidReason::WrongType))
    );
}

#[tokio::test]
async fn the_first_fetch_is_shared_by_concurrent_requests() {
    let fake = fake().await;
    let client = fake.client().build().unwrap();
    let token = token();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (client, token) = (client.clone(), token.clone());
            tokio::spawn(async move { client.validate_local(&token).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(fake.fetches(), 1);
    assert_eq!(client.cached_kids(), vec!["k1".to_owned()]);
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let fake = fake().await;
    let client = fake
        .client()
        .unknown_kid_refetch_interval(Duration::from_millis(500))
        .build()
        .unwrap();
    client.validate_local(&token()).await.unwrap();
    assert_eq!(fake.fetches(), 1);
    let forged = token_with("k2", &claims(now(), now() + 600));
    let unknown = Err(Error::InvalidToken(InvalidReason::UnknownKey));
    assert_eq!(client.validate_local(&forged).await, unknown);
    assert_eq!(fake.fetches(), 2, "an unknown kid refetches once");
    for _ in 0..20 {
        assert_eq!(client.validate_local(&forged).await, unknown);
    }
    assert_eq!(fake.fetches(), 2, "...and not again within the interval");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(client.validate_local(&forged).await, unknown);
    assert_eq!(fake.fetches(), 3);
}

#[tokio::test]
async fn stale_keys_are_served_while_the_service_is_down() {
    let fake = fake().await;
    *fake.shared.cache_control.lock().unwrap() = "public, max-age=1";
    let client = fake.client().build().unwrap();
    let token = token();
    client.validate_local(&token).await.unwrap();
    *fake.shared.down.lock().unwrap() = true;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Stale: answered at once from the cache while a refetch runs (and fails).
    let started = Instant::now();
    for _ in 0..10 {
        client.validate_local(&token).await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "waited for the refetch"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.fetches(), 2, "one refetch, not one per request");
    // A failed refetch (it fails 300 ms after it starts) is retried a second
    // after it failed, not on every request.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.validate_local(&token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.fetches(), 2);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    client.validate_local(&token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.fetches(), 3);
    // With nothing cached, an outage is a 503, not a 401.
    let cold = fake.client().build().unwrap();
    assert!(matches!(
        cold.validate_local(&token).await,
        Err(Error::Unavailable {
            reason: UnavailableReason::NoKeys,
            ..
        })
    ));
}

#[tokio::test]
async fn remote_retries_are_bounded_and_honour_retry_after() {
    let fake = fake().await;
    let client = fake
        .client()
        .mode(ValidationMode::Remote)
        .retry(RetryPolicy {
            max_retries: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            max_retry_after: Duration::from_secs(2),
        })
        .breaker(BreakerConfig {
            failure_threshold: 100,
            open_for: Duration::from_secs(1),
        })
        .build()
        .unwrap();
    let token = token();

    // 503 + Retry-After: 1 is waited for, then the retry succeeds.
    fake.script(&[(503, Some("1"))]);
    let started = Instant::now();
    client.validate(&token).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(fake.calls(), 2);

    // A Retry-After beyond the cap is not waited for: the caller learns it at once.
    fake.script(&[(503, Some("30"))]);
    assert_eq!(
        client.validate(&token).await,
        Err(Error::Unavailable {
            reason: UnavailableReason::Status(503),
            retry_after: Some(Duration::from_secs(30)),
        })
    );
    assert_eq!(fake.calls(), 3);

    // Persistent 5xx: the first attempt and two retries.
    fake.script(&[(502, None), (500, None), (504, None), (200, None)]);
    assert_eq!(
        client.validate(&token).await,
        Err(Error::Unavailable {
            reason: UnavailableReason::Status(504),
            retry_after: None,
        })
    );
    assert_eq!(fake.calls(), 6);

    // A verdict is final.
    fake.script(&[(401, None)]);
    assert_eq!(
        client.validate(&token).await,
        Err(Error::InvalidToken(InvalidReason::Rejected))
    );
    assert_eq!(fake.calls(), 7);
}

#[tokio::test]
async fn an_open_breaker_stops_calls_and_falls_back_to_local_validation() {
    let fake = fake().await;
    let client = fake
        .client()
        .mode(ValidationMode::RemoteWithLocalFallback)
        .retry(RetryPolicy::none())
        .breaker(BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_millis(300),
        })
        .build()
        .unwrap();
    let token = token();
    fake.script(&[(503, None); 10]);
    for _ in 0..5 {
        client.validate(&token).await.unwrap();
    }
    assert_eq!(fake.calls(), 2, "calls stop once the breaker is open");
    assert_eq!(client.local_fallbacks(), 5);
    assert_eq!(client.breaker_state(), BreakerState::Open);
    // After the open period, one probe; it fails, so the breaker opens again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    client.validate(&token).await.unwrap();
    client.validate(&token).await.unwrap();
    assert_eq!(fake.calls(), 3);
    // The service recovers: the next probe closes the breaker.
    fake.script(&[]);
    tokio::time::sleep(Duration::from_millis(350)).await;
    client.validate(&token).await.unwrap();
    assert_eq!(client.breaker_state(), BreakerState::Closed);
    client.validate(&token).await.unwrap();
    assert_eq!(fake.calls(), 5);
    assert_eq!(client.local_fallbacks(), 7);
}
