//! Password hashing (argon2id) off the async workers, and the password policy.
//!
//! Hashing is the one CPU-heavy thing this service does. It runs on a small pool
//! of dedicated threads (`concurrency` of them) fed by a bounded queue (`queue`
//! jobs); when both are full, callers get [`HashError::Overloaded`] at once, which
//! the API answers with 503 + Retry-After. A login storm therefore cannot queue
//! without bound or slow token validation. Dedicated threads (rather than tokio's
//! blocking pool, which grows to hundreds of threads) also bound memory: each
//! argon2 hash allocates `memory_kib`, and the allocator keeps a per-thread arena
//! of it, so few threads mean few arenas.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    mpsc::{self, SyncSender},
    Arc, Mutex,
};

use argon2::{
    password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString},
    Algorithm, Argon2, Params, Version,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::oneshot;

use crate::{config::PasswordHashConfig, metrics::Metrics, runtime_config::RuntimeConfig};

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("password hashing is saturated")]
    Overloaded,
    #[error("password hashing failed: {0}")]
    Internal(String),
}

/// The result of checking a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    pub valid: bool,
    /// The stored hash uses other parameters than the configured ones.
    pub needs_rehash: bool,
}

/// One unit of work for a hashing thread.
type Job = Box<dyn FnOnce(&Params) + Send>;

/// The bounded argon2id pool.
pub struct PasswordHasher {
    jobs: SyncSender<Job>,
    /// Jobs waiting or running; admission stops at `capacity`.
    admitted: Arc<AtomicUsize>,
    capacity: usize,
    metrics: Arc<Metrics>,
    /// Verified instead of a real hash when the user does not exist, so an unknown
    /// username costs the same time as a wrong password.
    dummy_hash: String,
}

impl PasswordHasher {
    pub fn new(config: &PasswordHashConfig, metrics: Arc<Metrics>) -> Result<Self, HashError> {
        let params = Params::new(
            config.memory_kib,
            config.iterations,
            config.parallelism,
            None,
        )
        .map_err(|e| HashError::Internal(e.to_string()))?;
        let dummy_hash = hash_blocking(&params, &random_password())?;
        // Admission (below) bounds what is in the channel; its capacity only has to
        // be large enough never to block a sender.
        let capacity = config.concurrency + config.queue;
        let (jobs, receiver) = mpsc::sync_channel::<Job>(capacity);
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..config.concurrency {
            let receiver = receiver.clone();
            let params = params.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || loop {
                    let job = match receiver.lock() {
                        Ok(rx) => rx.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match job {
                        Ok(job) => job(&params),
                        // The hasher was dropped: the instance is gone.
                        Err(_) => break,
                    }
                })
                .map_err(|e| HashError::Internal(e.to_string()))?;
        }
        Ok(Self {
            jobs,
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity,
            metrics,
            dummy_hash,
        })
    }

    /// Runs `work` on a hashing thread, or refuses at once when all are busy and
    /// the queue is full.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Params) -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        if self.admitted.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(HashError::Overloaded);
        }
        let (done, result) = oneshot::channel();
        let metrics = self.metrics.clone();
        let admitted = self.admitted.clone();
        metrics.hash_queue_depth.inc();
        let job: Job = Box::new(move |params: &Params| {
            let timer = metrics.hash_duration.start_timer();
            let result = work(params);
            timer.observe_duration();
            // Free the slot before answering, so a caller that hashes again right
            // after this answer finds it free.
            metrics.hash_queue_depth.dec();
            admitted.fetch_sub(1, Ordering::AcqRel);
            // If the client went away there is no receiver; the hash still held
            // its slot while it ran, which is the point.
            let _ = done.send(result);
        });
        if self.jobs.try_send(job).is_err() {
            // Only when the threads are gone (or the bound above is wrong).
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            self.metrics.hash_queue_depth.dec();
            return Err(HashError::Overloaded);
        }
        result
            .await
            .map_err(|_| HashError::Internal("hashing thread stopped".into()))?
    }

    /// A new PHC string for `password`.
    pub async fn hash(&self, password: SecretString) -> Result<String, HashError> {
        self.run(move |params| hash_blocking(params, password.expose_secret()))
            .await
    }

    /// Checks `password` against `phc`, or against the dummy hash when there is no
    /// user, so both cases take the same time.
    pub async fn verify(
        &self,
        password: SecretString,
        phc: Option<String>,
    ) -> Result<Verification, HashError> {
        let exists = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_hash.clone());
        let verification = self
            .run(move |params| {
                let Ok(parsed) = PasswordHash::new(&phc) else {
                    return Ok(Verification {
                        valid: false,
                        needs_rehash: false,
                    });
                };
                let valid = argon2_with(params)
                    .verify_password(password.expose_secret().as_bytes(), &parsed)
                    .is_ok();
                Ok(Verification {
                    valid,
                    needs_rehash: valid && differs_from(&parsed, params),
                })
            })
            .await?;
        Ok(Verification {
            valid: exists && verification.valid,
            needs_rehash: exists && verification.needs_rehash,
        })
    }
}

