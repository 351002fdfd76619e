//! Logging: JSON or text on stdout. Dependencies log at `warn` only, whatever the level,
//! so no library's debug output (request headers included) can reach the log; kube-client,
//! which logs undecodable response bodies (tokens included) at `warn`, not at all. Every
//! line is redacted on its way out (`redact`), whatever crate wrote it.

pub(crate) mod redact;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

use crate::cli::{LogFormat, LogLevel};

/// Installs the global subscriber. Call once, at start.
pub fn init(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Error => LevelFilter::ERROR,
    };
    let filter = Targets::new()
        .with_default(LevelFilter::WARN.min(level))
        .with_target("tokensmith", level)
        .with_target("tokensmith_service", level)
        .with_target("kube_client", LevelFilter::OFF);
    let writer = redact::Redacting(std::io::stdout);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(writer))
            .init(),
    }
}
