//! One trace from the caller to the Redis write: the call's `traceparent`
//! starts the server span, CreateUser's publish span travels in the Kafka
//! record's headers, and the projector's span continues it.

use crate::helpers::{finished_spans, kafka_link, spawn_app, unique, wait_until};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
    message::Headers,
};
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use user_service::proto::user::v1::CreateUserRequest;

#[tokio::test]
async fn a_trace_follows_a_create_from_the_call_through_kafka_to_the_read_model() {
    let app = spawn_app().await;
    app.wait_health(ServingStatus::Serving).await;
    app.wait_assigned().await;

    // The caller's own trace and span (W3C Trace Context).
    let trace_id = TraceId::from_hex(&format!("{:032x}", rand_u128())).unwrap();
    let caller_span = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    let mut request = tonic::Request::new(CreateUserRequest {
        name: "Traced".into(),
        email: "traced@example.com".into(),
        request_id: unique("traced"),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let created = app
        .users
        .clone()
        .create_user(request)
        .await
        .unwrap()
        .into_inner();
    let position = created.position.unwrap();

    // The record on the topic carries the trace.
    let c: StreamConsumer = kafka_link()
        .client_config()
        .set("group.id", unique("trace-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[&app.config.topic]).unwrap();
    let m = crate::helpers::first_user_event(&c).await;
    assert_eq!(
        (m.partition(), m.offset()),
        (position.partition, position.offset)
    );
    let traceparent = m
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "traceparent"))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
        .expect("the record has a traceparent header");
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{traceparent}"
    );

    // The spans of that trace, once the projector's has ended.
    let mut spans = Vec::new();
    wait_until(Duration::from_secs(30), || {
        spans = finished_spans()
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace_id)
            .collect();
        let done = spans.iter().any(|s| s.span_kind == SpanKind::Consumer);
        async move { done }
    })
    .await
    .expect("the projector's span ended");
    let find = |kind: SpanKind| {
        spans
            .iter()
            .find(|s| s.span_kind == kind)
            .unwrap_or_else(|| panic!("no {kind:?} span in {spans:#?}"))
    };
    let server = find(SpanKind::Server);
    let producer = find(SpanKind::Producer);
    let consumer = find(SpanKind::Consumer);
    assert_eq!(server.name, "user.v1.UserService/CreateUser");
    assert_eq!(
        server.parent_span_id, caller_span,
        "the call continues the caller's trace"
    );
    assert_eq!(producer.name, format!("{} publish", app.config.topic));
    assert_eq!(consumer.name, format!("{} process", app.config.topic));
    // The record's header names the publish span, and the projector's span
    // is its child.
    assert!(traceparent.contains(&producer.span_context.span_id().to_string()));
    assert_eq!(consumer.parent_span_id, producer.span_context.span_id());
    // The publish span descends from the server span (through the handler's).
    let mut parent = producer.parent_span_id;
    let mut chain = vec![];
    while parent != SpanId::INVALID && parent != server.span_context.span_id() {
        let up = spans
            .iter()
            .find(|s| s.span_context.span_id() == parent)
            .unwrap_or_else(|| panic!("span {parent} not in the trace: {chain:?}"));
        chain.push(up.name.to_string());
        parent = up.parent_span_id;
    }
    assert_eq!(parent, server.span_context.span_id(), "through {chain:?}");
    // The projector's span follows the publish: it starts once the record
    // is there. (Not "ends after": the broker's acknowledgement can reach
    // the publishing task after the projector has already applied it.)
    assert!(consumer.start_time >= producer.start_time);
    let offset = consumer
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "messaging.kafka.offset")
        .map(|kv| kv.value.to_string());
    assert_eq!(
        offset.as_deref(),
        Some(position.offset.to_string().as_str())
    );
    // The trace as text (docs/observability.md shows one): `--nocapture`.
    let mut sorted: Vec<_> = spans.iter().collect();
    sorted.sort_by_key(|s| s.start_time);
    let t0 = sorted[0].start_time;
    for s in sorted {
        let depth = std::iter::successors(Some(s.parent_span_id), |p| {
            spans
                .iter()
                .find(|x| x.span_context.span_id() == *p)
                .map(|x| x.parent_span_id)
        })
        .take_while(|p| spans.iter().any(|x| x.span_context.span_id() == *p))
        .count();
        let at = s.start_time.duration_since(t0).unwrap_or_default();
        let took = s.end_time.duration_since(s.start_time).unwrap_or_default();
        eprintln!(
            "{:>8.3} ms {:>8.3} ms  {}{} [{:?}] span {} parent {}",
            at.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e3,
            "  ".repeat(depth),
            s.name,
            s.span_kind,
            s.span_context.span_id(),
            s.parent_span_id,
        );
    }
    app.stop().await.expect("clean stop");
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    (u128::from(h.finish()) << 64) | u128::from(h.finish().rotate_left(17)) | 1
}
