//! Connections that say nothing, sit idle, or come past `MAX_CONNECTIONS`
//! cost the instance a bounded amount: the server closes them, and the
//! clients it serves go on (issue 25: 3,000 silent connections were all
//! still held after 40 s). Every wait here ends on a fact (a read returning
//! EOF, a frame, a metric); the time limits only bound a failure.

use crate::helpers::{
    TestApp, metric, producer, publish_user_created, read_until_closed, spawn_app_with,
    test_config, wait_until,
};
use futures::future::join_all;
use std::time::{Duration, Instant};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use user_service::proto::user::v1::GetUserRequest;
use user_service::transport::is_transport_error;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: what a client sends after its preface.
const SETTINGS: &[u8] = &[0, 0, 0, 0x4, 0, 0, 0, 0, 0];

/// The frames in `bytes` (server to client): (type, stream, payload).
fn frames(mut bytes: &[u8]) -> Vec<(u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        let end = (9 + len).min(bytes.len());
        out.push((bytes[3], stream, bytes[9..end].to_vec()));
        bytes = &bytes[end..];
    }
    out
}

/// An HTTP/2 connection that has said its preface and SETTINGS, once the
/// server's first bytes (its SETTINGS) came: h2 serves it.
async fn served_connection(app: &TestApp) -> TcpStream {
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    conn.write_all(&[PREFACE, SETTINGS].concat()).await.unwrap();
    let mut first = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut first))
        .await
        .expect("the server answers a new connection")
        .expect("with its SETTINGS");
    assert_eq!(first[3], 0x4, "a SETTINGS frame first");
    let mut payload = vec![0u8; u32::from_be_bytes([0, first[0], first[1], first[2]]) as usize];
    conn.read_exact(&mut payload).await.unwrap();
    conn
}

/// Many connections that never send HTTP/2's preface are all closed by the
/// server within `HTTP2_PREFACE_TIMEOUT` (and a margin), and counted; a
/// client goes on meanwhile.
#[tokio::test]
async fn silent_connections_are_closed_after_the_preface_timeout() {
    const SILENT: usize = 300;
    let preface_timeout = Duration::from_millis(500);
    let mut config = test_config();
    config.http2_preface_timeout = preface_timeout;
    let app = spawn_app_with(config).await;

    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(app.addr).await.unwrap());
    }
    let limit = Duration::from_secs(5);
    let ends = join_all(silent.iter_mut().map(|conn| read_until_closed(conn, limit))).await;
    let open = ends.iter().filter(|e| e.is_none()).count();
    assert_eq!(
        open, 0,
        "{open} of {SILENT} silent connections still open after {limit:?}"
    );
    let slowest = opened.elapsed();
    assert!(
        slowest >= preface_timeout,
        "closed before the timeout: {slowest:?}"
    );
    assert_eq!(
        metric(
            &app,
            "user_service_connections_closed_total",
            &[r#"reason="no_preface""#]
        ),
        SILENT as f64
    );
    // The suite's client (connected before) still has its answers.
    app.health
        .clone()
        .check(HealthCheckRequest::default())
        .await
        .expect("a client that spoke in time goes on");
    app.stop().await.expect("clean stop");
}

