//! auth-service: an authentication service whose replicas keep nothing another
//! replica would need, so Kubernetes can evict any of them at any moment.
//!
//! Data flows one way: HTTP ([`http`]) → domain modules → storage ([`store`]).
//! [`app`] wires them together and runs the server; [`config`] reads the
//! environment once; [`shutdown`] holds the lifecycle that readiness reports.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod http;
pub mod metrics;
pub mod passwords;
pub mod runtime_config;
pub mod sessions;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod users;
