//! The instance's lifecycle: starting, ready, draining.
//!
//! Readiness is the only thing Kubernetes and load balancers look at, so the phase
//! lives in one atomic that `/health` reads without locking. Shutdown follows the
//! contract: on the first SIGTERM or SIGINT the phase turns to draining at once,
//! the server keeps serving for `AUTH_SHUTDOWN_DELAY` while endpoints are removed,
//! then stops accepting and drains (see [`crate::app`]). A second signal exits at
//! once.

use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::watch;

/// Where this instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Migrations or key loading not finished: no traffic yet.
    Starting = 0,
    /// Serving.
    Ready = 1,
    /// A shutdown signal arrived: still serving, but asking for no new traffic.
    Draining = 2,
}

/// Shared, lock-free view of the phase plus a way to wait for draining.
pub struct Lifecycle {
    phase: AtomicU8,
    draining: watch::Sender<bool>,
}

impl Lifecycle {
    pub fn new() -> Self {
        Self {
            phase: AtomicU8::new(Phase::Starting as u8),
            draining: watch::Sender::new(false),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    /// Marks startup finished, unless a shutdown already began.
    pub fn set_ready(&self) {
        let _ = self.phase.compare_exchange(
            Phase::Starting as u8,
            Phase::Ready as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Turns readiness off for good and wakes everything waiting for it.
    pub fn begin_draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::Release);
        self.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        self.phase() == Phase::Draining
    }

    /// Resolves once draining has begun (at once if it already has).
    pub async fn drained_signal(&self) {
        let mut rx = self.draining.subscribe();
        // The sender lives as long as `self`, so wait_for cannot fail while we hold it.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

/// Resolves on the first SIGTERM or SIGINT, and arranges for a second one to end
/// the process at once.
pub async fn signal() {
    first_signal().await;
    tokio::spawn(async {
        first_signal().await;
        tracing::warn!("second shutdown signal: exiting without draining");
        std::process::exit(1);
    });
}

#[cfg(unix)]
async fn first_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we would never drain; waiting forever is wrong too,
        // so fall back to Ctrl-C handling, which tokio supports everywhere.
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown signal received"),
    }
}

#[cfg(not(unix))]
async fn first_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_is_final() {
        let l = Lifecycle::new();
        assert_eq!(l.phase(), Phase::Starting);
        l.begin_draining();
        l.set_ready();
        assert_eq!(l.phase(), Phase::Draining);
    }

    #[tokio::test]
    async fn drained_signal_resolves_after_begin() {
        let l = std::sync::Arc::new(Lifecycle::new());
        l.set_ready();
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.drained_signal().await }
        });
        l.begin_draining();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
