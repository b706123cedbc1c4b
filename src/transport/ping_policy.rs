//! The client-ping policy: a client that pings too often is sent a GOAWAY
//! (`ENHANCE_YOUR_CALM`, debug data `too_many_pings`) and its connection is
//! closed, as grpc-go's server keepalive enforcement does
//! (`EnforcementPolicy{MinTime, PermitWithoutStream: true}`). hyper and h2
//! have no such setting (h2 only bounds what a ping flood costs: it keeps one
//! pending pong, and reads no further frame until that pong is written), so
//! it is done here, by [`Policed`], an I/O wrapper around each accepted
//! connection (the plaintext TCP stream, or the TLS stream once decrypted).
//!
//! # What it reads
//!
//! It parses both directions' HTTP/2 framing as the bytes pass, without
//! copying or holding any: the client's 24-byte preface, then 9-byte frame
//! headers (24-bit length, type, flags, 31-bit stream id), payloads skipped,
//! frames split across reads at any byte. Nothing is validated: h2 does that
//! and answers a malformed connection itself.
//!
//! # The rule
//!
//! - A PING from the client without the ACK flag is *counted*; an ACK (the
//!   client answering the server's own keepalive pings,
//!   `HTTP2_KEEPALIVE_INTERVAL`) is not a client ping and is never counted.
//! - A counted ping that arrives sooner than `HTTP2_MIN_PING_INTERVAL` after
//!   the previous counted ping is a *strike*. The first ping of a connection
//!   is never one, and neither is a ping exactly the interval after the last.
//! - A HEADERS or DATA frame in either direction (a call's request or its
//!   answer) is activity: the next counted ping sets the strikes back to 0
//!   and is not judged (grpc-go's `resetPingStrikes`). The client's own
//!   frames count because a client busy with calls pings as part of them;
//!   the server's count, as in grpc-go (which resets on the HEADERS and DATA
//!   it sends), because a client that sizes its flow-control window from the
//!   round trip (hyper's and tonic's `http2_adaptive_window`, grpc-go's BDP
//!   estimator) pings each time DATA arrives after a pause of as little as
//!   100 ms: a `WatchProgress` stream at its fastest interval would otherwise
//!   be struck down while the client does nothing wrong.
//! - More than `HTTP2_MAX_PING_STRIKES` strikes: GOAWAY and close. With the
//!   defaults (10 s, 2), the fourth ping in a row under 10 s apart with no
//!   call in between ends the connection; our clients' keepalive (30 s, and
//!   only while calls are open) never comes close.
//! - Pings are judged alike with and without open streams (grpc-go's
//!   `PermitWithoutStream: true`): an idle client pinging at the permitted
//!   rate costs about what the server's own keepalive does.
//! - `HTTP2_MIN_PING_INTERVAL=0s` turns the policy off (the wrapper then only
//!   passes bytes through).
//!
//! # The GOAWAY
//!
//! The verdict comes as the client's bytes are read; those bytes still go to
//! h2 (their frames arrived; h2 may answer them), and the wrapper reads no
//! more. The GOAWAY (stream 0, last-stream-id the highest stream the client
//! opened with HEADERS, error code `ENHANCE_YOUR_CALM` 0xb, debug data
//! `too_many_pings`) is then written at the next frame boundary of the
//! server's outgoing bytes, which the wrapper tracks the same way, so it
//! never lands inside one of h2's frames: at once if h2 is between frames
//! (from the next read, write or flush h2 makes), else right after h2 has
//! written the rest of the frame it is in (the wrapper lets through no more
//! than that rest). Then it is flushed, the connection's write side shut
//! (TCP FIN; TLS close_notify), and h2 sees the end: reads return EOF, writes
//! fail. One warn line names the peer, and
//! `user_service_http2_too_many_pings_total` counts it. If the server has
//! already sent a GOAWAY of its own (a drain), the policy stands down: that
//! connection is ending, and a second GOAWAY could not lower the first's
//! last-stream-id as HTTP/2 requires.
//!
//! # Silent and idle connections
//!
//! The same wrapper holds a connection to two deadlines, as grpc-go's server
//! does, so that sockets which say nothing cannot pile up (3,000 silent ones
//! once held 3,000 descriptors and 92 MiB for as long as they stayed):
//!
//! - The client's 24-byte preface must have arrived within
//!   `HTTP2_PREFACE_TIMEOUT` of the accept (of the TLS handshake's end over
//!   TLS); else the next read fails and h2 drops the connection, with no
//!   GOAWAY (the peer has not spoken HTTP/2).
//! - A connection with no open stream for `MAX_CONNECTION_IDLE` (grpc-go's
//!   `MaxConnectionIdle`) gets a GOAWAY `NO_ERROR`, debug data `max_idle`, by
//!   the same path as the ping policy's: its client opens a new connection
//!   for its next call, and a call it sent meanwhile is above the GOAWAY's
//!   last-stream-id, so it knows that call was not processed. A stream is
//!   open from the client's HEADERS until the server ends it (END_STREAM) or
//!   either side resets it (RST_STREAM).
//!
//! `user_service_connections_closed_total` counts both, by reason. The
//! wrapper also holds the connection's place under `MAX_CONNECTIONS` (see
//! [`super::connections`]), given back when h2 drops it.

