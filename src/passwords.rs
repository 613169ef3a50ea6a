//! Password hashing (argon2id) off the async workers, and the password policy.
//!
//! Hashing is the one CPU-heavy thing this service does. It runs on a small pool
//! of dedicated threads (`concurrency` of them) fed by a bounded queue (`queue`
//! jobs); when both are full, callers get [`HashError::Overloaded`] at once, which
//! the API answers with 503 + Retry-After. A login storm therefore cannot queue
//! without bound or slow token validation. Dedicated threads (rather than tokio's
//! blocking pool, which grows to hundreds of threads) also bound memory: each
//! thread owns one argon2 working buffer (`memory_kib`) and reuses it for every
//! hash. Allocating it per hash, as `Argon2::hash_password` does, left the freed
//! buffers in glibc's per-thread arenas, and RSS grew by about one buffer per login
//! into the hundreds of MiB. On Linux the threads also run at a lower CPU priority
//! (nice 10), so that while they keep every core busy, the async workers (and so
//! validation) still get the CPU as soon as they need it.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    mpsc::{self, SyncSender},
    Arc, Mutex,
};

use argon2::{
    password_hash::{Output, ParamsString, PasswordHash, SaltString},
    Algorithm, Argon2, Block, Params, Version,
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
type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// What a hashing thread keeps between jobs: the configured parameters and the
/// argon2 working memory, allocated on first use and reused for every hash after.
/// Reuse is safe: argon2's first pass overwrites every block before reading it.
struct Worker {
    params: Params,
    memory: Vec<Block>,
}

impl Worker {
    fn new(params: Params) -> Self {
        Self {
            params,
            memory: Vec::new(),
        }
    }

    /// Runs `argon2` over the password into `out`, in the worker's memory. A stored
    /// hash made with more memory than configured (parameters lowered since) gets
    /// a buffer of its own, so the kept one never outgrows the configuration.
    fn compute(
        &mut self,
        argon2: &Argon2<'_>,
        password: &[u8],
        salt: &[u8],
        out: &mut [u8],
    ) -> argon2::Result<()> {
        let blocks = argon2.params().block_count();
        if blocks > self.params.block_count() {
            let mut own = vec![Block::default(); blocks];
            return argon2.hash_password_into_with_memory(password, salt, out, &mut own);
        }
        if self.memory.len() < blocks {
            self.memory.resize(blocks, Block::default());
        }
        argon2.hash_password_into_with_memory(password, salt, out, &mut self.memory[..blocks])
    }

    /// A PHC string for `password` with a fresh salt and the configured
    /// parameters: what `argon2::PasswordHasher::hash_password` makes.
    fn hash(&mut self, password: &[u8]) -> Result<String, HashError> {
        let internal = |e: &dyn std::fmt::Display| HashError::Internal(e.to_string());
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        let mut salt_bytes = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(|e| internal(&e))?;
        let argon2 = argon2_with(&self.params);
        let output_len = self
            .params
            .output_len()
            .unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let output = Output::init_with(output_len, |out| {
            self.compute(&argon2, password, salt_bytes, out)
                .map_err(Into::into)
        })
        .map_err(|e| internal(&e))?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&self.params).map_err(|e| internal(&e))?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        };
        Ok(phc.to_string())
    }

    /// Whether `password` matches `stored`, computed with the stored hash's own
    /// algorithm, version and parameters: what `PasswordVerifier::verify_password`
    /// does, including the constant-time comparison (`Output`'s `PartialEq`).
    fn verify(&mut self, password: &[u8], stored: &PasswordHash<'_>) -> bool {
        let (Some(salt), Some(expected)) = (&stored.salt, &stored.hash) else {
            return false;
        };
        let Ok(algorithm) = Algorithm::try_from(stored.algorithm) else {
            return false;
        };
        let Ok(version) = stored.version.map(Version::try_from).transpose() else {
            return false;
        };
        let Ok(params) = Params::try_from(stored) else {
            return false;
        };
        let mut salt_bytes = [0u8; 64];
        let Ok(salt_bytes) = salt.decode_b64(&mut salt_bytes) else {
            return false;
        };
        let argon2 = Argon2::new(algorithm, version.unwrap_or_default(), params);
        let output_len = argon2
            .params()
            .output_len()
            .unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        Output::init_with(output_len, |out| {
            self.compute(&argon2, password, salt_bytes, out)
                .map_err(Into::into)
        })
        .is_ok_and(|computed| computed == *expected)
    }
}

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
        let dummy_hash = Worker::new(params.clone()).hash(random_password().as_bytes())?;
        // Admission (below) bounds what is in the channel; its capacity only has to
        // be large enough never to block a sender.
        let capacity = config.concurrency + config.queue;
        let (jobs, receiver) = mpsc::sync_channel::<Job>(capacity);
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..config.concurrency {
            let receiver = receiver.clone();
            let mut worker = Worker::new(params.clone());
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = match receiver.lock() {
                            Ok(rx) => rx.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        match job {
                            Ok(job) => job(&mut worker),
                            // The hasher was dropped: the instance is gone.
                            Err(_) => break,
                        }
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

    /// Takes a place in the pool (running or queued), or refuses at once when all
    /// are taken. Login takes it before looking the user up, so a saturated pool
    /// sheds a login storm without a database query per refused attempt.
    pub fn reserve(&self) -> Result<Slot, HashError> {
        if self.admitted.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(HashError::Overloaded);
        }
        Ok(Slot {
            admitted: self.admitted.clone(),
        })
    }

    /// Runs `work` on a hashing thread in the place `slot` holds. The job owns the
    /// slot, so the place is freed when it has run, or when it is dropped unrun.
    async fn run<T: Send + 'static>(
        &self,
        slot: Slot,
        work: impl FnOnce(&mut Worker) -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let (done, result) = oneshot::channel();
        let metrics = self.metrics.clone();
        metrics.hash_queue_depth.inc();
        let job: Job = Box::new(move |worker: &mut Worker| {
            let timer = metrics.hash_duration.start_timer();
            let result = work(worker);
            timer.observe_duration();
            // Free the slot before answering, so a caller that hashes again right
            // after this answer finds it free.
            metrics.hash_queue_depth.dec();
            drop(slot);
            // If the client went away there is no receiver; the hash still held
            // its slot while it ran, which is the point.
            let _ = done.send(result);
        });
        if self.jobs.try_send(job).is_err() {
            // Only when the threads are gone (or the bound above is wrong); the
            // dropped job freed its place.
            self.metrics.hash_queue_depth.dec();
            return Err(HashError::Overloaded);
        }
        result
            .await
            .map_err(|_| HashError::Internal("hashing thread stopped".into()))?
    }

    /// A new PHC string for `password`.
    pub async fn hash(&self, password: SecretString) -> Result<String, HashError> {
        let slot = self.reserve()?;
        self.run(slot, move |worker| {
            worker.hash(password.expose_secret().as_bytes())
        })
        .await
    }

    /// Checks `password` against `phc`, or against the dummy hash when there is no
    /// user, so both cases take the same time.
    pub async fn verify(
        &self,
        password: SecretString,
        phc: Option<String>,
    ) -> Result<Verification, HashError> {
        let slot = self.reserve()?;
        self.verify_in(slot, password, phc).await
    }

    /// [`Self::verify`] in a place taken before with [`Self::reserve`].
    pub async fn verify_in(
        &self,
        slot: Slot,
        password: SecretString,
        phc: Option<String>,
    ) -> Result<Verification, HashError> {
        let exists = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_hash.clone());
        let verification = self
            .run(slot, move |worker| {
                let Ok(parsed) = PasswordHash::new(&phc) else {
                    return Ok(Verification {
                        valid: false,
                        needs_rehash: false,
                    });
                };
                let valid = worker.verify(password.expose_secret().as_bytes(), &parsed);
                Ok(Verification {
                    valid,
                    needs_rehash: valid && differs_from(&parsed, &worker.params),
                })
            })
            .await?;
        Ok(Verification {
            valid: exists && verification.valid,
            needs_rehash: exists && verification.needs_rehash,
        })
    }
}

