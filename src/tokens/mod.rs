//! Access tokens (JWTs signed with the key ring) and refresh tokens.
//!
//! Verification pins the algorithm to the key named by `kid` — never the one the
//! token header claims — so `alg: none` and HMAC-with-the-public-key confusion
//! cannot pass; it checks `iss`, `aud`, `exp` and `nbf` with one second of leeway
//! for clock differences between replicas.

pub mod keys;
pub mod refresh;

use std::sync::Arc;

use chrono::Utc;
use jsonwebtoken::{Header, Validation};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use keys::KeyRing;

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
}

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
}

impl AccessTokens {
    pub fn new(keys: Arc<KeyRing>, issuer: String, audience: String) -> Self {
        Self {
            keys,
            issuer,
            audience,
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
        };
        let mut header = Header::new(key.algorithm);
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
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let kid = header.kid.ok_or(TokenError::Invalid)?;
        let set = self.keys.keys();
        let key = set.get(&kid).ok_or(TokenError::UnknownKey)?;
        if header.alg != key.algorithm {
            return Err(TokenError::Invalid);
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = 1;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|_| TokenError::Invalid)
    }
}
