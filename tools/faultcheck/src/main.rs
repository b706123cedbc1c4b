//! `faultcheck`: CreateUser under load while a fault is injected, then checks
//! that every acknowledged user is there, once, as acknowledged.
//!
//! 1. Load: `--concurrency` callers send CreateUser with fresh request ids
//!    (service-assigned ids, and a share with client-chosen ids from a range
//!    unique to the run) round-robin over `--targets`, for `--duration`. A
//!    call that fails with a retryable error (UNAVAILABLE, ABORTED,
//!    DEADLINE_EXCEEDED, a transport error) is retried with the same request id
//!    and fields, backing off 50 ms to 1 s, until it gets a final answer or
//!    `--retry-for` after the load stopped. Every acknowledged request is
//!    recorded: request id, id, name, email, position.
//! 2. Fault: `--fault CMD` runs (`bash -c`) at `--fault-at`, `--heal CMD`
//!    `--heal-after` later; `--repeat N --every D` repeats the cycle. The load
//!    goes on at least `--after-heal` after the last heal. With
//!    `--check-group`, after each heal the projector's consumer group must be
//!    STABLE with every partition owned (`ProjectionService/GetProgress`)
//!    within `--rejoin-within`; with `--repeat` > 1, a CreateUser must be
//!    acknowledged within `--writes-within` of every heal. The window from
//!    the fault command's end (plus `--window-grace`) to the heal can be
//!    checked both ways: `--writes-during-fault` (every partition takes a new
//!    write in it: a killed leader was replaced) and `--no-acks-during-fault`
//!    (nothing is acknowledged in it and calls fail UNAVAILABLE: too few
//!    brokers left to keep two copies).
//! 3. Read back: once every target's health says SERVING, GetUser(id,
//!    min_position = the acknowledged position) for every acknowledged user,
//!    retrying UNAVAILABLE and DEADLINE_EXCEEDED until `--heal-timeout`; with
//!    `--read-every-target`, on every target (`--late-targets` too: instances
//!    a heal started), with the position and without it. With
//!    `--recreate-sample N`, N acknowledged client-chosen ids are then created
//!    again by other requests: each must answer ALREADY_EXISTS.
//! 4. The log (`--brokers`, `--topic`): every record of every partition from
//!    the start to the high watermark, read without a consumer group. Per id,
//!    the first UserCreated in offset order wins (per partition, if partitions
//!    were added: two requests' winners in two partitions are doubled). One
//!    request must own at most one winning event, and the winner for an
//!    acknowledged id must be that request's event.
//!
//! With `--max-retries-after-fault N`, a call that failed more than N times
//! after the first fault started fails the run.
//!
//! With `--switch-to-late-targets` the fault moves the traffic (a move to a
//! new topic): once the fault command has returned, the load (and the
//! retries of creates still failing, same request id) goes to
//! `--late-targets`, which alone are read back, users acknowledged on the old
//! topic without their position; `--log-partitions N` wants every event of
//! the (new) topic in murmur2(id) mod N.
//!
//! Prints one summary line on stdout (`fault=... lost=0 corrupted=0
//! doubled=0 ...`), progress on stderr, and with `--json FILE` the same figures
//! and the details as JSON. Exit status: 0 pass, 1 fail (lost, corrupted,
//! doubled or rejected requests, nothing acknowledged, a fault command that
//! failed, an unreadable log, a missed rejoin or write criterion), 2 set-up
//! error. See docs/faults.md. Every loop is bounded in count and time; only
//! loopback addresses are accepted.

use clap::Parser;
use futures::{StreamExt, stream};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use serde_json::{Value, json};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    ops::ControlFlow,
    os::{fd::AsFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tonic::{Code, Request, Status, transport::Channel};
use tools_common::{
    health::{self, NotServing},
    pool::Pool,
    retry::{self, is_transport_error},
};
use user_service::proto::user::v1::{
    CreateUserRequest, CreateUserResponse, GetProgressRequest, GetUserRequest, GroupState,
    Position, projection_service_client::ProjectionServiceClient,
    user_service_client::UserServiceClient,
};

#[derive(Parser, Debug)]
#[command(
    name = "faultcheck",
    about = "CreateUser under load while a fault is injected; then every acknowledged user must be readable, once, as acknowledged"
)]
struct Cli {
    /// The fault's name, printed as `fault=NAME`.
    #[arg(long, default_value = "none")]
    name: String,
    /// The service instances, `127.0.0.1:PORT`, comma-separated; calls go
    /// round-robin over them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:50051")]
    targets: Vec<String>,
    /// Instances a heal command starts (`127.0.0.1:PORT`, comma-separated):
    /// the load does not use them; after it they must be SERVING too, and
    /// the read-back (with --read-every-target) and the re-creates
    /// (--recreate-sample) use them like the others.
    #[arg(long, value_delimiter = ',')]
    late_targets: Vec<String>,
    /// HTTP/2 connections per target.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Callers, each with one CreateUser in flight (closed loop).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// How long new requests are started.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Start no more requests than this.
    #[arg(long, default_value_t = 1_000_000)]
    max_requests: u64,
    /// Share of requests that carry a client-chosen id (from a range unique to
    /// the run); the others let the service assign the id.
    #[arg(long, default_value_t = 0.25)]
    client_id_share: f64,
    /// Deadline of each call (sent as grpc-timeout).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
    /// How long a request is still retried after the load stopped.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    retry_for: Duration,
    /// Shell command (`bash -c`) that injects the fault.
    #[arg(long)]
    fault: Option<String>,
    /// When the (first) fault is injected, from the start of the load.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    fault_at: Duration,
    /// Shell command that heals the fault (may be empty).
    #[arg(long, default_value = "")]
    heal: String,
    /// Time from the fault command's start to the heal command.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    heal_after: Duration,
    /// Fault cycles.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Time between the starts of two fault cycles.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// A fault or heal command still running after this is killed (and fails the run).
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    command_timeout: Duration,
    /// The load runs at least this long after the last heal.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    after_heal: Duration,
    /// Longest wait, after the load, for every target to be SERVING, and then
    /// for the read-back to get its answers.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    heal_timeout: Duration,
    /// GetUser calls in flight during the read-back.
    #[arg(long, default_value_t = 16)]
    verify_concurrency: usize,
    /// Kafka bootstrap servers (127.0.0.1:PORT), for the log check.
    #[arg(long)]
    brokers: Option<String>,
    /// The service's topic; without it (or --brokers) the log is not checked.
    #[arg(long)]
    topic: Option<String>,
    /// Longest time to read the log back.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    log_timeout: Duration,
    /// The projector's consumer group: after each heal it must be STABLE with
    /// every partition owned within --rejoin-within.
    #[arg(long)]
    check_group: Option<String>,
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    rejoin_within: Duration,
    /// Between each fault and its heal, read users acknowledged before the
    /// fault and ask the health of `user.v1.UserService`: every read must be
    /// answered and the service stay SERVING (for faults of Kafka, which
    /// reads do not need). With --max-retries-after-fault each read is
    /// retried like the read-back (for up to 5 s), its retries judged by it.
    #[arg(long)]
    reads_during_fault: bool,
    /// Between each fault's end (plus --window-grace) and its heal, every
    /// partition that took writes before the fault must take a new one (for
    /// faults that writes must ride out: a partition leader killed, a new one
    /// elected among the in-sync replicas). Probes as with
    /// --no-acks-during-fault, so that callers held up on one partition do
    /// not starve the others.
    #[arg(long)]
    writes_during_fault: bool,
    /// Between each fault's end (plus --window-grace) and its heal, no
    /// CreateUser may be acknowledged, and calls must fail with UNAVAILABLE
    /// (for faults that must stop writes: two of three brokers down, fewer in
    /// sync than min.insync.replicas). The callers are closed-loop, so each
    /// soon waits on a request it cannot finish; to keep asking, a fresh
    /// request is also started every --probe-every from the fault's end to
    /// the heal, each retried like the others.
    #[arg(long)]
    no_acks_during_fault: bool,
    /// With --no-acks-during-fault or --writes-during-fault: how often a fresh
    /// request is started between a fault's end and its heal.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    probe_every: Duration,
    /// How long after the fault command's end the window of
    /// --writes-during-fault and --no-acks-during-fault opens: a call whose
    /// event was in the log before the fault may still be answered just after.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    window_grace: Duration,
    /// With --repeat > 1: a CreateUser must be acknowledged within this after
    /// every heal.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    writes_within: Duration,
    /// Read every acknowledged user on every target (--late-targets too),
    /// with its acknowledged position and again without one, instead of once,
    /// round-robin, with the position.
    #[arg(long)]
    read_every_target: bool,
    /// After the read-back, create this many acknowledged client-chosen ids
    /// (acknowledged before the first fault, spread over the run) again under
    /// fresh request ids and fields, round-robin over every target: each must
    /// answer ALREADY_EXISTS; an OK is a second user under the id (doubled).
    #[arg(long, default_value_t = 0)]
    recreate_sample: usize,
    /// A call (create, re-create, read-back) that failed more than this many
    /// times after the first fault started fails the run: the usual retry
    /// rides out a blip, not an outage. Also reports the UNAVAILABLE answers
    /// seen after the fault started.
    #[arg(long)]
    max_retries_after_fault: Option<u32>,
    /// The fault moves the traffic (`move-topic`: the users move to a new
    /// topic, served by the --late-targets): while the fault command runs,
    /// the load and --reads-during-fault (which then starts with the fault
    /// command and lasts until it has returned) stay on --targets; once it
    /// has returned, the load moves to the late targets, and creates still
    /// failing are retried there with the same request id. Create failures
    /// before the switch are reported, not judged by
    /// --max-retries-after-fault, but every such request must be
    /// acknowledged in the end. The read-back and the re-creates go to the
    /// late targets only, and users acknowledged on --targets are read
    /// without their position (it names the old topic); --topic is then the
    /// new topic.
    #[arg(long, requires = "late_targets")]
    switch_to_late_targets: bool,
    /// Every event in the log must sit in its id's partition by a map of N
    /// partitions (Kafka's murmur2 of the decimal id, mod N); one elsewhere
    /// is doubled.
    #[arg(long)]
    log_partitions: Option<i32>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Prefix of request ids, names and emails (default: random).
    #[arg(long)]
    run_id: Option<String>,
}

// ------------------------------------------------------------------ logging

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn since_start(t: Instant) -> f64 {
    t.saturating_duration_since(*START.get_or_init(Instant::now))
        .as_secs_f64()
}

macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("[faultcheck +{:.1}s] {}", since_start(Instant::now()), format!($($arg)*))
    };
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

// ------------------------------------------------------------------ channels

/// `--connections` lazily connected channels per target (`127.0.0.1:PORT`);
/// a slot whose connection looks dead is replaced by a fresh one.
fn lazy_pool(targets: &[String], per_target: usize) -> anyhow::Result<Pool> {
    let uris: Vec<String> = targets.iter().map(|a| format!("http://{a}")).collect();
    Pool::lazy(&uris, per_target, |e| {
        e.connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
    })
}

// ------------------------------------------------------------------ errors

