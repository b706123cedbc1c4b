//! gRPC over TLS and mutual TLS, with certificates made here (rcgen): the
//! right CA gets in, anything else fails the handshake, and a rotated
//! certificate serves new connections while an open stream goes on.

use crate::helpers::{
    TestApp,
    certs::{Ca, Files},
    spawn_app_with, test_config, wait_until,
};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use user_service::proto::user::v1::{
    WatchProgressRequest, projection_service_client::ProjectionServiceClient,
};

async fn tls_app(files: &Files, mutual: bool) -> TestApp {
    let mut config = test_config();
    config.tls_cert_file = Some(files.path("server.pem"));
    config.tls_key_file = Some(files.path("server.key"));
    config.tls_client_ca_file = mutual.then(|| files.path("clients-ca.pem"));
    config.tls_reload_interval = Duration::from_millis(100);
    spawn_app_with(config).await
}

/// A TLS channel trusting `ca`, with a client identity if given.
async fn connect(
    app: &TestApp,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn check(channel: Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
}

/// Connect and call once: Ok only if both work.
async fn reaches(app: &TestApp, ca: &str, identity: Option<&(String, String)>) -> bool {
    match connect(app, ca, identity).await {
        Ok(channel) => check(channel).await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn tls_admits_only_clients_that_trust_its_ca() {
    let (ca, other) = (Ca::new("service CA"), Ca::new("another CA"));
    let files = Files::new();
    let (cert, key) = ca.leaf("user-service", true);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    // The test's plaintext clients (helpers) cannot reach it: build by hand.
    let app = tls_app(&files, false).await;

    assert!(reaches(&app, &ca.pem(), None).await, "the right CA gets in");
    assert!(
        !reaches(&app, &other.pem(), None).await,
        "another CA does not"
    );
    // Plaintext against a TLS port: no answer.
    let plain = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Ok(channel) => check(channel).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "plaintext is refused");
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_its_ca() {
    let (ca, clients, other) = (
        Ca::new("server CA"),
        Ca::new("clients CA"),
        Ca::new("rogue CA"),
    );
    let files = Files::new();
    let (cert, key) = ca.leaf("user-service", true);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    files.write("clients-ca.pem", &clients.pem());
    let app = tls_app(&files, true).await;

    let good = clients.leaf("a client", false);
    let rogue = other.leaf("a client", false);
    assert!(
        reaches(&app, &ca.pem(), Some(&good)).await,
        "a client of the CA gets in"
    );
    assert!(
        !reaches(&app, &ca.pem(), None).await,
        "no certificate, no entry"
    );
    assert!(
        !reaches(&app, &ca.pem(), Some(&rogue)).await,
        "another CA's client does not"
    );
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_and_open_streams_go_on() {
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = Files::new();
    let (cert, key) = old_ca.leaf("user-service", true);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    let app = tls_app(&files, false).await;

    // A progress stream over the old certificate.
    let channel = connect(&app, &old_ca.pem(), None).await.expect("old CA");
    let mut stream = ProjectionServiceClient::new(channel)
        .watch_progress(WatchProgressRequest {
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
            ..Default::default()
        })
        .await
        .expect("stream opened")
        .into_inner();
    stream.message().await.unwrap().expect("a first snapshot");

    // Rotate: a certificate from another CA, key first then certificate.
    let (cert, key) = new_ca.leaf("user-service", true);
    files.write("server.key", &key);
    files.write("server.pem", &cert);
    wait_until(Duration::from_secs(10), || async {
        reaches(&app, &new_ca.pem(), None).await
    })
    .await
    .expect("new connections get the new certificate");
    assert!(
        !reaches(&app, &old_ca.pem(), None).await,
        "and no longer the old one"
    );

    // The stream opened before goes on.
    for _ in 0..3 {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("a snapshot in time");
        assert!(next.unwrap().is_some(), "the open stream goes on");
    }
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_certificate_without_its_key_stops_the_start() {
    let mut config = test_config();
    config.tls_cert_file = Some("/nonexistent/server.pem".into());
    let err = user_service::startup::Application::build(config)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("TLS_KEY_FILE"), "{err}");
}

/// Half-open TLS connections (accepted, no ClientHello) take at most
/// `TLS_MAX_HANDSHAKES` handshake places: one past it is closed at once and
/// counted, instead of holding a task until `TLS_HANDSHAKE_TIMEOUT`; a real
/// client gets in once places are free again.
#[tokio::test]
async fn half_open_tls_connections_past_the_handshake_cap_are_closed_and_counted() {
    use crate::helpers::{metric, read_until_closed};
    const MAX: usize = 8;
    let ca = Ca::new("service CA");
    let files = Files::new();
    let (cert, key) = ca.leaf("user-service", true);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    let mut config = test_config();
    config.tls_cert_file = Some(files.path("server.pem"));
    config.tls_key_file = Some(files.path("server.key"));
    config.tls_handshake_timeout = Duration::from_secs(60);
    config.tls_max_handshakes = MAX;
    let app = spawn_app_with(config).await;
    let open = |app: &TestApp| metric(app, "user_service_connections_open", &[]) as usize;

    let mut half_open = Vec::new();
    for _ in 0..MAX {
        half_open.push(tokio::net::TcpStream::connect(app.addr).await.unwrap());
    }
    wait_until(Duration::from_secs(5), || async { open(&app) == MAX })
        .await
        .expect("the server holds every half-open connection");
    let mut past = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let closed = read_until_closed(&mut past, Duration::from_secs(5))
        .await
        .expect("a connection past TLS_MAX_HANDSHAKES is closed at once");
    assert!(closed.is_empty(), "{closed:?}");
    assert!(
        !reaches(&app, &ca.pem(), None).await,
        "no handshake place is free"
    );
    assert!(
        metric(
            &app,
            "user_service_connections_refused_total",
            &[r#"reason="tls_handshakes""#]
        ) >= 2.0
    );

    drop(half_open);
    wait_until(Duration::from_secs(5), || async { open(&app) == 0 })
        .await
        .expect("a handshake that ends (here: EOF) gives its place back");
    assert!(
        reaches(&app, &ca.pem(), None).await,
        "a real client gets in"
    );
    app.stop().await.expect("clean stop");
}
