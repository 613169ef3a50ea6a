//! Signing keys: generation, encryption at rest, rotation and the in-memory ring.
//!
//! Keys live in the database (private halves sealed with AES-256-GCM under the
//! key-encryption key, the kid as associated data) and every replica keeps them in
//! memory, so validation never touches the database. A rotation inserts a key that
//! only starts signing after the *publish lead*: by then every replica has loaded
//! it and every JWKS cache has seen it, so no verifier meets an unknown kid. A
//! retired key stays published until the tokens it signed have expired. Exactly one
//! replica wins each rotation: inserts are conditional on the newest key, under a
//! lock (see `IdentityStore::add_signing_key`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN},
    rand::{SecureRandom, SystemRandom},
    signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use serde_json::{json, Value};

use crate::{
    config::KeyEncryptionKey,
    store::{Database, IdentityStore, StoreError, StoredKey},
};

/// Errors of key handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cryptography failed: {0}")]
    Crypto(&'static str),
    #[error("stored key {kid} cannot be used: {reason}")]
    Unusable { kid: String, reason: &'static str },
}

/// A key loaded into memory.
pub struct LoadedKey {
    pub kid: String,
    pub algorithm: Algorithm,
    pub decoding: DecodingKey,
    pub encoding: EncodingKey,
    pub jwk: Value,
    pub created_at: DateTime<Utc>,
    pub activates_at: DateTime<Utc>,
}

/// The keys a replica holds, oldest activation first.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<Arc<LoadedKey>>,
    by_kid: HashMap<String, Arc<LoadedKey>>,
}

impl KeySet {
    /// The key that signs now: the newest one already active. When none is (the
    /// wall clock stepped back after the first key was made, or replicas' clocks
    /// disagree about a key another one just created), the earliest: it is
    /// published, and refusing every login over a clock step would be worse.
    pub fn signing_key(&self, now: DateTime<Utc>) -> Option<&Arc<LoadedKey>> {
        self.keys
            .iter()
            .rev()
            .find(|k| k.activates_at <= now)
            .or_else(|| self.keys.first())
    }

    pub fn get(&self, kid: &str) -> Option<&Arc<LoadedKey>> {
        self.by_kid.get(kid)
    }

