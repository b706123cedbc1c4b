//! Hostile bytes on the service's port: whatever arrives, the answer is a clean
//! HTTP/2 error (the connection closed, a GOAWAY, a 431) or a gRPC status,
//! never a crash or a hang, and the service goes on serving: after each abuse
//! a new connection gets a SERVING health Check and a known user from GetUser.
//!
//! The gRPC-level cases speak raw HTTP/2 (the `h2` crate, the version tonic
//! itself uses), so that they can send what no gRPC client would: lengths
//! that lie, compressed flags without an encoding, protobuf that is not
//! protobuf, messages over the size limit, other content types.
//!
//! What tonic 0.14 answers, as found by these tests (a test fails if it
//! changes, so that a change is looked at):
//!
//! | abuse | answer |
//! |---|---|
//! | bytes that are not the HTTP/2 preface | connection closed (after the server's SETTINGS, sometimes a GOAWAY) |
//! | preface, then frames that are not frames | GOAWAY, connection closed |
//! | length prefix longer than the body, or cut inside the 5-byte prefix | `INTERNAL` "Unexpected EOF decoding stream." |
//! | compressed flag neither 0 nor 1 | `INTERNAL` |
//! | compressed flag 1 without `grpc-encoding` | `INTERNAL` (as gRPC's compression spec requires) |
//! | `grpc-encoding` the server does not support (gzip, ...) | `UNIMPLEMENTED` |
//! | no message at all (also a `GET`) | `INTERNAL` "Missing request message." |
//! | bytes that are not the message's protobuf (bad varint, bad UTF-8 in a string) | `INTERNAL` (tonic-prost maps every decode error to it) |
//! | a message over the decoding limit (`MAX_REQUEST_BYTES`; tonic's default is 4 MiB) | `RESOURCE_EXHAUSTED`, at once (gRPC's spec and grpc-go; tonic's own `OUT_OF_RANGE` is rewritten, see `api::oversize`) |
//! | `content-type` not `application/grpc` | served like any call: tonic does not look at it (gRPC's spec says a server SHOULD answer HTTP 415) |
//! | unknown service, method or path | `UNIMPLEMENTED` |
//! | headers over 16 KiB | HTTP 431; far over it, GOAWAY `ENHANCE_YOUR_CALM` for the connection |
//!
//! The last test calls the service through its real client with random ids,
//! positions and fields: a small property test (it talks to the real Kafka
//! and Redis); `PROPTEST_RNG_SEED` replays a run, as `HOSTILE_SEED` replays
//! the random bytes.

use crate::helpers::{
    TestApp, producer, publish_user_created, spawn_app, spawn_app_with, test_config,
};
use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use http::{HeaderMap, Request, StatusCode};
use proptest::{prelude::*, test_runner::TestRunner};
use prost::Message;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_client::HealthClient,
};
use tonic_types::StatusExt;
use user_service::{
    domain::NewUser,
    proto::user::v1::{
        CreateUserRequest, GetUserRequest, Position, User, user_service_client::UserServiceClient,
    },
};

const GET_USER: &str = "/user.v1.UserService/GetUser";
const CREATE_USER: &str = "/user.v1.UserService/CreateUser";
const CHECK: &str = "/grpc.health.v1.Health/Check";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest any one exchange may take: a guard against a hang, far above what
/// an answer takes (milliseconds), not a speed assertion.
const PATIENCE: Duration = Duration::from_secs(10);

/// Over tonic's default decoding limit (4 MiB), and over any limit the
/// service sets for requests that carry a name and an email.
const OVERSIZE: usize = 5 << 20;

// ---------------------------------------------------------------------------
// The service under attack, and what "still serving" means.
// ---------------------------------------------------------------------------

/// The service, ready (projector open, health SERVING), with one user that
/// each check reads back.
struct Target {
    app: TestApp,
    user: User,
    position: Position,
}

async fn target() -> Target {
    target_of(spawn_app().await).await
}

async fn target_of(app: TestApp) -> Target {
    app.wait_opened().await;
    app.wait_health(ServingStatus::Serving).await;
    let created = app
        .create("Hostile Wire", "hostile@example.com")
        .await
        .expect("the known user is created");
    Target {
        user: created.user.expect("a created user has a body"),
        position: created.position.expect("a created user has a position"),
        app,
    }
}

