//! The client-ping policy (src/transport/ping_policy.rs) on a running service,
//! spoken to in raw HTTP/2 so that the pings are exactly the test's:
//!
//! - pings spaced wider than `HTTP2_MIN_PING_INTERVAL`, with the server's own
//!   keepalive pings (and the client's ACKs of them) in between, pass, and
//!   each is answered;
//! - pings back to back get a GOAWAY `ENHANCE_YOUR_CALM` "too_many_pings"
//!   naming the last stream the client opened, then the end of the
//!   connection, over plaintext and over TLS, with the default policy;
//! - a tonic client that pings as gRPC clients do on a progress stream (BDP
//!   pings with each burst of DATA, as grpc-go's and grpc-core's clients, our
//!   Go and Python clients among them, do by default) is not punished under
//!   the default policy: a proxy between counts its pings and the GOAWAYs.

use crate::helpers::certs::{Ca, Files};
use crate::helpers::{spawn_app_with, test_config, wait_until};
use futures::StreamExt;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use user_service::proto::user::v1::{
    WatchProgressRequest, projection_service_client::ProjectionServiceClient,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest any one exchange may take: a guard against a hang, far above what
/// an answer takes, not a speed assertion.
const PATIENCE: Duration = Duration::from_secs(10);
const METRIC: &str = "user_service_http2_too_many_pings_total";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

fn ping(payload: u8) -> Vec<u8> {
    frame(PING, 0, 0, &[payload; 8])
}

/// A health Check on `stream` (HPACK by hand: static-table names, literal
/// values never indexed), with its empty request message.
fn health_check(stream: u32) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.push(u8::try_from(s.len()).unwrap());
        out.extend(s);
    }
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.push(0x04); // :path
    string(&mut block, b"/grpc.health.v1.Health/Check");
    block.push(0x01); // :authority
    string(&mut block, b"localhost");
    block.extend([0x0f, 0x10]); // content-type (static index 31)
    string(&mut block, b"application/grpc");
    block.push(0x00); // a new name
    string(&mut block, b"te");
    string(&mut block, b"trailers");
    let mut out = frame(HEADERS, END_HEADERS, stream, &block);
    out.extend(frame(DATA, END_STREAM, stream, &[0; 5]));
    out
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A client speaking raw HTTP/2 over `S` (TCP or TLS): it sends the preface
/// and an empty SETTINGS, acknowledges the server's SETTINGS and answers its
/// pings (counting them), and hands every frame it reads to the test.
struct Raw<S> {
    io: S,
    buf: Vec<u8>,
    server_pings: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    async fn start(io: S) -> Self {
        let mut raw = Self {
            io,
            buf: Vec::new(),
            server_pings: 0,
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        raw.send(&hello).await;
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        timeout(PATIENCE, self.io.write_all(bytes))
            .await
            .expect("the server takes our bytes in time")
            .expect("the server takes our bytes");
    }

    /// The next whole frame, `None` at the end of the connection; fails the
    /// test if neither comes within `PATIENCE`.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    match (f.kind, f.flags & ACK) {
                        (SETTINGS, 0) => self.send(&frame(SETTINGS, ACK, 0, &[])).await,
                        (PING, 0) => {
                            self.server_pings += 1;
                            self.send(&frame(PING, ACK, 0, &f.payload)).await;
                        }
                        _ => {}
                    }
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = timeout(PATIENCE, self.io.read(&mut chunk))
                .await
                .expect("a frame or the end within PATIENCE")
                .expect("a clean read (no reset)");
            if n == 0 {
                assert!(
                    self.buf.is_empty(),
                    "the end inside a frame: {:?}",
                    self.buf
                );
                return None;
            }
            self.buf.extend(&chunk[..n]);
        }
    }

    /// Reads up to the GOAWAY, checks it is the policy's, and that the
    /// connection ends right after it.
    async fn expect_too_many_pings(&mut self, last_stream: u32) {
        let goaway = loop {
            match self.next().await {
                Some(f) if f.kind == GOAWAY => break f,
                Some(_) => {}
                None => panic!("the connection ended without a GOAWAY"),
            }
        };
        assert_eq!(goaway.stream, 0, "{goaway:?}");
        let p = &goaway.payload;
        assert!(p.len() >= 8, "{goaway:?}");
        let last = u32::from_be_bytes(p[0..4].try_into().unwrap()) & 0x7fff_ffff;
        let code = u32::from_be_bytes(p[4..8].try_into().unwrap());
        assert_eq!(
            (last, code, String::from_utf8_lossy(&p[8..]).as_ref()),
            (last_stream, 0xb, "too_many_pings"),
            "last-stream-id, error code (ENHANCE_YOUR_CALM), debug data"
        );
        assert!(self.next().await.is_none(), "nothing after the GOAWAY");
    }
}

