//! Opaque refresh tokens: `rt1.<user id>.<session id>.<secret>`.
//!
//! The ids let any replica find the session in Redis without a global index (the
//! user id is the hash tag); the 256-bit secret is what proves possession, and only
//! its SHA-256 is stored. Comparing hashes of a high-entropy secret reveals nothing
//! useful through timing, and the comparison happens inside Redis anyway.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

const PREFIX: &str = "rt1";

/// A parsed refresh token.
pub struct RefreshToken {
    pub user_id: Uuid,
    pub session_id: Uuid,
    secret: SecretString,
}

impl RefreshToken {
    /// A new token for a session.
    pub fn generate(user_id: Uuid, session_id: Uuid) -> Result<Self, ring::error::Unspecified> {
        let mut bytes = [0u8; 32];
        SystemRandom::new().fill(&mut bytes)?;
        Ok(Self {
            user_id,
            session_id,
            secret: SecretString::from(URL_SAFE_NO_PAD.encode(bytes)),
        })
    }

    /// Parses the wire form; None for anything malformed.
    pub fn parse(token: &str) -> Option<Self> {
        if token.len() > 200 {
            return None;
        }
        let mut parts = token.split('.');
        let (prefix, user, session, secret) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if prefix != PREFIX || parts.next().is_some() {
            return None;
        }
        let decoded = URL_SAFE_NO_PAD.decode(secret).ok()?;
        if decoded.len() != 32 {
            return None;
        }
        Some(Self {
            user_id: Uuid::try_parse(user).ok()?,
            session_id: Uuid::try_parse(session).ok()?,
            secret: SecretString::from(secret.to_owned()),
        })
    }

    /// The wire form, to hand to the client once.
    pub fn to_wire(&self) -> SecretString {
        SecretString::from(format!(
            "{PREFIX}.{}.{}.{}",
            self.user_id.simple(),
            self.session_id.simple(),
            self.secret.expose_secret()
        ))
    }

    /// What is stored: hex SHA-256 of the secret.
    pub fn hash(&self) -> String {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            self.secret.expose_secret().as_bytes(),
        );
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hash_is_stable() {
        let t = RefreshToken::generate(Uuid::new_v4(), Uuid::new_v4()).unwrap();
        let wire = t.to_wire();
        let parsed = RefreshToken::parse(wire.expose_secret()).unwrap();
        assert_eq!(parsed.user_id, t.user_id);
        assert_eq!(parsed.session_id, t.session_id);
        assert_eq!(parsed.hash(), t.hash());
        assert_eq!(t.hash().len(), 64);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let t = RefreshToken::generate(Uuid::new_v4(), Uuid::new_v4()).unwrap();
        let wire = t.to_wire().expose_secret().to_owned();
        for bad in [
            "",
            "rt1",
            "rt1.a.b.c",
            &wire.replacen("rt1", "rt2", 1),
            &format!("{wire}.x"),
            &wire[..wire.len() - 2],
            &"a".repeat(500),
        ] {
            assert!(RefreshToken::parse(bad).is_none(), "{bad}");
        }
    }
}