    /// The JWKS document: every key we hold, pending and retired ones included.
    pub fn jwks(&self) -> Value {
        json!({ "keys": self.keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    #[cfg(test)]
    pub(crate) fn keys_for_tests(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Timing of the key lifecycle.
#[derive(Debug, Clone, Copy)]
pub struct KeyTiming {
    /// How long a new key is published before it signs.
    pub publish_lead: Duration,
}

impl KeyTiming {
    /// JWKS `max-age`: well inside the publish lead, so a cached JWKS that lacks a
    /// new key expires before the key signs anything.
    pub fn jwks_max_age(&self) -> Duration {
        (self.publish_lead / 3).min(Duration::from_secs(300))
    }

    /// How often each replica reloads keys from the database.
    pub fn reload_interval(&self) -> Duration {
        (self.publish_lead / 3).min(Duration::from_secs(30))
    }
}

/// The in-memory key ring of one replica.
pub struct KeyRing {
    current: RwLock<Arc<KeySet>>,
    kek: KeyEncryptionKey,
    algorithm: Algorithm,
    pub timing: KeyTiming,
    /// When an unknown kid last triggered a reload (at most one per few seconds).
    last_miss_reload: Mutex<Option<Instant>>,
}

/// Minimum spacing of reloads triggered by unknown kids.
const MISS_RELOAD_SPACING: Duration = Duration::from_secs(3);

impl KeyRing {
    pub fn new(kek: KeyEncryptionKey, algorithm: Algorithm, timing: KeyTiming) -> Self {
        Self {
            current: RwLock::new(Arc::new(KeySet::default())),
            kek,
            algorithm,
            timing,
            last_miss_reload: Mutex::new(None),
        }
    }

    pub fn keys(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Loads every stored key; a key that cannot be decrypted is skipped (logged)
    /// so one bad row cannot stop validation of tokens signed by the others.
    pub async fn reload(&self, db: &Database) -> Result<usize, KeyError> {
        let stored = db.signing_keys().await?;
        let mut set = KeySet::default();
        for key in &stored {
            match self.load(key) {
                Ok(loaded) => {
                    let loaded = Arc::new(loaded);
                    set.by_kid.insert(loaded.kid.clone(), loaded.clone());
                    set.keys.push(loaded);
                }
                Err(e) => tracing::error!(kid = %key.kid, error = %e, "skipping signing key"),
            }
        }
        let n = set.keys.len();
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(set),
            Err(p) => *p.into_inner() = Arc::new(set),
        }
        Ok(n)
    }

    /// Reloads after a token named a kid we do not hold, at most once per few
    /// seconds, so garbage kids cannot turn into a database flood.
    pub async fn reload_for_unknown_kid(&self, db: &Database) -> bool {
        {
            let mut last = match self.last_miss_reload.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if last.is_some_and(|t| t.elapsed() < MISS_RELOAD_SPACING) {
                return false;
            }
            *last = Some(Instant::now());
        }
        self.reload(db).await.is_ok()
    }

    fn load(&self, key: &StoredKey) -> Result<LoadedKey, KeyError> {
        let unusable = |reason| KeyError::Unusable {
            kid: key.kid.clone(),
            reason,
        };
        let pkcs8 = open(&self.kek, &key.kid, &key.private_key_encrypted)
            .map_err(|_| unusable("cannot decrypt (wrong AUTH_KEY_ENCRYPTION_KEY?)"))?;
        // The public half is derived from the sealed private half, never taken
        // from its column: the AEAD binds the private key to its kid, but the
        // public key column is bound to nothing, and whoever could write the table
        // (without the key-encryption key) could otherwise put a key of theirs
        // there, and verification would accept tokens they sign.
        let public_key = public_key_of(&key.algorithm, &pkcs8)
            .ok_or_else(|| unusable("the private key does not parse"))?;
        if public_key != key.public_key {
            tracing::error!(kid = %key.kid, "the stored public key does not belong to the sealed private key (tampering?); using the one derived from the private key");
        }
        let (algorithm, encoding, decoding, jwk) = match key.algorithm.as_str() {
            "EdDSA" => {
                let x = URL_SAFE_NO_PAD.encode(&public_key);
                (
                    Algorithm::EdDSA,
                    EncodingKey::from_ed_der(&pkcs8),
                    DecodingKey::from_ed_components(&x).map_err(|_| unusable("bad public key"))?,
                    json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": key.kid, "alg": "EdDSA", "use": "sig"}),
                )
            }
            "ES256" => {
                // Uncompressed SEC1 point: 0x04 || X (32 bytes) || Y (32 bytes).
                if public_key.len() != 65 || public_key[0] != 4 {
                    return Err(unusable("bad public key"));
                }
                let x = URL_SAFE_NO_PAD.encode(&public_key[1..33]);
                let y = URL_SAFE_NO_PAD.encode(&public_key[33..]);
                (
                    Algorithm::ES256,
                    EncodingKey::from_ec_der(&pkcs8),
                    DecodingKey::from_ec_components(&x, &y)
                        .map_err(|_| unusable("bad public key"))?,
                    json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": key.kid, "alg": "ES256", "use": "sig"}),
                )
            }
            _ => return Err(unusable("unknown algorithm")),
        };
        Ok(LoadedKey {
            kid: key.kid.clone(),
            algorithm,
            decoding,
            encoding,
            jwk,
            created_at: key.created_at,
            activates_at: key.activates_at,
        })
    }

    /// A new key of the configured algorithm, sealed for storage.
    pub fn generate(&self, activates_at: DateTime<Utc>) -> Result<StoredKey, KeyError> {
        let rng = SystemRandom::new();
        let (name, pkcs8) = match self.algorithm {
            Algorithm::ES256 => (
                "ES256",
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| KeyError::Crypto("key generation"))?
                    .as_ref()
                    .to_vec(),
            ),
            _ => (
                "EdDSA",
                Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| KeyError::Crypto("key generation"))?
                    .as_ref()
                    .to_vec(),
            ),
        };
        let public_key = public_key_of(name, &pkcs8).ok_or(KeyError::Crypto("key generation"))?;
        let mut id = [0u8; 12];
        rng.fill(&mut id).map_err(|_| KeyError::Crypto("random"))?;
        let kid = URL_SAFE_NO_PAD.encode(id);
        let sealed = seal(&self.kek, &kid, &pkcs8)?;
        Ok(StoredKey {
            kid,
            algorithm: name.to_owned(),
            public_key,
            private_key_encrypted: sealed,
            created_at: Utc::now(),
            activates_at,
        })
    }

    /// Brings the stored keys in line with the schedule, then reloads:
    /// - no key at all: create one that signs at once (no token exists yet);
    /// - the signing key is older than the rotation period minus the publish lead
    ///   and nothing is pending (or `force`): add a key that signs after the lead;
    /// - delete keys retired longer than the longest token lifetime ago.
    ///
    /// Returns the kid of a key this call added.
    pub async fn maintain(
        &self,
        db: &Database,
        rotation_period: Duration,
        token_lifetime: Duration,
        force: bool,
    ) -> Result<Option<String>, KeyError> {
        let now = Utc::now();
        let lead = chrono::Duration::from_std(self.timing.publish_lead).unwrap_or_default();
        let stored = db.signing_keys().await?;
        let mut added = None;
        match stored.last() {
            None => {
                let key = self.generate(now)?;
                if db.add_signing_key(&key, None).await? {
                    tracing::info!(kid = %key.kid, "created the first signing key");
                    added = Some(key.kid);
                }
            }
            Some(newest) => {
                let pending = newest.activates_at > now;
                let period = chrono::Duration::from_std(rotation_period).unwrap_or_default();
                let due = now - newest.activates_at >= period - lead;
                if !pending && (due || force) {
                    let key = self.generate(now + lead)?;
                    if db.add_signing_key(&key, Some(&newest.kid)).await? {
                        tracing::info!(kid = %key.kid, activates_at = %key.activates_at, "rotated signing key; the new key signs after the publish lead");
                        added = Some(key.kid);
                    }
                } else if force && pending {
                    tracing::info!(kid = %newest.kid, "a rotation is already pending");
                }
            }
        }
        // A key is retired when its successor activates; it stays published until
        // every token it signed has expired, plus a margin for clock skew.
        let keep_after_retire = chrono::Duration::from_std(token_lifetime).unwrap_or_default()
            + chrono::Duration::minutes(5);
        let expired: Vec<String> = stored
            .windows(2)
            .filter(|w| w[1].activates_at <= now && w[1].activates_at + keep_after_retire < now)
            .map(|w| w[0].kid.clone())
            .collect();
        if !expired.is_empty() {
            db.delete_signing_keys(&expired).await?;
            tracing::info!(count = expired.len(), "deleted expired signing keys");
        }
        self.reload(db).await?;
        Ok(added)
    }
}

/// The public key of a PKCS#8 private key of `algorithm` (`EdDSA`: the raw 32
/// bytes; `ES256`: the uncompressed SEC1 point), as stored beside it.
fn public_key_of(algorithm: &str, pkcs8: &[u8]) -> Option<Vec<u8>> {
    match algorithm {
        "EdDSA" => Ed25519KeyPair::from_pkcs8(pkcs8)
            .ok()
            .map(|pair| pair.public_key().as_ref().to_vec()),
        "ES256" => EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &SystemRandom::new(),
        )
        .ok()
        .map(|pair| pair.public_key().as_ref().to_vec()),
        _ => None,
    }
}

fn seal(kek: &KeyEncryptionKey, kid: &str, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, kek.expose()).map_err(|_| KeyError::Crypto("aead key"))?,
    );
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| KeyError::Crypto("random"))?;
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(kid.as_bytes()),
        &mut buf,
    )
    .map_err(|_| KeyError::Crypto("seal"))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Ok(out)
}