impl Target {
    /// A new connection gets a SERVING health Check and the known user, each
    /// within `PATIENCE`: the listener, the health service and the read path
    /// all survived `after`.
    async fn assert_still_serves(&self, after: &str) {
        let channel = timeout(
            PATIENCE,
            Channel::from_shared(format!("http://{}", self.app.addr))
                .unwrap()
                .connect(),
        )
        .await
        .unwrap_or_else(|_| panic!("after {after}: connecting took over {PATIENCE:?}"))
        .unwrap_or_else(|e| panic!("after {after}: the listener refuses connections: {e}"));
        let mut check = tonic::Request::new(HealthCheckRequest::default());
        check.set_timeout(PATIENCE);
        let status = timeout(PATIENCE, HealthClient::new(channel.clone()).check(check))
            .await
            .unwrap_or_else(|_| panic!("after {after}: health Check hung"))
            .unwrap_or_else(|s| panic!("after {after}: health Check failed: {s:?}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "after {after}");
        let mut get = tonic::Request::new(GetUserRequest {
            id: self.user.id,
            min_position: Some(self.position),
        });
        get.set_timeout(PATIENCE);
        let got = timeout(PATIENCE, UserServiceClient::new(channel).get_user(get))
            .await
            .unwrap_or_else(|_| panic!("after {after}: GetUser hung"))
            .unwrap_or_else(|s| panic!("after {after}: GetUser failed: {s:?}"))
            .into_inner()
            .user;
        assert_eq!(got.as_ref(), Some(&self.user), "after {after}");
    }

    async fn stop(self) {
        self.app.stop().await.expect("the service stops cleanly");
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP/2.
// ---------------------------------------------------------------------------

/// One gRPC message on the wire: compressed flag, length (which may lie),
/// bytes.
fn frame(flag: u8, len: u32, msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(flag);
    b.put_u32(len);
    b.put_slice(msg);
    b.freeze()
}

/// A well-formed gRPC message.
fn grpc_frame(msg: &impl Message) -> Bytes {
    let m = msg.encode_to_vec();
    frame(0, m.len() as u32, &m)
}

/// What the server answered on one stream.
#[derive(Debug)]
struct Reply {
    http: StatusCode,
    headers: HeaderMap,
    trailers: Option<HeaderMap>,
    body: Bytes,
}

impl Reply {
    /// The gRPC status: in the trailers, or in the headers of a
    /// trailers-only answer.
    fn grpc_status(&self) -> Option<Code> {
        let h = self
            .trailers
            .as_ref()
            .filter(|t| t.contains_key("grpc-status"))
            .unwrap_or(&self.headers);
        let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
        Some(Code::from_i32(code))
    }

    fn grpc_message(&self) -> String {
        let h = self.trailers.as_ref().unwrap_or(&self.headers);
        h.get("grpc-message")
            .or_else(|| self.headers.get("grpc-message"))
            .map(|m| String::from_utf8_lossy(m.as_bytes()).replace("%20", " "))
            .unwrap_or_default()
    }

    /// A clean gRPC answer: HTTP 200, gRPC's content type, a status.
    fn assert_grpc(&self, case: &str) -> Code {
        assert_eq!(self.http, StatusCode::OK, "{case}: {self:?}");
        assert_eq!(
            self.headers
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/grpc"),
            "{case}: {self:?}"
        );
        self.grpc_status()
            .unwrap_or_else(|| panic!("{case}: no grpc-status in {self:?}"))
    }
}

/// An HTTP/2 connection to the service; the connection task ends when the
/// server closes it.
async fn h2_connect(target: &Target) -> SendRequest<Bytes> {
    let tcp = TcpStream::connect(target.app.addr).await.unwrap();
    let (client, connection) = timeout(PATIENCE, h2::client::handshake(tcp))
        .await
        .expect("the HTTP/2 handshake completes")
        .expect("the server speaks HTTP/2");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// One request on `client`: `method path`, gRPC's headers (unless `headers`
/// replaces them), then `body` in DATA frames as flow control allows, ending
/// the stream. The answer is read while the body is still being sent: a
/// server may answer before it has read everything (and should, for an
/// oversize message).
async fn exchange(
    client: &SendRequest<Bytes>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, h2::Error> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"));
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req = req.header("content-type", "application/grpc");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.header("te", "trailers").body(()).unwrap();
    let mut ready = client.clone().ready().await?;
    let (response, mut send) = ready.send_request(req, body.is_empty())?;
    if !body.is_empty() {
        tokio::spawn(async move {
            let mut rest = body;
            while !rest.is_empty() {
                send.reserve_capacity(rest.len());
                let Some(Ok(capacity)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await
                else {
                    return; // the server reset the stream: it has answered
                };
                let chunk = rest.split_to(capacity.min(rest.len()));
                if send.send_data(chunk, rest.is_empty()).is_err() {
                    return;
                }
            }
        });
    }
    let (parts, mut recv) = response.await?.into_parts();
    let mut body = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.put(chunk);
    }
    let trailers = recv.trailers().await?;
    Ok(Reply {
        http: parts.status,
        headers: parts.headers,
        trailers,
        body: body.freeze(),
    })
}

/// `exchange`, which must give an answer within `PATIENCE`.
async fn answer(
    client: &SendRequest<Bytes>,
    case: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    timeout(PATIENCE, exchange(client, method, path, headers, body))
        .await
        .unwrap_or_else(|_| panic!("{case}: no answer within {PATIENCE:?}"))
        .unwrap_or_else(|e| panic!("{case}: HTTP/2 error instead of an answer: {e:?}"))
}

/// A health Check on `client`'s connection answers SERVING: the abuse ended
/// one stream, not the connection.
async fn assert_connection_serves(client: &SendRequest<Bytes>, after: &str) {
    let reply = answer(
        client,
        &format!("health Check on the connection after {after}"),
        "POST",
        CHECK,
        &[],
        grpc_frame(&HealthCheckRequest::default()),
    )
    .await;
    assert_eq!(reply.assert_grpc(after), Code::Ok, "after {after}");
    let message = reply.body.get(5..).expect("a message after the prefix");
    let status = HealthCheckResponse::decode(message).expect("a HealthCheckResponse");
    assert_eq!(status.status(), ServingStatus::Serving, "after {after}");
}

// ---------------------------------------------------------------------------
// Not HTTP/2 at all.
// ---------------------------------------------------------------------------

/// The types of the whole HTTP/2 frames in `bytes`, and how many bytes
/// are left after them (part of a frame).
fn frame_types(mut bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        if bytes.len() < 9 + len {
            break;
        }
        types.push(bytes[3]);
        bytes = &bytes[9 + len..];
    }
    (types, bytes.len())
}

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;

/// Sends `bytes` on a new TCP connection (then half-closes it if `fin`) and
/// returns what the server sent until it closed the connection, which it
/// must do within `PATIENCE`. What it sent must be HTTP/2 frames: its
/// SETTINGS, perhaps a GOAWAY, nothing that answers a request.
async fn server_closes_after(target: &Target, case: &str, bytes: &[u8], fin: bool) -> Vec<u8> {
    let mut tcp = TcpStream::connect(target.app.addr).await.unwrap();
    // The server may close before reading everything: a failed write is
    // part of being refused.
    let _ = tcp.write_all(bytes).await;
    if fin {
        let _ = tcp.shutdown().await;
    }
    let mut got = Vec::new();
    // A reset (the server closed with our bytes unread) may cut off what
    // it sent before; a close may not.
    let reset = match timeout(PATIENCE, tcp.read_to_end(&mut got)).await {
        Ok(Ok(_)) => false,
        Ok(Err(e)) => {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ),
                "{case}: {e}"
            );
            true
        }
        Err(_) => panic!(
            "{case}: the server kept the connection open for {PATIENCE:?} ({} bytes sent)",
            bytes.len()
        ),
    };
    assert!(
        !got.starts_with(b"HTTP/"),
        "{case}: the server answered in HTTP/1: {:?}",
        String::from_utf8_lossy(&got)
    );
    let (types, partial) = frame_types(&got);
    assert!(
        reset || partial == 0,
        "{case}: a partial frame before the close: {got:?}"
    );
    assert!(
        types.first().is_none_or(|t| *t == SETTINGS),
        "{case}: the server's first frame is not SETTINGS: {types:?}"
    );
    assert!(
        types
            .iter()
            .all(|t| [SETTINGS, PING, GOAWAY, WINDOW_UPDATE].contains(t)),
        "{case}: the server sent {types:?}"
    );
    got
}

#[tokio::test]
async fn bytes_that_are_not_http2_are_refused_and_the_service_still_serves() {
    let target = target().await;
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("HOSTILE_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = |len: std::ops::Range<usize>| {
        let mut b = vec![0u8; rng.random_range(len)];
        rng.fill(&mut b[..]);
        b
    };

    // Not a preface: the server closes by itself, without waiting for more.
    let mut not_http2: Vec<(String, Vec<u8>)> = vec![
        (
            "a TLS ClientHello".into(),
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".repeat(4),
        ),
        (
            "an HTTP/1.1 request".into(),
            b"POST /user.v1.UserService/GetUser HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                .to_vec(),
        ),
        (
            "a preface of another version".into(),
            b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
    ];
    for i in 0..12 {
        let mut b = random(24..4096);
        b[0] = b[0].max(b'Q'); // never the start of a preface
        not_http2.push((format!("random bytes #{i} ({} bytes)", b.len()), b));
    }
    for (case, bytes) in &not_http2 {
        server_closes_after(&target, case, bytes, false).await;
        target.assert_still_serves(case).await;
    }

    // A preface, then a frame longer than the largest the server allows
    // (16 KiB): a GOAWAY and a close, without waiting for the frame.
    let case = "a preface, then a 16 MiB frame";
    let huge = [PREFACE, b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"].concat();
    let got = server_closes_after(&target, case, &huge, false).await;
    assert!(frame_types(&got).0.contains(&GOAWAY), "{case}: no GOAWAY");
    target.assert_still_serves(case).await;

    // A preface, then random bytes and the end of the stream: refused, or
    // if they happen to be frames, the connection ends with ours.
    for i in 0..12 {
        let case = format!("a preface, then random bytes #{i}");
        let bytes = [PREFACE, &random(1..4096)].concat();
        server_closes_after(&target, &case, &bytes, true).await;
        target.assert_still_serves(&case).await;
    }
    target.stop().await;
}

// ---------------------------------------------------------------------------
// HTTP/2, but not gRPC as it should be.
// ---------------------------------------------------------------------------

/// One request that is not gRPC as it should be, and tonic's answer.
struct Malformed {
    case: &'static str,
    path: &'static str,
    /// The `grpc-encoding` header, if any.
    encoding: Option<&'static str>,
    body: Bytes,
    want: Code,
}

#[tokio::test]
async fn malformed_grpc_messages_get_a_grpc_error_and_the_connection_stays_up() {
    let target = target().await;
    let get = GetUserRequest {
        id: target.user.id,
        min_position: None,
    };
    let msg = get.encode_to_vec();
    let len = msg.len() as u32;
    let good = grpc_frame(&get);
    let case = |case, path, encoding, body, want| Malformed {
        case,
        path,
        encoding,
        body,
        want,
    };
    let cases = [
        // The well-formed call, so that the helpers are shown to work.
        case("a good call", GET_USER, None, good.clone(), Code::Ok),
        case(
            "a length prefix longer than the message",
            GET_USER,
            None,
            frame(0, len + 100, &msg),
            Code::Internal,
        ),
        case(
            "a length prefix cut short",
            GET_USER,
            None,
            Bytes::from_static(&[0, 0, 0]),
            Code::Internal,
        ),
        case(
            "a length prefix shorter than the message (a varint cut in two)",
            GET_USER,
            None,
            frame(0, 2, &msg),
            Code::Internal,
        ),
        case(
            "a compressed flag of 2",
            GET_USER,
            None,
            frame(2, len, &msg),
            Code::Internal,
        ),
        case(
            "a compressed flag without grpc-encoding",
            GET_USER,
            None,
            frame(1, len, &msg),
            Code::Internal,
        ),
        case(
            "gzip, which the service does not accept",
            GET_USER,
            Some("gzip"),
            frame(1, len, &msg),
            Code::Unimplemented,
        ),
        case(
            "an encoding no one knows",
            GET_USER,
            Some("x-nonsense"),
            good.clone(),
            Code::Unimplemented,
        ),
        case("no message", GET_USER, None, Bytes::new(), Code::Internal),
        case(
            "protobuf that is not protobuf (an endless varint)",
            GET_USER,
            None,
            frame(0, 12, &[0xff; 12]),
            Code::Internal,
        ),
        case(
            "a field of the wrong wire type (id as length-delimited)",
            GET_USER,
            None,
            frame(0, 3, &[0x0a, 0x01, 0x00]),
            Code::Internal,
        ),
        case(
            "a name that is not UTF-8",
            CREATE_USER,
            None,
            frame(0, 4, &[0x12, 0x02, 0xc3, 0x28]),
            Code::Internal,
        ),
        case(
            "an unknown method",
            "/user.v1.UserService/DeleteEverything",
            None,
            good.clone(),
            Code::Unimplemented,
        ),
        case(
            "an unknown service",
            "/nope.v1.Nope/Nope",
            None,
            good.clone(),
            Code::Unimplemented,
        ),
        case(
            "the root path",
            "/",
            None,
            good.clone(),
            Code::Unimplemented,
        ),
    ];
    let client = h2_connect(&target).await;
    for Malformed {
        case,
        path,
        encoding,
        body,
        want,
    } in cases
    {
        let headers: Vec<_> = encoding.map(|e| ("grpc-encoding", e)).into_iter().collect();
        let reply = answer(&client, case, "POST", path, &headers, body).await;
        let code = reply.assert_grpc(case);
        assert_eq!(code, want, "{case}: {}", reply.grpc_message());
        assert_connection_serves(&client, case).await;
        target.assert_still_serves(case).await;
    }
    // A GET carries no message.
    let reply = answer(&client, "a GET", "GET", GET_USER, &[], Bytes::new()).await;
    assert_eq!(reply.assert_grpc("a GET"), Code::Internal);
    assert_connection_serves(&client, "a GET").await;

    // A stream reset by the client halfway through its message.
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://localhost{GET_USER}"))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (response, mut send) = client
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(req, false)
        .unwrap();
    send.send_data(frame(0, 100, &msg), false).unwrap();
    send.send_reset(h2::Reason::CANCEL);
    assert!(response.await.is_err(), "a reset stream has no answer");
    assert_connection_serves(&client, "a stream reset halfway").await;
    target.assert_still_serves("a stream reset halfway").await;
    drop(client);
    target.stop().await;
}

#[tokio::test]
async fn an_oversize_message_is_resource_exhausted_without_being_read() {
    let target = target().await;
    let huge = CreateUserRequest {
        name: "n".repeat(OVERSIZE),
        email: "big@example.com".into(),
        ..Default::default()
    };
    let client = h2_connect(&target).await;

    // The whole message: answered before the server has read it (the
    // answer does not wait for 5 MiB to cross the flow-control window).
    let case = "a 5 MiB CreateUser";
    let reply = answer(&client, case, "POST", CREATE_USER, &[], grpc_frame(&huge)).await;
    assert_eq!(
        reply.assert_grpc(case),
        Code::ResourceExhausted,
        "{case}: {}",
        reply.grpc_message()
    );
    assert!(
        reply.grpc_message().contains("too large"),
        "{case}: {}",
        reply.grpc_message()
    );
    assert_connection_serves(&client, case).await;
    target.assert_still_serves(case).await;

    // Only the length prefix claims it: refused at once, not waited for.
    let case = "a length prefix claiming 5 MiB";
    let started = Instant::now();
    let reply = answer(
        &client,
        case,
        "POST",
        CREATE_USER,
        &[],
        frame(0, OVERSIZE as u32, b"\x12\x01n"),
    )
    .await;
    assert_eq!(reply.assert_grpc(case), Code::ResourceExhausted);
    assert!(
        started.elapsed() < PATIENCE / 2,
        "{case}: waited for the body"
    );
    assert_connection_serves(&client, case).await;
    target.assert_still_serves(case).await;

    // The progress service has the same limit, and the same answer.
    let case = "a GetProgress whose length prefix claims 5 MiB";
    let reply = answer(
        &client,
        case,
        "POST",
        "/user.v1.ProjectionService/GetProgress",
        &[],
        frame(0, OVERSIZE as u32, b""),
    )
    .await;
    assert_eq!(reply.assert_grpc(case), Code::ResourceExhausted);
    assert_connection_serves(&client, case).await;
    drop(client);

    // Through the real client: the same code, the same service after.
    let case = "a 5 MiB CreateUser from a tonic client";
    let status = target
        .app
        .create_req(huge)
        .await
        .expect_err("an oversize message is refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{case}: {status:?}");
    target.assert_still_serves(case).await;
    target.stop().await;
}

#[tokio::test]
async fn other_content_types_get_415_or_a_grpc_answer_and_the_connection_stays_up() {
    let target = target().await;
    let good = grpc_frame(&GetUserRequest {
        id: target.user.id,
        min_position: None,
    });
    let client = h2_connect(&target).await;
    for content_type in [
        "application/json",
        "text/html; charset=utf-8",
        "application/grpc-web+proto",
        "",
    ] {
        let case = format!("content-type {content_type:?}");
        let reply = answer(
            &client,
            &case,
            "POST",
            GET_USER,
            &[("content-type", content_type)],
            good.clone(),
        )
        .await;
        // tonic 0.14 does not look at the content type and serves the call;
        // gRPC's spec allows a server to answer 415 instead.
        if reply.http != StatusCode::UNSUPPORTED_MEDIA_TYPE {
            let code = reply.assert_grpc(&case);
            assert!(
                matches!(code, Code::Ok | Code::InvalidArgument | Code::Unimplemented),
                "{case}: {code:?} {}",
                reply.grpc_message()
            );
        }
        assert_connection_serves(&client, &case).await;
        target.assert_still_serves(&case).await;
    }
    drop(client);
    target.stop().await;
}

#[tokio::test]
async fn oversize_headers_get_431_or_a_goaway_and_the_service_still_serves() {
    let target = target().await;
    let good = grpc_frame(&GetUserRequest {
        id: target.user.id,
        min_position: None,
    });
    // A little over the server's header list limit (16 KiB): 431 for the
    // stream, the connection goes on.
    let client = h2_connect(&target).await;
    let case = "a 20 KB header";
    let big = "a".repeat(20_000);
    let reply = answer(
        &client,
        case,
        "POST",
        GET_USER,
        &[("x-big", &big)],
        good.clone(),
    )
    .await;
    assert_eq!(
        reply.http,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{case}"
    );
    assert_connection_serves(&client, case).await;
    target.assert_still_serves(case).await;

    // Far over it: the connection is ended with a GOAWAY, a clean HTTP/2
    // error, and other connections are served.
    let case = "a 100 KB header";
    let huge = "a".repeat(100_000);
    let err = timeout(
        PATIENCE,
        exchange(&client, "POST", GET_USER, &[("x-big", &huge)], good),
    )
    .await
    .unwrap_or_else(|_| panic!("{case}: no answer within {PATIENCE:?}"))
    .expect_err("a header list that large ends the connection");
    assert!(err.is_go_away() && err.is_remote(), "{case}: {err:?}");
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{case}");
    target.assert_still_serves(case).await;
    drop(client);
    target.stop().await;
}

/// Calls that send their headers and never their message must not hold the
/// service's call budget (`MAX_CONCURRENT_CALLS`) for ever: a client that
/// opens that many such streams (a few connections, each under
/// `MAX_CONCURRENT_STREAMS`) otherwise leaves every other caller
/// RESOURCE_EXHAUSTED for as long as it likes, while health says SERVING.
/// Whatever the cure (a time limit on receiving the message, or a slot
/// taken only once the message is in), a normal call is served again within
/// `PATIENCE` while those streams stay open.
#[tokio::test]
async fn calls_that_never_send_their_message_do_not_hold_the_call_budget() {
    let mut config = test_config();
    config.max_concurrent_calls = 20;
    // The service's bound on a call follows from these (see
    // Config::call_timeout): 1 s + 1 s + 2 s, well within PATIENCE.
    config.max_position_wait = Duration::from_secs(1);
    config.publish_timeout = Duration::from_secs(1);
    let target = target_of(spawn_app_with(config).await).await;
    let client = h2_connect(&target).await;
    let mut held = Vec::new();
    for _ in 0..25 {
        let req = Request::builder()
            .method("POST")
            .uri(format!("http://localhost{GET_USER}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut ready = client.clone().ready().await.unwrap();
        held.push(ready.send_request(req, false).unwrap());
    }
    let get = || {
        let mut req = tonic::Request::new(GetUserRequest {
            id: target.user.id,
            min_position: None,
        });
        req.set_timeout(Duration::from_secs(2));
        let mut users = target.app.users.clone();
        async move { users.get_user(req).await }
    };
    // Give the server time to take the streams in (and fill the budget,
    // as it does today).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        if get().await.err().map(|s| s.code()) == Some(Code::ResourceExhausted) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let last = loop {
        match get().await {
            Ok(r) => {
                assert_eq!(r.into_inner().user.as_ref(), Some(&target.user));
                break None;
            }
            Err(s) if started.elapsed() < PATIENCE => {
                let _ = s;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => break Some(s),
        }
    };
    if let Some(s) = last {
        panic!(
            "{} calls without a message, held for {PATIENCE:?}: GetUser still answers {s:?}",
            held.len()
        );
    }
    drop(held);
    drop(client);
    target.stop().await;
}

// ---------------------------------------------------------------------------
// Random calls through the real client.
// ---------------------------------------------------------------------------

/// What a black-box case sends.
#[derive(Debug, Clone)]
enum Call {
    Get {
        id: i64,
        position: Option<(i32, i64)>,
        deadline: Deadline,
    },
    Create {
        req: CreateUserRequest,
        deadline: Deadline,
    },
}

/// The call's deadline: none, a short one, or a `grpc-timeout` header that
/// no parser accepts or that is far past the service's cap (either way the
/// cap applies).
#[derive(Debug, Clone)]
enum Deadline {
    None,
    Millis(u64),
    Header(&'static str),
}

const MALFORMED_TIMEOUTS: &[&str] = &[
    "",
    "S",
    "1",
    "-1S",
    "1.5S",
    "1s",
    "0x10m",
    "99999999999999999999S", // over u64
    "１S",                   // not ASCII: not even a header value
];

fn deadline() -> impl Strategy<Value = Deadline> {
    prop_oneof![
        1 => Just(Deadline::None),
        3 => (20u64..800).prop_map(Deadline::Millis),
        1 => proptest::sample::select(MALFORMED_TIMEOUTS).prop_map(Deadline::Header),
        1 => proptest::sample::select(HUGE_TIMEOUTS).prop_map(Deadline::Header),
    ]
}

fn id() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        proptest::sample::select(&[0, -1, 1, 2, i64::MIN, i64::MAX, 1 << 32, (1 << 53) - 1][..]),
    ]
}

/// Positions: mostly on the topic's partitions, at offsets it has or will
/// not have for a long time, and anything at all.
fn position() -> impl Strategy<Value = Option<(i32, i64)>> {
    let partition = prop_oneof![
        4 => 0..3,
        1 => -2..=4,
        1 => any::<i32>(),
        1 => proptest::sample::select(&[i32::MIN, i32::MAX][..]),
    ];
    let offset = prop_oneof![
        3 => 0i64..3,
        1 => -2i64..0,
        1 => any::<i64>(),
        1 => proptest::sample::select(&[i64::MIN, i64::MAX, 1 << 40][..]),
    ];
    proptest::option::of((partition, offset))
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z ]{0,20}",
        "\\PC{0,40}",
        any::<String>(),
        (any::<char>(), 100usize..400).prop_map(|(c, n)| c.to_string().repeat(n)),
    ]
}

fn create_request() -> impl Strategy<Value = CreateUserRequest> {
    (
        prop_oneof![3 => Just(None), 1 => id().prop_map(Some)],
        prop_oneof![3 => "[A-Z][a-z]{0,10}", 1 => text()],
        prop_oneof![3 => "[a-z]{1,8}@[a-z]{1,8}\\.(com|example)", 1 => text()],
        prop_oneof![
            2 => Just(String::new()),
            3 => "[!-~]{1,16}",
            2 => any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string()),
            1 => "[!-~]{129,200}",
            1 => text(),
        ],
    )
        .prop_map(|(id, name, email, request_id)| CreateUserRequest {
            id,
            name,
            email,
            request_id,
        })
}

/// Calls; a GetUser names the known user (`known`) half the time.
fn call(known: i64) -> impl Strategy<Value = Call> {
    let get_id = prop_oneof![Just(known), id()];
    prop_oneof![
        3 => (get_id, position(), deadline())
            .prop_map(|(id, position, deadline)| Call::Get { id, position, deadline }),
        2 => (create_request(), deadline()).prop_map(|(req, deadline)| Call::Create { req, deadline }),
    ]
}

fn with_deadline<T>(msg: T, deadline: &Deadline) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    match deadline {
        Deadline::None => {}
        Deadline::Millis(ms) => req.set_timeout(Duration::from_millis(*ms)),
        Deadline::Header(raw) => {
            if let Ok(v) = raw.parse() {
                req.metadata_mut().insert("grpc-timeout", v);
            }
        }
    }
    req
}

/// The fields the `BadRequest` details name.
fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// The longest the service may take to answer: the caller's deadline, or
/// the service's cap on waits without one.
const MAX_POSITION_WAIT: Duration = Duration::from_secs(1);

/// Slack over the longest wait for the answer to arrive (two shared cores).
const SLACK: Duration = Duration::from_secs(4);

/// What a call answered: the user (GetUser's, or the one CreateUser
/// created), or a status.
type Answer = Result<User, tonic::Status>;

/// Sends `call` with the hang guard: `None` if no answer came within the
/// longest the service may take plus `SLACK`.
async fn send(target: &Target, call: &Call) -> Option<Answer> {
    let mut users = target.app.users.clone();
    let deadline = match call {
        Call::Get { deadline, .. } | Call::Create { deadline, .. } => deadline,
    };
    let limit = match deadline {
        Deadline::Millis(ms) => Duration::from_millis(*ms).max(MAX_POSITION_WAIT),
        _ => MAX_POSITION_WAIT,
    } + SLACK;
    let answer = async {
        match call {
            Call::Get { id, position, .. } => {
                let req = GetUserRequest {
                    id: *id,
                    min_position: position
                        .map(|(partition, offset)| Position { partition, offset }),
                };
                let r = users.get_user(with_deadline(req, deadline)).await?;
                Ok(r.into_inner().user.expect("an answered GetUser has a user"))
            }
            Call::Create { req, .. } => {
                let r = users
                    .create_user(with_deadline(req.clone(), deadline))
                    .await?;
                Ok(r.into_inner()
                    .user
                    .expect("an answered CreateUser has a user"))
            }
        }
    };
    timeout(limit, answer).await.ok()
}

/// The fields of a GetUser that are wrong whatever the topic holds.
fn wrong_get_fields(id: i64, position: Option<(i32, i64)>) -> Vec<&'static str> {
    let mut wrong = Vec::new();
    if id <= 0 {
        wrong.push("id");
    }
    if let Some((partition, offset)) = position {
        if !(0..3).contains(&partition) {
            wrong.push("min_position.partition");
        }
        if offset < 0 {
            wrong.push("min_position.offset");
        }
    }
    wrong
}

