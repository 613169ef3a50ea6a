//! Access tokens already verified by this replica, so a token presented again skips
//! the signature check and the claims parsing.
//!
//! Apps and gateways validate the holder's token on every request it makes, so the
//! same few thousand tokens come back again and again for their whole lifetime; an
//! Ed25519 verification (~50 µs here) was most of validation's CPU. A hit still
//! gets every check that can change after the token was verified:
//! - `exp` and `nbf` against the clock, with the verifier's leeway;
//! - the signing key is still in the ring (a key deleted after its retirement
//!   invalidates its tokens), since the key behind a kid never changes;
//! - the session, by the caller, as for any token: revocation stays immediate.
//!
//! What a hit skips depends only on the token's bytes (signature, `alg`, `iss`,
//! `aud`, the claims' shape), and the key is the whole token string, so no other
//! token can match an entry. Only tokens that passed full verification are stored,
//! so garbage cannot fill the cache, and it is bounded: when a shard is full, its
//! expired entries go, then arbitrary ones.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::Claims;

/// Shards, so the two-or-more async workers seldom wait for the same lock.
const SHARDS: usize = 16;
/// Entries per shard: 4096 in all, at most a few MiB.
const SHARD_CAPACITY: usize = 256;

struct Entry {
    claims: Arc<Claims>,
    kid: Box<str>,
}

/// The cache; see the module documentation.
pub struct VerifiedTokens {
    shards: Vec<Mutex<HashMap<Box<str>, Entry>>>,
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl VerifiedTokens {
    fn shard(&self, token: &str) -> &Mutex<HashMap<Box<str>, Entry>> {
        // The signature's last characters: random for real tokens; anything for
        // garbage, which only picks the shard it misses in.
        let bytes = token.as_bytes();
        let pick = bytes
            .len()
            .checked_sub(2)
            .map_or(0, |i| usize::from(bytes[i]));
        &self.shards[pick % SHARDS]
    }

    /// The claims of `token` if it was verified before and `key_known` still holds
    /// for the kid that signed it. An entry whose key is gone is dropped, and the
    /// caller verifies from scratch.
    pub fn get(&self, token: &str, key_known: impl FnOnce(&str) -> bool) -> Option<Arc<Claims>> {
        let mut shard = lock(self.shard(token));
        let entry = shard.get(token)?;
        if key_known(&entry.kid) {
            return Some(entry.claims.clone());
        }
        shard.remove(token);
        None
    }

    /// Remembers a token that passed full verification. `now` is Unix seconds.
    pub fn insert(&self, token: &str, kid: &str, claims: Arc<Claims>, now: i64) {
        let mut shard = lock(self.shard(token));
        if shard.len() >= SHARD_CAPACITY {
            shard.retain(|_, e| e.claims.exp >= now);
            if shard.len() >= SHARD_CAPACITY {
                // HashMap order is random per process: an arbitrary victim.
                if let Some(victim) = shard.keys().next().cloned() {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(
            token.into(),
            Entry {
                claims,
                kid: kid.into(),
            },
        );
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
