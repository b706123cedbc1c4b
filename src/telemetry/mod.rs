//! What the service tells operators: `tracing` set-up (`RUST_LOG` filters,
//! text or JSON output), distributed traces ([`trace`]), Prometheus metrics
//! ([`metrics`]); [`grpc`] is the layer that meters and traces every call.
//!
//! A leaf: it imports nothing of the crate, so every layer may record
//! through it. The figures the parts keep for themselves are collected at
//! scrape time where the parts are wired (`startup::metrics_endpoint`).

pub mod grpc;
pub mod metrics;
pub mod trace;

pub use metrics::Metrics;

use std::io::IsTerminal;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log output format (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber; later calls (tests) are no-ops.
pub fn init(format: LogFormat, default_filter: &str) {
    init_with(Some(format), default_filter, None);
}

/// Installs the global subscriber: logs in `format` (none: no log output),
/// and OpenTelemetry spans into `tracer` when given (which turns tracing
/// on, see [`trace`]). Later calls are no-ops.
pub fn init_with(
    format: Option<LogFormat>,
    default_filter: &str,
    tracer: Option<&opentelemetry_sdk::trace::SdkTracerProvider>,
) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let text = (format == Some(LogFormat::Text)).then(|| {
        fmt::layer()
            .with_target(false)
            .with_ansi(std::io::stdout().is_terminal())
    });
    // Every span in scope is listed with its fields: the request's span
    // carries `trace_id`, so a line joins its trace.
    let json = (format == Some(LogFormat::Json)).then(|| {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracer.map(trace::layer))
        .with(text)
        .with(json)
        .try_init();
}