/// What `call`'s answer must be.
fn check_answer(target: &Target, call: &Call, answer: &Answer) -> Result<(), TestCaseError> {
    if let Err(status) = answer {
        let code = status.code();
        prop_assert!(
            !matches!(code, Code::Internal | Code::Unknown | Code::Unimplemented),
            "{:?}: {:?}",
            code,
            status.message()
        );
        // CANCELLED only as the caller's own deadline passing (tonic's
        // "Timeout expired"); a stream the server resets is CANCELLED
        // ("h2 protocol error") too, as a panicking handler's was before the
        // service caught panics.
        if code == Code::Cancelled {
            let deadline = match call {
                Call::Get { deadline, .. } | Call::Create { deadline, .. } => deadline,
            };
            prop_assert!(
                matches!(deadline, Deadline::Millis(_)) && status.message() == "Timeout expired",
                "{:?}",
                status
            );
        }
    }
    // Answers any call may get: the service is busy or a dependency is not
    // there, the caller's deadline passed.
    let busy = |c: Code| {
        matches!(
            c,
            Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Cancelled
        )
    };
    match call {
        Call::Get { id, position, .. } => {
            let wrong = wrong_get_fields(*id, *position);
            match answer {
                Ok(user) => {
                    prop_assert!(wrong.is_empty(), "OK for wrong {:?}", wrong);
                    prop_assert_eq!(user.id, *id);
                    if *id == target.user.id {
                        prop_assert_eq!(user, &target.user);
                    }
                }
                // Refused at once, naming only fields that are wrong (the
                // service may stop at the first); a position on no
                // partition may be OUT_OF_RANGE instead.
                Err(s) if !wrong.is_empty() => {
                    let named = violated_fields(s);
                    let on_no_partition = wrong == ["min_position.partition"];
                    if !(on_no_partition && s.code() == Code::OutOfRange) {
                        prop_assert_eq!(s.code(), Code::InvalidArgument, "{:?}", s.message());
                        prop_assert!(!named.is_empty(), "no field named: {:?}", s);
                        prop_assert!(
                            named.iter().all(|f| wrong.contains(&f.as_str())),
                            "named {:?}, wrong {:?}",
                            named,
                            wrong
                        );
                    }
                }
                // The known user, read without a position, is there.
                Err(s) if *id == target.user.id && position.is_none() => {
                    prop_assert!(busy(s.code()), "{:?}: {:?}", s.code(), s.message());
                }
                // A position not reached (yet, or for a long time).
                Err(s) => prop_assert!(
                    busy(s.code()) || matches!(s.code(), Code::NotFound | Code::OutOfRange),
                    "{:?}: {:?}",
                    s.code(),
                    s.message()
                ),
            }
        }
        Call::Create { req, .. } => {
            let parsed = NewUser::parse(req.id, &req.name, &req.email, &req.request_id);
            match (parsed, answer) {
                (Err(e), answer) => {
                    let s = answer.as_ref().expect_err("an invalid create is refused");
                    prop_assert_eq!(s.code(), Code::InvalidArgument, "{:?}", s.message());
                    let want: Vec<&str> = e.0.iter().map(|v| v.field).collect();
                    prop_assert_eq!(violated_fields(s), want);
                }
                (Ok(new), Ok(user)) => {
                    prop_assert_eq!(user.name.as_str(), new.name.as_str());
                    prop_assert_eq!(user.email.as_str(), new.email.as_str());
                    if let Some(id) = req.id {
                        prop_assert_eq!(user.id, id);
                    }
                }
                (Ok(_), Err(s)) => {
                    let code = s.code();
                    // INVALID_ARGUMENT: a request id reused with other fields.
                    prop_assert!(
                        busy(code) || matches!(code, Code::AlreadyExists | Code::InvalidArgument),
                        "{:?}: {:?}",
                        code,
                        s.message()
                    );
                    if code == Code::InvalidArgument {
                        prop_assert_eq!(violated_fields(s), vec!["request_id".to_owned()]);
                    }
                }
            }
        }
    }
    Ok(())
}