/// A code as gRPC's spec spells it (`UNAVAILABLE`): the summary line's and
/// the JSON's, which docs/faults.md and scripts/faults read. Not a copy of
/// the other two spellings: loadgen writes tonic's (`Unavailable`, what its
/// `--expect-codes` takes), the service's metrics grpc-go's (`Canceled`).
fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Errors a client retries with the same request id (INTERNAL and UNKNOWN
/// when the connection failed rather than the service answering; our own
/// guard's timeout counts, a hung connection, as [`retry::guard_expired`]
/// marks it). Each retry waits [`retry::doubling`]: 50 ms to 1 s.
const RETRY: retry::Rule = retry::Rule {
    always: &[
        Code::Unavailable,
        Code::Aborted,
        Code::DeadlineExceeded,
        Code::Cancelled,
    ],
    on_transport: &[Code::Internal, Code::Unknown],
};

/// What calls met after the first fault started (--max-retries-after-fault):
/// every failed attempt by kind of call and code, and how many times one call
/// failed at most.
struct AfterFault {
    started: std::sync::OnceLock<Instant>,
    limit: Option<u32>,
    /// With --switch-to-late-targets: when the load moved (unset until
    /// then). Create failures before it are tallied apart, not judged.
    switch: Option<std::sync::OnceLock<Instant>>,
    tally: Mutex<AfterFaultTally>,
}

#[derive(Debug, Default)]
struct AfterFaultTally {
    /// Failed attempts after the fault started: kind of call -> code -> n.
    errors: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// The most failed attempts of one call after the fault started.
    max_failures: u32,
    /// Calls that failed more than the limit after the fault started.
    over: u64,
    examples: Vec<String>,
    /// With a switch: create failures after the fault started and before
    /// the switch, by code, and when the first and the last came.
    before_switch: BTreeMap<&'static str, u64>,
    first_before_switch: Option<Instant>,
    last_before_switch: Option<Instant>,
}

impl AfterFault {
    fn new(limit: Option<u32>, switch: bool) -> Self {
        Self {
            started: std::sync::OnceLock::new(),
            limit,
            switch: switch.then(std::sync::OnceLock::new),
            tally: Mutex::new(AfterFaultTally::default()),
        }
    }

    /// Whether an attempt failing now counts (the fault has started).
    fn counts(&self) -> bool {
        self.started.get().is_some_and(|t| Instant::now() >= *t)
    }

    /// Whether the fault has started and the load has yet to switch (with
    /// --switch-to-late-targets): creates may be refused meanwhile.
    fn before_switch(&self) -> bool {
        self.counts() && self.switch.as_ref().is_some_and(|s| s.get().is_none())
    }

    /// A failed attempt of a call of `kind`; true if it counts.
    fn failed(&self, kind: &'static str, code: Code) -> bool {
        if !self.counts() {
            return false;
        }
        let mut t = self.tally.lock().expect("after-fault lock");
        if kind == "create" && self.switch.as_ref().is_some_and(|s| s.get().is_none()) {
            let now = Instant::now();
            *t.before_switch.entry(code_name(code)).or_default() += 1;
            t.first_before_switch.get_or_insert(now);
            t.last_before_switch = Some(now);
            return false;
        }
        *t.errors
            .entry(kind)
            .or_default()
            .entry(code_name(code))
            .or_default() += 1;
        true
    }

    /// A call of `kind` is over, having failed `failures` times after the
    /// fault started.
    fn done(&self, kind: &'static str, what: &str, failures: u32, last: &str) {
        if failures == 0 {
            return;
        }
        let mut t = self.tally.lock().expect("after-fault lock");
        t.max_failures = t.max_failures.max(failures);
        if self.limit.is_some_and(|l| failures > l) {
            t.over += 1;
            if t.examples.len() < 6 {
                t.examples.push(format!(
                    "{kind} {what}: failed {failures} times after the fault started (last {last})"
                ));
            }
        }
    }
}

/// One call's retried failures: how many counted after the fault started
/// (see [`AfterFault::failed`]), and the last one.
struct Failures {
    n: u32,
    last: String,
}

impl Failures {
    fn new(last: &str) -> Self {
        Self {
            n: 0,
            last: last.to_owned(),
        }
    }

    /// A failed attempt of a call of `kind`, to be retried.
    fn note(&mut self, after_fault: &AfterFault, kind: &'static str, s: &Status) {
        if after_fault.failed(kind, s.code()) {
            self.n += 1;
        }
        self.last = format!("{} {}", code_name(s.code()), s.message());
    }
}

// ------------------------------------------------------------------ the load

#[derive(Debug, Clone)]
struct Ack {
    request_id: String,
    id: i64,
    name: String,
    email: String,
    client_id: bool,
    position: Option<(i32, i64)>,
    at: Instant,
    /// CreateUser answered the request's own fields (and its id, if chosen).
    answer_ok: bool,
    /// The target that acknowledged it (an index of --targets, then
    /// --late-targets).
    target: usize,
    /// Acknowledged on the topic the traffic moved from
    /// (--switch-to-late-targets): its position names that topic, not the
    /// one read back and checked.
    old_topic: bool,
}

struct Load {
    pool: Pool,
    run: String,
    id_base: i64,
    client_every: u64,
    call_timeout: Duration,
    retry_for: Duration,
    max_requests: u64,
    seq: AtomicU64,
    stop: AtomicBool,
    stop_at: Mutex<Option<Instant>>,
    acks: Mutex<Vec<Ack>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    samples: Mutex<Samples>,
    unacked: AtomicU64,
    /// Every failed attempt's time and code (at most ERROR_LOG_CAP), for the
    /// fault windows.
    error_log: Mutex<Vec<(Instant, &'static str)>>,
    /// Requests started outside the callers (probes during a fault).
    extra: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Failures after the first fault started.
    after_fault: AfterFault,
    /// How many of the pool's targets are the load's (--targets); with
    /// --switch-to-late-targets the late ones follow them.
    load_targets: usize,
    /// With a switch: requests that failed before it, then acknowledged /
    /// not (rejected or given up).
    held_acked: AtomicU64,
    held_failed: AtomicU64,
}

const ERROR_LOG_CAP: usize = 1_000_000;

/// What a create's attempts keep count of: failures after the fault
/// started and the last one's code, and whether one failed before the
/// switch (--switch-to-late-targets).
#[derive(Default)]
struct CreateTries {
    after_fault: u32,
    last: &'static str,
    held: bool,
}

impl Load {
    fn request(&self, seq: u64) -> (CreateUserRequest, bool) {
        let client_id = self.client_every > 0 && seq % self.client_every == 0;
        let req = CreateUserRequest {
            id: client_id.then(|| self.id_base + seq as i64),
            name: format!("Fault User {} {seq}", self.run),
            email: format!("fc.{}.{seq}@example.com", self.run),
            request_id: format!("fc-{}-{seq}", self.run),
        };
        (req, client_id)
    }

    fn sample(&self, kind: &'static str, what: String) {
        note(&mut self.samples.lock().expect("samples lock"), kind, what);
    }

    fn gave_up(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            && self
                .stop_at
                .lock()
                .expect("stop lock")
                .is_some_and(|t| t.elapsed() >= self.retry_for)
    }

    /// Starts a fresh request every `every` until `until`, each in a task of
    /// its own (so that one the fault holds up does not stop the next).
    async fn probe(self: Arc<Self>, every: Duration, until: Instant) {
        let mut n = 0u64;
        while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            if seq >= self.max_requests {
                break;
            }
            let load = self.clone();
            let h = tokio::spawn(async move { load.one(seq).await });
            self.extra.lock().expect("extra lock").push(h);
            n += 1;
            tokio::time::sleep(every).await;
        }
        say!("{n} probe requests started during the fault");
    }

    async fn worker(self: Arc<Self>) {
        while !self.stop.load(Ordering::Relaxed) {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            if seq >= self.max_requests {
                break;
            }
            self.one(seq).await;
        }
    }

    /// One request, retried as a client would until a final answer or giving up.
    async fn one(&self, seq: u64) {
        let (req, client_id) = self.request(seq);
        let req = &req;
        let step = |mut tries: CreateTries, attempt: u32| async move {
            let (slot, generation, ch) = self.pool.pick();
            let mut r = Request::new(req.clone());
            r.set_timeout(self.call_timeout);
            let answer = retry::guarded(
                self.call_timeout + Duration::from_secs(1),
                UserServiceClient::new(ch).create_user(r),
            )
            .await;
            let s = match answer {
                Ok(resp) => {
                    self.acknowledged(req, client_id, slot, resp.into_inner());
                    return ControlFlow::Break((true, tries));
                }
                Err(s) => s,
            };
            if self.after_fault.before_switch() {
                tries.held = true;
            }
            if self.after_fault.failed("create", s.code()) {
                tries.after_fault += 1;
                tries.last = code_name(s.code());
            }
            {
                let mut log = self.error_log.lock().expect("error log lock");
                if log.len() < ERROR_LOG_CAP {
                    log.push((Instant::now(), code_name(s.code())));
                }
            }
            let first = {
                let mut errors = self.errors.lock().expect("errors lock");
                let n = errors.entry(code_name(s.code())).or_default();
                *n += 1;
                *n == 1
            };
            if first {
                self.sample("error", format!("{}: {}", code_name(s.code()), s.message()));
            }
            if !RETRY.retries(&s) {
                *self
                    .rejected
                    .lock()
                    .expect("rejected lock")
                    .entry(code_name(s.code()))
                    .or_default() += 1;
                self.sample(
                    "rejected",
                    format!(
                        "{} rejected: {} {}",
                        req.request_id,
                        code_name(s.code()),
                        s.message()
                    ),
                );
                return ControlFlow::Break((false, tries));
            }
            if is_transport_error(&s) {
                self.pool.replace(slot, generation);
            }
            if self.gave_up() {
                self.unacked.fetch_add(1, Ordering::Relaxed);
                self.sample(
                    "gave-up",
                    format!(
                        "{} gave up after {} attempts, last {} {}",
                        req.request_id,
                        attempt + 1,
                        code_name(s.code()),
                        s.message()
                    ),
                );
                return ControlFlow::Break((false, tries));
            }
            ControlFlow::Continue(tries)
        };
        let first = CreateTries::default();
        let (acked, tries) = retry::with_backoff(first, retry::doubling, step).await;
        self.after_fault
            .done("create", &req.request_id, tries.after_fault, tries.last);
        if tries.held {
            let n = if acked {
                &self.held_acked
            } else {
                &self.held_failed
            };
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records CreateUser's answer to `req`, sent on `slot`.
    fn acknowledged(
        &self,
        req: &CreateUserRequest,
        client_id: bool,
        slot: usize,
        resp: CreateUserResponse,
    ) {
        let user = resp.user.unwrap_or_default();
        let answer_ok = user.name == req.name
            && user.email == req.email
            && req.id.is_none_or(|id| id == user.id)
            && user.id > 0;
        if !answer_ok {
            self.sample(
                "answer",
                format!(
                    "{}: CreateUser answered another user: {user:?}",
                    req.request_id
                ),
            );
        }
        let target = self.pool.target_of(slot);
        self.acks.lock().expect("acks lock").push(Ack {
            request_id: req.request_id.clone(),
            id: user.id,
            name: req.name.clone(),
            email: req.email.clone(),
            client_id,
            position: resp.position.map(|p| (p.partition, p.offset)),
            at: Instant::now(),
            answer_ok,
            target,
            old_topic: self.after_fault.switch.is_some() && target < self.load_targets,
        });
    }
}

// ------------------------------------------------------------------ faults

/// Runs a command with `bash -c` in a process group of its own, its stdout
/// sent to our stderr (our stdout carries only the summary line); kills the
/// group if it outlives `timeout`. Returns the exit code.
async fn run_shell(cmd: String, timeout: Duration) -> Result<i32, String> {
    tokio::task::spawn_blocking(move || {
        let out = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| e.to_string())?;
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(&cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run bash: {e}"))?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return Ok(st.code().unwrap_or(-1)),
                Ok(None) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = Command::new("kill")
                        .arg("-KILL")
                        .arg(format!("-{}", child.id()))
                        .status();
                    let _ = child.wait();
                    return Err(format!("still running after {timeout:?}: killed"));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

#[derive(Debug, Default, Clone)]
struct Cycle {
    started: Option<Instant>,
    /// The fault command returned.
    fault_done: Option<Instant>,
    /// The heal command started (or, without one, was due).
    heal_start: Option<Instant>,
    healed: Option<Instant>,
    /// Each partition's log end once the fault command returned (with
    /// --no-acks-during-fault): an event below it was in the log before the
    /// window, so its answer coming late is not a write in the window.
    ends_at_fault: Option<BTreeMap<i32, i64>>,
    problems: Vec<String>,
    rejoin: Option<Duration>,
    reads: Option<FaultReads>,
}

/// What reads and health checks saw between a fault and its heal.
#[derive(Debug, Default, Clone)]
struct FaultReads {
    ok: u64,
    failed: u64,
    serving: u64,
    not_serving: u64,
    /// The first failure of each kind, for the report.
    samples: Vec<String>,
}

/// Reads users acknowledged before `fault_at` until `until` (and, if
/// given, while `busy` is set), one call at a time, round-robin over the
/// load's own targets (--targets), and asks `user.v1.UserService`'s health
/// beside each.
async fn reads_during(
    load: Arc<Load>,
    fault_at: Instant,
    until: Instant,
    busy: Option<Arc<AtomicBool>>,
) -> FaultReads {
    let mut r = FaultReads::default();
    let acked: Vec<Ack> = load
        .acks
        .lock()
        .expect("acks lock")
        .iter()
        .filter(|a| a.at < fault_at)
        .cloned()
        .collect();
    if acked.is_empty() {
        r.samples
            .push("no user acknowledged before the fault".into());
        r.failed += 1;
        return r;
    }
    let mut i = 0usize;
    while Instant::now() < until || busy.as_ref().is_some_and(|b| b.load(Ordering::Relaxed)) {
        let ack = &acked[(i * 7919) % acked.len()];
        let target = i % load.load_targets.max(1);
        i += 1;
        let (_, _, ch) = load.pool.pick_target(target);
        let outcome: Result<(), String> = if load.after_fault.limit.is_some() {
            // Retried like the read-back (its retries judged by
            // --max-retries-after-fault): a blip the usual retry rides out
            // is no failure, an outage is.
            let how = ReadHow {
                target: Some(target),
                with_position: false,
            };
            let until = Instant::now() + Duration::from_secs(5);
            match read_back(&load.pool, ack, how, until, &load.after_fault).await {
                Read::Found { name, .. } if name == ack.name => Ok(()),
                Read::Found {
                    id, name, email, ..
                } => Err(format!("another user: {id} {name:?} {email:?}")),
                Read::NotFound => Err("NOT_FOUND".into()),
                Read::Failing(e) => Err(e),
            }
        } else {
            let mut req = Request::new(GetUserRequest {
                id: ack.id,
                min_position: None,
            });
            req.set_timeout(Duration::from_secs(2));
            let got = tokio::time::timeout(
                Duration::from_secs(3),
                UserServiceClient::new(ch.clone()).get_user(req),
            )
            .await;
            match got {
                Ok(Ok(resp))
                    if resp
                        .get_ref()
                        .user
                        .as_ref()
                        .is_some_and(|u| u.name == ack.name) =>
                {
                    Ok(())
                }
                Ok(Ok(resp)) => Err(format!("another user: {:?}", resp.get_ref().user)),
                Ok(Err(s)) => Err(format!("{} {}", code_name(s.code()), s.message())),
                Err(_) => Err("timed out".into()),
            }
        };
        match outcome {
            Ok(()) => r.ok += 1,
            Err(e) => {
                if r.failed == 0 {
                    r.samples.push(format!("GetUser {}: {e}", ack.id));
                }
                r.failed += 1;
            }
        }
        match serving(ch, "user.v1.UserService", "timed out").await {
            Ok(()) => r.serving += 1,
            Err(e) => {
                if r.not_serving == 0 {
                    r.samples
                        .push(format!("health of user.v1.UserService: {e}"));
                }
                r.not_serving += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r
}

struct FaultPlan {
    fault: String,
    heal: String,
    fault_at: Duration,
    heal_after: Duration,
    repeat: u32,
    every: Duration,
    duration: Duration,
    command_timeout: Duration,
    group: Option<String>,
    rejoin_within: Duration,
    reads_during_fault: bool,
    /// Start a fresh request this often from each fault's end to its heal.
    probe_every: Option<Duration>,
    /// Where to read each partition's log end when the fault command
    /// returns (brokers, topic): with --no-acks-during-fault.
    log_ends: Option<(String, String)>,
    /// Move the load to the late targets once the fault command has
    /// returned (--switch-to-late-targets); reads during the fault then
    /// start with the fault command.
    switch: bool,
    /// How many targets the pool has (the load's, then the late ones).
    all_targets: usize,
}

async fn run_faults(plan: FaultPlan, load: Arc<Load>, start: Instant) -> Vec<Cycle> {
    let mut cycles = Vec::new();
    let mut rejoin_checks = Vec::new();
    for i in 0..plan.repeat {
        let at = start + plan.fault_at + plan.every * i;
        if at >= start + plan.duration {
            say!(
                "fault cycle {} would start after the load ({:?}): not run",
                i + 1,
                plan.duration
            );
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let mut c = Cycle {
            started: Some(Instant::now()),
            ..Cycle::default()
        };
        // Only the first cycle's start counts (a no-op after it).
        let _ = load.after_fault.started.set(c.started.expect("set above"));
        let heal_at = c.started.expect("set above") + plan.heal_after;
        // With a switch the fault command is the move itself: reads on the
        // old targets go on while it runs, and until the heal time.
        let fault_running = Arc::new(AtomicBool::new(true));
        let early_reads = (plan.reads_during_fault && plan.switch).then(|| {
            tokio::spawn(reads_during(
                load.clone(),
                c.started.expect("set above"),
                heal_at,
                Some(fault_running.clone()),
            ))
        });
        say!("fault {}/{}: {}", i + 1, plan.repeat, plan.fault);
        match run_shell(plan.fault.clone(), plan.command_timeout).await {
            Ok(0) => {}
            Ok(rc) => c.problems.push(format!("fault command exited {rc}")),
            Err(e) => c.problems.push(format!("fault command: {e}")),
        }
        c.fault_done = Some(Instant::now());
        fault_running.store(false, Ordering::Relaxed);
        if plan.switch && i == 0 {
            load.pool.activate(load.load_targets, plan.all_targets);
            if let Some(s) = &load.after_fault.switch {
                let _ = s.set(Instant::now());
            }
            say!(
                "the load moves to the late targets (creates still failing are retried there with the same request id)"
            );
        }
        if let Some((brokers, topic)) = plan.log_ends.clone() {
            c.ends_at_fault = tokio::task::spawn_blocking(move || {
                log_ends(&brokers, &topic, Duration::from_secs(5))
            })
            .await
            .ok()
            .flatten();
            // A fault that takes the partitions' leaders away (two brokers of
            // three down: no quorum) leaves no broker to ask. The check then
            // stays strict: every acknowledgement in the window counts as a
            // write during the fault, none is excused as a late answer to an
            // event appended before it.
            if c.ends_at_fault.is_none() {
                say!(
                    "the log ends at the fault's end could not be read (no leader to ask): \
                     every acknowledgement in the fault's window counts as a write"
                );
            }
        }
        let probes = plan
            .probe_every
            .map(|every| tokio::spawn(load.clone().probe(every, heal_at)));
        let reads = early_reads.or_else(|| {
            plan.reads_during_fault.then(|| {
                tokio::spawn(reads_during(
                    load.clone(),
                    c.started.expect("set above"),
                    heal_at,
                    None,
                ))
            })
        });
        if !plan.heal.trim().is_empty() {
            tokio::time::sleep_until(heal_at.into()).await;
            c.heal_start = Some(Instant::now());
            say!("heal {}/{}: {}", i + 1, plan.repeat, plan.heal);
            match run_shell(plan.heal.clone(), plan.command_timeout).await {
                Ok(0) => {}
                Ok(rc) => c.problems.push(format!("heal command exited {rc}")),
                Err(e) => c.problems.push(format!("heal command: {e}")),
            }
        }
        if let Some(reads) = reads {
            c.reads = reads.await.ok();
        }
        if let Some(p) = probes {
            let _ = p.await;
        }
        if c.heal_start.is_none() {
            c.heal_start = Some(heal_at.max(c.fault_done.expect("set above")));
        }
        let healed = Instant::now();
        c.healed = Some(healed);
        say!("fault {}/{} over", i + 1, plan.repeat);
        for p in &c.problems {
            say!("fault {}/{}: {p}", i + 1, plan.repeat);
        }
        if let Some(group) = plan.group.clone() {
            let load = load.clone();
            let bound = plan.rejoin_within + Duration::from_secs(30);
            rejoin_checks.push(tokio::spawn(async move {
                wait_group(&load.pool, &group, healed, bound).await
            }));
        }
        cycles.push(c);
    }
    for (c, h) in cycles.iter_mut().zip(rejoin_checks) {
        c.rejoin = h.await.unwrap_or(None);
    }
    cycles
}

/// Time from `since` until the group is STABLE with every partition owned,
/// asked of any target; None if not within `bound`.
async fn wait_group(pool: &Pool, group: &str, since: Instant, bound: Duration) -> Option<Duration> {
    let mut last = String::new();
    while since.elapsed() < bound {
        let (_, _, ch) = pool.pick();
        let mut req = Request::new(GetProgressRequest {
            group: group.to_owned(),
            topic: String::new(),
            partitions: vec![],
        });
        req.set_timeout(Duration::from_secs(2));
        let r = tokio::time::timeout(
            Duration::from_secs(3),
            ProjectionServiceClient::new(ch).get_progress(req),
        )
        .await;
        match r {
            Ok(Ok(resp)) => {
                if let Some(s) = resp.into_inner().snapshot {
                    let owned =
                        !s.partitions.is_empty() && s.partitions.iter().all(|p| p.owner.is_some());
                    if s.state == GroupState::Stable as i32 && owned {
                        return Some(since.elapsed());
                    }
                    last = format!(
                        "state {:?}, {} of {} partitions owned",
                        GroupState::try_from(s.state).unwrap_or(GroupState::Unspecified),
                        s.partitions.iter().filter(|p| p.owner.is_some()).count(),
                        s.partitions.len()
                    );
                }
            }
            Ok(Err(s)) => last = format!("{} {}", code_name(s.code()), s.message()),
            Err(_) => last = "GetProgress timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say!("group {group} not back within {bound:?} (last: {last})");
    None
}

// ------------------------------------------------------------------ fault windows

/// What the load saw between a fault's end (plus the grace) and its heal.
#[derive(Debug, Default)]
struct Window {
    /// Seconds from the fault command's end to the window's start and end.
    from_s: f64,
    to_s: f64,
    acks: u64,
    /// Answers in the window for events appended before it (not counted in
    /// `acks`).
    late_answers: u64,
    acks_by_partition: BTreeMap<i32, u64>,
    errors: BTreeMap<&'static str, u64>,
    /// For every partition that took writes before the fault: seconds from
    /// the fault command's end to its first write in the window, if any.
    writes_again_s: BTreeMap<i32, Option<f64>>,
    /// A few acknowledgements in the window, for the report.
    examples: Vec<String>,
}

impl Window {
    fn is_empty(&self) -> bool {
        self.to_s <= self.from_s
    }

    fn unavailable(&self) -> u64 {
        self.errors.get("UNAVAILABLE").copied().unwrap_or(0)
    }

    /// The slowest partition to write again; None if one never did.
    fn writes_again_max(&self) -> Option<f64> {
        self.writes_again_s
            .values()
            .try_fold(0.0f64, |m, w| w.map(|w| m.max(w)))
    }

    fn json(&self) -> Value {
        json!({
            "from_s": round1(self.from_s),
            "to_s": round1(self.to_s),
            "acks": self.acks,
            "acks_by_partition": self.acks_by_partition,
            "errors": self.errors,
            "writes_again_s": self.writes_again_s.iter()
                .map(|(p, w)| (p.to_string(), json!(w.map(|w| (w * 100.0).round() / 100.0))))
                .collect::<serde_json::Map<_, _>>(),
            "examples": self.examples,
        })
    }
}

/// The window from `fault_done + grace` to `heal_start` of one fault cycle.
fn fault_window(
    acks: &[Ack],
    errors: &[(Instant, &'static str)],
    started: Instant,
    fault_done: Instant,
    grace: Duration,
    heal_start: Instant,
    ends_at_fault: Option<&BTreeMap<i32, i64>>,
) -> Window {
    let from = fault_done + grace;
    let secs = |t: Instant| {
        if t >= fault_done {
            t.duration_since(fault_done).as_secs_f64()
        } else {
            -fault_done.duration_since(t).as_secs_f64()
        }
    };
    let mut w = Window {
        from_s: secs(from),
        to_s: secs(heal_start),
        ..Window::default()
    };
    for a in acks {
        if a.at < started {
            if let Some((p, _)) = a.position {
                w.writes_again_s.entry(p).or_insert(None);
            }
        }
    }
    let mut in_window: Vec<&Ack> = acks
        .iter()
        .filter(|a| a.at >= from && a.at < heal_start)
        .collect();
    in_window.sort_by_key(|a| a.at);
    for a in in_window {
        // An event the log held before the window (below the partition's
        // end when the fault command returned) answered late, e.g. a retry
        // of a request whose first attempt was appended then: not a write.
        if let (Some(ends), Some((p, o))) = (ends_at_fault, a.position)
            && ends.get(&p).is_some_and(|end| o < *end)
        {
            w.late_answers += 1;
            continue;
        }
        w.acks += 1;
        if let Some((p, o)) = a.position {
            *w.acks_by_partition.entry(p).or_default() += 1;
            if let Some(first @ None) = w.writes_again_s.get_mut(&p) {
                *first = Some(secs(a.at));
            }
            if w.examples.len() < 6 {
                w.examples.push(format!(
                    "{} acknowledged at {p}:{o}, {:.2}s after the fault's end",
                    a.request_id,
                    secs(a.at)
                ));
            }
        }
    }
    for (t, code) in errors {
        if *t >= from && *t < heal_start {
            *w.errors.entry(code).or_default() += 1;
        }
    }
    w
}

/// What is wrong with a window: `writes` (every partition must write again)
/// or `no_acks` (nothing acknowledged, calls UNAVAILABLE).
fn window_problems(w: &Window, writes: bool, no_acks: bool) -> Vec<String> {
    let mut out = Vec::new();
    if !(writes || no_acks) {
        return out;
    }
    if w.is_empty() {
        out.push(format!(
            "the fault window is empty (from {:.1}s to {:.1}s after the fault's end): heal later",
            w.from_s, w.to_s
        ));
        return out;
    }
    if writes {
        let silent: Vec<i32> = w
            .writes_again_s
            .iter()
            .filter(|(_, t)| t.is_none())
            .map(|(p, _)| *p)
            .collect();
        if w.writes_again_s.is_empty() {
            out.push("no partition took a write before the fault".into());
        } else if !silent.is_empty() {
            out.push(format!(
                "partition(s) {silent:?} took no write between {:.1}s after the fault's end and the heal ({:.1}s): no leader took over",
                w.from_s, w.to_s
            ));
        }
    }
    if no_acks {
        if w.acks > 0 {
            out.push(format!(
                "{} CreateUser acknowledged between {:.1}s after the fault's end and the heal ({:.1}s), by partition {:?}: {}",
                w.acks,
                w.from_s,
                w.to_s,
                w.acks_by_partition,
                w.examples.join("; ")
            ));
        }
        if w.unavailable() == 0 {
            out.push(format!(
                "no call failed UNAVAILABLE between {:.1}s after the fault's end and the heal (errors {:?})",
                w.from_s, w.errors
            ));
        }
    }
    out
}

// ------------------------------------------------------------------ health

/// Whether `service` ("" = the server) says SERVING within 2 s (a deadline
/// of 1 s); if not, what it said, or `timed_out`.
async fn serving(ch: Channel, service: &str, timed_out: &str) -> Result<(), String> {
    let check = health::check(ch, service, Duration::from_secs(1));
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(NotServing::Status(n))) => Err(format!("status {n}")),
        Ok(Err(NotServing::Failed(s))) => Err(format!("{} {}", code_name(s.code()), s.message())),
        Err(_) => Err(timed_out.into()),
    }
}

/// Waits until every target says SERVING; the targets that never did.
async fn wait_serving(pool: &Pool, targets: &[String], deadline: Instant) -> Vec<String> {
    let mut bad = Vec::new();
    for (t, addr) in targets.iter().enumerate() {
        let mut last = String::new();
        let mut ok = false;
        while Instant::now() < deadline {
            match serving(pool.for_target(t), "", "health check timed out").await {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !ok {
            bad.push(format!("{addr} ({last})"));
        }
    }
    bad
}

// ------------------------------------------------------------------ read-back

enum Read {
    Found {
        id: i64,
        name: String,
        email: String,
        position: Option<(i32, i64)>,
    },
    NotFound,
    Failing(String),
}

/// Where a read-back goes and what it asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ReadHow {
    /// One target (an index of the pool's targets); None: round-robin.
    target: Option<usize>,
    /// With the acknowledged position as `min_position`.
    with_position: bool,
}

async fn read_back(
    pool: &Pool,
    ack: &Ack,
    how: ReadHow,
    deadline: Instant,
    after_fault: &AfterFault,
) -> Read {
    let first = Failures::new("no answer before the heal timeout");
    let step = |mut failed: Failures, _| async move {
        if Instant::now() >= deadline {
            let read = Read::Failing(failed.last.clone());
            return ControlFlow::Break((read, failed));
        }
        let (slot, generation, ch) = match how.target {
            Some(t) => pool.pick_target(t),
            None => pool.pick(),
        };
        let mut req = Request::new(GetUserRequest {
            id: ack.id,
            min_position: ack
                .position
                .filter(|_| how.with_position)
                .map(|(partition, offset)| Position { partition, offset }),
        });
        req.set_timeout(Duration::from_secs(3));
        let r = retry::guarded(
            Duration::from_secs(4),
            UserServiceClient::new(ch).get_user(req),
        )
        .await;
        let read = match r {
            Ok(resp) => {
                let resp = resp.into_inner();
                let user = resp.user.unwrap_or_default();
                Read::Found {
                    id: user.id,
                    name: user.name,
                    email: user.email,
                    position: resp.position.map(|p| (p.partition, p.offset)),
                }
            }
            Err(s) if s.code() == Code::NotFound => Read::NotFound,
            Err(s) if RETRY.retries(&s) => {
                failed.note(after_fault, "read", &s);
                if is_transport_error(&s) {
                    pool.replace(slot, generation);
                }
                return ControlFlow::Continue(failed);
            }
            Err(s) => Read::Failing(format!("{} {}", code_name(s.code()), s.message())),
        };
        ControlFlow::Break((read, failed))
    };
    let (read, failed) = retry::with_backoff(first, retry::doubling, step).await;
    let what = format!(
        "of id {}{} {}",
        ack.id,
        how.target
            .map(|t| format!(" on target {}", t + 1))
            .unwrap_or_default(),
        if how.with_position {
            "with its position"
        } else {
            "without a position"
        }
    );
    after_fault.done("read", &what, failed.n, &failed.last);
    read
}

// ------------------------------------------------------------------ re-creates

/// What CreateUser answered for an acknowledged id asked for again by
/// another request.
#[derive(Debug)]
enum Recreate {
    AlreadyExists,
    /// OK: a second user under the id.
    Created(Option<(i32, i64)>),
    /// Another final answer.
    Other(String),
    /// Still failing with retryable errors at `until`.
    GaveUp(String),
}

/// CreateUser(`req`) on target `target`, retried like the load's requests
/// (same request id and fields) until a final answer or `until`.
async fn recreate(
    pool: &Pool,
    target: usize,
    req: &CreateUserRequest,
    call_timeout: Duration,
    until: Instant,
    after_fault: &AfterFault,
) -> Recreate {
    let step = |mut failed: Failures, _| async move {
        let (slot, generation, ch) = pool.pick_target(target);
        let mut r = Request::new(req.clone());
        r.set_timeout(call_timeout);
        let answer = retry::guarded(
            call_timeout + Duration::from_secs(1),
            UserServiceClient::new(ch).create_user(r),
        )
        .await;
        let answer = match answer {
            Ok(resp) => {
                Recreate::Created(resp.into_inner().position.map(|p| (p.partition, p.offset)))
            }
            Err(s) if s.code() == Code::AlreadyExists => Recreate::AlreadyExists,
            Err(s) if RETRY.retries(&s) => {
                failed.note(after_fault, "recreate", &s);
                if is_transport_error(&s) {
                    pool.replace(slot, generation);
                }
                if Instant::now() < until {
                    return ControlFlow::Continue(failed);
                }
                Recreate::GaveUp(failed.last.clone())
            }
            Err(s) => Recreate::Other(format!("{} {}", code_name(s.code()), s.message())),
        };
        ControlFlow::Break((answer, failed))
    };
    let (answer, failed) = retry::with_backoff(Failures::new(""), retry::doubling, step).await;
    after_fault.done("recreate", &req.request_id, failed.n, &failed.last);
    answer
}

/// Up to `n` of the acknowledged client-chosen ids, acknowledged before
/// `before` (if given), spread evenly over them in acknowledgement order.
fn recreate_sample(acks: &[Ack], n: usize, before: Option<Instant>) -> Vec<&Ack> {
    let mut pool: Vec<&Ack> = acks
        .iter()
        .filter(|a| a.client_id && a.answer_ok && before.is_none_or(|t| a.at < t))
        .collect();
    pool.sort_by_key(|a| a.at);
    if pool.len() <= n {
        return pool;
    }
    (0..n).map(|k| pool[k * pool.len() / n]).collect()
}

// ------------------------------------------------------------------ the log

#[derive(Debug, Clone)]
struct Event {
    partition: i32,
    offset: i64,
    id: i64,
    name: String,
    email: String,
    request_id: Option<String>,
}

impl Event {
    /// Who sent it: the request id, or (events without one) the fields, which
    /// are unique per request in this driver's runs.
    fn identity(&self) -> String {
        match &self.request_id {
            Some(r) => r.clone(),
            None => format!("fields:{}|{}", self.name, self.email),
        }
    }

    fn is_of(&self, ack: &Ack) -> bool {
        match &self.request_id {
            Some(r) => *r == ack.request_id,
            None => self.name == ack.name && self.email == ack.email,
        }
    }
}

struct LogRead {
    /// The topic's partition count when it was read.
    partitions: usize,
    records: u64,
    events: Vec<Event>,
    undecodable: u64,
    dlq_records: Option<i64>,
}

fn decode(partition: i32, offset: i64, key: Option<&[u8]>, value: Option<&[u8]>) -> Option<Event> {
    let v: Value = serde_json::from_slice(value?).ok()?;
    if v.get("schema_version")?.as_u64()? != 1 || v.get("type")?.as_str()? != "UserCreated" {
        return None;
    }
    let id = v.get("id")?.as_i64()?;
    if std::str::from_utf8(key?).ok()? != id.to_string() {
        return None;
    }
    Some(Event {
        partition,
        offset,
        id,
        name: v.get("name")?.as_str()?.to_owned(),
        email: v.get("email")?.as_str()?.to_owned(),
        request_id: v
            .get("request_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// A consumer for assigned partitions and watermarks. librdkafka wants a
/// group id even then; nothing joins it (no subscribe) and nothing is
/// committed to it.
fn reader(brokers: &str, role: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("faultcheck-{role}-{}", rand::random::<u32>()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false")
        .create()?)
}

/// Every record of every partition from the low to the high watermark, with
/// assigned partitions (no consumer group).
fn read_log(brokers: &str, topic: &str, timeout: Duration) -> anyhow::Result<LogRead> {
    let consumer = reader(brokers, "reader")?;
    let meta_timeout = Duration::from_secs(10);
    let md = consumer.fetch_metadata(Some(topic), meta_timeout)?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| anyhow::anyhow!("topic {topic} not found"))?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in t.partitions() {
        let (lo, hi) = consumer.fetch_watermarks(topic, p.id(), meta_timeout)?;
        if hi > lo {
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(lo))?;
            ends.insert(p.id(), hi);
        }
    }
    let dlq_records = count_records(&consumer, &format!("{topic}.dlq"), meta_timeout);
    let mut out = LogRead {
        partitions: t.partitions().len(),
        records: 0,
        events: Vec::new(),
        undecodable: 0,
        dlq_records,
    };
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut errors = 0u32;
    while !ends.is_empty() {
        if Instant::now() >= deadline {
            anyhow::bail!(
                "log not read within {timeout:?}: partitions {:?} unfinished",
                ends.keys().collect::<Vec<_>>()
            );
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(e)) => {
                errors += 1;
                if errors <= 5 {
                    say!("reading the log: {e}");
                }
            }
            Some(Ok(m)) => {
                let (p, o) = (m.partition(), m.offset());
                let Some(&end) = ends.get(&p) else { continue };
                if o >= end {
                    ends.remove(&p);
                    continue;
                }
                out.records += 1;
                match decode(p, o, m.key(), m.payload()) {
                    Some(e) => out.events.push(e),
                    None => out.undecodable += 1,
                }
                if o + 1 >= end {
                    ends.remove(&p);
                }
            }
        }
    }
    Ok(out)
}

/// Each partition's high watermark (the offset the next event would get).
fn log_ends(brokers: &str, topic: &str, timeout: Duration) -> Option<BTreeMap<i32, i64>> {
    let consumer = reader(brokers, "ends").ok()?;
    let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    let mut ends = BTreeMap::new();
    for p in t.partitions() {
        let (_, hi) = consumer.fetch_watermarks(topic, p.id(), timeout).ok()?;
        ends.insert(p.id(), hi);
    }
    Some(ends)
}

/// Records in a topic (high minus low watermarks); None if it does not exist.
fn count_records(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Option<i64> {
    let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() || t.partitions().is_empty() {
        return None;
    }
    let mut n = 0;
    for p in t.partitions() {
        let (lo, hi) = consumer.fetch_watermarks(topic, p.id(), timeout).ok()?;
        n += hi - lo;
    }
    Some(n)
}

/// What the log says about the acknowledged requests.
#[derive(Default)]
struct LogVerdict {
    status: &'static str,
    note: String,
    lost: HashSet<String>,
    doubled: HashSet<String>,
    corrupted: HashSet<String>,
    /// Ids created in two partitions by different requests.
    split: u64,
    /// Events outside their id's partition by --log-partitions.
    misplaced: u64,
    /// Where each acknowledged request's own winning event sits.
    own_winner: HashMap<String, (i32, i64)>,
    stats: Value,
}

/// The log rule over `log`; with `partitions`, every event must also sit in
/// its id's partition by a map of that count (one elsewhere is doubled: it
/// was routed by another map).
fn check_log(
    log: &LogRead,
    acks: &[Ack],
    partitions: Option<i32>,
    samples: &mut Samples,
) -> LogVerdict {
    let mut v = LogVerdict::default();
    let mut events = log.events.clone();
    events.sort_by_key(|e| (e.partition, e.offset));
    if let Some(n) = partitions {
        for e in &events {
            let home = user_service::domain::partition_map::partition_for_key(
                e.id.to_string().as_bytes(),
                n,
            );
            if e.partition != home {
                v.misplaced += 1;
                v.doubled.insert(e.identity());
                note(
                    samples,
                    "log-misplaced",
                    format!(
                        "id {} ({}) at {}:{}, but murmur2 mod {n} says partition {home}",
                        e.id,
                        e.identity(),
                        e.partition,
                        e.offset
                    ),
                );
            }
        }
    }
    // Per id, the first event in offset order wins (one id, one partition).
    // Once partitions were added an id's events may sit in two partitions,
    // where no offset order relates them: each partition's first event of
    // the id is then a winner for a reader of that partition.
    let mut winners: BTreeMap<i64, Vec<&Event>> = BTreeMap::new();
    let mut later = 0u64;
    for e in &events {
        let firsts = winners.entry(e.id).or_default();
        if firsts.iter().any(|w| w.partition == e.partition) {
            later += 1;
        } else {
            firsts.push(e);
        }
    }
    let split = winners.values().filter(|w| w.len() > 1).count();
    let with_rid = events.iter().filter(|e| e.request_id.is_some()).count();
    if with_rid == 0 {
        v.status = "no-request-ids";
        v.note = "no request ids in the log: requests are told apart by their (unique) name and email instead".into();
    } else {
        v.status = "ok";
    }
    let mut acked: HashMap<i64, Vec<&Ack>> = HashMap::new();
    for a in acks {
        acked.entry(a.id).or_default().push(a);
    }
    for v in acked.values_mut() {
        v.sort_by_key(|a| a.at);
    }
    // One id, two users: the id's winners in two partitions sent by two
    // requests (the rule could pick either). The first acknowledged
    // request's (else the lowest partition's) is the id's; the others are
    // doubled.
    let mut split_between_requests = 0u64;
    for (id, firsts) in &winners {
        let who: BTreeSet<String> = firsts.iter().map(|w| w.identity()).collect();
        if who.len() < 2 {
            continue;
        }
        split_between_requests += 1;
        let own = acked
            .get(id)
            .into_iter()
            .flatten()
            .find_map(|a| firsts.iter().find(|w| w.is_of(a)))
            .unwrap_or(&firsts[0])
            .identity();
        for w in who.iter().filter(|w| **w != own) {
            v.doubled.insert(w.clone());
        }
        note(
            samples,
            "log-split",
            format!(
                "id {id} created in {} partitions by different requests: {}",
                firsts.len(),
                firsts
                    .iter()
                    .map(|w| format!("{} at {}:{}", w.identity(), w.partition, w.offset))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    // One request, one user: a request owning winners under two ids.
    let mut owned: HashMap<String, BTreeSet<i64>> = HashMap::new();
    for w in winners.values().flatten() {
        owned.entry(w.identity()).or_default().insert(w.id);
    }
    let mut two_users = 0u64;
    for (who, ids) in &owned {
        if ids.len() > 1 {
            two_users += 1;
            v.doubled.insert(who.clone());
            note(
                samples,
                "log-two-users",
                format!("request {who} created users {ids:?}"),
            );
        }
    }
    let mut missing = 0u64;
    let mut other = 0u64;
    let mut changed = 0u64;
    let mut not_winner_position = 0u64;
    for a in acks {
        let Some(firsts) = winners.get(&a.id) else {
            missing += 1;
            v.lost.insert(a.request_id.clone());
            note(
                samples,
                "log-missing",
                format!(
                    "{} acknowledged id {} but the log has no event for it",
                    a.request_id, a.id
                ),
            );
            continue;
        };
        match firsts.iter().find(|w| w.is_of(a)) {
            None => {
                let w = firsts[0];
                other += 1;
                v.doubled.insert(a.request_id.clone());
                note(
                    samples,
                    "log-other-creator",
                    format!(
                        "{} acknowledged id {} at {:?}, but {} created it at {}:{}",
                        a.request_id,
                        a.id,
                        a.position,
                        w.identity(),
                        w.partition,
                        w.offset
                    ),
                );
            }
            Some(w) => {
                if w.name != a.name || w.email != a.email {
                    changed += 1;
                    v.corrupted.insert(a.request_id.clone());
                }
                v.own_winner
                    .insert(a.request_id.clone(), (w.partition, w.offset));
                // A position on the topic moved from names nothing here.
                if !a.old_topic && a.position != Some((w.partition, w.offset)) {
                    not_winner_position += 1;
                }
            }
        }
    }
    v.stats = json!({
        "records": log.records,
        "partitions": log.partitions,
        "events": events.len(),
        "events_with_request_id": with_rid,
        "undecodable": log.undecodable,
        "dlq_records": log.dlq_records,
        "ids": winners.len(),
        "later_events_for_an_id": later,
        "ids_in_two_partitions": split,
        "ids_split_between_requests": split_between_requests,
        "requests_with_two_users": two_users,
        "acked_missing_in_log": missing,
        "acked_created_by_another_event": other,
        "acked_fields_differ_in_log": changed,
        "acked_position_not_the_winner": not_winner_position,
        "acked_on_the_old_topic": acks.iter().filter(|a| a.old_topic).count(),
        "map_partitions": partitions,
        "misplaced_events": v.misplaced,
    });
    v.split = split_between_requests;
    v
}

// ------------------------------------------------------------------ main

/// A few examples of each kind of trouble, for the log.
type Samples = BTreeMap<&'static str, Vec<String>>;

fn note(samples: &mut Samples, kind: &'static str, s: String) {
    let v = samples.entry(kind).or_default();
    if v.len() < 6 {
        v.push(s);
    }
}

fn loopback_only(what: &str, addrs: &[String]) -> anyhow::Result<()> {
    for a in addrs {
        let host = a.rsplit_once(':').map(|(h, _)| h).unwrap_or("");
        if host != "127.0.0.1" && host != "localhost" {
            anyhow::bail!("{what} {a:?}: only 127.0.0.1:PORT is allowed");
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    START.get_or_init(Instant::now);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(pass) => std::process::exit(if pass { 0 } else { 1 }),
        Err(e) => {
            eprintln!("faultcheck: {e:#}");
            std::process::exit(2);
        }
    }
}

/// The run, phase by phase: each phase returns what it found, and the
/// verdict is made from those values.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let setup = Setup::new(&cli)?;
    let load = ready_load(&cli, &setup).await?;
    let loaded = load_under_faults(&cli, &setup, &load).await;
    let cycles = judge_cycles(&cli, &loaded);
    let mut samples = std::mem::take(&mut *load.samples.lock().expect("samples lock"));
    let reads = read_back_all(&cli, &setup, &load, &loaded.acks).await?;
    let read_back = judge_reads(&cli, &setup, &loaded.acks, &reads.reads, &mut samples);
    let recreated = recreate_acked(&cli, &setup, &load, &loaded.acks, &reads, &mut samples).await;
    let twice = acknowledged_twice(&loaded.acks, &mut samples);
    say!(
        "read back: {} NOT_FOUND, {} still failing, {} corrupted, {} without a position",
        read_back.not_found,
        read_back.still_failing,
        read_back.corrupted.len(),
        read_back.unverified
    );
    let log = check_the_log(
        &cli,
        &setup,
        &loaded.acks,
        &read_back.moved_positions,
        &mut samples,
    )
    .await?;
    let verdict = judge(
        &cli,
        &setup,
        &load,
        &loaded,
        [&cycles.failures, &reads.failures],
        &read_back,
        recreated.as_ref(),
        &twice,
        &log,
    );
    if !samples.is_empty() {
        say!("examples:");
        for (kind, v) in &samples {
            for s in v {
                eprintln!("    {kind}: {s}");
            }
        }
    }
    for f in &verdict.failures {
        say!("FAIL: {f}");
    }
    let report = Report {
        cli: &cli,
        setup: &setup,
        loaded: &loaded,
        cycles: &cycles,
        read_back: &read_back,
        recreated: recreated.as_ref(),
        twice: &twice,
        log: &log,
        verdict: &verdict,
    };
    let line = report.line();
    println!("{line}");
    if let Some(path) = &cli.json {
        let out = report.json(&line, &samples);
        std::fs::write(path, format!("{out:#}\n"))?;
    }
    Ok(verdict.pass())
}

// ------------------------------------------------------------------ set-up

/// The run's targets, checked, and what tells its requests apart.
struct Setup {
    /// The load's targets (`127.0.0.1:PORT`).
    targets: Vec<String>,
    /// Instances a heal starts.
    late_targets: Vec<String>,
    /// The load's targets, then the late ones.
    all_targets: Vec<String>,
    /// Prefix of request ids, names and emails.
    run: String,
    /// Client-chosen ids: base + seq, a range of 2^20 unique to the run.
    id_base: i64,
    /// Every this-many requests carries a client-chosen id (0: none).
    client_every: u64,
    /// --switch-to-late-targets.
    switch: bool,
}

impl Setup {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        // `127.0.0.1:PORT`, given with or without `http://`.
        let addresses = |given: &[String]| -> Vec<String> {
            given
                .iter()
                .map(|t| t.trim().trim_start_matches("http://").to_owned())
                .filter(|t| !t.is_empty())
                .collect()
        };
        let targets = addresses(&cli.targets);
        anyhow::ensure!(!targets.is_empty(), "--targets: none given");
        loopback_only("target", &targets)?;
        let late_targets = addresses(&cli.late_targets);
        loopback_only("late target", &late_targets)?;
        let all_targets: Vec<String> = targets.iter().chain(&late_targets).cloned().collect();
        if let Some(b) = &cli.brokers {
            let brokers: Vec<String> = b.split(',').map(|s| s.trim().to_owned()).collect();
            loopback_only("broker", &brokers)?;
        }
        anyhow::ensure!(cli.repeat >= 1, "--repeat must be at least 1");
        anyhow::ensure!(
            cli.max_requests < (1 << 20),
            "--max-requests must stay below 2^20 (the client-chosen id range)"
        );

        let run = cli
            .run_id
            .clone()
            .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()));
        let id_base = i64::from(rand::random_range(1..=u32::MAX)) << 20;
        let share = cli.client_id_share.clamp(0.0, 1.0);
        let client_every = if share > 0.0 {
            (1.0 / share).round().max(1.0) as u64
        } else {
            0
        };
        let switch = cli.switch_to_late_targets;
        anyhow::ensure!(
            !switch || !late_targets.is_empty(),
            "--switch-to-late-targets: no --late-targets"
        );
        Ok(Self {
            targets,
            late_targets,
            all_targets,
            run,
            id_base,
            client_every,
            switch,
        })
    }
}

/// The load, its pool's targets SERVING, not started yet.
async fn ready_load(cli: &Cli, setup: &Setup) -> anyhow::Result<Arc<Load>> {
    // With a switch the load's pool holds the late targets too, unused
    // until the switch.
    let pool = if setup.switch {
        let pool = lazy_pool(&setup.all_targets, cli.connections)?;
        pool.activate(0, setup.targets.len());
        pool
    } else {
        lazy_pool(&setup.targets, cli.connections)?
    };

    say!(
        "run {}: {} callers over {:?} for {:?}; fault {:?} at {:?}, heal {:?} after {:?}, {} cycle(s) every {:?}",
        setup.run,
        cli.concurrency,
        setup.targets,
        cli.duration,
        cli.fault.as_deref().unwrap_or("none"),
        cli.fault_at,
        cli.heal,
        cli.heal_after,
        cli.repeat,
        cli.every
    );
    let bad = wait_serving(&pool, &setup.targets, Instant::now() + cli.heal_timeout).await;
    anyhow::ensure!(bad.is_empty(), "not SERVING before the load: {bad:?}");

    Ok(Arc::new(Load {
        pool,
        run: setup.run.clone(),
        id_base: setup.id_base,
        client_every: setup.client_every,
        call_timeout: cli.call_timeout,
        retry_for: cli.retry_for,
        max_requests: cli.max_requests,
        seq: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        stop_at: Mutex::new(None),
        acks: Mutex::new(Vec::new()),
        errors: Mutex::new(BTreeMap::new()),
        rejected: Mutex::new(BTreeMap::new()),
        samples: Mutex::new(Samples::new()),
        unacked: AtomicU64::new(0),
        error_log: Mutex::new(Vec::new()),
        extra: Mutex::new(Vec::new()),
        after_fault: AfterFault::new(cli.max_retries_after_fault, setup.switch),
        load_targets: setup.targets.len(),
        held_acked: AtomicU64::new(0),
        held_failed: AtomicU64::new(0),
    }))
}

// ------------------------------------------------------------------ load and faults

/// What the load left once every request had its final answer.
struct Loaded {
    cycles: Vec<Cycle>,
    acks: Vec<Ack>,
    attempted: u64,
    /// Failed attempts by code.
    errors: BTreeMap<&'static str, u64>,
    /// Requests that got a final error, by code.
    rejected: BTreeMap<&'static str, u64>,
    /// Requests given up (still failing `--retry-for` after the load).
    unacked: u64,
    error_log: Vec<(Instant, &'static str)>,
    /// Seconds from the load's start until every request was over.
    load_s: f64,
}

impl Loaded {
    fn rejected_n(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Runs the load for `--duration` (and past the last heal by
/// `--after-heal`) with the fault cycles beside it, then lets every request
/// in flight get its final answer.
async fn load_under_faults(cli: &Cli, setup: &Setup, load: &Arc<Load>) -> Loaded {
    let start = Instant::now();
    let workers: Vec<_> = (0..cli.concurrency.max(1))
        .map(|_| tokio::spawn(load.clone().worker()))
        .collect();
    let faults = cli.fault.clone().filter(|f| !f.trim().is_empty()).map(|f| {
        tokio::spawn(run_faults(
            FaultPlan {
                fault: f,
                heal: cli.heal.clone(),
                fault_at: cli.fault_at,
                heal_after: cli.heal_after,
                repeat: cli.repeat,
                every: cli.every,
                duration: cli.duration,
                command_timeout: cli.command_timeout,
                group: cli.check_group.clone(),
                rejoin_within: cli.rejoin_within,
                reads_during_fault: cli.reads_during_fault,
                probe_every: (cli.no_acks_during_fault || cli.writes_during_fault)
                    .then_some(cli.probe_every),
                log_ends: cli
                    .no_acks_during_fault
                    .then(|| cli.brokers.clone().zip(cli.topic.clone()))
                    .flatten(),
                switch: setup.switch,
                all_targets: setup.all_targets.len(),
            },
            load.clone(),
            start,
        ))
    });
    tokio::time::sleep_until((start + cli.duration).into()).await;
    let cycles = match faults {
        Some(h) => h.await.unwrap_or_default(),
        None => Vec::new(),
    };
    if let Some(last) = cycles.last().and_then(|c| c.healed) {
        tokio::time::sleep_until((last + cli.after_heal).into()).await;
    }
    *load.stop_at.lock().expect("stop lock") = Some(Instant::now());
    load.stop.store(true, Ordering::Relaxed);
    say!(
        "load stopped after {:.1}s; retrying what is in flight for up to {:?}",
        start.elapsed().as_secs_f64(),
        cli.retry_for
    );
    for w in workers {
        let _ = w.await;
    }
    let extra = std::mem::take(&mut *load.extra.lock().expect("extra lock"));
    for h in extra {
        let _ = h.await;
    }
    let loaded = Loaded {
        load_s: start.elapsed().as_secs_f64(),
        cycles,
        acks: std::mem::take(&mut *load.acks.lock().expect("acks lock")),
        attempted: load.seq.load(Ordering::Relaxed).min(cli.max_requests),
        errors: load.errors.lock().expect("errors lock").clone(),
        rejected: load.rejected.lock().expect("rejected lock").clone(),
        unacked: load.unacked.load(Ordering::Relaxed),
        error_log: std::mem::take(&mut *load.error_log.lock().expect("error log lock")),
    };
    say!(
        "{} requests, {} acknowledged, {} gave up, {} rejected; errors {:?}",
        loaded.attempted,
        loaded.acks.len(),
        loaded.unacked,
        loaded.rejected_n(),
        loaded.errors
    );
    loaded
}

// ------------------------------------------------------------------ the cycles judged

/// The fault cycles judged: the time from each heal to the next
/// acknowledgement, the group's rejoin, the reads and the fault windows.
struct CycleVerdict {
    failures: Vec<String>,
    json: Vec<Value>,
    /// The longest time from a heal to the next acknowledgement.
    heal_max: Option<f64>,
    /// A cycle with no acknowledgement after its heal.
    heal_missing: bool,
    rejoin_max: Option<f64>,
    window_acks: u64,
    window_unavailable: u64,
    /// The slowest partition to write again over the windows; None if one
    /// never did.
    writes_again_max: Option<f64>,
}

fn judge_cycles(cli: &Cli, loaded: &Loaded) -> CycleVerdict {
    let (acks, cycles) = (&loaded.acks, &loaded.cycles);
    let mut ack_times: Vec<Instant> = acks.iter().map(|a| a.at).collect();
    ack_times.sort();
    let window_checks = cli.writes_during_fault || cli.no_acks_during_fault;
    let mut v = CycleVerdict {
        failures: Vec::new(),
        json: Vec::new(),
        heal_max: None,
        heal_missing: false,
        rejoin_max: None,
        window_acks: 0,
        window_unavailable: 0,
        writes_again_max: Some(0.0),
    };
    for (i, c) in cycles.iter().enumerate() {
        let healed = c.healed.expect("a finished cycle");
        let heal = ack_times
            .iter()
            .find(|t| **t >= healed)
            .map(|t| t.duration_since(healed).as_secs_f64());
        match heal {
            Some(h) => v.heal_max = Some(v.heal_max.map_or(h, |m: f64| m.max(h))),
            None => v.heal_missing = true,
        }
        let rejoin = c.rejoin.map(|d| d.as_secs_f64());
        if let Some(r) = rejoin {
            v.rejoin_max = Some(v.rejoin_max.map_or(r, |m: f64| m.max(r)));
        }
        say!(
            "cycle {}: fault at {:.1}s, over at {:.1}s, first write after {}{}",
            i + 1,
            since_start(c.started.expect("set")),
            since_start(healed),
            heal.map_or("none".into(), |h| format!("{h:.2}s")),
            match (&cli.check_group, rejoin) {
                (None, _) => String::new(),
                (Some(_), Some(r)) => format!(", group back after {r:.2}s"),
                (Some(_), None) => ", group NOT back".into(),
            }
        );
        for p in &c.problems {
            v.failures.push(format!("cycle {}: {p}", i + 1));
        }
        if let Some(r) = &c.reads {
            say!(
                "cycle {}: during the fault, {} reads answered, {} failed; user.v1.UserService SERVING {} times, not {} times",
                i + 1,
                r.ok,
                r.failed,
                r.serving,
                r.not_serving
            );
            if r.failed > 0 || r.not_serving > 0 || r.ok == 0 {
                v.failures.push(format!(
                    "cycle {}: reads during the fault: {} failed, {} not SERVING ({})",
                    i + 1,
                    r.failed,
                    r.not_serving,
                    r.samples.join("; ")
                ));
            }
        }
        let window = window_checks.then(|| {
            fault_window(
                acks,
                &loaded.error_log,
                c.started.expect("set"),
                c.fault_done.expect("set"),
                cli.window_grace,
                c.heal_start.expect("set"),
                c.ends_at_fault.as_ref(),
            )
        });
        if let Some(w) = &window {
            v.window_acks += w.acks;
            v.window_unavailable += w.unavailable();
            v.writes_again_max = match (v.writes_again_max, w.writes_again_max()) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            say!(
                "cycle {}: from {:.1}s to {:.1}s after the fault's end: {} acknowledged {:?} (and {} late answers for events logged before), errors {:?}; partitions writing again after {}",
                i + 1,
                w.from_s,
                w.to_s,
                w.acks,
                w.acks_by_partition,
                w.late_answers,
                w.errors,
                w.writes_again_s
                    .iter()
                    .map(|(p, t)| format!(
                        "{p}: {}",
                        t.map_or("never".into(), |t| format!("{t:.2}s"))
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for p in window_problems(w, cli.writes_during_fault, cli.no_acks_during_fault) {
                v.failures.push(format!("cycle {}: {p}", i + 1));
            }
        }
        if cli.repeat > 1 && heal.is_none_or(|h| h > cli.writes_within.as_secs_f64()) {
            v.failures.push(format!(
                "cycle {}: no CreateUser acknowledged within {:?} of the heal",
                i + 1,
                cli.writes_within
            ));
        }
        if cli.check_group.is_some() && rejoin.is_none_or(|r| r > cli.rejoin_within.as_secs_f64()) {
            v.failures.push(format!(
                "cycle {}: the projector's group not back within {:?}",
                i + 1,
                cli.rejoin_within
            ));
        }
        v.json.push(json!({
            "cycle": i + 1,
            "fault_at_s": round1(since_start(c.started.expect("set"))),
            "healed_at_s": round1(since_start(healed)),
            "heal_s": heal.map(|h| (h * 100.0).round() / 100.0),
            "rejoin_s": rejoin.map(|r| (r * 100.0).round() / 100.0),
            "reads_during_fault": c.reads.as_ref().map(|r| json!({
                "ok": r.ok,
                "failed": r.failed,
                "serving": r.serving,
                "not_serving": r.not_serving,
            })),
            "window": window.as_ref().map(Window::json),
            "problems": c.problems,
        }));
    }
    if cli.fault.is_some() && cycles.is_empty() {
        v.failures
            .push("no fault was injected (the load ended first)".into());
    }
    v
}

// ------------------------------------------------------------------ reading back

/// The read-back's answers, and where it and the re-creates go.
struct Reads {
    /// The late targets (started by a heal) get channels of their own: the
    /// load's pool has only the load's targets (unless it switched to them).
    late_pool: Option<Pool>,
    /// The targets read back and asked to create again (of `all_targets`).
    targets: std::ops::Range<usize>,
    /// (index of the ack, how it was read, the answer).
    reads: Vec<(usize, ReadHow, Read)>,
    failures: Vec<String>,
}

impl Reads {
    fn pool<'a>(&'a self, load: &'a Load) -> &'a Pool {
        self.late_pool.as_ref().unwrap_or(&load.pool)
    }
}

/// Once every target is SERVING (or `--heal-timeout` is over), GetUser for
/// every acknowledged user, as `--read-every-target` says.
async fn read_back_all(
    cli: &Cli,
    setup: &Setup,
    load: &Load,
    acks: &[Ack],
) -> anyhow::Result<Reads> {
    let all_targets = &setup.all_targets;
    let verify_start = Instant::now();
    let deadline = verify_start + cli.heal_timeout;
    let late_pool = if setup.late_targets.is_empty() || setup.switch {
        None
    } else {
        Some(lazy_pool(all_targets, cli.connections)?)
    };
    let check_pool = late_pool.as_ref().unwrap_or(&load.pool);
    let bad = wait_serving(check_pool, all_targets, deadline).await;
    // All the targets; after a switch, the ones the load moved to (the
    // others serve the old topic's read model, which lacks what was created
    // after the move).
    let check_targets = if setup.switch {
        setup.targets.len()..all_targets.len()
    } else {
        0..all_targets.len()
    };
    // Once, round-robin, with the position; or on every target, with and
    // without it.
    let hows: Vec<ReadHow> = if cli.read_every_target {
        check_targets
            .clone()
            .flat_map(|t| {
                [true, false].map(|with_position| ReadHow {
                    target: Some(t),
                    with_position,
                })
            })
            .collect()
    } else {
        vec![ReadHow {
            target: None,
            with_position: true,
        }]
    };
    let mut failures = Vec::new();
    if !bad.is_empty() {
        say!("not SERVING after the heal timeout: {bad:?}");
        failures.push(format!("not SERVING after the load: {bad:?}"));
    } else {
        say!(
            "all targets SERVING after {:.1}s; reading back {} users ({} read(s) each)",
            verify_start.elapsed().as_secs_f64(),
            acks.len(),
            hows.len()
        );
    }
    let after_fault = &load.after_fault;
    // A user acknowledged on the old topic is read without its position
    // (once per target, though --read-every-target asks for both kinds).
    let hows_of = |a: &Ack| -> Vec<ReadHow> {
        hows.iter()
            .filter_map(
                |h| match (a.old_topic && h.with_position, cli.read_every_target) {
                    (false, _) => Some(*h),
                    (true, true) => None,
                    (true, false) => Some(ReadHow {
                        with_position: false,
                        ..*h
                    }),
                },
            )
            .collect()
    };
    let reads: Vec<(usize, ReadHow, Read)> = stream::iter(
        acks.iter()
            .enumerate()
            .flat_map(|(i, a)| hows_of(a).into_iter().map(move |how| (i, a, how))),
    )
    .map(|(i, a, how)| async move {
        (
            i,
            how,
            read_back(check_pool, a, how, deadline, after_fault).await,
        )
    })
    .buffered(cli.verify_concurrency.max(1))
    .collect()
    .await;
    Ok(Reads {
        late_pool,
        targets: check_targets,
        reads,
        failures,
    })
}

/// " on TARGET (with its position)" for a read of one target, "" for one
/// round-robin.
fn read_where(all_targets: &[String], how: &ReadHow) -> String {
    match how.target {
        None => String::new(),
        Some(t) => format!(
            " on {} ({})",
            all_targets[t],
            if how.with_position {
                "with its position"
            } else {
                "without a position"
            }
        ),
    }
}

/// What the read-back found.
struct ReadBack {
    lost: HashSet<String>,
    corrupted: HashSet<String>,
    doubled: HashSet<String>,
    /// Requests read back without a position.
    unverified: usize,
    still_failing: usize,
    not_found: usize,
    /// Positions read back for users acknowledged on the old topic: checked
    /// against the new log's winner once it is read.
    moved_positions: Vec<(usize, ReadHow, (i32, i64))>,
    /// With --read-every-target: the answers per target and kind of read.
    json: Option<Vec<Value>>,
}

fn judge_reads(
    cli: &Cli,
    setup: &Setup,
    acks: &[Ack],
    reads: &[(usize, ReadHow, Read)],
    samples: &mut Samples,
) -> ReadBack {
    let all_targets = &setup.all_targets;
    let mut lost: HashSet<String> = HashSet::new();
    let mut corrupted: HashSet<String> = HashSet::new();
    let mut doubled: HashSet<String> = HashSet::new();
    let mut unverified: HashSet<&str> = HashSet::new();
    let mut still_failing: HashSet<&str> = HashSet::new();
    let mut not_found: HashSet<&str> = HashSet::new();
    let mut moved_positions: Vec<(usize, ReadHow, (i32, i64))> = Vec::new();
    let mut by_how: BTreeMap<ReadHow, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for a in acks {
        if !a.answer_ok {
            corrupted.insert(a.request_id.clone());
        }
    }
    for (i, how, r) in reads {
        let a = &acks[*i];
        let answer = match r {
            Read::NotFound => {
                not_found.insert(&a.request_id);
                lost.insert(a.request_id.clone());
                note(
                    samples,
                    "not-found",
                    format!(
                        "{} id {}: NOT_FOUND{}",
                        a.request_id,
                        a.id,
                        read_where(all_targets, how)
                    ),
                );
                "not_found"
            }
            Read::Failing(e) => {
                still_failing.insert(&a.request_id);
                lost.insert(a.request_id.clone());
                note(
                    samples,
                    "still-failing",
                    format!(
                        "{} id {}: still failing{}: {e}",
                        a.request_id,
                        a.id,
                        read_where(all_targets, how)
                    ),
                );
                "still_failing"
            }
            Read::Found {
                id,
                name,
                email,
                position,
            } => {
                let mut answer = "ok";
                if *id != a.id || *name != a.name || *email != a.email {
                    corrupted.insert(a.request_id.clone());
                    note(
                        samples,
                        "corrupted",
                        format!(
                            "{} id {}: read back {id} {name:?} {email:?}{}",
                            a.request_id,
                            a.id,
                            read_where(all_targets, how)
                        ),
                    );
                    answer = "corrupted";
                }
                match position {
                    None => {
                        unverified.insert(&a.request_id);
                        if answer == "ok" {
                            answer = "no_position";
                        }
                    }
                    Some(p) if a.old_topic => moved_positions.push((*i, *how, *p)),
                    Some(p) if Some(*p) != a.position => {
                        doubled.insert(a.request_id.clone());
                        note(
                            samples,
                            "other-position",
                            format!(
                                "{} id {}: acknowledged at {:?}, created at {p:?}{}",
                                a.request_id,
                                a.id,
                                a.position,
                                read_where(all_targets, how)
                            ),
                        );
                        if answer == "ok" {
                            answer = "other_position";
                        }
                    }
                    Some(_) => {}
                }
                answer
            }
        };
        *by_how.entry(*how).or_default().entry(answer).or_default() += 1;
    }
    let json: Option<Vec<Value>> = cli.read_every_target.then(|| {
        by_how
            .iter()
            .map(|(how, answers)| {
                json!({
                    "target": how.target.map(|t| all_targets[t].clone()),
                    "with_position": how.with_position,
                    "answers": answers,
                })
            })
            .collect()
    });
    if cli.read_every_target {
        for (how, answers) in &by_how {
            say!("read back{}: {answers:?}", read_where(all_targets, how));
        }
    }
    ReadBack {
        unverified: unverified.len(),
        still_failing: still_failing.len(),
        not_found: not_found.len(),
        lost,
        corrupted,
        doubled,
        moved_positions,
        json,
    }
}

// ------------------------------------------------------------------ re-creating

/// What the re-creates of acknowledged client-chosen ids answered.
struct Recreated {
    failures: Vec<String>,
    /// The requests that created an acknowledged id again.
    doubled: HashSet<String>,
    json: Value,
    /// (sent, ALREADY_EXISTS, OK).
    figures: (usize, u64, u64),
}

/// With `--recreate-sample N`: N acknowledged client-chosen ids created
/// again by other requests, round-robin over the read-back's targets.
async fn recreate_acked(
    cli: &Cli,
    setup: &Setup,
    load: &Load,
    acks: &[Ack],
    reads: &Reads,
    samples: &mut Samples,
) -> Option<Recreated> {
    if cli.recreate_sample == 0 {
        return None;
    }
    let (all_targets, after_fault) = (&setup.all_targets, &load.after_fault);
    let mut failures = Vec::new();
    let mut doubled = HashSet::new();
    let sample = recreate_sample(
        acks,
        cli.recreate_sample,
        after_fault.started.get().copied(),
    );
    if sample.is_empty() {
        failures.push("no client-chosen id acknowledged before the fault to create again".into());
    }
    say!(
        "creating {} acknowledged client-chosen ids again under other request ids, round-robin over {} targets",
        sample.len(),
        reads.targets.len()
    );
    let until = Instant::now() + cli.retry_for;
    let (run_id, call_timeout, first_target, n_targets, check_pool) = (
        &setup.run,
        cli.call_timeout,
        reads.targets.start,
        reads.targets.len(),
        reads.pool(load),
    );
    let answers: Vec<(usize, &Ack, CreateUserRequest, Recreate)> =
        stream::iter(sample.iter().enumerate())
            .map(|(k, a)| async move {
                let req = CreateUserRequest {
                    id: Some(a.id),
                    name: format!("Fault User {run_id} re {k}"),
                    email: format!("fc.{run_id}.re{k}@example.com"),
                    request_id: format!("fc-{run_id}-re-{k}"),
                };
                let t = first_target + k % n_targets;
                let answer = recreate(check_pool, t, &req, call_timeout, until, after_fault).await;
                (t, *a, req, answer)
            })
            .buffered(8)
            .collect()
            .await;
    let (mut exists, mut created, mut other, mut gave_up) = (0u64, 0u64, 0u64, 0u64);
    let mut per_target: BTreeMap<&str, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for (t, a, req, answer) in &answers {
        let kind = match answer {
            Recreate::AlreadyExists => {
                exists += 1;
                "already_exists"
            }
            Recreate::Created(position) => {
                created += 1;
                doubled.insert(req.request_id.clone());
                note(
                    samples,
                    "recreate-ok",
                    format!(
                        "id {} (acknowledged to {} at {:?}) created again by {} on {}: OK at {position:?}",
                        a.id, a.request_id, a.position, req.request_id, all_targets[*t]
                    ),
                );
                "ok"
            }
            Recreate::Other(e) => {
                other += 1;
                note(
                    samples,
                    "recreate-other",
                    format!(
                        "id {} again by {} on {}: {e}",
                        a.id, req.request_id, all_targets[*t]
                    ),
                );
                "other"
            }
            Recreate::GaveUp(e) => {
                gave_up += 1;
                note(
                    samples,
                    "recreate-gave-up",
                    format!(
                        "id {} again by {} on {}: still failing after {:?}: {e}",
                        a.id, req.request_id, all_targets[*t], cli.retry_for
                    ),
                );
                "gave_up"
            }
        };
        *per_target
            .entry(all_targets[*t].as_str())
            .or_default()
            .entry(kind)
            .or_default() += 1;
    }
    say!(
        "re-created {} ids: {exists} ALREADY_EXISTS, {created} OK (a second user), {other} other answers, {gave_up} unanswered; by target {per_target:?}",
        answers.len()
    );
    if created > 0 {
        failures.push(format!(
            "{created} of {} acknowledged ids created again by other requests answered OK: a second user under the id",
            answers.len()
        ));
    }
    if other + gave_up > 0 {
        failures.push(format!(
            "{} of {} re-creates of acknowledged ids did not answer ALREADY_EXISTS ({other} another answer, {gave_up} unanswered)",
            other + gave_up,
            answers.len()
        ));
    }
    Some(Recreated {
        failures,
        doubled,
        json: json!({
            "sample": answers.len(),
            "already_exists": exists,
            "ok": created,
            "other": other,
            "gave_up": gave_up,
            "by_target": per_target,
        }),
        figures: (answers.len(), exists, created),
    })
}

/// Two acknowledged requests, one id: all but the first acknowledged are
/// doubled.
struct Twice {
    /// Ids acknowledged to more than one request.
    ids: u64,
    doubled: HashSet<String>,
}

fn acknowledged_twice(acks: &[Ack], samples: &mut Samples) -> Twice {
    let mut by_id: HashMap<i64, Vec<&Ack>> = HashMap::new();
    for a in acks {
        by_id.entry(a.id).or_default().push(a);
    }
    let mut twice = Twice {
        ids: 0,
        doubled: HashSet::new(),
    };
    for (id, mut v) in by_id {
        if v.len() > 1 {
            twice.ids += 1;
            v.sort_by_key(|a| a.at);
            note(
                samples,
                "id-twice",
                format!(
                    "id {id} acknowledged to {:?}",
                    v.iter().map(|a| a.request_id.as_str()).collect::<Vec<_>>()
                ),
            );
            for a in &v[1..] {
                twice.doubled.insert(a.request_id.clone());
            }
        }
    }
    twice
}

// ------------------------------------------------------------------ the log checked

/// What the log check found, and what it adds to the verdict.
#[derive(Default)]
struct LogCheck {
    /// `ok`, `no-request-ids`, `error` or `skipped`.
    status: &'static str,
    json: Value,
    split: u64,
    /// With --log-partitions: events outside their id's partition.
    misplaced: Option<u64>,
    lost: HashSet<String>,
    corrupted: HashSet<String>,
    doubled: HashSet<String>,
    failures: Vec<String>,
}

/// With `--brokers` and `--topic`: the log read back and checked against
/// the acknowledgements (and the positions moved users were read back at).
async fn check_the_log(
    cli: &Cli,
    setup: &Setup,
    acks: &[Ack],
    moved_positions: &[(usize, ReadHow, (i32, i64))],
    samples: &mut Samples,
) -> anyhow::Result<LogCheck> {
    let (Some(brokers), Some(topic)) = (&cli.brokers, &cli.topic) else {
        say!("log not checked (no --brokers/--topic)");
        return Ok(LogCheck {
            status: "skipped",
            json: json!({"status": "skipped"}),
            ..LogCheck::default()
        });
    };
    let (b, t, timeout) = (brokers.clone(), topic.clone(), cli.log_timeout);
    let log = match tokio::task::spawn_blocking(move || read_log(&b, &t, timeout)).await? {
        Ok(log) => log,
        Err(e) => {
            say!("log check failed: {e:#}");
            return Ok(LogCheck {
                status: "error",
                json: json!({"status": "error", "error": format!("{e:#}")}),
                failures: vec![format!("log not read: {e:#}")],
                ..LogCheck::default()
            });
        }
    };
    let v = check_log(&log, acks, cli.log_partitions, samples);
    if !v.note.is_empty() {
        say!("{}", v.note);
    }
    say!("log: {}", v.stats);
    let mut doubled = v.doubled;
    // A moved user read back at another event than its request's winner in
    // this log: another user's answer.
    for (i, how, p) in moved_positions {
        let a = &acks[*i];
        match v.own_winner.get(&a.request_id) {
            Some(w) if w == p => {}
            Some(w) => {
                doubled.insert(a.request_id.clone());
                note(
                    samples,
                    "other-position",
                    format!(
                        "{} id {}: its event won at {w:?} in the log, read back at {p:?}{}",
                        a.request_id,
                        a.id,
                        read_where(&setup.all_targets, how)
                    ),
                );
            }
            // Not its own winner: check_log counted it.
            None => {}
        }
    }
    Ok(LogCheck {
        status: v.status,
        json: json!({"status": v.status, "note": v.note, "stats": v.stats}),
        split: v.split,
        misplaced: Some(v.misplaced).filter(|_| cli.log_partitions.is_some()),
        lost: v.lost,
        corrupted: v.corrupted,
        doubled,
        failures: Vec::new(),
    })
}

// ------------------------------------------------------------------ verdict

/// The run's verdict, from what the phases found.
struct Verdict {
    failures: Vec<String>,
    lost: usize,
    corrupted: usize,
    doubled: usize,
    /// What calls met after the first fault started.
    after: AfterFaultTally,
    unavailable_after: u64,
    /// With --switch-to-late-targets: the switch's figures.
    switch: Option<Value>,
}

impl Verdict {
    fn pass(&self) -> bool {
        self.failures.is_empty()
    }
}

#[allow(clippy::too_many_arguments)]
fn judge(
    cli: &Cli,
    setup: &Setup,
    load: &Load,
    loaded: &Loaded,
    earlier: [&[String]; 2],
    read_back: &ReadBack,
    recreated: Option<&Recreated>,
    twice: &Twice,
    log: &LogCheck,
) -> Verdict {
    let mut failures: Vec<String> = earlier.concat();
    if let Some(r) = recreated {
        failures.extend(r.failures.iter().cloned());
    }
    failures.extend(log.failures.iter().cloned());
    let lost: HashSet<&String> = read_back.lost.iter().chain(&log.lost).collect();
    let corrupted: HashSet<&String> = read_back.corrupted.iter().chain(&log.corrupted).collect();
    let doubled: HashSet<&String> = read_back
        .doubled
        .iter()
        .chain(recreated.into_iter().flat_map(|r| &r.doubled))
        .chain(&twice.doubled)
        .chain(&log.doubled)
        .collect();
    let (n_lost, n_corrupted, n_doubled) = (lost.len(), corrupted.len(), doubled.len());
    if n_lost + n_corrupted + n_doubled > 0 {
        failures.push(format!(
            "lost {n_lost}, corrupted {n_corrupted}, doubled {n_doubled}"
        ));
    }
    if loaded.acks.is_empty() {
        failures.push("nothing was acknowledged".into());
    }
    let rejected_n = loaded.rejected_n();
    if rejected_n > 0 {
        failures.push(format!(
            "{rejected_n} valid, fresh requests got a final error: {:?}",
            loaded.rejected
        ));
    }
    let after_fault = &load.after_fault;
    let after = std::mem::take(&mut *after_fault.tally.lock().expect("after-fault lock"));
    let unavailable_after: u64 = after
        .errors
        .values()
        .filter_map(|c| c.get("UNAVAILABLE"))
        .sum();
    let switch = after_fault.switch.as_ref().map(|sw| {
        let (json, problems) = judge_switch(sw.get().copied(), &after, setup, load, loaded);
        failures.extend(problems);
        json
    });
    if let Some(limit) = cli.max_retries_after_fault {
        say!(
            "after the fault started: failed attempts {:?}, at most {} for one call, {} call(s) failed more than {limit} times",
            after.errors,
            after.max_failures,
            after.over
        );
        if after.over > 0 {
            failures.push(format!(
                "{} call(s) failed more than {limit} times after the fault started (at most {}): {}",
                after.over,
                after.max_failures,
                after.examples.join("; ")
            ));
        }
    }
    Verdict {
        failures,
        lost: n_lost,
        corrupted: n_corrupted,
        doubled: n_doubled,
        after,
        unavailable_after,
        switch,
    }
}

/// The switch (--switch-to-late-targets, at `at` if it happened): creates
/// refused from the fault's start (the seal) to the switch, and what became
/// of them; its figures and its problems.
fn judge_switch(
    at: Option<Instant>,
    after: &AfterFaultTally,
    setup: &Setup,
    load: &Load,
    loaded: &Loaded,
) -> (Value, Vec<String>) {
    let acks = &loaded.acks;
    let mut problems = Vec::new();
    let unavailable = after.before_switch.get("UNAVAILABLE").copied().unwrap_or(0);
    // From the first refused create to the switch (creates on the old
    // topic could not succeed in between).
    let window_s = match (after.first_before_switch, at) {
        (Some(first), Some(at)) => at.saturating_duration_since(first).as_secs_f64(),
        _ => 0.0,
    };
    let (held_ok, held_failed) = (
        load.held_acked.load(Ordering::Relaxed),
        load.held_failed.load(Ordering::Relaxed),
    );
    let reads = loaded
        .cycles
        .first()
        .and_then(|c| c.reads.clone())
        .unwrap_or_default();
    say!(
        "switch at {}: {unavailable} create attempts answered UNAVAILABLE before it (all codes {:?}), over {window_s:.1}s from the first; {} request(s) held up then, {held_ok} acknowledged after it, {held_failed} not; reads on the old targets during the move: {} answered, {} failed",
        at.map_or("never".into(), |t| format!("{:.1}s", since_start(t))),
        after.before_switch,
        held_ok + held_failed,
        reads.ok,
        reads.failed
    );
    if at.is_none() {
        problems.push("the load never switched to the late targets".into());
    }
    if held_failed > 0 {
        problems.push(format!(
            "{held_failed} create(s) refused before the switch were not acknowledged after it"
        ));
    }
    let json = json!({
        "at_s": at.map(|t| round1(since_start(t))),
        "unavailable": unavailable,
        "errors": after.before_switch,
        "window_s": round1(window_s),
        "last_before_switch_s": after.last_before_switch.map(|t| round1(since_start(t))),
        "held": held_ok + held_failed,
        "held_acknowledged": held_ok,
        "held_failed": held_failed,
        "acknowledged_on_old": acks.iter().filter(|a| a.old_topic).count(),
        "acknowledged_on_new": acks.iter().filter(|a| !a.old_topic).count(),
        "acknowledged_by_target": acks.iter().fold(BTreeMap::<&str, u64>::new(), |mut m, a| {
            *m.entry(setup.all_targets[a.target].as_str()).or_default() += 1;
            m
        }),
        "reads_on_old_ok": reads.ok,
        "reads_on_old_failed": reads.failed,
        "old_not_serving": reads.not_serving,
    });
    (json, problems)
}

// ------------------------------------------------------------------ report

/// Everything the summary line and the JSON say.
struct Report<'a> {
    cli: &'a Cli,
    setup: &'a Setup,
    loaded: &'a Loaded,
    cycles: &'a CycleVerdict,
    read_back: &'a ReadBack,
    recreated: Option<&'a Recreated>,
    twice: &'a Twice,
    log: &'a LogCheck,
    verdict: &'a Verdict,
}

impl Report<'_> {
    /// The summary line: `fault=... lost=0 corrupted=0 doubled=0 ...`.
    fn line(&self) -> String {
        let (cli, loaded, c, v) = (self.cli, self.loaded, self.cycles, self.verdict);
        let errors_s = if loaded.errors.is_empty() {
            "none".to_owned()
        } else {
            loaded
                .errors
                .iter()
                .map(|(c, n)| format!("{c}:{n}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let no_cycles = loaded.cycles.is_empty();
        let heal_s = match (no_cycles, c.heal_missing, c.heal_max) {
            (true, _, _) => "-".to_owned(),
            (false, true, _) | (false, false, None) => "never".to_owned(),
            (false, false, Some(h)) => format!("{h:.1}"),
        };
        let mut line = format!(
            "fault={} attempted={} acknowledged={} unacknowledged={} rejected={} errors={errors_s} lost={} corrupted={} doubled={} unverified={} heal_s={heal_s}",
            cli.name,
            loaded.attempted,
            loaded.acks.len(),
            loaded.unacked,
            loaded.rejected_n(),
            v.lost,
            v.corrupted,
            v.doubled,
            self.read_back.unverified
        );
        if cli.check_group.is_some() {
            line.push_str(&format!(
                " rejoin_s={}",
                c.rejoin_max.map_or("never".into(), |r| format!("{r:.1}"))
            ));
        }
        if cli.writes_during_fault && !no_cycles {
            line.push_str(&format!(
                " writes_again_s={}",
                c.writes_again_max
                    .map_or("never".into(), |r| format!("{r:.1}"))
            ));
        }
        if cli.no_acks_during_fault && !no_cycles {
            line.push_str(&format!(
                " window_acks={} window_unavailable={}",
                c.window_acks, c.window_unavailable
            ));
        }
        if cli.read_every_target {
            line.push_str(&format!(" read_targets={}", self.setup.all_targets.len()));
        }
        if let Some((sent, exists, created)) = self.recreated.map(|r| r.figures) {
            line.push_str(&format!(
                " recreated={sent} already_exists={exists} recreate_ok={created}"
            ));
        }
        if cli.max_retries_after_fault.is_some() {
            line.push_str(&format!(
                " unavailable_after_fault={} over_retried={}",
                v.unavailable_after, v.after.over
            ));
        }
        if cli.recreate_sample > 0 || self.log.split > 0 {
            line.push_str(&format!(" split_ids={}", self.log.split));
        }
        if let Some(m) = self.log.misplaced {
            line.push_str(&format!(" misplaced={m}"));
        }
        if let Some(sw) = &v.switch {
            line.push_str(&format!(
                " switch_unavailable={} switch_window_s={:.1} held_retried={}/{} old_reads_ok={} old_reads_failed={}",
                sw["unavailable"],
                sw["window_s"].as_f64().unwrap_or(0.0),
                sw["held_acknowledged"],
                sw["held"],
                sw["reads_on_old_ok"],
                sw["reads_on_old_failed"]
            ));
        }
        line.push_str(&format!(
            " log={} result={}",
            self.log.status,
            if v.pass() { "PASS" } else { "FAIL" }
        ));
        line
    }

    /// The figures and the details, for `--json`.
    fn json(&self, line: &str, samples: &Samples) -> Value {
        let (cli, setup, loaded, c, v) =
            (self.cli, self.setup, self.loaded, self.cycles, self.verdict);
        let acks = &loaded.acks;
        let after = &v.after;
        json!({
            "line": line,
            "fault": cli.name,
            "run_id": setup.run,
            "pass": v.pass(),
            "failures": v.failures,
            "targets": setup.targets,
            "attempted": loaded.attempted,
            "acknowledged": acks.len(),
            "acknowledged_client_ids": acks.iter().filter(|a| a.client_id).count(),
            "unacknowledged": loaded.unacked,
            "rejected": loaded.rejected,
            "errors": loaded.errors,
            "lost": v.lost,
            "lost_not_found": self.read_back.not_found,
            "lost_still_failing": self.read_back.still_failing,
            "corrupted": v.corrupted,
            "doubled": v.doubled,
            "ids_acknowledged_twice": self.twice.ids,
            "unverified": self.read_back.unverified,
            "heal_s": c.heal_max.filter(|_| !c.heal_missing).map(|h| (h * 100.0).round() / 100.0),
            "rejoin_s": c.rejoin_max.map(|r| (r * 100.0).round() / 100.0),
            "writes_during_fault": cli.writes_during_fault,
            "no_acks_during_fault": cli.no_acks_during_fault,
            "writes_again_s": (cli.writes_during_fault && !loaded.cycles.is_empty())
                .then(|| c.writes_again_max.map(|r| (r * 100.0).round() / 100.0)),
            "window_acks": cli.no_acks_during_fault.then_some(c.window_acks),
            "window_unavailable": cli.no_acks_during_fault.then_some(c.window_unavailable),
            "cycles": c.json,
            "late_targets": setup.late_targets,
            "read_back": self.read_back.json,
            "recreate": self.recreated.map_or(Value::Null, |r| r.json.clone()),
            "after_fault": cli.max_retries_after_fault.map(|limit| json!({
                "max_retries": limit,
                "unavailable": v.unavailable_after,
                "errors": after.errors,
                "max_failures": after.max_failures,
                "over_retried": after.over,
                "examples": after.examples,
            })),
            "log_split_ids": self.log.split,
            "log_misplaced": self.log.misplaced,
            "switch": v.switch,
            "load_s": round1(loaded.load_s),
            "log": self.log.json,
            "examples": samples,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(partition: i32, offset: i64, id: i64, seq: u64, rid: bool) -> Event {
        Event {
            partition,
            offset,
            id,
            name: format!("Fault User r {seq}"),
            email: format!("fc.r.{seq}@example.com"),
            request_id: rid.then(|| format!("fc-r-{seq}")),
        }
    }

    fn ack(id: i64, seq: u64, position: (i32, i64)) -> Ack {
        Ack {
            request_id: format!("fc-r-{seq}"),
            id,
            name: format!("Fault User r {seq}"),
            email: format!("fc.r.{seq}@example.com"),
            client_id: false,
            position: Some(position),
            at: Instant::now(),
            answer_ok: true,
            target: 0,
            old_topic: false,
        }
    }

    fn log(events: Vec<Event>) -> LogRead {
        LogRead {
            partitions: 3,
            records: events.len() as u64,
            events,
            undecodable: 0,
            dlq_records: None,
        }
    }

    #[test]
    fn the_first_event_of_an_id_wins_and_a_ghost_is_doubled() {
        for rid in [true, false] {
            // Request 1 created id 10, then (a retry) id 11: one request, two
            // users. Request 2 was acknowledged id 10, which request 1 owns.
            let l = log(vec![
                ev(0, 0, 10, 1, rid),
                ev(0, 1, 10, 2, rid),
                ev(1, 0, 11, 1, rid),
                ev(2, 0, 12, 3, rid),
            ]);
            let acks = [ack(11, 1, (1, 0)), ack(10, 2, (0, 1)), ack(12, 3, (2, 0))];
            let mut samples = Samples::new();
            let v = check_log(&l, &acks, None, &mut samples);
            assert_eq!(v.status, if rid { "ok" } else { "no-request-ids" });
            let key1 = if rid {
                "fc-r-1".to_owned()
            } else {
                "fields:Fault User r 1|fc.r.1@example.com".to_owned()
            };
            assert!(v.doubled.contains(&key1), "{:?}", v.doubled);
            assert!(v.doubled.contains("fc-r-2"), "{:?}", v.doubled);
            assert_eq!(v.doubled.len(), 2);
            assert!(v.lost.is_empty() && v.corrupted.is_empty());
        }
    }

    #[test]
    fn an_id_created_by_two_requests_in_two_partitions_is_doubled() {
        // Id 20: request 5's event in partition 3 (acknowledged), then a
        // re-create by request 9 routed to partition 1 after partitions were
        // added: each partition's reader would pick its own winner. Id 30:
        // request 6 in partitions 0 and 4 (a retry routed anew): one request,
        // one user.
        let l = log(vec![
            ev(3, 0, 20, 5, true),
            ev(1, 0, 20, 9, true),
            ev(0, 0, 30, 6, true),
            ev(4, 0, 30, 6, true),
        ]);
        let acks = [ack(20, 5, (3, 0)), ack(30, 6, (4, 0))];
        let mut samples = Samples::new();
        let v = check_log(&l, &acks, None, &mut samples);
        assert_eq!(v.split, 1);
        assert_eq!(
            v.doubled,
            HashSet::from(["fc-r-9".to_owned()]),
            "the other request, not the acknowledged one"
        );
        assert!(v.lost.is_empty() && v.corrupted.is_empty());
        assert_eq!(v.stats["ids_in_two_partitions"], 2);
        assert_eq!(v.stats["acked_created_by_another_event"], 0);
        // Nothing acknowledged under the id: the lowest partition's is its.
        let v = check_log(&l, &[], None, &mut samples);
        assert_eq!(v.doubled, HashSet::from(["fc-r-5".to_owned()]));
    }

    #[test]
    fn after_a_move_an_event_outside_its_partition_by_the_new_map_is_doubled() {
        use user_service::domain::partition_map::partition_for_key;
        let home = |id: i64| partition_for_key(id.to_string().as_bytes(), 24);
        let (a, b) = (101, 202);
        let elsewhere = (home(b) + 1) % 24;
        let l = log(vec![
            ev(home(a), 0, a, 1, true),
            ev(elsewhere, 0, b, 2, true),
        ]);
        // Request 1 was acknowledged on the old topic: its position there
        // names nothing in this log.
        let acks = [
            Ack {
                old_topic: true,
                ..ack(a, 1, (3, 77))
            },
            ack(b, 2, (elsewhere, 0)),
        ];
        let mut samples = Samples::new();
        let v = check_log(&l, &acks, Some(24), &mut samples);
        assert_eq!(v.misplaced, 1);
        assert_eq!(v.doubled, HashSet::from(["fc-r-2".to_owned()]));
        assert!(v.lost.is_empty() && v.corrupted.is_empty());
        assert_eq!(v.stats["acked_position_not_the_winner"], 0);
        assert_eq!(v.own_winner.get("fc-r-1"), Some(&(home(a), 0)));
        // Without the map's count nothing is misplaced.
        assert_eq!(check_log(&l, &acks, None, &mut samples).misplaced, 0);
    }

    #[test]
    fn the_recreate_sample_spreads_over_client_ids_before_the_fault() {
        let t0 = Instant::now();
        let acks: Vec<Ack> = (0..100u64)
            .map(|seq| Ack {
                client_id: seq % 4 == 0,
                at: t0 + Duration::from_millis(seq),
                ..ack(seq as i64, seq, (0, seq as i64))
            })
            .collect();
        let fault = t0 + Duration::from_millis(80);
        let s = recreate_sample(&acks, 10, Some(fault));
        assert_eq!(s.len(), 10);
        assert!(s.iter().all(|a| a.client_id && a.at < fault));
        assert_eq!(s.first().map(|a| a.id), Some(0));
        // Fewer than asked: all of them.
        assert_eq!(recreate_sample(&acks, 50, Some(fault)).len(), 20);
    }

    #[test]
    fn an_acknowledged_id_missing_from_the_log_is_lost() {
        let mut samples = Samples::new();
        let v = check_log(
            &log(vec![ev(0, 0, 1, 1, true)]),
            &[ack(2, 2, (0, 1))],
            None,
            &mut samples,
        );
        assert!(v.lost.contains("fc-r-2"));
    }

    #[test]
    fn decode_takes_only_valid_user_created_records() {
        let good = br#"{"schema_version":1,"type":"UserCreated","id":7,"name":"A","email":"a@example.com","created_at_ms":1,"request_id":"x"}"#;
        let e = decode(0, 3, Some(b"7"), Some(good)).expect("a valid event");
        assert_eq!((e.id, e.request_id.as_deref()), (7, Some("x")));
        assert!(
            decode(0, 3, Some(b"8"), Some(good)).is_none(),
            "key must match the id"
        );
        assert!(decode(0, 3, Some(b"7"), Some(b"nope")).is_none());
    }

    fn timed_ack(seq: u64, partition: i32, at: Instant) -> Ack {
        Ack {
            at,
            ..ack(seq as i64, seq, (partition, seq as i64))
        }
    }

    #[test]
    fn a_fault_window_counts_what_falls_in_it() {
        let t0 = Instant::now();
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        // Fault from 10 s to 11 s, grace 2 s: the window is 13 s to 20 s.
        let acks = [
            timed_ack(1, 0, s(1.0)),
            timed_ack(2, 1, s(2.0)),
            timed_ack(3, 2, s(3.0)),
            timed_ack(4, 0, s(11.5)), // within the grace: not counted
            timed_ack(5, 1, s(14.0)),
            timed_ack(6, 1, s(15.0)),
            timed_ack(7, 2, s(16.0)),
            timed_ack(8, 0, s(21.0)), // after the heal's start
        ];
        let errors = [
            (s(12.0), "UNAVAILABLE"),
            (s(13.5), "UNAVAILABLE"),
            (s(19.0), "DEADLINE_EXCEEDED"),
        ];
        let w = fault_window(
            &acks,
            &errors,
            s(10.0),
            s(11.0),
            Duration::from_secs(2),
            s(20.0),
            None,
        );
        assert_eq!((w.from_s, w.to_s), (2.0, 9.0));
        assert_eq!(w.acks, 3);
        assert_eq!(w.acks_by_partition, BTreeMap::from([(1, 2), (2, 1)]));
        assert_eq!(w.unavailable(), 1);
        assert_eq!(w.errors.get("DEADLINE_EXCEEDED"), Some(&1));
        assert_eq!(w.writes_again_s.get(&0), Some(&None));
        assert_eq!(w.writes_again_s.get(&1), Some(&Some(3.0)));
        assert_eq!(w.writes_again_max(), None);
        // Partition 0 never wrote again: --writes-during-fault fails; three
        // acks: --no-acks-during-fault fails.
        let p = window_problems(&w, true, false);
        assert!(p.len() == 1 && p[0].contains("[0]"), "{p:?}");
        let p = window_problems(&w, false, true);
        assert!(
            p.len() == 1 && p[0].starts_with("3 CreateUser acknowledged"),
            "{p:?}"
        );
    }

    #[test]
    fn an_event_the_log_held_before_the_window_is_a_late_answer_not_a_write() {
        let t0 = Instant::now();
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        // Window 13 s to 20 s; offsets are the sequence numbers.
        let acks = [
            timed_ack(5, 1, s(14.0)), // 1:5, below the end 6 at the fault
            timed_ack(6, 1, s(15.0)), // 1:6, appended in the window
        ];
        let errors = [(s(14.5), "UNAVAILABLE")];
        let window = |ends: BTreeMap<i32, i64>| {
            fault_window(
                &acks,
                &errors,
                s(10.0),
                s(11.0),
                Duration::from_secs(2),
                s(20.0),
                Some(&ends),
            )
        };
        let w = window(BTreeMap::from([(1, 6)]));
        assert_eq!((w.acks, w.late_answers), (1, 1));
        let p = window_problems(&w, false, true);
        assert!(
            p.len() == 1 && p[0].starts_with("1 CreateUser acknowledged"),
            "{p:?}"
        );
        // Both below the end: nothing was written in the window.
        let w = window(BTreeMap::from([(1, 7)]));
        assert_eq!((w.acks, w.late_answers), (0, 2));
        assert!(window_problems(&w, false, true).is_empty());
    }

    #[test]
    fn a_quiet_window_with_unavailable_passes_no_acks_and_fails_writes() {
        let t0 = Instant::now();
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        let acks = [timed_ack(1, 0, s(1.0)), timed_ack(2, 0, s(30.0))];
        let errors = [(s(15.0), "UNAVAILABLE")];
        let w = fault_window(
            &acks,
            &errors,
            s(10.0),
            s(11.0),
            Duration::from_secs(2),
            s(20.0),
            None,
        );
        assert!(window_problems(&w, false, true).is_empty());
        assert_eq!(window_problems(&w, true, false).len(), 1);
        // No UNAVAILABLE in the window: the no-acks check wants to see the refusal.
        let w = fault_window(
            &acks,
            &[],
            s(10.0),
            s(11.0),
            Duration::from_secs(2),
            s(20.0),
            None,
        );
        assert_eq!(window_problems(&w, false, true).len(), 1);
        // A heal within the grace leaves no window to judge.
        let w = fault_window(
            &acks,
            &errors,
            s(10.0),
            s(11.0),
            Duration::from_secs(2),
            s(12.0),
            None,
        );
        assert!(w.is_empty());
        assert!(window_problems(&w, true, true)[0].contains("empty"));
    }

    #[test]
    fn retry_classes() {
        let retryable = |s: &Status| RETRY.retries(s);
        assert!(retryable(&Status::unavailable("x")));
        assert!(retryable(&Status::aborted("x")));
        assert!(retryable(&Status::deadline_exceeded("x")));
        // INTERNAL or UNKNOWN: only when the connection failed, whatever
        // the message says.
        let goaway = Status::from_error(Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR)));
        assert_eq!(goaway.code(), Code::Internal);
        assert!(retryable(&goaway));
        assert!(!retryable(&Status::internal("h2 protocol error: GOAWAY")));
        assert!(!retryable(&Status::internal("internal error")));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(retryable(&Status::from_error(Box::new(reset))));
        assert!(is_transport_error(&retry::guard_expired()));
        assert!(!is_transport_error(&Status::unavailable(
            "the read model (Redis) is unavailable; retry later"
        )));
        assert!(!retryable(&Status::already_exists("x")));
        assert!(!retryable(&Status::invalid_argument("x")));
    }
}
