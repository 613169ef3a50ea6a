//! Timeouts and circuit breaking for every call to a shared dependency.
//!
//! A dependency that hangs must not hang our requests, and one that keeps failing
//! must not collect a queue of waiting requests: after a few consecutive failures
//! the breaker opens and calls fail at once for a cool-down. After it, exactly one
//! call is let through to probe the dependency (half-open) while the others keep
//! failing at once; the probe's success closes the breaker, its failure opens it
//! for another cool-down. The error the caller sees is always
//! [`StoreError::Unavailable`], which the HTTP edge turns into 503 + Retry-After.
//!
//! Why one probe and not every call after the cool-down: a dependency that is down
//! often costs a call the whole timeout (sqlx keeps retrying a refused connection
//! until its acquire timeout), and letting every call through after each cool-down
//! made every request arriving in that window wait the full timeout, about two
//! thirds of the time during an outage (found by scripts/eviction-drill).

use std::{
    future::Future,
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use super::{Dependency, StoreError};

/// Consecutive failures that open the breaker.
const FAILURE_THRESHOLD: u32 = 3;
/// How long an open breaker short-circuits calls before letting a probe through.
const COOL_DOWN: Duration = Duration::from_millis(500);

/// Timeout and circuit breaker for one dependency.
pub struct Guard {
    dependency: Dependency,
    timeout: Duration,
    epoch: Instant,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` until which calls are short-circuited.
    open_until_ms: AtomicU64,
    /// A probe call is running (half-open): other calls fail at once.
    probing: AtomicBool,
}

impl Guard {
    pub fn new(dependency: Dependency, timeout: Duration) -> Self {
        Self {
            dependency,
            timeout,
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    pub fn dependency(&self) -> Dependency {
        self.dependency
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the breaker is open or half-open: calls other than a probe are
    /// short-circuited.
    pub fn is_open(&self) -> bool {
        self.consecutive_failures.load(Ordering::Acquire) >= FAILURE_THRESHOLD
    }

    /// Runs `call` unless the breaker is open, bounded by the timeout, and records
    /// whether the dependency answered. Errors that mean "the dependency answered
    /// no" (a constraint violation, a missing row) do not count as failures.
    pub async fn run<T, E, F>(&self, call: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, E>>,
        E: Into<StoreError>,
    {
        // Held by the one call that probes a tripped breaker; frees the probe slot
        // when dropped, even if the caller gives up on the call half-way.
        let _probe = if self.is_open() {
            if self.now_ms() < self.open_until_ms.load(Ordering::Acquire) {
                return Err(StoreError::Unavailable(self.dependency));
            }
            match ProbeSlot::take(&self.probing) {
                Some(slot) => Some(slot),
                None => return Err(StoreError::Unavailable(self.dependency)),
            }
        } else {
            None
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => {
                self.record_success();
                Ok(value)
            }
            Ok(Err(e)) => {
                let err = e.into();
                if err.is_unavailable() {
                    self.record_failure();
                    tracing::debug!(dependency = %self.dependency, error = %err, "dependency call failed");
                    Err(StoreError::Unavailable(self.dependency))
                } else {
                    self.record_success();
                    Err(err)
                }
            }
            Err(_elapsed) => {
                self.record_failure();
                Err(StoreError::Unavailable(self.dependency))
            }
        }
    }

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
    }

    pub fn record_failure(&self) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= FAILURE_THRESHOLD {
            let until = self.now_ms() + u64::try_from(COOL_DOWN.as_millis()).unwrap_or(500);
            self.open_until_ms.store(until, Ordering::Release);
        }
    }
}

/// The right to probe a tripped breaker; released on drop.
struct ProbeSlot<'a>(&'a AtomicBool);

impl<'a> ProbeSlot<'a> {
    fn take(flag: &'a AtomicBool) -> Option<Self> {
        flag.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Self(flag))
    }
}

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_after_consecutive_failures_and_probes_after_cool_down() {
        let guard = Guard::new(Dependency::Redis, Duration::from_millis(50));
        for _ in 0..FAILURE_THRESHOLD {
            let r: Result<(), _> = guard
                .run(async { Err::<(), _>(StoreError::Unavailable(Dependency::Redis)) })
                .await;
            assert!(r.is_err());
        }
        assert!(guard.is_open());
        // Short-circuited: the call is not even polled.
        let polled = std::sync::atomic::AtomicBool::new(false);
        let r = guard
            .run(async {
                polled.store(true, Ordering::SeqCst);
                Ok::<_, StoreError>(())
            })
            .await;
        assert!(!polled.load(Ordering::SeqCst));
        assert!(matches!(r, Err(StoreError::Unavailable(Dependency::Redis))));
        tokio::time::sleep(COOL_DOWN + Duration::from_millis(20)).await;
        let r = guard.run(async { Ok::<_, StoreError>(7) }).await;
        assert_eq!(r.unwrap(), 7);
        assert!(!guard.is_open());
    }

    async fn trip(guard: &Guard) {
        for _ in 0..FAILURE_THRESHOLD {
            let _ = guard
                .run(async { Err::<(), _>(StoreError::Unavailable(guard.dependency())) })
                .await;
        }
        assert!(guard.is_open());
    }

    /// A call that must fail at once: it records whether it was polled at all.
    async fn short_circuited(guard: &Guard) {
        let polled = std::sync::atomic::AtomicBool::new(false);
        let r = guard
            .run(async {
                polled.store(true, Ordering::SeqCst);
                Ok::<_, StoreError>(())
            })
            .await;
        assert!(!polled.load(Ordering::SeqCst), "the call was let through");
        assert!(matches!(r, Err(StoreError::Unavailable(_))));
    }

    // Regression (scripts/eviction-drill, PostgreSQL outage): after each cool-down
    // every concurrent call went through and waited the whole timeout, so logins
    // during an outage took a second instead of failing fast.
    #[tokio::test]
    async fn after_the_cool_down_only_one_probe_goes_through() {
        let guard = Guard::new(Dependency::Database, Duration::from_millis(300));
        trip(&guard).await;
        tokio::time::sleep(COOL_DOWN + Duration::from_millis(20)).await;
        let probe = guard.run(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, StoreError>(1)
        });
        let others = async {
            // Polled after the probe has taken its slot.
            tokio::task::yield_now().await;
            let start = Instant::now();
            for _ in 0..5 {
                short_circuited(&guard).await;
            }
            start.elapsed()
        };
        let (probed, others_took) = tokio::join!(probe, others);
        assert_eq!(probed.unwrap(), 1);
        assert!(others_took < Duration::from_millis(50), "{others_took:?}");
        // The probe's success closed the breaker.
        assert!(!guard.is_open());
        assert_eq!(
            guard.run(async { Ok::<_, StoreError>(2) }).await.unwrap(),
            2
        );
    }

    #[tokio::test]
    async fn a_failed_probe_opens_the_breaker_again() {
        let guard = Guard::new(Dependency::Redis, Duration::from_millis(50));
        trip(&guard).await;
        tokio::time::sleep(COOL_DOWN + Duration::from_millis(20)).await;
        let r: Result<(), _> = guard
            .run(async { Err::<(), _>(StoreError::Unavailable(Dependency::Redis)) })
            .await;
        assert!(r.is_err());
        short_circuited(&guard).await;
    }

    #[tokio::test]
    async fn an_abandoned_probe_frees_the_probe_slot() {
        let guard = Guard::new(Dependency::Redis, Duration::from_secs(5));
        trip(&guard).await;
        tokio::time::sleep(COOL_DOWN + Duration::from_millis(20)).await;
        // The caller gives up (its request timed out, its client went away).
        let abandoned = tokio::time::timeout(
            Duration::from_millis(20),
            guard.run(std::future::pending::<Result<(), StoreError>>()),
        )
        .await;
        assert!(abandoned.is_err());
        let r = guard.run(async { Ok::<_, StoreError>(3) }).await;
        assert_eq!(r.unwrap(), 3);
        assert!(!guard.is_open());
    }

    #[tokio::test]
    async fn a_hanging_call_times_out() {
        let guard = Guard::new(Dependency::Database, Duration::from_millis(20));
        let r = guard
            .run(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, StoreError>(())
            })
            .await;
        assert!(matches!(
            r,
            Err(StoreError::Unavailable(Dependency::Database))
        ));
    }

    #[tokio::test]
    async fn answered_errors_do_not_open_the_breaker() {
        let guard = Guard::new(Dependency::Database, Duration::from_millis(20));
        for _ in 0..10 {
            let _ = guard
                .run(async { Err::<(), _>(StoreError::NotFound) })
                .await;
        }
        assert!(!guard.is_open());
    }
}
