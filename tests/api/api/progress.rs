//! `ProjectionService`: the group's progress per partition, live, from any
//! instance, agreeing with Kafka's own tool.

use crate::helpers::{
    OwnRedis, TestApp, delete_keys, producer, publish_user_created, spawn_app, spawn_app_with,
    test_config, wait_until,
};
use futures::StreamExt;
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};
use tonic::{Code, Streaming};
use user_service::domain::{UserId, partition_map::user_partition};
use user_service::proto::user::v1::{
    GetProgressRequest, GroupState, PartitionStatus, ProgressSnapshot, WatchProgressRequest,
    WatchProgressResponse,
};

fn every(ms: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

async fn watch(
    app: &TestApp,
    req: WatchProgressRequest,
) -> Result<Streaming<WatchProgressResponse>, tonic::Status> {
    app.progress
        .clone()
        .watch_progress(req)
        .await
        .map(|r| r.into_inner())
}

async fn watch_every(
    app: &TestApp,
    ms: i64,
) -> Result<Streaming<WatchProgressResponse>, tonic::Status> {
    watch(
        app,
        WatchProgressRequest {
            interval: every(ms),
            ..Default::default()
        },
    )
    .await
}

async fn next(stream: &mut Streaming<WatchProgressResponse>) -> ProgressSnapshot {
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("a snapshot every interval")
        .expect("the stream is open")
        .expect("no error")
        .snapshot
        .expect("a snapshot")
}

async fn snapshot(app: &TestApp) -> ProgressSnapshot {
    app.progress
        .clone()
        .get_progress(GetProgressRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
}

#[tokio::test]
async fn lag_reads_n_and_stalled_while_redis_is_down_then_zero_and_ok() {
    let mut redis = OwnRedis::start();
    let mut config = test_config();
    redis.use_in(&mut config);
    config.redis_timeout = Duration::from_millis(500);
    let app = spawn_app_with(config).await;
    app.wait_assigned().await;

    let mut stream = watch_every(&app, 200).await.unwrap();
    // The partition map's record (offset 0 of partition 0) applied and
    // committed: no lag.
    let (first, _) = until(
        &mut stream,
        "no lag",
        Duration::from_secs(30),
        |_| {},
        |s| s.totals.unwrap().total_lag == 0,
    )
    .await;
    assert_eq!(first.group, app.config.consumer_group);
    assert_eq!(first.partitions.len(), app.config.topic_partitions as usize);

    // Pause the projector by taking Redis away, then produce N events.
    redis.stop();
    let n = 30;
    let p = producer();
    for id in 1..=n {
        publish_user_created(&p, &app.config.topic, id, &format!("user {id}")).await;
    }
    let mut seen = vec![first];
    loop {
        let s = next(&mut stream).await;
        seen.push(s.clone());
        let stalled = s
            .partitions
            .iter()
            .filter(|p| p.lag > 0)
            .all(|p| p.status() == PartitionStatus::Stalled);
        if s.totals.unwrap().total_lag == n && stalled {
            assert!(s.partitions.iter().all(|p| p.owner.is_some()));
            break;
        }
        assert!(seen.len() < 200, "never saw lag {n} and STALLED: {s:#?}");
    }

    redis.restart();
    loop {
        let s = next(&mut stream).await;
        seen.push(s.clone());
        if s.totals.unwrap().total_lag == 0
            && s.partitions
                .iter()
                .all(|p| p.status() == PartitionStatus::Ok)
        {
            // Caught up: this instance, the only member, applied every event
            // and committed it; both offsets are the log end.
            for p in &s.partitions {
                assert!(
                    p.log_end_offset > 0,
                    "ids 1..={n} put events on every partition: {s:#?}"
                );
                assert_eq!(
                    p.applied_offset,
                    Some(p.log_end_offset),
                    "partition {}: applied",
                    p.partition
                );
                assert_eq!(
                    p.committed_offset,
                    Some(p.log_end_offset),
                    "partition {}: committed",
                    p.partition
                );
            }
            break;
        }
        assert!(seen.len() < 400, "never caught up: {s:#?}");
    }

    // Figures that must not go backwards did not.
    for pair in seen.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            b.time.unwrap().seconds * 1_000_000_000 + b.time.unwrap().nanos as i64
                >= a.time.unwrap().seconds * 1_000_000_000 + a.time.unwrap().nanos as i64
        );
        for (pa, pb) in a.partitions.iter().zip(&b.partitions) {
            assert!(pb.log_end_offset >= pa.log_end_offset);
            assert!(pb.committed_offset.unwrap_or(0) >= pa.committed_offset.unwrap_or(0));
        }
    }
    app.stop()
        .await
        .expect("an open progress stream does not hold shutdown");
}