/// The nice value of hashing threads. A login storm keeps them busy on every
/// core; at nice 10 the scheduler weighs them at about a tenth of this process's
/// other threads, so the async workers serving validations get a core first.
/// Hashing loses nothing while the CPU is otherwise idle. (Nice values rank
/// threads within one scheduling group: other processes on the machine, such as
/// Redis and wrk in `scripts/bench`, are not ranked against them.)
const HASHING_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority. Linux keeps the nice value per thread
/// (`setpriority` on the thread id); elsewhere it is per process, so this does
/// nothing there rather than slow the whole service.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), HASHING_NICE) {
            tracing::debug!(error = %e, "could not lower the hashing thread's priority");
        }
    }
}

/// A place in the hashing pool, from [`PasswordHasher::reserve`]; dropped unused,
/// it frees the place.
#[must_use = "a reserved place is freed when dropped"]
pub struct Slot {
    /// The pool's admission counter.
    admitted: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

fn argon2_with(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
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

    /// The worker computes hashes itself (to reuse its memory): its PHC strings
    /// must verify with the argon2 crate, and the crate's with the worker, for
    /// other parameters and algorithms too.
    #[test]
    fn worker_agrees_with_the_argon2_crate() {
        use argon2::password_hash::{rand_core::OsRng, PasswordHasher as _, PasswordVerifier as _};
        let params = Params::new(1024, 1, 1, None).unwrap();
        let mut worker = Worker::new(params.clone());
        for _ in 0..2 {
            let phc = worker.hash(b"pw one two three").unwrap();
            assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
            let parsed = PasswordHash::new(&phc).unwrap();
            assert!(argon2_with(&params)
                .verify_password(b"pw one two three", &parsed)
                .is_ok());
            assert!(worker.verify(b"pw one two three", &parsed));
            assert!(!worker.verify(b"pw one two thref", &parsed));
        }
        for (algorithm, version, m_cost) in [
            (Algorithm::Argon2id, Version::V0x13, 2048),
            (Algorithm::Argon2id, Version::V0x13, 512),
            (Algorithm::Argon2i, Version::V0x13, 1024),
            (Algorithm::Argon2d, Version::V0x10, 1024),
        ] {
            let salt = SaltString::generate(&mut OsRng);
            let theirs = Argon2::new(algorithm, version, Params::new(m_cost, 2, 1, None).unwrap())
                .hash_password(b"secret", &salt)
                .unwrap()
                .to_string();
            let parsed = PasswordHash::new(&theirs).unwrap();
            assert!(worker.verify(b"secret", &parsed), "{theirs}");
            assert!(!worker.verify(b"Secret", &parsed), "{theirs}");
        }
        // The kept buffer never grew past the configured memory.
        assert_eq!(worker.memory.len(), params.block_count());
    }

    #[tokio::test]
    async fn reserved_places_count_until_used_or_dropped() {
        let config = PasswordHashConfig {
            queue: 1,
            ..small()
        };
        let hasher = PasswordHasher::new(&config, Arc::new(Metrics::new())).unwrap();
        let first = hasher.reserve().unwrap();
        let second = hasher.reserve().unwrap();
        assert!(matches!(hasher.reserve(), Err(HashError::Overloaded)));
        drop(first);
        let v = hasher
            .verify_in(second, SecretString::from("x"), None)
            .await
            .unwrap();
        assert!(!v.valid);
        let third = hasher.reserve().unwrap();
        drop(third);
        assert_eq!(hasher.admitted.load(Ordering::Acquire), 0);
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
