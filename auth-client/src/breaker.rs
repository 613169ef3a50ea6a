//! A circuit breaker for remote validation.
//!
//! When the service is down (every replica evicted at once, a network partition),
//! waiting out a timeout and retries on every request would stall the app and
//! pile up work; the breaker turns that into an immediate answer (or a fallback to
//! local validation) until the service is likely back:
//!
//! - **Closed**: calls go through; `failure_threshold` consecutive failures open it.
//! - **Open**: calls are refused at once for `open_for`.
//! - **Half-open**: one probe call goes through; success closes the breaker, failure
//!   opens it again. A probe that never reports (its future was dropped) is given
//!   up after `open_for`, so the breaker cannot stick half-open.
//!
//! The state machine is pure (time is passed in) so it is unit-tested without
//! sleeping; [`Breaker`] wraps it in a mutex for concurrent use.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed attempts that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before letting a probe through.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(5),
        }
    }
}

/// The state, as reported to callers (metrics, health, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_started: Instant },
}

/// The pure state machine.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: State,
}

/// The answer to "may I call?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead (in half-open, this call is the probe).
    Allowed,
    /// Do not call; the breaker may let a probe through after this long.
    Rejected { retry_in: Duration },
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config: BreakerConfig {
                failure_threshold: config.failure_threshold.max(1),
                ..config
            },
            state: State::Closed { failures: 0 },
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            // An open breaker whose time is up admits the next call as a probe.
            State::Open { until } if now >= until => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to make a call at `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Allowed,
            State::Open { until } if now < until => Admission::Rejected {
                retry_in: until - now,
            },
            State::Open { .. } => {
                self.state = State::HalfOpen { probe_started: now };
                Admission::Allowed
            }
            State::HalfOpen { probe_started } => {
                let abandoned_at = probe_started + self.config.open_for;
                if now >= abandoned_at {
                    // The probe never reported (cancelled): let another one through.
                    self.state = State::HalfOpen { probe_started: now };
                    Admission::Allowed
                } else {
                    Admission::Rejected {
                        retry_in: abandoned_at - now,
                    }
                }
            }
        }
    }

    /// Records an answer from the service (any status it gave deliberately).
    pub fn on_success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    /// Records a failed attempt: connection error, timeout, 5xx.
    pub fn on_failure(&mut self, now: Instant) {
        let open = State::Open {
            until: now + self.config.open_for,
        };
        self.state = match self.state {
            State::Closed { failures } if failures + 1 >= self.config.failure_threshold => open,
            State::Closed { failures } => State::Closed {
                failures: failures + 1,
            },
            // A failed probe, or a late failure of a call admitted before the
            // breaker opened: (re)open for a full period.
            State::HalfOpen { .. } | State::Open { .. } => open,
        };
    }
}

/// A [`CircuitBreaker`] shared by concurrent calls.
#[derive(Debug)]
pub(crate) struct Breaker(Mutex<CircuitBreaker>);

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self(Mutex::new(CircuitBreaker::new(config)))
    }

    fn with<T>(&self, f: impl FnOnce(&mut CircuitBreaker) -> T) -> T {
        // The state machine cannot be left inconsistent by a panic, so a poisoned
        // lock is still usable.
        let mut guard = match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    pub fn admit(&self) -> Admission {
        self.with(|b| b.admit(Instant::now()))
    }

    pub fn on_success(&self) {
        self.with(|b| {
            if b.state(Instant::now()) != BreakerState::Closed {
                tracing::info!("auth service answers again: circuit closed");
            }
            b.on_success();
        });
    }

    pub fn on_failure(&self) {
        self.with(|b| {
            let now = Instant::now();
            let before = b.state(now);
            b.on_failure(now);
            if before != BreakerState::Open && b.state(now) == BreakerState::Open {
                tracing::warn!("auth service calls keep failing: circuit open");
            }
        });
    }

    pub fn state(&self) -> BreakerState {
        self.with(|b| b.state(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_secs: u64) -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            failure_threshold: threshold,
            open_for: Duration::from_secs(open_secs),
        })
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t = Instant::now();
        let mut b = breaker(3, 10);
        b.on_failure(t);
        b.on_failure(t);
        b.on_success(); // the count is of *consecutive* failures
        b.on_failure(t);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Closed);
        assert_eq!(b.admit(t), Admission::Allowed);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Open);
        assert_eq!(b.admit(t + 4 * S), Admission::Rejected { retry_in: 6 * S });
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_result_decides() {
        let t = Instant::now();
        let mut b = breaker(1, 10);
        b.on_failure(t);
        assert_eq!(b.state(t + 10 * S), BreakerState::HalfOpen);
        assert_eq!(b.admit(t + 10 * S), Admission::Allowed, "the probe");
        assert_eq!(
            b.admit(t + 11 * S),
            Admission::Rejected { retry_in: 9 * S },
            "only one probe at a time"
        );
        // Failed probe: open for a full period again.
        b.on_failure(t + 12 * S);
        assert_eq!(b.state(t + 12 * S), BreakerState::Open);
        assert_eq!(b.admit(t + 13 * S), Admission::Rejected { retry_in: 9 * S });
        // Successful probe: closed, and calls flow.
        assert_eq!(b.admit(t + 22 * S), Admission::Allowed);
        b.on_success();
        assert_eq!(b.state(t + 22 * S), BreakerState::Closed);
        assert_eq!(b.admit(t + 22 * S), Admission::Allowed);
        assert_eq!(b.admit(t + 22 * S), Admission::Allowed);
    }

    #[test]
    fn an_abandoned_probe_does_not_keep_the_breaker_half_open() {
        let t = Instant::now();
        let mut b = breaker(1, 5);
        b.on_failure(t);
        assert_eq!(b.admit(t + 5 * S), Admission::Allowed);
        // That probe's future was dropped: nobody reports. After another period a
        // new probe is allowed.
        assert!(matches!(b.admit(t + 9 * S), Admission::Rejected { .. }));
        assert_eq!(b.admit(t + 10 * S), Admission::Allowed);
    }

    #[test]
    fn late_failures_while_open_extend_it_and_threshold_zero_means_one() {
        let t = Instant::now();
        let mut b = breaker(0, 5);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Open);
        b.on_failure(t + 3 * S);
        assert_eq!(b.state(t + 6 * S), BreakerState::Open);
        assert_eq!(b.state(t + 8 * S), BreakerState::HalfOpen);
    }

    #[test]
    fn the_shared_breaker_reports_its_state() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(60),
        });
        assert_eq!(b.admit(), Admission::Allowed);
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(), Admission::Rejected { .. }));
    }
}