use super::connections::Admission;
use crate::telemetry::Metrics;
use std::{
    collections::HashSet,
    future::Future,
    io::{self, IoSlice},
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, Waker, ready},
    time::{Duration, Instant},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const NO_ERROR: u32 = 0x0;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// Counts the connections the ping policy ended.
const METRIC: &str = "user_service_http2_too_many_pings_total";
/// Counts the connections closed for silence or idleness, by reason.
const CLOSED_METRIC: &str = "user_service_connections_closed_total";
/// Open streams tracked per connection; past it (h2 refuses streams over
/// `MAX_CONCURRENT_STREAMS` long before) the connection is never idle.
const MAX_TRACKED_STREAMS: usize = 1 << 16;
/// Most bytes read and dropped, once the connection is closed, so that what
/// the client had already sent does not make the kernel answer the close
/// with a reset (which can discard the GOAWAY before the client reads it).
const DRAIN_LIMIT: usize = 64 * 1024;

/// The policy's settings, shared by every connection of a server.
#[derive(Clone, Debug)]
pub struct PingPolicy {
    min_interval: Duration,
    max_strikes: u32,
    /// Zero: no deadline for the preface.
    preface_timeout: Duration,
    /// Zero: idle connections are kept.
    max_idle: Duration,
    metrics: Option<Metrics>,
}

impl PingPolicy {
    /// Pings sooner than `min_interval` after the previous are strikes; more
    /// than `max_strikes` strikes end the connection. A zero interval turns
    /// the policy off.
    pub fn new(min_interval: Duration, max_strikes: u32) -> Self {
        Self {
            min_interval,
            max_strikes,
            preface_timeout: Duration::ZERO,
            max_idle: Duration::ZERO,
            metrics: None,
        }
    }

    /// Closes a connection whose preface has not come within `preface`,
    /// and sends GOAWAY to one with no open stream for `max_idle` (see the
    /// module's doc); zero turns either off.
    pub fn with_deadlines(mut self, preface: Duration, max_idle: Duration) -> Self {
        self.preface_timeout = preface;
        self.max_idle = max_idle;
        self
    }

    /// Counts each connection ended in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn is_off(&self) -> bool {
        self.min_interval.is_zero()
    }

    /// `io`, under this policy; `peer` is for the log line.
    pub fn police<IO>(&self, io: IO, peer: Option<SocketAddr>) -> Policed<IO> {
        let watched = !self.is_off() || !self.preface_timeout.is_zero() || !self.max_idle.is_zero();
        let enforcer = watched.then(|| {
            Box::new(Enforcer {
                judge: Judge::new(self.min_interval, self.max_strikes),
                inbound: Frames::client(),
                outbound: Frames::server(),
                stage: Stage::Open,
                why: Why::TooManyPings,
                deadline: Deadline::new(self.preface_timeout, self.max_idle),
                peer,
                metrics: self.metrics.clone(),
                waiting: None,
            })
        });
        Policed {
            io,
            enforcer,
            admission: None,
        }
    }
}

/// An accepted connection under the [`PingPolicy`]: reads and writes pass
/// through, watched. Its [`Connected::ConnectInfo`] is the wrapped stream's,
/// so `Request::remote_addr` (and, over TLS, the peer certificates) work as
/// before.
pub struct Policed<IO> {
    io: IO,
    /// `None` when the policy and both deadlines are off.
    enforcer: Option<Box<Enforcer>>,
    /// The connection's place under `MAX_CONNECTIONS`, given back on drop.
    admission: Option<Admission>,
}

impl<IO> Policed<IO> {
    /// The wrapped stream.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Holds `admission` for as long as the connection lives.
    pub fn holding(mut self, admission: Admission) -> Self {
        self.admission = Some(admission);
        self
    }
}

impl<IO> std::fmt::Debug for Policed<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policed")
            .field("policed", &self.enforcer.is_some())
            .field("admitted", &self.admission.is_some())
            .finish_non_exhaustive()
    }
}

