//! Access tokens (JWTs signed with the key ring) and refresh tokens.
//!
//! Verification pins the algorithm to the key named by `kid` — never the one the
//! token header claims — so `alg: none` and HMAC-with-the-public-key confusion
//! cannot pass; it checks `iss`, `aud`, `exp` and `nbf` with one second of leeway
//! for clock differences between replicas, and the explicit type `at+jwt` (RFC
//! 9068, RFC 8725 §3.11), so no other kind of JWT signed with our keys can pass
//! for an access token. Tokens seen before are answered from
//! [`cache::VerifiedTokens`], which re-checks the time claims and the key.

pub mod cache;
pub mod keys;
pub mod refresh;

use std::sync::Arc;

use chrono::Utc;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use cache::VerifiedTokens;
use keys::{KeyRing, KeySet};

/// Seconds of clock difference between replicas tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 1;

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// User id.
    pub sub: String,
    /// Session id.
    pub sid: String,
    pub jti: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub username: String,
    pub roles: Vec<String>,
    pub permissions: Vec<String>,
    /// The user's authorization version when the token was minted: a change of
    /// roles, permissions, password or the disabled flag raises the user's
    /// version, and validation refuses tokens minted under an older one.
    /// Absent only in tokens minted before it existed (read as 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz_ver: Option<u64>,
}

impl Claims {
    pub fn user_id(&self) -> Option<Uuid> {
        Uuid::try_parse(&self.sub).ok()
    }

    pub fn session_id(&self) -> Option<Uuid> {
        Uuid::try_parse(&self.sid).ok()
    }

    pub fn has_permission(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }
}

/// What a token needs to say about its holder.
pub struct Subject<'a> {
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub username: &'a str,
    pub roles: &'a [String],
    pub permissions: &'a [String],
    /// See [`Claims::authz_ver`].
    pub authz_version: u64,
}

/// The JWT `typ` of access tokens (RFC 9068 §2.1).
pub const ACCESS_TOKEN_TYPE: &str = "at+jwt";

/// Tokens minted by releases before [`ACCESS_TOKEN_TYPE`] say `typ: JWT` and carry
/// no `authz_ver`. They are accepted while a rolling update may still have such
/// releases minting them (a 401 for a valid token is what the service exists to
/// avoid), and only if issued before this instant (2027-01-01T00:00:00Z, Unix s);
/// after it no such token can pass. Remove with the next release after that day.
const LEGACY_TYPE_ISSUED_BEFORE: i64 = 1_798_761_600;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Bad signature, unknown kid, wrong alg/iss/aud, expired, malformed...: the
    /// client learns only that the token is invalid.
    #[error("invalid token")]
    Invalid,
    /// The kid is not in our ring (yet): worth one reload.
    #[error("unknown signing key")]
    UnknownKey,
    #[error("no signing key is active")]
    NoSigningKey,
    #[error("signing failed")]
    Signing,
}

/// Issues and verifies access tokens with the replica's key ring.
pub struct AccessTokens {
    pub keys: Arc<KeyRing>,
    issuer: String,
    audience: String,
    /// The verification rules for each algorithm a key may have, built once: a
    /// `Validation` holds sets of strings, too dear to rebuild per request.
    validations: Vec<Validation>,
    verified: VerifiedTokens,
}

impl AccessTokens {
    pub fn new(keys: Arc<KeyRing>, issuer: String, audience: String) -> Self {
        let validations = [Algorithm::EdDSA, Algorithm::ES256]
            .into_iter()
            .map(|alg| validation(alg, &issuer, &audience))
            .collect();
        Self {
            keys,
            issuer,
            audience,
            validations,
            verified: VerifiedTokens::default(),
        }
    }