fn too_many_pings_counted(app: &crate::helpers::TestApp) -> Option<String> {
    app.handle
        .metrics
        .render()
        .lines()
        .find(|l| l.starts_with(METRIC))
        .map(str::to_owned)
}

#[tokio::test]
async fn pings_spaced_wider_than_the_interval_pass() {
    let mut config = test_config();
    config.http2_min_ping_interval = Duration::from_millis(300);
    // The server pings often too: the client's ACKs, close before and after
    // its own pings, are not pings of its own.
    config.http2_keepalive_interval = Duration::from_millis(100);
    let app = spawn_app_with(config).await;
    let mut raw = Raw::start(TcpStream::connect(app.addr).await.unwrap()).await;
    for i in 0..6u8 {
        if i > 0 {
            // The spacing under test: a ping 400 ms after the last one's
            // answer, so over 400 ms after the server read it.
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        raw.send(&ping(i)).await;
        loop {
            let f = raw
                .next()
                .await
                .unwrap_or_else(|| panic!("the connection ended after ping {i}"));
            assert_ne!(f.kind, GOAWAY, "after ping {i}: {f:?}");
            if f.kind == PING && f.flags & ACK != 0 && f.payload == [i; 8] {
                break;
            }
        }
    }
    assert!(
        raw.server_pings >= 3,
        "the server's own keepalive pinged only {} times",
        raw.server_pings
    );
    // And the connection still serves a call.
    raw.send(&health_check(1)).await;
    loop {
        let f = raw.next().await.expect("the answer to the call");
        assert_ne!(f.kind, GOAWAY, "{f:?}");
        if f.kind == HEADERS && f.stream == 1 && f.flags & END_STREAM != 0 {
            break;
        }
    }
    assert_eq!(too_many_pings_counted(&app), None);
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn pings_back_to_back_get_goaway_too_many_pings() {
    // The default policy (10 s, 2 strikes).
    let app = spawn_app_with(test_config()).await;
    let mut raw = Raw::start(TcpStream::connect(app.addr).await.unwrap()).await;
    // A call first: the GOAWAY must name its stream as the last one.
    raw.send(&health_check(1)).await;
    loop {
        let f = raw.next().await.expect("the answer to the call");
        if f.kind == HEADERS && f.stream == 1 && f.flags & END_STREAM != 0 {
            break;
        }
    }
    // Four at once: the first is free (a call came before it), the next
    // three are strikes, one over the two allowed.
    raw.send(&[ping(1), ping(2), ping(3), ping(4)].concat())
        .await;
    raw.expect_too_many_pings(1).await;
    assert_eq!(
        too_many_pings_counted(&app).as_deref(),
        Some(&*format!("{METRIC} 1"))
    );
    // Only that connection: the service goes on.
    let status = app
        .health
        .clone()
        .check(HealthCheckRequest::default())
        .await;
    assert!(status.is_ok(), "{status:?}");
    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn pings_back_to_back_over_tls_get_goaway_too() {
    let ca = Ca::new("ping policy CA");
    let files = Files::new();
    let (cert, key) = ca.leaf("user-service", true);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    let mut config = test_config();
    config.tls_cert_file = Some(files.path("server.pem"));
    config.tls_key_file = Some(files.path("server.key"));
    let app = spawn_app_with(config).await;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(app.addr).await.unwrap();
    let stream = timeout(
        PATIENCE,
        tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("the handshake in time")
    .expect("the handshake");

    let mut raw = Raw::start(stream).await;
    raw.send(&[ping(1), ping(2), ping(3), ping(4)].concat())
        .await;
    raw.expect_too_many_pings(0).await;
    assert_eq!(
        too_many_pings_counted(&app).as_deref(),
        Some(&*format!("{METRIC} 1"))
    );
    app.stop().await.expect("clean stop");
}

/// What the proxy saw.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    connections: usize,
    client_pings: usize,
    goaways: usize,
}

/// A TCP proxy to the service that counts the client's pings (not ACKs)
/// and the server's GOAWAYs, by frame headers.
struct Proxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let counts = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(to).await.unwrap();
                counts.lock().unwrap().connections += 1;
                let (client_rx, client_tx) = client.into_split();
                let (server_rx, server_tx) = server.into_split();
                let upstream = counts.clone();
                tokio::spawn(pump(
                    client_rx,
                    server_tx,
                    PREFACE.len(),
                    move |kind, flags| {
                        if kind == PING && flags & ACK == 0 {
                            upstream.lock().unwrap().client_pings += 1;
                        }
                    },
                ));
                let downstream = counts.clone();
                tokio::spawn(pump(server_rx, client_tx, 0, move |kind, _| {
                    if kind == GOAWAY {
                        downstream.lock().unwrap().goaways += 1;
                    }
                }));
            }
        });
        Self { addr, seen, task }
    }

    fn seen(&self) -> Seen {
        *self.seen.lock().unwrap()
    }
}