impl<IO: Connected> Connected for Policed<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// One connection's state under the policy.
struct Enforcer {
    judge: Judge,
    /// The client's bytes, as read.
    inbound: Frames,
    /// The server's bytes, as written.
    outbound: Frames,
    stage: Stage,
    /// Why the GOAWAY goes, once condemned.
    why: Why,
    deadline: Deadline,
    peer: Option<SocketAddr>,
    metrics: Option<Metrics>,
    /// A read that found h2 mid-frame when the GOAWAY was due: woken when
    /// the frame is out.
    waiting: Option<Waker>,
}

/// Why a connection gets its GOAWAY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    TooManyPings,
    Idle,
}

impl Why {
    /// The GOAWAY's error code and debug data.
    fn code_and_data(self) -> (u32, &'static [u8]) {
        match self {
            Self::TooManyPings => (ENHANCE_YOUR_CALM, b"too_many_pings"),
            Self::Idle => (NO_ERROR, b"max_idle"),
        }
    }
}

/// What a connection is waiting for under a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The client's preface.
    Preface,
    /// A stream, on a connection with none open.
    Stream,
}

/// The connection's one timer: the preface's deadline, then the idle one
/// whenever no stream is open. One `Sleep`, reset in place.
struct Deadline {
    max_idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: Option<Wait>,
}

impl Deadline {
    fn new(preface: Duration, max_idle: Duration) -> Self {
        let mut d = Self {
            max_idle,
            sleep: None,
            armed: None,
        };
        if !preface.is_zero() {
            d.arm(Wait::Preface, preface);
        } else if !max_idle.is_zero() {
            d.arm(Wait::Stream, max_idle);
        }
        d
    }

    fn arm(&mut self, wait: Wait, after: Duration) {
        let at = tokio::time::Instant::now() + after;
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.armed = Some(wait);
    }

    /// Follows the connection: `preface_done` (the whole preface is read),
    /// `idle` (no stream open), and whether it was idle before.
    fn follow(&mut self, preface_done: bool, idle: bool, was_idle: bool) {
        if self.armed == Some(Wait::Preface) && !preface_done {
            return;
        }
        let became_idle = self.armed == Some(Wait::Preface) || !was_idle;
        if self.max_idle.is_zero() || !idle {
            self.armed = None;
        } else if became_idle || self.armed.is_none() {
            self.arm(Wait::Stream, self.max_idle);
        }
    }

    /// Polls the timer (registering `cx` for its end): what ran out, if
    /// anything. It stays armed until [`Deadline::disarm`].
    fn poll(&mut self, cx: &mut Context<'_>) -> Option<Wait> {
        let wait = self.armed?;
        let sleep = self.sleep.as_mut()?;
        sleep.as_mut().poll(cx).is_ready().then_some(wait)
    }

    fn disarm(&mut self) {
        self.armed = None;
    }
}

/// Where a connection is on its way to the GOAWAY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Open,
    /// Over its strikes, or idle: the GOAWAY goes at the next outgoing
    /// boundary.
    Condemned,
    /// This much of the GOAWAY is written.
    Sending(usize),
    Flushing,
    ShuttingDown,
    /// GOAWAY sent (or the connection failed): reads EOF, writes fail.
    Closed,
}

impl Enforcer {
    /// The client's `bytes`, read at `now`.
    fn read(&mut self, bytes: &[u8], now: Instant) {
        let judge = &mut self.judge;
        let was_idle = judge.idle();
        let mut over = false;
        self.inbound
            .feed(bytes, |frame| over |= judge.client_frame(frame, now));
        self.deadline
            .follow(self.inbound.past_preface(), self.judge.idle(), was_idle);
        if over && self.condemn(Why::TooManyPings) {
            let peer = self.peer_name();
            tracing::warn!(
                %peer,
                strikes = self.judge.strikes,
                min_interval = ?self.judge.min_interval,
                "client pings too often (HTTP2_MIN_PING_INTERVAL): GOAWAY ENHANCE_YOUR_CALM too_many_pings, connection closed"
            );
            if let Some(metrics) = &self.metrics {
                metrics.counter(METRIC, &[]).increment(1);
            }
        }
    }

    /// The server's `bytes`, written; `cx` is registered with the idle
    /// timer if they ended the last open stream.
    fn wrote(&mut self, bytes: &[u8], cx: &mut Context<'_>) {
        let judge = &mut self.judge;
        let was_idle = judge.idle();
        self.outbound.feed(bytes, |frame| judge.server_frame(frame));
        if self.judge.idle() != was_idle {
            self.deadline
                .follow(self.inbound.past_preface(), self.judge.idle(), was_idle);
            // h2 may not read again before the timer runs out: have its
            // task woken then (at once if it already has).
            if self.deadline.poll(cx).is_some() {
                cx.waker().wake_by_ref();
            }
        }
    }