    /// Signs a token valid for `ttl_seconds`.
    pub fn issue(
        &self,
        subject: &Subject<'_>,
        ttl_seconds: u64,
    ) -> Result<(String, Claims), TokenError> {
        let set = self.keys.keys();
        let now = Utc::now();
        let key = set.signing_key(now).ok_or(TokenError::NoSigningKey)?;
        let iat = now.timestamp();
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: subject.user_id.to_string(),
            sid: subject.session_id.to_string(),
            jti: Uuid::new_v4().to_string(),
            iat,
            nbf: iat,
            exp: iat + i64::try_from(ttl_seconds).unwrap_or(i64::MAX / 2),
            username: subject.username.to_owned(),
            roles: subject.roles.to_vec(),
            permissions: subject.permissions.to_vec(),
            authz_ver: Some(subject.authz_version),
        };
        let mut header = Header::new(key.algorithm);
        header.typ = Some(ACCESS_TOKEN_TYPE.to_owned());
        header.kid = Some(key.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|_| TokenError::Signing)?;
        Ok((token, claims))
    }

    /// Verifies signature, algorithm, issuer, audience and time claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        // Tokens are a few hundred bytes; refuse megabyte inputs before parsing.
        if token.len() > 8192 {
            return Err(TokenError::Invalid);
        }
        let set = self.keys.keys();
        // A cached token whose key has left the ring is verified from scratch,
        // which says why it fails.
        if let Some(claims) = self.verified.get(token, |kid| set.get(kid).is_some()) {
            return if within_lifetime(&claims, jsonwebtoken::get_current_timestamp()) {
                Ok(Claims::clone(&claims))
            } else {
                Err(TokenError::Invalid)
            };
        }
        let (claims, kid) = self.verify_uncached(token, &set)?;
        let claims = Arc::new(claims);
        self.verified
            .insert(token, &kid, claims.clone(), Utc::now().timestamp());
        Ok(Arc::unwrap_or_clone(claims))
    }

    /// Full verification, without the cache: for tokens not seen before (and for
    /// benchmarks of that path). Returns the claims and the kid that signed them.
    pub fn verify_uncached(
        &self,
        token: &str,
        set: &KeySet,
    ) -> Result<(Claims, String), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let typed = match header.typ.as_deref() {
            Some(t)
                if t.eq_ignore_ascii_case(ACCESS_TOKEN_TYPE)
                    || t.eq_ignore_ascii_case("application/at+jwt") =>
            {
                true
            }
            Some("JWT") => false,
            _ => return Err(TokenError::Invalid),
        };
        let kid = header.kid.ok_or(TokenError::Invalid)?;
        let key = set.get(&kid).ok_or(TokenError::UnknownKey)?;
        if header.alg != key.algorithm {
            return Err(TokenError::Invalid);
        }
        // Keys are only ever of the algorithms built in `new`.
        let validation = self
            .validations
            .iter()
            .find(|v| v.algorithms == [key.algorithm])
            .ok_or(TokenError::Invalid)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, validation)
            .map_err(|_| TokenError::Invalid)?
            .claims;
        if !typed && (claims.authz_ver.is_some() || claims.iat >= LEGACY_TYPE_ISSUED_BEFORE) {
            return Err(TokenError::Invalid);
        }
        Ok((claims, kid))
    }
}

/// The rules for tokens signed with `algorithm`: only that algorithm, our issuer
/// and audience, the time claims with leeway, and the claims we rely on present.
fn validation(algorithm: Algorithm, issuer: &str, audience: &str) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY_SECONDS;
    validation.validate_nbf = true;
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    validation
}