fn open(kek: &KeyEncryptionKey, kid: &str, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
    if sealed.len() < NONCE_LEN {
        return Err(KeyError::Crypto("sealed key too short"));
    }
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, kek.expose()).map_err(|_| KeyError::Crypto("aead key"))?,
    );
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KeyError::Crypto("nonce"))?;
    let mut buf = ciphertext.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(kid.as_bytes()), &mut buf)
        .map_err(|_| KeyError::Crypto("open"))?;
    Ok(plain.to_vec())
}

/// The key-encryption key for embedded mode without `AUTH_KEY_ENCRYPTION_KEY`: a
/// random key in a 0600 file in the data directory, made on first start.
pub fn embedded_key_encryption_key(dir: &std::path::Path) -> std::io::Result<KeyEncryptionKey> {
    use std::io::{Read, Write};
    let path = dir.join("key-encryption.key");
    if let Ok(mut f) = std::fs::File::open(&path) {
        let mut bytes = [0u8; 32];
        f.read_exact(&mut bytes)?;
        return Ok(KeyEncryptionKey::new(bytes));
    }
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| std::io::Error::other("no randomness"))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&path)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    tracing::warn!(path = %path.display(), "generated a key-encryption key for embedded mode; keep this file private");
    Ok(KeyEncryptionKey::new(bytes))
}