    /// Marks an open connection for its GOAWAY (`why`); false if it is
    /// already on its way out, or the server sent a GOAWAY of its own (a
    /// drain: that connection is ending, and a second GOAWAY could not lower
    /// the first's last-stream-id).
    fn condemn(&mut self, why: Why) -> bool {
        if self.stage != Stage::Open || self.judge.server_going_away {
            return false;
        }
        self.stage = Stage::Condemned;
        self.why = why;
        self.deadline.disarm();
        true
    }

    fn peer_name(&self) -> String {
        self.peer
            .map_or_else(|| "unknown".to_owned(), |p| p.to_string())
    }

    fn count_closed(&self, reason: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics
                .counter(CLOSED_METRIC, &[("reason", reason)])
                .increment(1);
        }
    }

    /// Before a read of an open connection: what its deadline says. `Err`
    /// for a connection whose preface did not come in time (closed with no
    /// GOAWAY); an idle one is condemned to its GOAWAY.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.deadline.poll(cx) {
            None => Ok(()),
            Some(Wait::Preface) => {
                self.deadline.disarm();
                self.stage = Stage::Closed;
                self.count_closed("no_preface");
                tracing::debug!(peer = %self.peer_name(), "no HTTP/2 preface in time (HTTP2_PREFACE_TIMEOUT): connection closed");
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within HTTP2_PREFACE_TIMEOUT",
                ))
            }
            Some(Wait::Stream) => {
                self.deadline.disarm();
                if self.condemn(Why::Idle) {
                    self.count_closed("idle");
                    tracing::debug!(peer = %self.peer_name(), "connection idle for MAX_CONNECTION_IDLE: GOAWAY max_idle");
                }
                Ok(())
            }
        }
    }

    /// Whether the next byte written would start a frame.
    fn at_boundary(&self) -> bool {
        self.outbound.to_boundary() == 0
    }

    /// What a flush or a shutdown of h2's does first: `None` to pass it on
    /// (the connection is open, or h2 is mid-frame: its flush pushes out the
    /// rest of the frame, and a shutdown mid-frame leaves no boundary for a
    /// GOAWAY), else the answer: done once closed, or the GOAWAY driven on.
    fn before_flush_or_shutdown<IO: AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
    ) -> Option<Poll<io::Result<()>>> {
        match self.stage {
            Stage::Open => None,
            Stage::Closed => Some(Poll::Ready(Ok(()))),
            Stage::Condemned if !self.at_boundary() => None,
            _ => Some(self.drive(io, cx)),
        }
    }

    /// Takes a condemned connection to `Closed`: waits for the outgoing
    /// boundary, writes the GOAWAY, flushes, shuts the write side.
    fn drive<IO: AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let fail = |stage: &mut Stage, e: io::Error| {
            *stage = Stage::Closed;
            Poll::Ready(Err(e))
        };
        loop {
            match self.stage {
                Stage::Open | Stage::Closed => return Poll::Ready(Ok(())),
                Stage::Condemned => {
                    if !self.at_boundary() {
                        self.waiting = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    self.stage = Stage::Sending(0);
                }
                Stage::Sending(sent) => {
                    let frame = goaway(self.judge.highest_stream, self.why);
                    match Pin::new(&mut *io).poll_write(cx, &frame[sent..]) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0)) => {
                            return fail(&mut self.stage, io::ErrorKind::WriteZero.into());
                        }
                        Poll::Ready(Ok(n)) if sent + n >= frame.len() => {
                            self.stage = Stage::Flushing;
                        }
                        Poll::Ready(Ok(n)) => self.stage = Stage::Sending(sent + n),
                        Poll::Ready(Err(e)) => return fail(&mut self.stage, e),
                    }
                }
                Stage::Flushing => match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => self.stage = Stage::ShuttingDown,
                    Poll::Ready(Err(e)) => return fail(&mut self.stage, e),
                },
                Stage::ShuttingDown => match Pin::new(&mut *io).poll_shutdown(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => self.stage = Stage::Closed,
                    Poll::Ready(Err(e)) => return fail(&mut self.stage, e),
                },
            }
        }
    }
}

/// What a write on a closed connection gets.
fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "connection closed by the connection policy",
    )
}

/// Reads and drops what the client has already sent, without waiting for
/// more (see [`DRAIN_LIMIT`]).
fn drain<IO: AsyncRead + Unpin>(io: &mut IO, cx: &mut Context<'_>) {
    let mut scratch = [0u8; 4096];
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => drained += buf.filled().len(),
            _ => return,
        }
    }
}