/// The time checks of `jsonwebtoken`'s validation, repeated for a cached token:
/// rejected when `exp < now - leeway` or `nbf > now + leeway` (`now` in Unix s).
fn within_lifetime(claims: &Claims, now: u64) -> bool {
    match (u64::try_from(claims.exp), u64::try_from(claims.nbf)) {
        (Ok(exp), Ok(nbf)) => {
            exp >= now.saturating_sub(LEEWAY_SECONDS) && nbf <= now + LEEWAY_SECONDS
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyEncryptionKey;
    use keys::KeyTiming;

    fn tokens() -> AccessTokens {
        let ring = KeyRing::new(
            KeyEncryptionKey::new([5; 32]),
            Algorithm::EdDSA,
            KeyTiming {
                publish_lead: std::time::Duration::from_secs(60),
            },
        );
        ring.replace_for_tests(vec![
            ring.generated_key_for_tests(Utc::now() - chrono::Duration::minutes(1))
        ]);
        AccessTokens::new(Arc::new(ring), "https://issuer".into(), "aud".into())
    }

    fn issue(tokens: &AccessTokens) -> (String, Claims) {
        let roles = vec!["reader".to_owned()];
        let permissions = vec!["docs:read".to_owned()];
        tokens
            .issue(
                &Subject {
                    user_id: Uuid::new_v4(),
                    session_id: Uuid::new_v4(),
                    username: "alice",
                    roles: &roles,
                    permissions: &permissions,
                    authz_version: 0,
                },
                900,
            )
            .unwrap()
    }

    #[test]
    fn a_token_verifies_the_same_from_the_cache() {
        let tokens = tokens();
        let (token, claims) = issue(&tokens);
        assert_eq!(tokens.verify(&token).unwrap(), claims);
        assert_eq!(tokens.verified.len(), 1);
        assert_eq!(tokens.verify(&token).unwrap(), claims);
        // Tampering gives another string, which the cache does not know.
        let mut tampered = token.clone();
        tampered.insert(token.len() - 5, 'A');
        assert_eq!(tokens.verify(&tampered), Err(TokenError::Invalid));
        assert_eq!(tokens.verified.len(), 1);
    }

    #[test]
    fn a_cached_token_still_expires() {
        let tokens = tokens();
        let (token, claims) = issue(&tokens);
        assert!(tokens.verify(&token).is_ok());
        let now = Utc::now().timestamp();
        let kid = tokens.keys.keys().keys_for_tests()[0].clone();
        for (exp, nbf) in [(now - 5, now - 10), (now + 60, now + 30)] {
            let cached = Claims {
                exp,
                nbf,
                ..claims.clone()
            };
            tokens.verified.insert(&token, &kid, Arc::new(cached), now);
            assert_eq!(tokens.verify(&token), Err(TokenError::Invalid));
        }
    }

    #[test]
    fn a_cached_token_fails_once_its_key_is_gone() {
        let tokens = tokens();
        let (token, _) = issue(&tokens);
        assert!(tokens.verify(&token).is_ok());
        tokens.keys.replace_for_tests(vec![tokens
            .keys
            .generated_key_for_tests(Utc::now() - chrono::Duration::minutes(1))]);
        assert_eq!(tokens.verify(&token), Err(TokenError::UnknownKey));
        assert!(tokens.verified.is_empty());
    }

    #[test]
    fn lifetime_checks_match_the_verifier() {
        let claims = |exp, nbf| Claims {
            iss: String::new(),
            aud: String::new(),
            sub: String::new(),
            sid: String::new(),
            jti: String::new(),
            iat: 0,
            nbf,
            exp,
            username: String::new(),
            roles: Vec::new(),
            permissions: Vec::new(),
            authz_ver: None,
        };
        let now = 1_000;
        assert!(within_lifetime(&claims(1_000, 1_000), now));
        assert!(within_lifetime(&claims(999, 1_001), now)); // leeway both ways
        assert!(!within_lifetime(&claims(998, 900), now));
        assert!(!within_lifetime(&claims(2_000, 1_002), now));
        assert!(!within_lifetime(&claims(-1, 900), now));
    }

    #[test]
    fn only_typed_access_tokens_verify_save_the_previous_releases() {
        let tokens = tokens();
        let (_, mut claims) = issue(&tokens);
        let keys = tokens.keys.keys();
        let key = keys.signing_key(Utc::now()).unwrap();
        let sign = |typ: Option<&str>, claims: &Claims| {
            let mut header = Header::new(key.algorithm);
            header.typ = typ.map(str::to_owned);
            header.kid = Some(key.kid.clone());
            jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
        };
        assert!(tokens.verify(&sign(Some("at+jwt"), &claims)).is_ok());
        assert!(tokens
            .verify(&sign(Some("application/at+jwt"), &claims))
            .is_ok());
        for typ in [Some("id+jwt"), Some("JOSE"), None] {
            assert_eq!(
                tokens.verify(&sign(typ, &claims)),
                Err(TokenError::Invalid),
                "{typ:?}"
            );
        }
        // `JWT` with an authorization version: minted by this release, so not one
        // of the previous release's tokens.
        assert_eq!(
            tokens.verify(&sign(Some("JWT"), &claims)),
            Err(TokenError::Invalid)
        );
        // The previous release's shape: no version, issued before the cut-off.
        claims.authz_ver = None;
        claims.iat = LEGACY_TYPE_ISSUED_BEFORE - 1;
        assert!(tokens.verify(&sign(Some("JWT"), &claims)).is_ok());
        claims.iat = LEGACY_TYPE_ISSUED_BEFORE;
        assert_eq!(
            tokens.verify(&sign(Some("JWT"), &claims)),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn the_cache_stays_bounded() {
        let tokens = tokens();
        let (_, claims) = issue(&tokens);
        let claims = Arc::new(claims);
        let now = Utc::now().timestamp();
        for i in 0..10_000 {
            tokens
                .verified
                .insert(&format!("token-{i}"), "kid", claims.clone(), now);
        }
        assert!(tokens.verified.len() <= 4096);
    }
}
