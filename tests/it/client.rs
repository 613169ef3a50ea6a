//! The `auth-client` crate against three real replicas: local and remote
//! validation agree, revocation is seen remotely at once and locally at expiry,
//! the circuit breaker opens when every replica is gone and closes when they
//! return, a key rotation costs no request, and concurrent refreshes from one
//! client never trip reuse detection.
//!
//! The client reaches the replicas through [`Balancer`], a TCP round-robin that
//! stands in for a Kubernetes Service: one stable address whose backends come
//! and go. Replicas restarted after an outage get new OS-chosen ports, so the
//! balancer is repointed, exactly as a Service's endpoints would be; the client
//! keeps its one base URL throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use auth_client::{
    check_permission, require_permission, AuthClient, AuthClientBuilder, AuthLayer, AuthRejection,
    AuthUser, BreakerConfig, BreakerState, Error, InvalidReason, RetryPolicy, Session,
    UnavailableReason, ValidationMode,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use crate::kit::{self, TestApp};

/// A TCP round-robin balancer (see the module doc). With no backend it accepts
/// connections and closes them at once, like a load balancer with no healthy
/// endpoint.
struct Balancer {
    url: String,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(apps: &[TestApp]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let backends = Arc::new(Mutex::new(Vec::new()));
        let shared = backends.clone();
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let backend = {
                    let list = shared.lock().unwrap();
                    next = next.wrapping_add(1);
                    (!list.is_empty()).then(|| list[next % list.len()])
                };
                tokio::spawn(async move {
                    let Some(backend) = backend else { return };
                    let connect = TcpStream::connect(backend);
                    if let Ok(Ok(mut outbound)) =
                        tokio::time::timeout(Duration::from_secs(1), connect).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        let balancer = Self {
            url,
            backends,
            task,
        };
        balancer.point_at(apps);
        balancer
    }

    fn point_at(&self, apps: &[TestApp]) {
        *self.backends.lock().unwrap() = apps.iter().map(|a| a.addr).collect();
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Three replicas on a fresh database, behind a balancer.
async fn cluster(
    configure: impl Fn(&mut auth_service::config::Config) + Copy,
) -> (Vec<TestApp>, Balancer, String) {
    let db = kit::fresh_database().await;
    let apps = kit::replicas(3, || {
        let mut c = kit::postgres_config(&db);
        configure(&mut c);
        c
    })
    .await;
    let balancer = Balancer::start(&apps).await;
    (apps, balancer, db)
}

/// A client of the balancer. It opens a connection per request (no pool), so
/// consecutive calls land on different replicas.
fn client(balancer: &Balancer, mode: ValidationMode) -> AuthClientBuilder {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    AuthClient::builder(balancer.url.as_str())
        .mode(mode)
        .http_client(http)
}

/// Sets `access_token_ttl_seconds` through the admin API and makes every
/// replica apply it now (they would within 5 s anyway).
async fn set_access_ttl(apps: &[TestApp], seconds: u64) {
    let admin = kit::admin_token(&apps[0]).await;
    let r = apps[0]
        .put("/v1/admin/config/access_token_ttl_seconds")
        .bearer_auth(&admin)
        .json(&json!({ "value": seconds }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for app in apps {
        app.state.runtime.refresh(&app.state.db).await.unwrap();
    }
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn stop_all(apps: Vec<TestApp>) {
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test]
async fn local_and_remote_validation_agree() {
    let (apps, balancer, _db) = cluster(|_| {}).await;
    let role = kit::username("editors");
    kit::create_role(&apps[0], &role, &["docs:read", "docs:write"]).await;
    let user = kit::create_user(&apps[0], &[&role]).await;
    let client = client(&balancer, ValidationMode::Remote).build().unwrap();
    let session = Session::login(&client, &user, kit::PASSWORD).await.unwrap();
    let token = session.access_token().await.unwrap();

    // The same claims whichever way, whichever replica answers.
    let local = client.validate_local(&token).await.unwrap();
    for _ in 0..6 {
        assert_eq!(client.validate_remote(&token).await.unwrap(), local);
    }
    assert_eq!(local.username, user);
    assert_eq!(local.sid, session.session_id());
    assert_eq!(local.roles, vec![role.clone()]);
    assert_eq!(local.aud, "auth-service");
    assert!(local.exp > local.iat && local.nbf <= local.iat);
    check_permission(&local, "docs:write").unwrap();
    assert_eq!(
        check_permission(&local, "auth:admin"),
        Err(Error::Forbidden("auth:admin".into()))
    );

    // Refused the same way too.
    let jwks: Value = apps[0]
        .get("/.well-known/jwks.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kid = kid_of(&token);
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap();
    let public_key = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["permissions"] = json!(["auth:admin"]);
    let hmac_header = jsonwebtoken::Header {
        kid: Some(kid.clone()),
        ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
    };
    let forgeries = [
        ("garbage", "not-a-jwt".to_owned(), InvalidReason::Malformed),
        (
            "tampered payload",
            format!("{}.{}.{}", parts[0], b64(&payload), parts[2]),
            InvalidReason::BadSignature,
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT", "kid": kid})),
                parts[1]
            ),
            InvalidReason::Malformed,
        ),
        (
            "HMAC keyed with the public key",
            jsonwebtoken::encode(
                &hmac_header,
                &payload,
                &jsonwebtoken::EncodingKey::from_secret(&public_key),
            )
            .unwrap(),
            InvalidReason::AlgorithmMismatch,
        ),
        (
            "unknown kid",
            format!(
                "{}.{}.{}",
                b64(&json!({"alg": "EdDSA", "typ": "JWT", "kid": "no-such-key"})),
                parts[1],
                parts[2]
            ),
            InvalidReason::UnknownKey,
        ),
    ];
    for (what, forged, reason) in &forgeries {
        assert_eq!(
            client.validate_local(forged).await,
            Err(Error::InvalidToken(*reason)),
            "{what}, locally"
        );
        assert_eq!(
            client.validate_remote(forged).await,
            Err(Error::InvalidToken(InvalidReason::Rejected)),
            "{what}, remotely"
        );
    }
    let other_audience = AuthClient::builder(balancer.url.as_str())
        .audience("another-service")
        .build()
        .unwrap();
    assert_eq!(
        other_audience.validate_local(&token).await,
        Err(Error::InvalidToken(InvalidReason::WrongAudience))
    );
    let other_issuer = AuthClient::builder(balancer.url.as_str())
        .issuer("https://impostor.example")
        .build()
        .unwrap();
    assert_eq!(
        other_issuer.validate_local(&token).await,
        Err(Error::InvalidToken(InvalidReason::WrongIssuer))
    );

    // The layer and the extractor in front of a small app.
    let app = axum::Router::new()
        .route(
            "/me",
            axum::routing::get(|user: AuthUser| async move { user.username.clone() }),
        )
        .route(
            "/write",
            axum::routing::get(|user: AuthUser| async move { user.username.clone() })
                .route_layer(require_permission("docs:write")),
        )
        .route(
            "/admin",
            axum::routing::get(|user: AuthUser| async move {
                user.require_permission("auth:admin")?;
                Ok::<_, AuthRejection>("admin")
            }),
        )
        .route(
            "/delete",
            axum::routing::get(|| async { "deleted" })
                .route_layer(require_permission("docs:delete")),
        )
        .layer(AuthLayer::new(client.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut request = http.get(format!("{app_url}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    for token in [None, Some("not-a-jwt"), Some(forgeries[3].1.as_str())] {
        let r = get("/me", token).await.unwrap();
        assert_eq!(r.status(), 401, "{token:?}");
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_token");
    }
    for path in ["/me", "/write"] {
        let r = get(path, Some(&token)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), user);
    }
    for path in ["/admin", "/delete"] {
        let r = get(path, Some(&token)).await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer error=\"insufficient_scope\""
        );
    }
    // The app sees a logout at once: its client validates remotely.
    session.logout().await.unwrap();
    assert_eq!(get("/me", Some(&token)).await.unwrap().status(), 401);

    server.abort();
    stop_all(apps).await;
}

#[tokio::test]
async fn revocation_is_seen_remotely_at_once_and_locally_at_expiry() {
    // ES256 here (EdDSA, the default, everywhere else): both verify locally.
    let (apps, balancer, _db) =
        cluster(|c| c.signing_algorithm = jsonwebtoken::Algorithm::ES256).await;
    set_access_ttl(&apps, 4).await;
    let user = kit::create_user(&apps[0], &[]).await;
    let leeway = Duration::from_secs(1);
    let client = client(&balancer, ValidationMode::RemoteWithLocalFallback)
        .leeway(leeway)
        .build()
        .unwrap();
    let session = Session::login(&client, &user, kit::PASSWORD).await.unwrap();
    let token = session.access_token().await.unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(&token).unwrap().alg,
        jsonwebtoken::Algorithm::ES256
    );
    let claims = client.validate_local(&token).await.unwrap();
    assert_eq!(claims.exp - claims.iat, 4);
    assert_eq!(client.validate(&token).await.unwrap(), claims);

    session.logout().await.unwrap();
    // Remotely: refused at once, on every replica, and a refusal is a verdict,
    // not an outage, so the fallback mode does not fall back.
    for _ in 0..3 {
        assert_eq!(
            client.validate(&token).await,
            Err(Error::InvalidToken(InvalidReason::Rejected))
        );
    }
    assert_eq!(client.local_fallbacks(), 0);
    // Locally: still valid, the signature says nothing of sessions...
    assert!(
        unix_now() < claims.exp as f64,
        "the test was too slow to see the token before its expiry"
    );
    assert_eq!(client.validate_local(&token).await.unwrap(), claims);
    // ...until it expires (plus the leeway).
    let refused_at = loop {
        match client.validate_local(&token).await {
            Ok(_) => {
                assert!(
                    unix_now() < (claims.exp + 4) as f64,
                    "an expired token still validates locally"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                assert_eq!(e, Error::InvalidToken(InvalidReason::Expired));
                break unix_now();
            }
        }
    };
    assert!(
        refused_at >= claims.exp as f64,
        "refused before exp: {refused_at} < {}",
        claims.exp
    );
    assert!(
        refused_at <= (claims.exp as f64) + leeway.as_secs_f64() + 2.0,
        "refused too late: {refused_at}, exp {}",
        claims.exp
    );
    stop_all(apps).await;
}

#[tokio::test]
async fn breaker_opens_when_every_replica_stops_and_closes_when_they_return() {
    // A publish lead of 3 s makes the JWKS max-age 1 s, so the key cache goes
    // stale during the outage and must keep serving the keys it has.
    let (apps, balancer, db) = cluster(|c| c.key_publish_lead = Duration::from_secs(3)).await;
    let user = kit::create_user(&apps[0], &[]).await;
    let client = client(&balancer, ValidationMode::RemoteWithLocalFallback)
        .breaker(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(1),
        })
        .retry(RetryPolicy {
            max_retries: 1,
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let session = Session::login(&client, &user, kit::PASSWORD).await.unwrap();
    let token = session.access_token().await.unwrap();
    let claims = client.validate(&token).await.unwrap();
    client.validate_local(&token).await.unwrap();
    assert_eq!(client.breaker_state(), BreakerState::Closed);
    assert_eq!(client.local_fallbacks(), 0);

    // Every replica goes away at once.
    balancer.point_at(&[]);
    stop_all(apps).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Validation keeps answering from the cached (now stale) keys, while the
    // failed remote calls open the breaker.
    for _ in 0..4 {
        assert_eq!(client.validate(&token).await.unwrap(), claims);
    }
    assert_eq!(client.breaker_state(), BreakerState::Open);
    assert_eq!(client.local_fallbacks(), 4);
    assert_eq!(client.validate_local(&token).await.unwrap(), claims);
    // Open: remote validation answers at once, without calling.
    let started = Instant::now();
    match client.validate_remote(&token).await {
        Err(Error::Unavailable {
            reason: UnavailableReason::CircuitOpen,
            retry_after: Some(wait),
        }) => assert!(wait <= Duration::from_secs(1)),
        other => panic!("expected an open circuit, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(100));

    // New replicas (new addresses, the same database and Redis) come up.
    let apps = kit::replicas(3, || {
        let mut c = kit::postgres_config(&db);
        c.key_publish_lead = Duration::from_secs(3);
        c
    })
    .await;
    balancer.point_at(&apps);
    // Once the open period is over, a probe goes through and closes the breaker;
    // the session, kept in Redis, survived the outage.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.validate_remote(&token).await {
            Ok(c) => {
                assert_eq!(c, claims);
                break;
            }
            Err(e) => {
                assert!(e.is_unavailable(), "{e:?}");
                assert!(Instant::now() < deadline, "the breaker never closed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(client.breaker_state(), BreakerState::Closed);
    let fallbacks = client.local_fallbacks();
    for _ in 0..3 {
        assert_eq!(client.validate(&token).await.unwrap(), claims);
    }
    assert_eq!(
        client.local_fallbacks(),
        fallbacks,
        "no fallback once closed"
    );
    stop_all(apps).await;
}

#[tokio::test]
async fn a_key_rotation_is_picked_up_without_a_failed_request() {
    // The JWKS max-age is a third of the publish lead: 1 s here.
    let (apps, balancer, _db) = cluster(|c| c.key_publish_lead = Duration::from_secs(3)).await;
    let user = kit::create_user(&apps[0], &[]).await;
    let client = client(&balancer, ValidationMode::Local).build().unwrap();
    let session = Session::login(&client, &user, kit::PASSWORD).await.unwrap();
    let old_token = session.access_token().await.unwrap();
    let old_kid = kid_of(&old_token);
    client.validate(&old_token).await.unwrap();
    assert!(client.cached_kids().contains(&old_kid));

    let added = auth_service::app::maintain_keys(&apps[0].state, true)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(added, old_kid);
    // Through the publish lead and past it: fresh tokens from every replica and
    // the old one all validate locally, every time.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut new_tokens = 0;
    while Instant::now() < deadline {
        let token = session.refresh().await.unwrap();
        if kid_of(&token) == added {
            if new_tokens == 0 {
                // Known before its first use: the cache honoured max-age and the
                // service published the key early enough.
                assert!(
                    client.cached_kids().contains(&added),
                    "the new key was first met in a token"
                );
            }
            new_tokens += 1;
        }
        client
            .validate(&token)
            .await
            .expect("validation failed during rotation");
        client
            .validate(&old_token)
            .await
            .expect("old-key token refused during rotation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(new_tokens > 3, "the new key never signed");
    let kids = client.cached_kids();
    assert!(kids.contains(&old_kid) && kids.contains(&added), "{kids:?}");
    stop_all(apps).await;
}

#[tokio::test]
async fn concurrent_refreshes_from_one_client_never_revoke_the_session() {
    let (apps, balancer, _db) = cluster(|_| {}).await;
    set_access_ttl(&apps, 2).await;
    let user = kit::create_user(&apps[0], &[]).await;
    let client = client(&balancer, ValidationMode::Remote).build().unwrap();
    let session = Arc::new(
        Session::login(&client, &user, kit::PASSWORD)
            .await
            .unwrap()
            .refresh_before(Duration::from_secs(1)),
    );

    // Sixteen tasks see the same token refused at once: one refresh, not sixteen
    // (sixteen would present one refresh token sixteen times: reuse).
    let stale = session.access_token().await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (session, stale) = (session.clone(), stale.clone());
            tokio::spawn(async move { session.refresh_if_current(&stale).await })
        })
        .collect();
    let mut fresh = Vec::new();
    for task in tasks {
        fresh.push(task.await.unwrap().unwrap());
    }
    assert!(fresh.iter().all(|t| *t == fresh[0] && *t != stale));
    assert_eq!(session.refreshes(), 1);

    // Eight tasks use the session for 5 s, more than two token lifetimes: it is
    // refreshed ahead of expiry, one refresh at a time, and every token they get
    // validates on the service.
    let deadline = Instant::now() + Duration::from_secs(5);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (session, client) = (session.clone(), client.clone());
            tokio::spawn(async move {
                let mut calls = 0;
                while Instant::now() < deadline {
                    let token = session.access_token().await.unwrap();
                    client.validate_remote(&token).await.unwrap();
                    calls += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                calls
            })
        })
        .collect();
    let mut calls = 0;
    for task in tasks {
        calls += task.await.unwrap();
    }
    let refreshes = session.refreshes();
    assert!(
        (3..=12).contains(&refreshes),
        "{refreshes} refreshes for {calls} calls"
    );

    for app in &apps {
        assert_eq!(app.state.metrics.refresh_reuse.get(), 0, "reuse detected");
    }
    let token = session.access_token().await.unwrap();
    assert_eq!(
        client.validate_remote(&token).await.unwrap().sid,
        session.session_id()
    );
    stop_all(apps).await;
}