#[cfg(test)]
impl KeyRing {
    /// A newly generated key, loaded, without a database.
    pub(crate) fn generated_key_for_tests(&self, activates_at: DateTime<Utc>) -> LoadedKey {
        #[allow(clippy::unwrap_used)]
        self.load(&self.generate(activates_at).unwrap()).unwrap()
    }

    /// Replaces the ring's keys, as a reload from the database would.
    pub(crate) fn replace_for_tests(&self, keys: Vec<LoadedKey>) {
        let mut set = KeySet::default();
        for key in keys {
            let key = Arc::new(key);
            set.by_kid.insert(key.kid.clone(), key.clone());
            set.keys.push(key);
        }
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(set),
            Err(p) => *p.into_inner() = Arc::new(set),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_with_the_right_key_and_kid() {
        let kek = KeyEncryptionKey::new([1; 32]);
        let sealed = seal(&kek, "kid-a", b"secret pkcs8").unwrap();
        assert_eq!(open(&kek, "kid-a", &sealed).unwrap(), b"secret pkcs8");
        assert!(open(&kek, "kid-b", &sealed).is_err());
        assert!(open(&KeyEncryptionKey::new([2; 32]), "kid-a", &sealed).is_err());
        assert!(open(&kek, "kid-a", &sealed[..5]).is_err());
    }

    #[test]
    fn generated_keys_load_for_both_algorithms() {
        for alg in [Algorithm::EdDSA, Algorithm::ES256] {
            let ring = KeyRing::new(
                KeyEncryptionKey::new([3; 32]),
                alg,
                KeyTiming {
                    publish_lead: Duration::from_secs(60),
                },
            );
            let stored = ring.generate(Utc::now()).unwrap();
            let loaded = ring.load(&stored).unwrap();
            assert_eq!(loaded.algorithm, alg);
            assert_eq!(loaded.jwk["kid"], stored.kid);
        }
    }

    #[test]
    fn signing_key_is_the_newest_active_one() {
        let ring = KeyRing::new(
            KeyEncryptionKey::new([3; 32]),
            Algorithm::EdDSA,
            KeyTiming {
                publish_lead: Duration::from_secs(60),
            },
        );
        let now = Utc::now();
        let old = Arc::new(
            ring.load(&ring.generate(now - chrono::Duration::hours(1)).unwrap())
                .unwrap(),
        );
        let pending = Arc::new(
            ring.load(&ring.generate(now + chrono::Duration::hours(1)).unwrap())
                .unwrap(),
        );
        let set = KeySet {
            by_kid: HashMap::from([
                (old.kid.clone(), old.clone()),
                (pending.kid.clone(), pending.clone()),
            ]),
            keys: vec![old.clone(), pending.clone()],
        };
        assert_eq!(set.signing_key(now).unwrap().kid, old.kid);
        assert_eq!(set.jwks()["keys"].as_array().unwrap().len(), 2);
        // Before every key's activation (a clock stepped back): the earliest.
        let before = now - chrono::Duration::hours(2);
        assert_eq!(set.signing_key(before).unwrap().kid, old.kid);
        assert!(KeySet::default().signing_key(now).is_none());
    }
}