/// Copies `from` to `to`, calling `on_frame` with each frame's type and
/// flags (after skipping `skip` bytes: the client's preface).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut skip: usize,
    mut on_frame: impl FnMut(u8, u8),
) {
    let mut header = Vec::with_capacity(9);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut bytes = &buf[..n];
        while !bytes.is_empty() {
            if skip > 0 {
                let k = skip.min(bytes.len());
                skip -= k;
                bytes = &bytes[k..];
                continue;
            }
            let k = (9 - header.len()).min(bytes.len());
            header.extend(&bytes[..k]);
            bytes = &bytes[k..];
            if header.len() == 9 {
                on_frame(header[3], header[4]);
                skip = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                header.clear();
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test]
async fn a_client_pinging_as_grpc_clients_do_is_not_punished() {
    // The default policy (10 s, 2 strikes).
    let app = spawn_app_with(test_config()).await;
    wait_until(Duration::from_secs(30), || app.progress_answers())
        .await
        .expect("the own group's progress");
    let proxy = Proxy::start(app.addr).await;
    let channel = Channel::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        // BDP pings: one with the first DATA after each answered ping and a
        // delay (100 ms at first), as grpc-go's and grpc-core's clients do
        // by default.
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(PATIENCE)
        .connect()
        .await
        .expect("the proxy connects");
    let mut stream = ProjectionServiceClient::new(channel.clone())
        .watch_progress(WatchProgressRequest {
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            ..Default::default()
        })
        .await
        .expect("WatchProgress opens")
        .into_inner();
    // Snapshots until the client has pinged five times, each well under the
    // default 10 s after the last, with no call of the client's between:
    // struck down at the fourth, were the server's DATA not activity.
    let started = Instant::now();
    let mut snapshots = 0;
    while proxy.seen().client_pings < 5 || snapshots < 10 {
        timeout(PATIENCE, stream.next())
            .await
            .expect("a snapshot every 100 ms")
            .expect("the stream goes on")
            .expect("no error");
        snapshots += 1;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "in a minute, the client pinged only {:?}",
            proxy.seen()
        );
    }
    // And a call on the same connection.
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("a health Check on the same channel");
    let seen = proxy.seen();
    assert_eq!((seen.connections, seen.goaways), (1, 0), "{seen:?}");
    assert_eq!(too_many_pings_counted(&app), None);
    drop(stream);
    app.stop().await.expect("clean stop");
}
