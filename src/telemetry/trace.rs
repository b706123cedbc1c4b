//! Distributed traces, W3C Trace Context across the whole path: a call's
//! `traceparent` (gRPC metadata) starts its server span, CreateUser's
//! publish span is written into the Kafka record's headers, and the
//! projector continues that trace when it applies the record, so one trace
//! holds the call, the broker and the Redis write (OpenTelemetry's messaging
//! conventions: the consumer's `process` span is the producer's child).
//!
//! Off unless an exporter is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`): no
//! span is then made on any of these paths and nothing is propagated, so an
//! untraced service pays nothing for it.

use opentelemetry::{
    Context, global,
    propagation::{Extractor, Injector},
    trace::{TraceContextExt, TracerProvider},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use rdkafka::message::{Headers, OwnedHeaders};
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are made and propagated (an exporter is installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// An OTLP (gRPC) exporter to `endpoint`, batched, under `service_name`.
pub fn otlp_provider(
    endpoint: &str,
    service_name: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .with_batch_exporter(exporter)
        .build())
}

/// The `tracing` layer that turns spans into OpenTelemetry spans, for the
/// subscriber; turns tracing on.
pub(super) fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    global::set_text_map_propagator(TraceContextPropagator::new());
    ENABLED.store(true, Ordering::Relaxed);
    tracing_opentelemetry::layer().with_tracer(provider.tracer("user-service"))
}

/// The trace id of `span`, as W3C writes it, if it has one.
pub fn trace_id(span: &Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Sets `span`'s remote parent and writes its trace id into its
/// `trace_id` field (so log lines carry it).
fn adopt(span: &Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    if let Some(id) = trace_id(span) {
        span.record("trace_id", id.as_str());
    }
}

struct HttpHeaders<'a>(&'a http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The span of one incoming gRPC call, child of the caller's `traceparent`.
pub fn server_span(headers: &http::HeaderMap, service: &str, method: &str) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "grpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        trace_id = tracing::field::Empty,
    );
    let parent = global::get_text_map_propagator(|p| p.extract(&HttpHeaders(headers)));
    adopt(&span, parent);
    span
}

struct KafkaHeaders(OwnedHeaders);

impl Injector for KafkaHeaders {
    fn set(&mut self, key: &str, value: String) {
        let headers = std::mem::replace(&mut self.0, OwnedHeaders::new());
        self.0 = headers.insert(rdkafka::message::Header {
            key,
            value: Some(&value),
        });
    }
}

/// The producer span of one publish (a child of the current span), and the
/// record headers that carry it to the consumer; `None` when tracing is off.
pub fn publish_span(topic: &str, key: &str) -> Option<(Span, OwnedHeaders)> {
    if !enabled() {
        return None;
    }
    let span = tracing::info_span!(
        "publish",
        otel.name = %format_args!("{topic} publish"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %topic,
        messaging.kafka.message.key = %key,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.kafka.offset = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    adopt(&span, Context::new());
    let mut headers = KafkaHeaders(OwnedHeaders::new());
    global::get_text_map_propagator(|p| p.inject_context(&span.context(), &mut headers));
    Some((span, headers.0))
}

struct RecordHeaders<'a, H>(Option<&'a H>);

impl<H: Headers> Extractor for RecordHeaders<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        let headers = self.0?;
        headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .map_or_else(Vec::new, |h| h.iter().map(|h| h.key).collect())
    }
}

/// The consumer span of applying one record, child of the producer span its
/// headers carry; `Span::none()` when tracing is off.
pub fn process_span<H: Headers>(
    headers: Option<&H>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("{topic} process"),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = %topic,
        messaging.destination.partition.id = partition,
        messaging.kafka.offset = offset,
        trace_id = tracing::field::Empty,
    );
    let parent = global::get_text_map_propagator(|p| p.extract(&RecordHeaders(headers)));
    adopt(&span, parent);
    span
}
