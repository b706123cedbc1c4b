//! The `user-service` binary: parse flags, start the application, run until
//! SIGTERM or Ctrl-C.

use anyhow::Context;
use clap::Parser;
use user_service::{
    config::{Command, Config},
    move_topic::Move,
    startup::Application,
    telemetry,
};

/// mimalloc instead of glibc's malloc: the profile in docs/benchmarks.md
/// shows allocation and copying at 15–20% of the service's CPU per call, and
/// `scripts/bench.d/ab-allocator` measures the gain against glibc's malloc.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    // Traces only where an OTLP endpoint is configured.
    let tracer = config
        .otlp_endpoint
        .as_deref()
        .map(|endpoint| telemetry::trace::otlp_provider(endpoint, &config.otel_service_name))
        .transpose()
        .context("OTEL_EXPORTER_OTLP_ENDPOINT")?;
    telemetry::init_with(
        Some(config.log_format),
        "info,rdkafka=warn",
        tracer.as_ref(),
    );
    if let Some(Command::MoveTopic { to, partitions }) = &config.command {
        let report = Move {
            link: config.kafka_link().context("Kafka settings")?,
            from: config.topic.clone(),
            to: to.clone(),
            partitions: *partitions,
            replication: config.topic_replication,
            timeout: config
                .publish_timeout
                .max(std::time::Duration::from_secs(10)),
        }
        .run()
        .await
        .with_context(|| format!("moving {} to {to}", config.topic))?;
        println!(
            "moved {} ({} partitions) to {to} ({} partitions): {} events copied, {} records left \
             behind (created nothing), seals at {:?}; run the instances with KAFKA_TOPIC={to}",
            config.topic,
            report.from_map.partitions,
            report.to_map.partitions,
            report.copied,
            report.skipped,
            report.seals
        );
        return Ok(());
    }
    // Fail points from FAILPOINTS (only with the `failpoints` feature; tests).
    let _failpoints = fail::FailScenario::setup();
    let app = Application::build(config)
        .await
        .context("starting user-service")?;
    tracing::info!(addr = %app.local_addr(), traces = tracer.is_some(), "serving gRPC");
    let ran = app
        .run_until_stopped(shutdown_signal())
        .await
        .context("running user-service");
    if let Some(tracer) = tracer {
        // Sends the spans still batched.
        let _ = tracer.shutdown();
    }
    ran
}

/// Resolves on the first SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        // Failing to install a handler leaves only SIGTERM to stop us.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}
