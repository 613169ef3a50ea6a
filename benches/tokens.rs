//! Micro-benchmarks of access tokens: signing, full verification, and
//! verification of a token seen before (answered by the cache of verified tokens).
//!
//!   cargo bench --bench tokens
//!
//! Keys come from an embedded (SQLite) database in a temporary directory, made the
//! way a replica makes them. `scripts/bench` measures the service as a whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use auth_service::{
    config::{Config, DatabaseConfig, KeyEncryptionKey},
    store::Database,
    tokens::{
        keys::{KeyRing, KeyTiming},
        AccessTokens, Subject,
    },
};
use jsonwebtoken::Algorithm;
use uuid::Uuid;

fn main() {
    divan::main();
}

const ALGORITHMS: &[&str] = &["EdDSA", "ES256"];

struct Fixture {
    tokens: AccessTokens,
    token: String,
    roles: Vec<String>,
    permissions: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(algorithm: &str) -> Self {
        let algorithm = match algorithm {
            "ES256" => Algorithm::ES256,
            _ => Algorithm::EdDSA,
        };
        let dir = tempfile::tempdir().unwrap();
        let config =
            Config::for_storage(DatabaseConfig::Embedded, None, dir.path().to_path_buf()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ring = Arc::new(KeyRing::new(
            KeyEncryptionKey::new([9; 32]),
            algorithm,
            KeyTiming {
                publish_lead: Duration::from_secs(360),
            },
        ));
        runtime.block_on(async {
            let db = Database::connect_lazy(&config).unwrap();
            db.migrate().await.unwrap();
            ring.maintain(
                &db,
                Duration::from_secs(30 * 86_400),
                Duration::from_secs(900),
                false,
            )
            .await
            .unwrap();
            db.close().await;
        });
        let tokens = AccessTokens::new(ring, "http://localhost:8080".into(), "auth-service".into());
        let mut fixture = Self {
            tokens,
            token: String::new(),
            roles: vec!["reader".into(), "editor".into()],
            permissions: vec![
                "docs:read".into(),
                "docs:write".into(),
                "docs:comment".into(),
            ],
            _dir: dir,
        };
        fixture.token = fixture.issue();
        fixture
    }

    fn issue(&self) -> String {
        self.tokens
            .issue(
                &Subject {
                    user_id: Uuid::new_v4(),
                    session_id: Uuid::new_v4(),
                    username: "alice@example.com",
                    roles: &self.roles,
                    permissions: &self.permissions,
                    authz_version: 0,
                },
                900,
            )
            .unwrap()
            .0
    }
}

/// Signing a new access token (login, refresh).
#[divan::bench(args = ALGORITHMS)]
fn sign(bencher: divan::Bencher, algorithm: &str) {
    let fixture = Fixture::new(algorithm);
    bencher.bench(|| fixture.issue());
}

/// Full verification: header, key, signature, claims and their checks.
#[divan::bench(args = ALGORITHMS)]
fn verify_new_token(bencher: divan::Bencher, algorithm: &str) {
    let fixture = Fixture::new(algorithm);
    let keys = fixture.tokens.keys.keys();
    bencher.bench(|| {
        fixture
            .tokens
            .verify_uncached(divan::black_box(&fixture.token), &keys)
            .unwrap()
    });
}

/// A token verified before: the cache's lookup, time and key checks, and a copy
/// of the claims.
#[divan::bench(args = ALGORITHMS)]
fn verify_seen_token(bencher: divan::Bencher, algorithm: &str) {
    let fixture = Fixture::new(algorithm);
    fixture.tokens.verify(&fixture.token).unwrap();
    bencher.bench(|| {
        fixture
            .tokens
            .verify(divan::black_box(&fixture.token))
            .unwrap()
    });
}
