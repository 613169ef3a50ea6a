//! How calls to the service are retried: a bounded number of attempts, spaced by
//! exponential backoff with jitter, and never sooner than the service's
//! `Retry-After` — but never waiting longer than a cap for it either.
//!
//! Jitter matters here: when a replica is evicted, every app that was talking to
//! it fails at the same instant, and without jitter they would all retry at the
//! same instants too.

use std::time::Duration;

/// Retry settings for calls to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = no retry).
    pub max_retries: u32,
    /// The first backoff; it doubles with each retry.
    pub base_delay: Duration,
    /// No backoff is longer than this.
    pub max_delay: Duration,
    /// The longest `Retry-After` that is waited for. A service asking for more
    /// gets no retry: the caller gets the error (and the `Retry-After`) at once,
    /// instead of a request that hangs for a long time.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 2,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// The backoff before retry number `retry` (1-based), with "equal jitter":
    /// half of the exponential delay is fixed, the other half random, so retries
    /// are both spread out and never immediate. `jitter` is uniform in [0, 1).
    pub fn backoff(&self, retry: u32, jitter: f64) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)));
        let ceiling = exp.min(self.max_delay);
        let half = ceiling / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// The wait before retry number `retry`, or `None` when no retry should be
    /// made: retries are used up, or the service asked to wait longer than
    /// [`max_retry_after`](Self::max_retry_after).
    pub fn delay(
        &self,
        retry: u32,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if retry > self.max_retries {
            return None;
        }
        let backoff = self.backoff(retry, jitter);
        match retry_after {
            Some(wait) if wait > self.max_retry_after => None,
            Some(wait) => Some(wait.max(backoff)),
            None => Some(backoff),
        }
    }
}

/// A `Retry-After` value in delay-seconds form. The HTTP-date form is not used by
/// the service and is ignored (the caller falls back to its own backoff).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn backoff_doubles_with_equal_jitter_and_is_capped() {
        let p = RetryPolicy {
            max_retries: 10,
            base_delay: ms(100),
            max_delay: ms(500),
            max_retry_after: Duration::from_secs(2),
        };
        assert_eq!(p.backoff(1, 0.0), ms(50));
        assert!(p.backoff(1, 0.999_999) < ms(100));
        assert_eq!(p.backoff(2, 0.0), ms(100));
        assert_eq!(p.backoff(3, 0.5), ms(300));
        // Capped: 100 * 2^9 would be 51.2 s.
        assert_eq!(p.backoff(10, 0.0), ms(250));
        assert_eq!(p.backoff(10, 1.0), ms(500));
        // Huge retry numbers saturate instead of overflowing.
        assert_eq!(p.backoff(u32::MAX, 1.0), ms(500));
        // Out-of-range jitter is clamped.
        assert_eq!(p.backoff(1, 7.0), ms(100));
        assert_eq!(p.backoff(1, -1.0), ms(50));
    }

    #[test]
    fn delay_respects_the_retry_budget_and_retry_after_cap() {
        let p = RetryPolicy {
            max_retries: 2,
            base_delay: ms(100),
            max_delay: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(2),
        };
        assert_eq!(p.delay(1, None, 0.0), Some(ms(50)));
        assert_eq!(p.delay(2, None, 0.0), Some(ms(100)));
        assert_eq!(p.delay(3, None, 0.0), None, "only two retries");
        // Retry-After is honoured when within the cap, and never shortened.
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(1)), 0.9),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            p.delay(1, Some(Duration::ZERO), 0.0),
            Some(ms(50)),
            "Retry-After 0 still backs off"
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(2)), 0.0),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3)), 0.0),
            None,
            "beyond the cap"
        );
        assert_eq!(RetryPolicy::none().delay(1, None, 0.0), None);
    }

    #[test]
    fn retry_after_seconds_are_parsed_and_dates_ignored() {
        assert_eq!(parse_retry_after("1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after(""), None);
    }
}
