//! The Prometheus endpoint: counters move by what happened, the lag series
//! say what the progress RPC says, and callers cannot add series.

use crate::helpers::{samples, scrape, spawn_app, sum_of, wait_until};
use futures::StreamExt;
use std::time::Duration;
use tonic::{Code, codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
};
use user_service::proto::user::v1::GetProgressRequest;

#[tokio::test]
async fn counters_follow_the_calls_and_lag_matches_the_progress_rpc() {
    let app = spawn_app().await;
    app.wait_health(ServingStatus::Serving).await;
    app.wait_assigned().await;

    const N: usize = 12;
    let mut created = Vec::new();
    for i in 0..N {
        let c = app
            .create(&format!("Metric {i}"), &format!("metric{i}@example.com"))
            .await
            .expect("created");
        created.push(c);
    }
    // Every create applied (its position read back).
    for c in &created {
        let user = c.user.clone().unwrap();
        app.get_at(user.id, c.position, Duration::from_secs(10))
            .await
            .expect("applied");
    }
    // One refused call: an invalid id.
    let invalid = app
        .get_at(0, None, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);

    // The group commits what it applied (auto-commit): wait for it, so the
    // figures stand still while they are compared.
    let progress = || async {
        app.progress
            .clone()
            .get_progress(GetProgressRequest::default())
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
    };
    wait_until(Duration::from_secs(30), || async {
        progress().await.totals.is_some_and(|t| t.total_lag == 0)
    })
    .await
    .expect("the group committed everything");

    let text = scrape(&app).await;
    let s = samples(&text);
    let n = N as f64;
    assert_eq!(
        sum_of(&s, "user_service_events_sent_total", &[]),
        n,
        "{text}"
    );
    assert_eq!(sum_of(&s, "user_service_events_acknowledged_total", &[]), n);
    assert_eq!(sum_of(&s, "user_service_events_failed_total", &[]), 0.0);
    assert_eq!(sum_of(&s, "user_service_events_in_flight", &[]), 0.0);
    assert_eq!(
        sum_of(&s, "user_service_projector_events_applied_total", &[]),
        n,
        "every create applied once, whatever the partition"
    );
    assert_eq!(
        sum_of(
            &s,
            "grpc_server_handled_total",
            &["grpc_method=\"CreateUser\"", "grpc_code=\"OK\""]
        ),
        n
    );
    assert_eq!(
        sum_of(
            &s,
            "grpc_server_handled_total",
            &["grpc_method=\"GetUser\"", "grpc_code=\"InvalidArgument\""]
        ),
        1.0
    );
    assert_eq!(
        sum_of(
            &s,
            "grpc_server_handling_seconds_count",
            &["grpc_method=\"CreateUser\""]
        ),
        n
    );
    assert_eq!(sum_of(&s, "user_service_event_ack_seconds_count", &[]), n);
    assert_eq!(
        sum_of(&s, "user_service_dependency_up", &["dependency=\"redis\""]),
        1.0
    );
    assert_eq!(
        sum_of(&s, "user_service_dependency_up", &["dependency=\"kafka\""]),
        1.0
    );
    assert_eq!(
        sum_of(
            &s,
            "user_service_health_serving",
            &["service=\"projector\""]
        ),
        1.0
    );
    assert_eq!(sum_of(&s, "user_service_projector_in_group", &[]), 1.0);
    assert_eq!(
        sum_of(&s, "user_service_projector_assigned_partitions", &[]),
        f64::from(app.config.topic_partitions)
    );

    // The lag series and a progress snapshot taken right after agree: the
    // same poller feeds both, and nothing is written in between.
    let snapshot = progress().await;
    assert_eq!(
        snapshot.partitions.len(),
        app.config.topic_partitions as usize
    );
    for p in &snapshot.partitions {
        let label = format!("partition=\"{}\"", p.partition);
        assert_eq!(
            sum_of(&s, "user_service_projection_log_end_offset", &[&label]),
            p.log_end_offset as f64,
            "partition {}",
            p.partition
        );
        assert_eq!(
            sum_of(&s, "user_service_projection_lag_records", &[&label]),
            p.lag as f64,
            "partition {}",
            p.partition
        );
    }
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn the_endpoint_can_be_turned_off() {
    let mut config = crate::helpers::test_config();
    config.metrics_addr = user_service::config::MetricsAddr::Off;
    let app = crate::helpers::spawn_app_with(config).await;
    assert!(app.handle.metrics_addr.is_none());
    app.stop().await.expect("clean stop");
}

/// Calls to names the server does not serve (answered UNIMPLEMENTED) are
/// counted under `unknown`: made-up names add no series (30,000 of them once
/// took /metrics from 30 KB to 71 MB, for good).
#[tokio::test]
async fn made_up_method_names_add_no_series() {
    let app = spawn_app().await;
    app.wait_health(ServingStatus::Serving).await;
    let before = scrape(&app).await;

    const N: usize = 3000;
    // Random services, random methods, and random methods of a served service.
    let paths = (0..N).map(|n| match n % 3 {
        0 => format!("/random.Svc/Meth{n}"),
        1 => format!("/random{n}.Svc/Meth"),
        _ => format!("/user.v1.UserService/Meth{n}"),
    });
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let codes: Vec<Code> = futures::stream::iter(paths)
        .map(|path| {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            async move {
                grpc.ready().await.unwrap();
                grpc.unary(
                    tonic::Request::new(HealthCheckRequest::default()),
                    PathAndQuery::try_from(path).unwrap(),
                    tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default(),
                )
                .await
                .expect_err("no such method")
                .code()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(codes.iter().all(|c| *c == Code::Unimplemented), "{codes:?}");

    let after = scrape(&app).await;
    let (was, now) = (samples(&before), samples(&after));
    let growth = format!(
        "{} series ({} bytes) before, {} ({} bytes) after",
        was.len(),
        before.len(),
        now.len(),
        after.len()
    );
    assert!(
        !after.contains("random") && !after.contains("Meth"),
        "a made-up name became a label: {growth}"
    );
    // The two new label sets (unknown/unknown, UserService/unknown), with
    // their histograms: a few dozen series, whatever N is.
    assert!(now.len() <= was.len() + 100, "{growth}");
    let unknown = |service: &str| {
        sum_of(
            &now,
            "grpc_server_handled_total",
            &[
                &format!("grpc_service=\"{service}\""),
                "grpc_method=\"unknown\"",
                "grpc_code=\"Unimplemented\"",
            ],
        )
    };
    assert_eq!(unknown("unknown"), (N - N / 3) as f64, "{after}");
    assert_eq!(unknown("user.v1.UserService"), (N / 3) as f64, "{after}");
    app.stop().await.expect("clean stop");
}
