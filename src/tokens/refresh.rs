//! Opaque refresh tokens: `rt2.<user id>.<session id>.<secret and tag>`.
//!
//! The ids let any replica find the session in Redis without a global index (the
//! user id is the hash tag). The last part is 32 random bytes, which prove
//! possession (only their SHA-256 is stored), followed by an HMAC-SHA-256 tag
//! over the ids and those bytes, under a key derived from the key-encryption key
//! (so every replica has it, and the session store does not). The tag says "we
//! issued this token to this session": a presented token with a valid tag that is
//! not the session's current one was used before, however many rotations ago, and
//! revokes the session (reuse detection needs no history); a token without a
//! valid tag proves nothing and leaves the session alone, so knowing a session id
//! (it is in every access token) is not enough to end someone's session.
//!
//! Tokens of the previous format, `rt1.<ids>.<secret>`, carry no tag; they still
//! rotate, and their reuse is judged by a bounded history of used hashes.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ring::{
    hmac,
    rand::{SecureRandom, SystemRandom},
};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::config::KeyEncryptionKey;

const PREFIX: &str = "rt2";
const LEGACY_PREFIX: &str = "rt1";
const SECRET_LEN: usize = 32;
const TAG_LEN: usize = 32;

/// A parsed refresh token.
pub struct RefreshToken {
    pub user_id: Uuid,
    pub session_id: Uuid,
    /// The last part of the wire form, as sent.
    secret: SecretString,
    prefix: &'static str,
}

impl RefreshToken {
    /// The wire form, to hand to the client once.
    pub fn to_wire(&self) -> SecretString {
        SecretString::from(format!(
            "{}.{}.{}.{}",
            self.prefix,
            self.user_id.simple(),
            self.session_id.simple(),
            self.secret.expose_secret()
        ))
    }

    /// What is stored: hex SHA-256 of the last part. Comparing hashes of a
    /// high-entropy secret reveals nothing useful through timing, and the
    /// comparison happens inside the store anyway.
    pub fn hash(&self) -> String {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            self.secret.expose_secret().as_bytes(),
        );
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Makes and reads refresh tokens with the replicas' shared tag key.
pub struct RefreshTokens {
    tag_key: hmac::Key,
}

impl RefreshTokens {
    /// The tag key is derived from the key-encryption key, so it is the same on
    /// every replica without another secret to configure, and cannot be used to
    /// open the signing keys.
    pub fn new(kek: &KeyEncryptionKey) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, kek.expose());
        let derived = hmac::sign(&root, b"auth-service refresh-token tag v1");
        Self {
            tag_key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    fn tag_input(user_id: Uuid, session_id: Uuid, secret: &[u8]) -> Vec<u8> {
        let mut input = Vec::with_capacity(32 + secret.len());
        input.extend_from_slice(user_id.as_bytes());
        input.extend_from_slice(session_id.as_bytes());
        input.extend_from_slice(secret);
        input
    }

    /// A new token for a session.
    pub fn generate(
        &self,
        user_id: Uuid,
        session_id: Uuid,
    ) -> Result<RefreshToken, ring::error::Unspecified> {
        let mut bytes = [0u8; SECRET_LEN + TAG_LEN];
        SystemRandom::new().fill(&mut bytes[..SECRET_LEN])?;
        let tag = hmac::sign(
            &self.tag_key,
            &Self::tag_input(user_id, session_id, &bytes[..SECRET_LEN]),
        );
        bytes[SECRET_LEN..].copy_from_slice(tag.as_ref());
        Ok(RefreshToken {
            user_id,
            session_id,
            secret: SecretString::from(URL_SAFE_NO_PAD.encode(bytes)),
            prefix: PREFIX,
        })
    }

    /// Parses the wire form: the token, and whether it carries our valid tag (a
    /// token of the previous format has none). None for anything malformed, and
    /// for a tag that does not verify (a forgery is not worth a store lookup).
    pub fn parse(&self, token: &str) -> Option<(RefreshToken, bool)> {
        if token.len() > 200 {
            return None;
        }
        let mut parts = token.split('.');
        let (prefix, user, session, secret) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let user_id = Uuid::try_parse(user).ok()?;
        let session_id = Uuid::try_parse(session).ok()?;
        let decoded = URL_SAFE_NO_PAD.decode(secret).ok()?;
        let (prefix, authentic) = match prefix {
            PREFIX if decoded.len() == SECRET_LEN + TAG_LEN => {
                let (random, tag) = decoded.split_at(SECRET_LEN);
                // Constant time.
                hmac::verify(
                    &self.tag_key,
                    &Self::tag_input(user_id, session_id, random),
                    tag,
                )
                .ok()?;
                (PREFIX, true)
            }
            LEGACY_PREFIX if decoded.len() == SECRET_LEN => (LEGACY_PREFIX, false),
            _ => return None,
        };
        Some((
            RefreshToken {
                user_id,
                session_id,
                secret: SecretString::from(secret.to_owned()),
                prefix,
            },
            authentic,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> RefreshTokens {
        RefreshTokens::new(&KeyEncryptionKey::new([3; 32]))
    }

    #[test]
    fn round_trip_and_hash_is_stable() {
        let tokens = tokens();
        let t = tokens.generate(Uuid::new_v4(), Uuid::new_v4()).unwrap();
        let wire = t.to_wire();
        let (parsed, authentic) = tokens.parse(wire.expose_secret()).unwrap();
        assert!(authentic);
        assert_eq!(parsed.user_id, t.user_id);
        assert_eq!(parsed.session_id, t.session_id);
        assert_eq!(parsed.hash(), t.hash());
        assert_eq!(t.hash().len(), 64);
        assert_eq!(parsed.to_wire().expose_secret(), wire.expose_secret());
    }

    #[test]
    fn a_tag_binds_the_token_to_its_session_and_our_key() {
        let tokens = tokens();
        let t = tokens.generate(Uuid::new_v4(), Uuid::new_v4()).unwrap();
        let wire = t.to_wire().expose_secret().to_owned();
        // Another session's ids with this secret and tag.
        let moved = wire.replacen(
            &t.session_id.simple().to_string(),
            &Uuid::new_v4().simple().to_string(),
            1,
        );
        assert!(tokens.parse(&moved).is_none());
        // Another deployment's key.
        let other = RefreshTokens::new(&KeyEncryptionKey::new([4; 32]));
        assert!(other.parse(&wire).is_none());
        // A legacy token parses, without authenticity.
        let legacy = format!(
            "rt1.{}.{}.{}",
            t.user_id.simple(),
            t.session_id.simple(),
            URL_SAFE_NO_PAD.encode([9u8; 32])
        );
        let (_, authentic) = tokens.parse(&legacy).unwrap();
        assert!(!authentic);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let tokens = tokens();
        let t = tokens.generate(Uuid::new_v4(), Uuid::new_v4()).unwrap();
        let wire = t.to_wire().expose_secret().to_owned();
        let mut flipped = wire.clone().into_bytes();
        let last = flipped.len() - 3;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        for bad in [
            "",
            "rt2",
            "rt2.a.b.c",
            &wire.replacen("rt2", "rt3", 1),
            &wire.replacen("rt2", "rt1", 1),
            &format!("{wire}.x"),
            &wire[..wire.len() - 2],
            &String::from_utf8(flipped).unwrap(),
            &"a".repeat(500),
        ] {
            assert!(tokens.parse(bad).is_none(), "{bad}");
        }
    }
}
