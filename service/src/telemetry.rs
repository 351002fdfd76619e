//! Logging: JSON or text on stdout. Dependencies log at `warn` only, whatever the level,
//! so no library's debug output (request headers included) can reach the log; kube-client,
//! which logs undecodable response bodies (tokens included) at `warn`, not at all. Every
//! line is redacted on its way out (`redact`), whatever crate wrote it.
//!
//! Lines go to stdout from a thread of their own (tracing-appender, never lossy): a
//! Check pays for a queue push, not a `write(2)`, and under load many lines share one
//! write (the thread flushes whenever the queue runs empty). A full queue (64 Ki lines) makes the logging thread wait, as a blocked stdout
//! would, rather than drop a decision line.

pub(crate) mod redact;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

use crate::cli::{LogFormat, LogLevel};

/// Lines that may wait for the writer thread before a logging call blocks.
const QUEUED_LINES: usize = 64 * 1024;

/// Keeps the writer thread; dropping it writes out every queued line. Hold it until exit.
#[must_use = "dropping it stops the log writer"]
pub struct LogWriter {
    _guard: tracing_appender::non_blocking::WorkerGuard,
}

/// Installs the global subscriber. Call once, at start.
pub fn init(level: LogLevel, format: LogFormat) -> LogWriter {
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
    let (stdout, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("tokensmith-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    let writer = redact::Redacting(stdout);
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
        // Colours only on a terminal: a log collector would keep the escape codes.
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
            )
            .init(),
    }
    LogWriter { _guard: guard }
}
