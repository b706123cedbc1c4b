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

/// The TCP ports process `pid` listens on (its own sockets in LISTEN, as
/// /proc shows them).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.ok()?.path()).ok()?;
            let link = link.to_str()?;
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// The real binary with `METRICS_ADDR` set so: the ports it listens on,
/// once it serves gRPC (the listeners are bound before anything starts).
async fn ports_with_metrics_addr(metrics_addr: &str) -> (u16, Vec<u16>) {
    let name = crate::helpers::unique("metrics-off");
    let port = crate::helpers::free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_user-service"))
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("METRICS_ADDR", metrics_addr)
        .env("KAFKA_TOPIC", format!("{name}-users"))
        .env("KAFKA_CONSUMER_GROUP", format!("{name}-projector"))
        .env("REDIS_KEY_PREFIX", format!("{name}:"))
        .env("DRAIN_GRACE", "0s")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let endpoint = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    wait_until(Duration::from_secs(60), || async {
        match endpoint.connect().await {
            Ok(channel) => tonic_health::pb::health_client::HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .is_ok(),
            Err(_) => false,
        }
    })
    .await
    .expect("the binary serves gRPC");
    let ports = listening_ports(child.id().unwrap());
    let _ = child.kill().await;
    (port, ports)
}

/// `METRICS_ADDR=off`: the process listens on its gRPC port and nothing
/// else; with an address, on both (what shows the check sees a metrics
/// listener when there is one).
#[tokio::test]
async fn the_endpoint_can_be_turned_off() {
    let (grpc, ports) = ports_with_metrics_addr("off").await;
    assert_eq!(ports, vec![grpc], "only gRPC listens");
    let (grpc, ports) = ports_with_metrics_addr("127.0.0.1:0").await;
    assert_eq!(ports.len(), 2, "gRPC ({grpc}) and /metrics: {ports:?}");
    assert!(ports.contains(&grpc));
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