/// A connection with no call for `MAX_CONNECTION_IDLE` gets GOAWAY
/// NO_ERROR `max_idle`, then EOF; one whose call outlasts the bound keeps
/// it until the call's end, and its client then reconnects by itself.
#[tokio::test]
async fn idle_connections_get_goaway_and_a_call_in_flight_keeps_its_connection() {
    let max_idle = Duration::from_millis(400);
    let mut config = test_config();
    config.max_connection_idle = max_idle;
    config.projector_enabled = false;
    config.max_position_wait = Duration::from_secs(2);
    let app = spawn_app_with(config).await;
    crate::helpers::wait_map_known(&app).await;

    // A read waiting on a position never applied (no projector): an open
    // stream for max_position_wait, five times the idle bound.
    let id = 4343;
    let position = publish_user_created(&producer(), &app.config.topic, id, "Never Applied").await;
    let mut users = app.users.clone();
    let waiting = tokio::spawn(async move {
        users
            .get_user(GetUserRequest {
                id,
                min_position: Some(position),
            })
            .await
    });

    let mut idle = served_connection(&app).await;
    let closed = read_until_closed(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle connection is closed by the server");
    let goaway = frames(&closed)
        .into_iter()
        .find(|(kind, _, _)| *kind == 0x7)
        .unwrap_or_else(|| panic!("a GOAWAY before the close: {:?}", frames(&closed)));
    assert_eq!(goaway.1, 0, "on stream 0");
    assert_eq!(&goaway.2[4..8], &[0, 0, 0, 0], "NO_ERROR");
    assert_eq!(&goaway.2[8..], b"max_idle");

    let answer = waiting.await.unwrap().expect_err("never applied");
    assert_eq!(
        answer.code(),
        Code::DeadlineExceeded,
        "the call's connection was kept while it ran: {answer:?}"
    );
    // That connection goes idle in its turn, and is closed (every one is,
    // once the server has seen its end); its client reconnects.
    let open = || metric(&app, "user_service_connections_open", &[]);
    wait_until(Duration::from_secs(5), || async { open() == 0.0 })
        .await
        .expect("the client's connection is closed once idle");
    app.health
        .clone()
        .check(HealthCheckRequest::default())
        .await
        .expect("the client reconnects for its next call");
    app.stop().await.expect("clean stop");
}

/// Past `MAX_CONNECTIONS`, a new connection is closed at once, before h2
/// says a word, and counted; the clients already connected go on, and a
/// place given back is taken again.
#[tokio::test]
async fn past_max_connections_a_new_connection_is_closed_and_counted() {
    const MAX: usize = 6;
    let mut config = test_config();
    config.max_connections = MAX;
    let app = spawn_app_with(config).await;
    let open = |app: &TestApp| metric(app, "user_service_connections_open", &[]) as usize;
    app.health
        .clone()
        .check(HealthCheckRequest::default())
        .await
        .expect("the suite's client is connected");

    let mut held = Vec::new();
    while open(&app) < MAX {
        held.push(served_connection(&app).await);
    }
    assert_eq!(open(&app), MAX);

    let mut past = TcpStream::connect(app.addr).await.unwrap();
    let _ = past.write_all(&[PREFACE, SETTINGS].concat()).await;
    let closed = read_until_closed(&mut past, Duration::from_secs(5))
        .await
        .expect("a connection past MAX_CONNECTIONS is closed");
    assert!(
        closed.is_empty(),
        "closed before h2 served it, not after: {:?}",
        frames(&closed)
    );
    assert_eq!(
        metric(
            &app,
            "user_service_connections_refused_total",
            &[r#"reason="max_connections""#]
        ),
        1.0
    );
    app.health
        .clone()
        .check(HealthCheckRequest::default())
        .await
        .expect("a connected client goes on");
    // A tonic client turned away gets a transport error, as the tools tell
    // it (by its source chain); the server's own answer is none.
    let turned_away = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
            .unwrap()
            .connect_lazy(),
    )
    .check(HealthCheckRequest::default())
    .await
    .expect_err("no place for its connection");
    assert!(is_transport_error(&turned_away), "{turned_away:?}");
    let answered = app
        .health
        .clone()
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown health name");
    assert!(!is_transport_error(&answered), "{answered:?}");

    // One closes: its place is free again once the server has seen it go.
    drop(held.pop());
    wait_until(Duration::from_secs(5), || async { open(&app) < MAX })
        .await
        .expect("a closed connection gives its place back");
    held.push(served_connection(&app).await);
    drop(held);
    app.stop().await.expect("clean stop");
}
