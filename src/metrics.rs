//! Prometheus metrics of one running instance.
//!
//! Each [`Metrics`] owns its own registry instead of the crate's global one, so
//! several instances in one test process keep separate counts. Labels carry route
//! templates and outcomes only: never a raw path, a username, or anything secret.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The `outcome` label values of `auth_logins_total`.
pub const LOGIN_OUTCOMES: [&str; 6] = [
    "success",
    "invalid_credentials",
    "locked",
    "overloaded",
    "unavailable",
    "error",
];

/// Every metric this service exports.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route template, method and status.
    pub http_requests: IntCounterVec,
    /// Time to answer, by route template and method.
    pub http_duration: HistogramVec,
    /// Requests being served right now.
    pub http_in_flight: IntGauge,
    /// 1 from the first shutdown signal until exit.
    pub draining: IntGauge,
    /// 1 while a dependency answered its last probe.
    pub dependency_up: IntGaugeVec,
    /// Latency of the last probe of a dependency.
    pub dependency_latency: prometheus::GaugeVec,
    /// 1 while the circuit breaker for a dependency is open (calls short-circuited).
    pub dependency_circuit_open: IntGaugeVec,
    /// Logins by outcome (success, invalid_credentials, locked, rate_limited, unavailable).
    pub logins: IntCounterVec,
    /// Token validations by outcome.
    pub validations: IntCounterVec,
    /// Validations accepted on signature and `exp` alone because Redis was down.
    pub degraded_validations: IntCounter,
    /// Refreshes by outcome.
    pub refreshes: IntCounterVec,
    /// Refresh tokens presented a second time (the session was revoked).
    pub refresh_reuse: IntCounter,
    /// Accounts locked out (`username`), and attempts of client IPs refused
    /// because their slow lane was full (`ip`).
    pub lockouts: IntCounterVec,
    /// Attempts of client IPs over their failure limit that waited for their turn.
    pub ip_slowed: IntCounter,
    /// Password hashes waiting for or holding a hashing thread.
    pub hash_queue_depth: IntGauge,
    /// Time spent computing one password hash.
    pub hash_duration: prometheus::Histogram,
    /// Signing keys loaded, by state (published, active).
    pub signing_keys: IntGaugeVec,
    /// Age of the key that signs new tokens.
    pub signing_key_age: prometheus::Gauge,
}

impl Metrics {
    // The names, help texts and labels are constants: a failure here is a
    // programming error that every test run would show at once.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            http_requests: IntCounterVec::new(
                Opts::new("http_requests_total", "HTTP requests answered"),
                &["route", "method", "status"],
            )
            .expect("valid metric"),
            http_duration: HistogramVec::new(
                HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ]),
                &["route", "method"],
            )
            .expect("valid metric"),
            http_in_flight: IntGauge::new("http_requests_in_flight", "HTTP requests in flight")
                .expect("valid metric"),
            draining: IntGauge::new(
                "auth_draining",
                "1 while this instance drains after a shutdown signal",
            )
            .expect("valid metric"),
            dependency_up: IntGaugeVec::new(
                Opts::new("auth_dependency_up", "1 while a dependency answers"),
                &["dependency"],
            )
            .expect("valid metric"),
            dependency_latency: prometheus::GaugeVec::new(
                Opts::new(
                    "auth_dependency_latency_seconds",
                    "Latency of the last health probe of a dependency",
                ),
                &["dependency"],
            )
            .expect("valid metric"),
            dependency_circuit_open: IntGaugeVec::new(
                Opts::new(
                    "auth_dependency_circuit_open",
                    "1 while calls to a dependency are short-circuited",
                ),
                &["dependency"],
            )
            .expect("valid metric"),
            logins: IntCounterVec::new(
                Opts::new("auth_logins_total", "Login attempts by outcome"),
                &["outcome"],
            )
            .expect("valid metric"),
            validations: IntCounterVec::new(
                Opts::new("auth_validations_total", "Token validations by outcome"),
                &["outcome"],
            )
            .expect("valid metric"),
            degraded_validations: IntCounter::new(
                "auth_degraded_validations_total",
                "Tokens accepted without a session check because Redis was unreachable",
            )
            .expect("valid metric"),
            refreshes: IntCounterVec::new(
                Opts::new("auth_refreshes_total", "Token refreshes by outcome"),
                &["outcome"],
            )
            .expect("valid metric"),
            refresh_reuse: IntCounter::new(
                "auth_refresh_reuse_detected_total",
                "Refresh tokens presented again after use; their sessions were revoked",
            )
            .expect("valid metric"),
            lockouts: IntCounterVec::new(
                Opts::new(
                    "auth_lockouts_total",
                    "Failed-login limits crossed, by scope",
                ),
                &["scope"],
            )
            .expect("valid metric"),
            ip_slowed: IntCounter::new(
                "auth_ip_slowed_attempts_total",
                "Attempts from client IPs over their failure limit that waited for a turn",
            )
            .expect("valid metric"),
            hash_queue_depth: IntGauge::new(
                "auth_password_hash_queue_depth",
                "Password hashes queued or running",
            )
            .expect("valid metric"),
            hash_duration: prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "auth_password_hash_duration_seconds",
                    "Time to compute one password hash",
                )
                .buckets(vec![0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]),
            )
            .expect("valid metric"),
            signing_keys: IntGaugeVec::new(
                Opts::new("auth_signing_keys", "Signing keys loaded, by state"),
                &["state"],
            )
            .expect("valid metric"),
            signing_key_age: prometheus::Gauge::new(
                "auth_signing_key_age_seconds",
                "Age of the key that signs new tokens",
            )
            .expect("valid metric"),
            registry,
        };
        let build_info = IntGaugeVec::new(
            Opts::new("auth_build_info", "Build information; always 1"),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.http_requests.clone()),
            Box::new(m.http_duration.clone()),
            Box::new(m.http_in_flight.clone()),
            Box::new(m.draining.clone()),
            Box::new(m.dependency_up.clone()),
            Box::new(m.dependency_latency.clone()),
            Box::new(m.dependency_circuit_open.clone()),
            Box::new(m.logins.clone()),
            Box::new(m.validations.clone()),
            Box::new(m.degraded_validations.clone()),
            Box::new(m.refreshes.clone()),
            Box::new(m.refresh_reuse.clone()),
            Box::new(m.lockouts.clone()),
            Box::new(m.ip_slowed.clone()),
            Box::new(m.hash_queue_depth.clone()),
            Box::new(m.hash_duration.clone()),
            Box::new(m.signing_keys.clone()),
            Box::new(m.signing_key_age.clone()),
            Box::new(build_info),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        // Series that exist from the start: `increase()` over a series that appears
        // at 1 misses that first event, so alerts on the first lockout or reuse
        // would never fire.
        for outcome in LOGIN_OUTCOMES {
            m.logins.with_label_values(&[outcome]);
        }
        for outcome in ["valid", "invalid", "forbidden", "unavailable", "error"] {
            m.validations.with_label_values(&[outcome]);
        }
        for outcome in ["success", "invalid", "unavailable", "error"] {
            m.refreshes.with_label_values(&[outcome]);
        }
        for scope in ["username", "ip"] {
            m.lockouts.with_label_values(&[scope]);
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec fails only on an inconsistent metric family, which the
        // fixed set above cannot produce; an empty scrape is the safe answer anyway.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            buf.clear();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
