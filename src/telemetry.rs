//! Logging setup: JSON lines in containers, human-readable on a terminal.
//!
//! `RUST_LOG` filters as usual; without it we log our own crate at info and
//! dependencies at warn. Every request runs in a span carrying its request id.

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

const DEFAULT_FILTER: &str = "info,sqlx=warn,tower_http=info,hyper=warn,redis=warn";

/// Installs the global subscriber; later calls (several instances in one test
/// process) keep the first.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .try_init(),
        LogFormat::Pretty => builder.with_target(false).try_init(),
    };
}