/// The GOAWAY this policy sends.
fn goaway(last_stream: u32, why: Why) -> Vec<u8> {
    let (code, data) = why.code_and_data();
    let len = (8 + data.len()) as u32;
    let mut frame = len.to_be_bytes()[1..].to_vec();
    // type, flags 0, stream 0
    frame.extend([GOAWAY, 0, 0, 0, 0, 0]);
    frame.extend((last_stream & 0x7fff_ffff).to_be_bytes());
    frame.extend(code.to_be_bytes());
    frame.extend(data);
    frame
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Policed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(e) = this.enforcer.as_deref_mut() else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        if e.stage == Stage::Open {
            e.check_deadline(cx)?;
        }
        if e.stage == Stage::Open {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            e.read(&buf.filled()[before..], Instant::now());
            // Bytes read before the verdict still go to h2; the next read
            // (or write) sends the GOAWAY.
            return Poll::Ready(Ok(()));
        }
        ready!(e.drive(&mut this.io, cx))?;
        drain(&mut this.io, cx);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Policed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(e) = this.enforcer.as_deref_mut() else {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        };
        let limit = match e.stage {
            Stage::Open => buf.len(),
            // Only the rest of h2's current frame goes before the GOAWAY.
            Stage::Condemned if !e.at_boundary() => e.outbound.to_boundary().min(buf.len()),
            _ => {
                ready!(e.drive(&mut this.io, cx))?;
                return Poll::Ready(Err(closed()));
            }
        };
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, &buf[..limit]))?;
        e.wrote(&buf[..n], cx);
        if e.stage == Stage::Condemned
            && e.at_boundary()
            && let Some(waiting) = e.waiting.take()
        {
            waiting.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.enforcer.as_deref().map(|e| e.stage) {
            None => Pin::new(&mut this.io).poll_write_vectored(cx, bufs),
            Some(Stage::Open) => {
                let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
                if let Some(e) = this.enforcer.as_deref_mut() {
                    let mut left = n;
                    for buf in bufs {
                        if left == 0 {
                            break;
                        }
                        let k = left.min(buf.len());
                        e.wrote(&buf[..k], cx);
                        left -= k;
                    }
                }
                Poll::Ready(Ok(n))
            }
            Some(_) => {
                // On the way to the GOAWAY: one slice at a time, bounded.
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
                Pin::new(this).poll_write(cx, first)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(done) = this
            .enforcer
            .as_deref_mut()
            .and_then(|e| e.before_flush_or_shutdown(&mut this.io, cx))
        {
            return done;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(done) = this
            .enforcer
            .as_deref_mut()
            .and_then(|e| e.before_flush_or_shutdown(&mut this.io, cx))
        {
            return done;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// The counting: strikes, activity, the highest stream.
#[derive(Debug)]
struct Judge {
    min_interval: Duration,
    max_strikes: u32,
    /// When the last counted ping came.
    last_ping: Option<Instant>,
    strikes: u32,
    /// A HEADERS or DATA frame went either way since the last counted ping.
    active: bool,
    /// The highest stream id the client opened (with HEADERS).
    highest_stream: u32,
    /// The server sent a GOAWAY of its own.
    server_going_away: bool,
    /// Streams the client opened that are not ended yet.
    open: HashSet<u32>,
    /// More streams than [`MAX_TRACKED_STREAMS`] were open at once: never
    /// idle from then on.
    untracked: bool,
}

impl Judge {
    fn new(min_interval: Duration, max_strikes: u32) -> Self {
        Self {
            min_interval,
            max_strikes,
            last_ping: None,
            strikes: 0,
            active: false,
            highest_stream: 0,
            server_going_away: false,
            open: HashSet::new(),
            untracked: false,
        }
    }

    /// No stream is open.
    fn idle(&self) -> bool {
        self.open.is_empty() && !self.untracked
    }

    fn opened(&mut self, stream: u32) {
        if self.open.len() >= MAX_TRACKED_STREAMS {
            self.untracked = true;
        } else {
            self.open.insert(stream);
        }
    }

    /// A frame from the client, read at `now`; true when it takes the
    /// connection over its strikes.
    fn client_frame(&mut self, frame: FrameHeader, now: Instant) -> bool {
        match frame.kind {
            HEADERS => {
                if frame.stream > self.highest_stream {
                    self.opened(frame.stream);
                }
                self.highest_stream = self.highest_stream.max(frame.stream);
                self.active = true;
                false
            }
            DATA => {
                self.active = true;
                false
            }
            RST_STREAM => {
                self.open.remove(&frame.stream);
                false
            }
            PING if frame.flags & ACK == 0 => self.ping(now),
            _ => false,
        }
    }

    fn ping(&mut self, now: Instant) -> bool {
        if std::mem::take(&mut self.active) {
            self.strikes = 0;
        } else if self
            .last_ping
            .is_some_and(|last| now.saturating_duration_since(last) < self.min_interval)
        {
            self.strikes += 1;
        }
        self.last_ping = Some(now);
        !self.server_going_away && self.strikes > self.max_strikes
    }

    /// A frame the server wrote.
    fn server_frame(&mut self, frame: FrameHeader) {
        match frame.kind {
            HEADERS | DATA => {
                self.active = true;
                if frame.flags & END_STREAM != 0 {
                    self.open.remove(&frame.stream);
                }
            }
            RST_STREAM => {
                self.open.remove(&frame.stream);
            }
            GOAWAY => self.server_going_away = true,
            _ => {}
        }
    }
}

/// A frame's 9-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// Where one direction's bytes are in HTTP/2's framing.
#[derive(Debug, Clone)]
enum Frames {
    /// Inside the client's preface, this much of it left.
    Preface(usize),
    /// Inside a frame header, this much of it seen.
    Header([u8; HEADER_LEN], usize),
    /// Inside a payload, this much of it left.
    Payload(usize),
}

impl Frames {
    /// The client's side: the preface first.
    fn client() -> Self {
        Self::Preface(PREFACE_LEN)
    }

    /// The server's side: frames from the first byte (its preface is a
    /// SETTINGS frame).
    fn server() -> Self {
        Self::Header([0; HEADER_LEN], 0)
    }

    /// Moves over `bytes`, calling `on_header` for each frame header
    /// completed in them.
    fn feed(&mut self, mut bytes: &[u8], mut on_header: impl FnMut(FrameHeader)) {
        while !bytes.is_empty() {
            match self {
                Self::Preface(left) | Self::Payload(left) => {
                    let n = (*left).min(bytes.len());
                    *left -= n;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        *self = Self::server();
                    }
                }
                Self::Header(buf, seen) => {
                    let n = (HEADER_LEN - *seen).min(bytes.len());
                    buf[*seen..*seen + n].copy_from_slice(&bytes[..n]);
                    *seen += n;
                    bytes = &bytes[n..];
                    if *seen == HEADER_LEN {
                        let header = FrameHeader::parse(buf);
                        *self = match header.len {
                            0 => Self::server(),
                            len => Self::Payload(len as usize),
                        };
                        on_header(header);
                    }
                }
            }
        }
    }

    /// Whether the client's preface is behind (always, for the server's side).
    fn past_preface(&self) -> bool {
        !matches!(self, Self::Preface(_))
    }

    /// Bytes still to pass before the next frame boundary; 0 at one. Inside
    /// a header: the rest of the header (its payload's length is not known
    /// until it is whole).
    fn to_boundary(&self) -> usize {
        match self {
            Self::Preface(left) | Self::Payload(left) => *left,
            Self::Header(_, 0) => 0,
            Self::Header(_, seen) => HEADER_LEN - seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    fn ping(ack: bool) -> Vec<u8> {
        frame(PING, u8::from(ack), 0, &[7; 8])
    }

    fn header(kind: u8, flags: u8, stream: u32, len: u32) -> FrameHeader {
        FrameHeader {
            len,
            kind,
            flags,
            stream,
        }
    }

    /// A client's bytes: the preface, SETTINGS, a call whose DATA payload
    /// holds what looks like a PING frame, pings and an ACK.
    fn client_bytes() -> (Vec<u8>, Vec<FrameHeader>) {
        let mut bytes = PREFACE.to_vec();
        let mut want = Vec::new();
        let mut push = |kind, flags, stream, payload: &[u8]| {
            bytes.extend(frame(kind, flags, stream, payload));
            want.push(header(kind, flags, stream, payload.len() as u32));
        };
        push(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        push(HEADERS, 0x4, 1, &[0x83, 0x86]);
        // A DATA payload made of PING frames, and big: none of it is a frame.
        let fake: Vec<u8> = std::iter::repeat_n(ping(false), 2000).flatten().collect();
        push(DATA, 0, 1, &fake);
        push(PING, 0, 0, &[1; 8]);
        push(0x8, 0, 0, &[0, 0, 1, 0]);
        push(PING, ACK, 0, &[2; 8]);
        push(DATA, 0x1, 1, &[]);
        push(HEADERS, 0x5, 0x7fff_fffd, &[0x83]);
        (bytes, want)
    }

    fn parse_in(chunks: &[&[u8]]) -> Vec<FrameHeader> {
        let mut frames = Frames::client();
        let mut got = Vec::new();
        for chunk in chunks {
            frames.feed(chunk, |h| got.push(h));
        }
        assert_eq!(frames.to_boundary(), 0, "ends between frames");
        got
    }

    #[test]
    fn parses_whole_and_byte_by_byte() {
        let (bytes, want) = client_bytes();
        assert_eq!(parse_in(&[&bytes]), want);
        let bytes_one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_in(&bytes_one_by_one), want);
    }

    #[test]
    fn parses_split_at_every_byte() {
        let (bytes, want) = client_bytes();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(parse_in(&[a, b]), want, "split at {at}");
        }
        // And in three, around every header boundary.
        for at in (0..bytes.len()).step_by(7) {
            let (a, rest) = bytes.split_at(at);
            let (b, c) = rest.split_at(rest.len().min(5));
            assert_eq!(parse_in(&[a, b, c]), want, "split at {at}");
        }
    }

    #[test]
    fn the_reserved_bit_is_not_part_of_the_stream_id() {
        let mut frames = Frames::server();
        let mut got = Vec::new();
        let mut bytes = frame(HEADERS, 0, 5, &[]);
        bytes[5] |= 0x80;
        frames.feed(&bytes, |h| got.push(h));
        assert_eq!(got, [header(HEADERS, 0, 5, 0)]);
    }

    #[test]
    fn knows_how_far_the_next_boundary_is() {
        let mut frames = Frames::server();
        assert_eq!(frames.to_boundary(), 0);
        let data = frame(DATA, 0, 1, &[0; 100]);
        frames.feed(&data[..4], |_| {});
        assert_eq!(frames.to_boundary(), 5, "the rest of the header");
        frames.feed(&data[4..9], |_| {});
        assert_eq!(frames.to_boundary(), 100, "the payload");
        frames.feed(&data[9..60], |_| {});
        assert_eq!(frames.to_boundary(), 49);
        frames.feed(&data[60..], |_| {});
        assert_eq!(frames.to_boundary(), 0);
        let mut client = Frames::client();
        client.feed(&PREFACE[..10], |_| {});
        assert_eq!(client.to_boundary(), 14, "the rest of the preface");
    }

    #[test]
    fn the_connect_info_is_the_wrapped_streams() {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        fn yields<IO: Connected<ConnectInfo = Info>, Info>() {}
        // What `Request::remote_addr` (and `peer_certs`) look for.
        yields::<Policed<tokio::net::TcpStream>, TcpConnectInfo>();
        yields::<
            Policed<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
            TlsConnectInfo<TcpConnectInfo>,
        >();
    }

    fn judge() -> Judge {
        Judge::new(Duration::from_secs(10), 2)
    }

    fn client_ping(j: &mut Judge, at: Instant) -> bool {
        j.client_frame(header(PING, 0, 0, 8), at)
    }

    #[test]
    fn pings_at_the_interval_are_no_strikes() {
        let mut j = judge();
        let t = Instant::now();
        for i in 0..100 {
            assert!(!client_ping(&mut j, t + Duration::from_secs(10 * i)));
        }
        assert_eq!(j.strikes, 0);
    }

    #[test]
    fn three_strikes_are_over_two() {
        let mut j = judge();
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        assert!(!client_ping(&mut j, at(0)), "the first is free");
        assert!(!client_ping(&mut j, at(10_000)));
        assert_eq!(j.strikes, 0, "exactly the interval is allowed");
        assert!(!client_ping(&mut j, at(19_999)));
        assert_eq!(j.strikes, 1, "just under it is a strike");
        assert!(!client_ping(&mut j, at(20_000)));
        assert!(client_ping(&mut j, at(20_001)), "3 strikes > 2");
    }

    #[test]
    fn acks_and_other_frames_are_not_pings() {
        let mut j = judge();
        let t = Instant::now();
        for kind in [0x3, 0x4, 0x8, 0x9] {
            assert!(!j.client_frame(header(kind, 0, 0, 4), t));
        }
        for _ in 0..10 {
            assert!(!j.client_frame(header(PING, ACK, 0, 8), t));
        }
        assert_eq!((j.strikes, j.last_ping), (0, None));
    }

    #[test]
    fn headers_or_data_either_way_reset_the_strikes() {
        let t = Instant::now();
        for activity in [
            |j: &mut Judge| {
                j.client_frame(header(HEADERS, 0, 3, 1), Instant::now());
            },
            |j: &mut Judge| {
                j.client_frame(header(DATA, 0, 3, 1), Instant::now());
            },
            |j: &mut Judge| j.server_frame(header(HEADERS, 0, 3, 1)),
            |j: &mut Judge| j.server_frame(header(DATA, 0, 3, 1)),
        ] {
            let mut j = judge();
            for _ in 0..3 {
                assert!(!client_ping(&mut j, t));
            }
            assert_eq!(j.strikes, 2);
            activity(&mut j);
            assert!(!client_ping(&mut j, t), "the ping after activity is free");
            assert_eq!(j.strikes, 0);
            assert!(!client_ping(&mut j, t));
            assert!(!client_ping(&mut j, t));
            assert!(client_ping(&mut j, t), "counting starts again");
        }
        // Server pings, settings or window updates are no activity.
        let mut j = judge();
        for _ in 0..3 {
            client_ping(&mut j, t);
            j.server_frame(header(PING, 0, 0, 8));
            j.server_frame(header(0x8, 0, 0, 4));
        }
        assert!(client_ping(&mut j, t));
    }

    #[test]
    fn after_the_servers_own_goaway_no_verdict() {
        let mut j = judge();
        let t = Instant::now();
        j.server_frame(header(GOAWAY, 0, 0, 8));
        for _ in 0..10 {
            assert!(!client_ping(&mut j, t));
        }
    }

    #[test]
    fn the_goaway_frame() {
        let mut got = Vec::new();
        let bytes = goaway(0x8000_0007, Why::TooManyPings);
        let mut frames = Frames::server();
        frames.feed(&bytes, |h| got.push(h));
        assert_eq!(got, [header(GOAWAY, 0, 0, 22)]);
        assert_eq!(&bytes[9..13], &7u32.to_be_bytes());
        assert_eq!(&bytes[13..17], &[0, 0, 0, 0xb]);
        assert_eq!(&bytes[17..], b"too_many_pings");
        let idle = goaway(5, Why::Idle);
        assert_eq!(&idle[..9], &[0, 0, 16, GOAWAY, 0, 0, 0, 0, 0]);
        assert_eq!(&idle[9..17], &[0, 0, 0, 5, 0, 0, 0, 0]);
        assert_eq!(&idle[17..], b"max_idle");
    }

    /// The wrapper over an in-memory connection: the test plays h2 on the
    /// policed side and the client on the other.
    fn policed(interval: Duration) -> (Policed<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (server, client) = tokio::io::duplex(1 << 20);
        (PingPolicy::new(interval, 2).police(server, None), client)
    }

    fn flood() -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(HEADERS, 0x5, 3, &[0x83]));
        for _ in 0..4 {
            bytes.extend(ping(false));
        }
        bytes
    }

    async fn read_all(from: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), from.read_to_end(&mut got))
            .await
            .expect("the policed side ends the connection")
            .unwrap();
        got
    }

    #[tokio::test]
    async fn a_flood_gets_goaway_then_eof() {
        let (mut server, mut client) = policed(Duration::from_secs(10));
        client.write_all(&flood()).await.unwrap();
        let mut buf = vec![0; 1 << 16];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..n],
            flood(),
            "what was read before the verdict goes to h2"
        );
        assert_eq!(server.read(&mut buf).await.unwrap(), 0, "then EOF");
        assert!(server.write_all(&ping(true)).await.is_err(), "writes fail");
        assert_eq!(read_all(&mut client).await, goaway(3, Why::TooManyPings));
    }

    #[tokio::test]
    async fn the_goaway_waits_for_the_frame_h2_is_writing() {
        let (mut server, mut client) = policed(Duration::from_secs(10));
        let data = frame(DATA, 0, 1, &[9; 1000]);
        server.write_all(&data[..300]).await.unwrap();
        client.write_all(&flood()).await.unwrap();
        let mut buf = vec![0; 1 << 16];
        assert_eq!(server.read(&mut buf).await.unwrap(), flood().len());
        assert!(
            server.read(&mut buf).now_or_never().is_none(),
            "no EOF while h2 is mid-frame"
        );
        // h2 writes the rest and more: only the rest goes.
        let mut rest = data[300..].to_vec();
        rest.extend(ping(true));
        let left = data.len() - 300;
        assert_eq!(server.write(&rest).await.unwrap(), left);
        assert!(server.write(&rest[left..]).await.is_err());
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        let mut want = data.clone();
        want.extend(goaway(3, Why::TooManyPings));
        assert_eq!(read_all(&mut client).await, want);
    }

    #[tokio::test]
    async fn spaced_pings_pass_and_off_means_off() {
        for (interval, pause) in [
            (Duration::from_millis(20), Duration::from_millis(30)),
            (Duration::ZERO, Duration::ZERO),
        ] {
            let (mut server, mut client) = policed(interval);
            client.write_all(PREFACE).await.unwrap();
            let mut buf = vec![0; 1 << 16];
            let mut read = server.read(&mut buf).await.unwrap();
            for _ in 0..6 {
                tokio::time::sleep(pause).await;
                client.write_all(&ping(false)).await.unwrap();
                read += server.read(&mut buf).await.unwrap();
                server.write_all(&ping(true)).await.unwrap();
            }
            assert_eq!(read, PREFACE.len() + 6 * 17);
            drop(server);
            assert_eq!(read_all(&mut client).await, ping(true).repeat(6));
        }
    }
}