/// `kafka-consumer-groups --describe`, from the tools jar the stack installed:
/// partition → (current offset, log end, lag, consumer id).
fn official_describe(group: &str) -> BTreeMap<i32, (Option<i64>, i64, Option<i64>, String)> {
    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka-tool");
    let mut args = vec![
        "consumer-groups".to_owned(),
        "--bootstrap-server".to_owned(),
        crate::helpers::kafka_brokers(),
        "--describe".to_owned(),
        "--group".to_owned(),
        group.to_owned(),
    ];
    let props = crate::helpers::kafka_tool_properties();
    if let Some(p) = &props {
        args.extend(["--command-config".to_owned(), p.display().to_string()]);
    }
    let out = std::process::Command::new(tool)
        .args(&args)
        .output()
        .expect("scripts/kafka-tool runs");
    if let Some(p) = &props {
        let _ = std::fs::remove_file(p); // it holds a password
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut rows = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(group)) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID
        let num = |s: &str| s.parse::<i64>().ok();
        rows.insert(
            cols[2].parse().unwrap(),
            (
                num(cols[3]),
                cols[4].parse().unwrap(),
                num(cols[5]),
                cols[6].to_owned(),
            ),
        );
    }
    rows
}

#[tokio::test]
async fn figures_agree_with_kafka_consumer_groups_describe() {
    let app = spawn_app().await;
    let mut last = None;
    for i in 0..20 {
        last = Some(app.create(&format!("u{i}"), "u@example.com").await.unwrap());
    }
    let last = last.unwrap();
    app.get_at(
        last.user.unwrap().id,
        last.position,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    // Wait for the auto-commit to catch up with what was applied.
    wait_until(Duration::from_secs(30), || async {
        snapshot(&app).await.totals.unwrap().total_lag == 0
    })
    .await
    .expect("lag reaches 0");

    let ours = snapshot(&app).await;
    let theirs = official_describe(&app.config.consumer_group);
    assert_eq!(ours.state(), GroupState::Stable);
    assert_eq!(
        theirs.len(),
        app.config.topic_partitions as usize,
        "{theirs:?}"
    );
    for p in &ours.partitions {
        let (current, log_end, lag, consumer) = &theirs[&p.partition];
        assert_eq!(p.committed_offset, *current, "partition {}", p.partition);
        assert_eq!(p.log_end_offset, *log_end, "partition {}", p.partition);
        assert_eq!(Some(p.lag), *lag, "partition {}", p.partition);
        assert_eq!(
            &p.owner.as_ref().unwrap().member_id,
            consumer,
            "partition {}",
            p.partition
        );
    }
    assert_eq!(ours.totals.unwrap().total_lag, 0);
    app.stop().await.expect("clean stop");
}

/// GetProgress until `done` holds of a snapshot, which it returns; fails the
/// test with the last snapshot after `limit`.
async fn snapshot_until(
    app: &TestApp,
    what: &str,
    limit: Duration,
    mut done: impl FnMut(&ProgressSnapshot) -> bool,
) -> ProgressSnapshot {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let s = snapshot(app).await;
        if done(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {what} within {limit:?}; last snapshot: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes one event on each of `partitions` (ids from `next_id` up,
/// chosen by the service's partitioner).
async fn one_event_per_partition(topic: &str, partitions: &BTreeSet<i32>, next_id: &mut i64) {
    let p = producer();
    let count = partitions.len() as i32;
    for partition in partitions {
        while user_partition(UserId::parse(*next_id).unwrap(), count) != *partition {
            *next_id += 1;
        }
        publish_user_created(&p, topic, *next_id, "owned").await;
        *next_id += 1;
    }
}

/// The log end of a partition of a topic the service made, after `events`
/// events there: partition 0 starts with the topic's partition map.
fn log_end_after(partition: i32, events: i64) -> i64 {
    events + i64::from(partition == 0)
}

/// Each partition's applied offset in `s` is the log end for the partitions
/// `own`ed by the instance that answered, and unknown for the others.
fn applied_only_by_the_owner(s: &ProgressSnapshot, own: &BTreeSet<i32>, events: i64) -> bool {
    s.partitions.iter().all(|p| {
        let log_end = log_end_after(p.partition, events);
        p.log_end_offset == log_end
            && p.applied_offset == own.contains(&p.partition).then_some(log_end)
    })
}

#[tokio::test]
async fn either_instance_reports_every_partition_with_its_owner() {
    let a = spawn_app().await;
    a.wait_assigned().await;
    let all: BTreeSet<i32> = (0..a.config.topic_partitions).collect();
    assert_eq!(
        a.stats().assignment,
        all,
        "the only member owns every partition"
    );
    // Applied by the only member: it reports every partition as applied.
    let mut next_id = 1;
    one_event_per_partition(&a.config.topic, &all, &mut next_id).await;
    snapshot_until(
        &a,
        "every partition applied by the only member",
        Duration::from_secs(60),
        |s| applied_only_by_the_owner(s, &all, 1),
    )
    .await;

    let b = spawn_app_with(a.config.clone()).await;
    wait_until(Duration::from_secs(60), || async {
        !a.stats().assignment.is_empty() && !b.stats().assignment.is_empty()
    })
    .await
    .expect("both own partitions");

    for app in [&a, &b] {
        // The group may still be settling: wait until it reports two members
        // sharing every partition.
        let s = snapshot_until(
            app,
            "two members owning every partition",
            Duration::from_secs(60),
            |s| {
                s.members.len() == 2
                    && s.partitions.iter().all(|p| p.owner.is_some())
                    && s.partitions
                        .iter()
                        .map(|p| p.owner.as_ref().unwrap().member_id.clone())
                        .collect::<BTreeSet<_>>()
                        .len()
                        == 2
            },
        )
        .await;
        assert_eq!(
            s.partitions
                .iter()
                .map(|p| p.partition)
                .collect::<BTreeSet<_>>(),
            all
        );
        for p in &s.partitions {
            let owner = p.owner.as_ref().unwrap();
            assert!(owner.client_id.starts_with("user-service@"));
            assert!(!owner.host.is_empty());
        }
    }

    // Only the owning instance knows its applied offset: after one more event
    // on every partition, each instance reports the log end as applied for
    // the partitions it owns now, and nothing for those it gave away.
    one_event_per_partition(&a.config.topic, &all, &mut next_id).await;
    for app in [&a, &b] {
        snapshot_until(
            app,
            "the owner's applied offsets, and only its own",
            Duration::from_secs(60),
            |s| {
                let own = app.stats().assignment;
                own.len() < all.len() && applied_only_by_the_owner(s, &own, 2)
            },
        )
        .await;
    }
    b.stop().await.expect("clean stop");
    a.stop().await.expect("clean stop");
}

#[tokio::test]
async fn watchers_are_bounded_share_one_poller_and_reconnect() {
    let mut config = test_config();
    config.max_progress_watchers = 4;
    let app = spawn_app_with(config).await;
    // Kafka describes a new group within moments, longer while many tests
    // run: the checks below need its answer, so wait for one.
    wait_until(Duration::from_secs(30), || app.progress_answers())
        .await
        .expect("the own group's progress");

    // Bad requests.
    let err = watch_every(&app, 50).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = watch(
        &app,
        WatchProgressRequest {
            partitions: vec![7],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = watch(
        &app,
        WatchProgressRequest {
            group: "no-such-group-anywhere".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "not on the allowlist");
    let err = app
        .progress
        .clone()
        .get_progress(GetProgressRequest {
            topic: "no-such-topic-anywhere".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "not on the allowlist");

    // Four watchers of one group, each with its first snapshot at once.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut s = watch(
            &app,
            WatchProgressRequest {
                interval: every(200),
                partitions: vec![1],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let first = next(&mut s).await;
        assert_eq!(first.partitions.len(), 1, "filtered to partition 1");
        streams.push(s);
    }
    let err = watch(&app, WatchProgressRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // A quiet group still gets a snapshot per interval, and the four share
    // one poll of Kafka per interval instead of one each.
    let polls_before = app.handle.progress.polls();
    let mut times = vec![Vec::new(); streams.len()];
    for _ in 0..10 {
        for (s, t) in streams.iter_mut().zip(times.iter_mut()) {
            let snap = next(s).await;
            let time = snap.time.unwrap();
            t.push(time.seconds * 1_000_000_000 + time.nanos as i64);
        }
    }
    let polls = app.handle.progress.polls() - polls_before;
    assert!(polls <= 20, "40 snapshots to 4 watchers took {polls} polls");
    for t in &times {
        assert!(
            t.windows(2).all(|w| w[1] > w[0]),
            "each snapshot is a fresh poll: {t:?}"
        );
    }

    // A watcher that leaves frees its slot; a new one can join.
    drop(streams.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let rejoined = loop {
        match watch_every(&app, 200).await {
            Ok(s) => break s,
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot of the watcher that left never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    streams.push(rejoined);

    // A faster watcher joining a slowly polled group still gets fresh polls.
    drop(streams);
    let mut streams = Vec::new();
    let mut slow = watch_every(&app, 3_600_000).await.unwrap();
    next(&mut slow).await;
    let mut fast = watch_every(&app, 200).await.unwrap();
    let mut fast_times = Vec::new();
    for _ in 0..4 {
        let t = next(&mut fast).await.time.unwrap();
        fast_times.push(t.seconds * 1_000_000_000 + t.nanos as i64);
    }
    assert!(
        fast_times.windows(2).all(|w| w[1] > w[0]),
        "fresh polls for the fast watcher: {fast_times:?}"
    );
    streams.push(slow);
    streams.push(fast);

    // Shutdown ends every stream.
    app.stop()
        .await
        .expect("open progress streams do not hold shutdown");
    for mut s in streams {
        while let Some(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("the stream ends")
        {}
    }
}

/// Snapshots from `stream` until one satisfies `done`, checking `each` on
/// every one; returns the one that did and how many were read.
async fn until(
    stream: &mut Streaming<WatchProgressResponse>,
    what: &str,
    limit: Duration,
    mut each: impl FnMut(&ProgressSnapshot),
    mut done: impl FnMut(&ProgressSnapshot) -> bool,
) -> (ProgressSnapshot, usize) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = 0;
    loop {
        let s = next(stream).await;
        seen += 1;
        each(&s);
        if done(&s) {
            return (s, seen);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {what}: {s:#?}"
        );
    }
}

/// The read model is caught up: every partition's checkpoint in Redis is at
/// the log end, and Kafka's verdict is OK.
fn caught_up(s: &ProgressSnapshot, events: i64) -> bool {
    // The partition map's record is one more.
    s.partitions.iter().map(|p| p.log_end_offset).sum::<i64>() == events + 1
        && s.partitions.iter().all(|p| {
            p.read_model_offset == Some(p.log_end_offset)
                && p.rebuild_target_offset.is_none()
                && p.status() == PartitionStatus::Ok
        })
}

#[tokio::test]
async fn the_read_models_checkpoint_is_reported_and_a_lost_redis_is_rebuilding_until_caught_up() {
    // One event per apply, so replaying a few thousand takes a while: the
    // rebuild is a window a 100 ms watcher sees many times, not a blink.
    let mut config = test_config();
    config.projector_batch_size = 1;
    let app = spawn_app_with(config).await;
    app.wait_opened().await;
    let mut stream = watch_every(&app, 100).await.unwrap();

    // Users published straight to the topic, as other instances would.
    let events: i64 = 10_000;
    let p = producer();
    let topic = app.config.topic.clone();
    futures::stream::iter(1..=events)
        .map(|id| {
            let (p, topic) = (&p, &topic);
            async move { publish_user_created(p, topic, id, &format!("user {id}")).await }
        })
        .buffer_unordered(500)
        .collect::<Vec<_>>()
        .await;

    // Every snapshot: the read model never passes the log end, and a rebuild
    // target is reported exactly when the partition is REBUILDING.
    let consistent = |s: &ProgressSnapshot| {
        for p in &s.partitions {
            assert!(
                p.read_model_offset.unwrap_or(0) <= p.log_end_offset,
                "partition {}: {p:?}",
                p.partition
            );
            if p.owner.is_none() {
                // STOPPED wins over REBUILDING.
                assert_eq!(p.status(), PartitionStatus::Stopped, "{p:?}");
            } else {
                assert_eq!(
                    p.rebuild_target_offset.is_some(),
                    p.status() == PartitionStatus::Rebuilding,
                    "{p:?}"
                );
            }
        }
    };
    let (before, _) = until(
        &mut stream,
        "the read model caught up",
        Duration::from_secs(120),
        consistent,
        |s| caught_up(s, events),
    )
    .await;
    assert_eq!(
        before.partitions.len(),
        app.config.topic_partitions as usize
    );

    // Redis loses this service's data; the projector replays from the log.
    delete_keys(&app.config).await;
    let (rebuilding, _) = until(
        &mut stream,
        "a partition REBUILDING",
        Duration::from_secs(60),
        consistent,
        |s| {
            s.partitions
                .iter()
                .any(|p| p.status() == PartitionStatus::Rebuilding)
        },
    )
    .await;
    for p in rebuilding
        .partitions
        .iter()
        .filter(|p| p.status() == PartitionStatus::Rebuilding)
    {
        // The target is the log end seen when the loss was found (nothing
        // was published since), and the read model is short of it.
        assert_eq!(p.rebuild_target_offset, Some(p.log_end_offset), "{p:?}");
        let at = p
            .read_model_offset
            .expect("a rebuilding partition has a checkpoint");
        assert!((0..p.log_end_offset).contains(&at), "{p:?}");
    }

    let mut rebuilding_seen = 1;
    let (after, seen) = until(
        &mut stream,
        "the rebuilt read model caught up",
        Duration::from_secs(120),
        |s| {
            consistent(s);
            if s.partitions
                .iter()
                .any(|p| p.status() == PartitionStatus::Rebuilding)
            {
                rebuilding_seen += 1;
            }
        },
        |s| caught_up(s, events),
    )
    .await;
    assert_eq!(
        after
            .partitions
            .iter()
            .map(|p| (p.partition, p.log_end_offset))
            .collect::<Vec<_>>(),
        before
            .partitions
            .iter()
            .map(|p| (p.partition, p.log_end_offset))
            .collect::<Vec<_>>(),
    );
    eprintln!("snapshots while rebuilding: {rebuilding_seen}, until caught up: {seen}");
    app.stop().await.expect("clean stop");
}