fn argon2_with(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
}

fn hash_blocking(params: &Params, password: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2_with(params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Internal(e.to_string()))
}

/// Whether a stored hash was made with other parameters (or another algorithm).
fn differs_from(hash: &PasswordHash<'_>, params: &Params) -> bool {
    if hash.algorithm != Algorithm::Argon2id.ident() || hash.version != Some(0x13) {
        return true;
    }
    match Params::try_from(hash) {
        Ok(stored) => {
            stored.m_cost() != params.m_cost()
                || stored.t_cost() != params.t_cost()
                || stored.p_cost() != params.p_cost()
        }
        Err(_) => true,
    }
}

/// A random password for generated accounts (48 hex characters).
pub fn generate_password() -> String {
    random_password()
}

fn random_password() -> String {
    let mut bytes = [0u8; 24];
    // The OS RNG failing is unrecoverable for an auth service anyway; a fixed
    // dummy password would still keep timing equal, which is all this is for.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a new password is refused; the text is safe to show the user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PolicyViolation(pub String);

/// Checks a new password against the runtime policy. Length is checked first, so
/// an over-long password is refused before anything expensive looks at it.
pub fn check_policy(
    password: &str,
    username: &str,
    email: Option<&str>,
    policy: &RuntimeConfig,
) -> Result<(), PolicyViolation> {
    let length = password.chars().count();
    if length > policy.password_max_length as usize {
        return Err(PolicyViolation(format!(
            "must be at most {} characters",
            policy.password_max_length
        )));
    }
    if length < policy.password_min_length as usize {
        return Err(PolicyViolation(format!(
            "must be at least {} characters",
            policy.password_min_length
        )));
    }
    let lower = password.to_lowercase();
    let name = username.to_lowercase();
    if !name.is_empty() && lower.contains(&name) {
        return Err(PolicyViolation("must not contain the username".into()));
    }
    let mut inputs = vec![username];
    if let Some(email) = email {
        inputs.push(email);
    }
    let score = u8::from(zxcvbn::zxcvbn(password, &inputs).score());
    if score < policy.password_min_score {
        return Err(PolicyViolation(
            "is too common or easy to guess; use a longer passphrase".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> PasswordHashConfig {
        PasswordHashConfig {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
            concurrency: 1,
            queue: 0,
        }
    }

    #[tokio::test]
    async fn hash_then_verify_and_rehash_detection() {
        let hasher = PasswordHasher::new(&small(), Arc::new(Metrics::new())).unwrap();
        let phc = hasher
            .hash(SecretString::from("pw one two three"))
            .await
            .unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
        let ok = hasher
            .verify(SecretString::from("pw one two three"), Some(phc.clone()))
            .await
            .unwrap();
        assert_eq!(
            ok,
            Verification {
                valid: true,
                needs_rehash: false
            }
        );
        let bad = hasher
            .verify(SecretString::from("nope"), Some(phc.clone()))
            .await
            .unwrap();
        assert!(!bad.valid);
        let mut stronger = small();
        stronger.memory_kib = 2048;
        let hasher2 = PasswordHasher::new(&stronger, Arc::new(Metrics::new())).unwrap();
        let v = hasher2
            .verify(SecretString::from("pw one two three"), Some(phc))
            .await
            .unwrap();
        assert_eq!(
            v,
            Verification {
                valid: true,
                needs_rehash: true
            }
        );
    }

    #[tokio::test]
    async fn unknown_user_never_verifies() {
        let hasher = PasswordHasher::new(&small(), Arc::new(Metrics::new())).unwrap();
        let v = hasher
            .verify(SecretString::from("anything"), None)
            .await
            .unwrap();
        assert!(!v.valid);
    }

    #[tokio::test]
    async fn saturation_sheds_instead_of_queueing() {
        // Slow enough (~10 ms a hash) that 16 requests overlap.
        let config = PasswordHashConfig {
            memory_kib: 8192,
            iterations: 2,
            ..small()
        };
        let hasher = Arc::new(PasswordHasher::new(&config, Arc::new(Metrics::new())).unwrap());
        let results = futures_join(hasher.clone(), 16).await;
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(HashError::Overloaded))));
        assert!(results.iter().any(|r| r.is_ok()));
    }

    async fn futures_join(hasher: Arc<PasswordHasher>, n: usize) -> Vec<Result<String, HashError>> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let h = hasher.clone();
                tokio::spawn(async move { h.hash(SecretString::from("x")).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[test]
    fn policy_rules() {
        let policy = RuntimeConfig::default();
        assert!(check_policy("short", "bob", None, &policy).is_err());
        assert!(check_policy(&"x".repeat(129), "bob", None, &policy).is_err());
        assert!(check_policy("password1234", "bob", None, &policy).is_err());
        assert!(check_policy("alice-was-here-2024!", "alice", None, &policy).is_err());
        assert!(check_policy("correct horse battery staple 42", "bob", None, &policy).is_ok());
    }
}
