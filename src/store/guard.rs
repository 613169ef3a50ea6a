//! Timeouts and circuit breaking for every call to a shared dependency.
//!
//! A dependency that hangs must not hang our requests, and one that keeps failing
//! must not collect a queue of waiting requests: after a few consecutive failures
//! the breaker opens and calls fail at once for a cool-down, after which calls are
//! let through again to probe it. The error the caller sees is always
//! [`StoreError::Unavailable`], which the HTTP edge turns into 503 + Retry-After.

use std::{
    future::Future,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
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
}

impl Guard {
    pub fn new(dependency: Dependency, timeout: Duration) -> Self {
        Self {
            dependency,
            timeout,
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
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

    /// Whether calls are being short-circuited right now.
    pub fn is_open(&self) -> bool {
        self.now_ms() < self.open_until_ms.load(Ordering::Acquire)
    }

    /// Runs `call` unless the breaker is open, bounded by the timeout, and records
    /// whether the dependency answered. Errors that mean "the dependency answered
    /// no" (a constraint violation, a missing row) do not count as failures.
    pub async fn run<T, E, F>(&self, call: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, E>>,
        E: Into<StoreError>,
    {
        if self.is_open() {
            return Err(StoreError::Unavailable(self.dependency));
        }
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