/// `grpc-timeout` values far past the service's cap: `99999999H` (valid, 8
/// digits), `123456789S` (9 digits, over gRPC's limit: tonic's own timeout
/// ignores it), `18446744073709551615n` (u64::MAX).
const HUGE_TIMEOUTS: &[&str] = &["99999999H", "123456789S", "18446744073709551615n"];

/// A caller's deadline far past the service's cap does not hold a wait: on a
/// position inside the log that is never applied (no projector runs), the
/// answer comes within `MAX_POSITION_WAIT`; on one past the log's end, at
/// once. Before the waits were capped, each of these calls waited as long
/// as its header said.
#[tokio::test]
async fn a_deadline_past_the_cap_does_not_hold_a_wait() {
    let mut config = test_config();
    config.max_position_wait = MAX_POSITION_WAIT;
    config.projector_enabled = false;
    let app = spawn_app_with(config).await;
    crate::helpers::wait_map_known(&app).await;
    let id = 4242;
    let position = publish_user_created(&producer(), &app.config.topic, id, "Never Applied").await;
    let past_the_end = Position {
        offset: 1 << 40,
        ..position
    };
    for (pos, what, want) in [
        (position, "never applied", Code::DeadlineExceeded),
        (past_the_end, "past the end", Code::OutOfRange),
    ] {
        for raw in HUGE_TIMEOUTS {
            let mut req = tonic::Request::new(GetUserRequest {
                id,
                min_position: Some(pos),
            });
            req.metadata_mut()
                .insert("grpc-timeout", raw.parse().unwrap());
            let limit = MAX_POSITION_WAIT + SLACK;
            let began = std::time::Instant::now();
            let status = timeout(limit, app.users.clone().get_user(req))
                .await
                .unwrap_or_else(|_| panic!("{what}, grpc-timeout {raw}: no answer in {limit:?}"))
                .expect_err("the position is not applied");
            let took = began.elapsed();
            assert_eq!(
                status.code(),
                want,
                "{what}, grpc-timeout {raw}: {status:?}"
            );
            if want == Code::OutOfRange {
                // At once: no wait, which would take MAX_POSITION_WAIT.
                assert!(
                    took < MAX_POSITION_WAIT,
                    "{what}, grpc-timeout {raw}: answered after {took:?}"
                );
            } else {
                // The service's cap, not the caller's deadline, ended it.
                assert!(
                    took >= MAX_POSITION_WAIT * 9 / 10,
                    "{what}, grpc-timeout {raw}: answered after {took:?}"
                );
            }
        }
    }
    app.stop().await.expect("the service stops cleanly");
}

/// Random GetUser and CreateUser calls through the real client never answer
/// INTERNAL, UNKNOWN or UNIMPLEMENTED, never hang past their deadline (or
/// the service's cap without one), refuse invalid input with
/// INVALID_ARGUMENT naming the wrong fields (or OUT_OF_RANGE for a position),
/// and leave the service serving.
#[test]
fn random_calls_through_the_client_get_clean_answers_in_time() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = test_config();
    config.max_position_wait = MAX_POSITION_WAIT;
    let target = rt.block_on(async { target_of(spawn_app_with(config).await).await });
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        // Each shrink step is a real call: a few, not thousands.
        max_shrink_iters: 32,
        ..ProptestConfig::default()
    });
    let seen = Mutex::new(BTreeMap::<String, usize>::new());
    let result = runner.run(&call(target.user.id), |call| {
        rt.block_on(async {
            let Some(answer) = send(&target, &call).await else {
                return Err(TestCaseError::fail(format!(
                    "no answer within the deadline and {SLACK:?}"
                )));
            };
            let kind = match &call {
                Call::Get { .. } => "GetUser",
                Call::Create { .. } => "CreateUser",
            };
            let code = answer
                .as_ref()
                .map_or_else(tonic::Status::code, |_| Code::Ok);
            *seen
                .lock()
                .unwrap()
                .entry(format!("{kind} {code:?}"))
                .or_default() += 1;
            check_answer(&target, &call, &answer)
        })
    });
    // What the cases met (shown with --nocapture).
    eprintln!("answers: {:?}", seen.lock().unwrap());
    rt.block_on(async {
        target.assert_still_serves("random calls").await;
        if let Err(e) = result {
            panic!("{e}");
        }
        target.stop().await;
    });
}
