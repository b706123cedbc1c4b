//! A drop-in successor to the article's Go service (docs/migrating-from-go.md):
//! on a topic the Go service wrote, its events become users wherever its
//! writer's balancer put them (re-homed to their ids' partitions), what cannot
//! be applied is dead-lettered with a reason, an id the two read models
//! disagree on is reported, and every replay reaches the same users.

use crate::helpers::{
    TestApp, delete_keys, kafka_link, log_end_offsets, producer, raw_hset, read_log_all, scrape,
    spawn_app_with, test_config, unique, wait_until,
};
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
    message::Headers,
    producer::FutureRecord,
};
use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};
use tonic::Code;
use user_service::{
    domain::{PartitionMap, UserCreated, UserId},
    kafka::ensure_topics,
    projector::REHOMED_FROM,
    proto::user::v1::{GetUserRequest, Position, User},
    store::Keys,
};

const PARTITIONS: i32 = 3;

/// The article's event, as its Go code writes it (`json.Marshal(userInfo)`,
/// tests/golden/article-*.json).
fn article_event(id: i64, name: &str, email: &str, create_time: &str) -> Vec<u8> {
    format!(
        r#"{{"id":{id},"name":{},"email":{},"create_time":"{create_time}"}}"#,
        serde_json::to_string(name).unwrap(),
        serde_json::to_string(email).unwrap(),
    )
    .into_bytes()
}

fn home(id: i64) -> i32 {
    PartitionMap {
        partitions: PARTITIONS,
        offset: 0,
    }
    .home(UserId::parse(id).unwrap())
}

/// What the Go era left: `(partition, id, value)` in the order written.
/// kafka-go's `LeastBytes` spreads records over the partitions whatever
/// their key; round robin stands in for it.
fn go_era() -> Vec<(i32, i64, Vec<u8>)> {
    let mut records = Vec::new();
    for i in 0..30 {
        let id = 1_000_000 + i;
        let value = article_event(
            id,
            &format!("go user {i}"),
            &format!("g{i}@example.com"),
            &format!("2025-11-25T13:40:{i:02}.123456789Z"),
        );
        records.push(((i % 3) as i32, id, value));
    }
    // The same user written again (a retry) elsewhere: the two models agree.
    let (_, id, value) = records[2].clone();
    records.push(((home(id) + 1) % PARTITIONS, id, value));
    // Another user under a taken id, later, elsewhere: the Go service's read
    // model kept this one, this service keeps the first. (The first is in
    // its home partition, so its copy cannot land after this one's.)
    let taken = records
        .iter()
        .position(|(partition, id, _)| *partition == home(*id))
        .expect("an event in its home partition");
    records.push((
        (home(TAKEN_ID + taken as i64) + 1) % PARTITIONS,
        TAKEN_ID + taken as i64,
        article_event(
            TAKEN_ID + taken as i64,
            "renamed",
            "renamed@example.com",
            "2025-11-25T14:00:00Z",
        ),
    ));
    records
}

/// The first id of the Go era.
const TAKEN_ID: i64 = 1_000_000;

/// Every user of the Go era reads back, as its first event made it, with
/// the position of the event that created it; a read the projector cannot
/// answer yet (still re-homing) is retried.
async fn read_users(app: &TestApp) -> BTreeMap<i64, (User, Position)> {
    let mut users = BTreeMap::new();
    for i in 0..30 {
        let id = TAKEN_ID + i;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let (user, position) = loop {
            let got = app
                .users
                .clone()
                .get_user(GetUserRequest {
                    id,
                    min_position: None,
                })
                .await;
            match got.map(tonic::Response::into_inner) {
                Ok(r) => break (r.user.unwrap(), r.position.unwrap()),
                Err(s)
                    if matches!(s.code(), Code::Unavailable | Code::NotFound)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(s) => panic!("user {id}: {s:?}"),
            }
        };
        assert_eq!(user.name, format!("go user {i}"), "the first event wins");
        assert_eq!(user.email, format!("g{i}@example.com"));
        let t = user.create_time.unwrap();
        // 2025-11-25T13:40:ssZ, kept to the millisecond.
        assert_eq!((t.seconds, t.nanos), (1_764_078_000 + i, 123_000_000));
        assert_eq!(
            position.partition,
            home(id),
            "created in its home partition"
        );
        users.insert(id, (user, position));
    }
    users
}

/// Waits until this instance's projector applied every partition up to (at
/// least) the log's end as it is now.
async fn wait_caught_up(app: &TestApp, topic: &str) {
    let ends = log_end_offsets(topic);
    wait_until(Duration::from_secs(60), || async {
        let applied = app.stats().applied_offsets;
        ends.iter()
            .all(|(p, end)| *end == 0 || applied.get(p).is_some_and(|a| *a >= end - 1))
    })
    .await
    .unwrap_or_else(|_| panic!("not caught up with {ends:?}: {:?}", app.stats()));
}

/// The dead-letter topic's records: reason by (partition, offset) of origin.
async fn dead_letters(app: &TestApp, n: usize) -> Vec<String> {
    let c: StreamConsumer = kafka_link()
        .client_config()
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[&app.config.dlq_topic()]).unwrap();
    let mut reasons = Vec::new();
    while reasons.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
            .await
            .expect("dead letters")
            .unwrap();
        let headers: HashMap<String, String> = m
            .headers()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        reasons.push(headers["dlq.reason"].clone());
    }
    reasons.sort();
    reasons
}

#[tokio::test]
async fn the_articles_events_become_users_wherever_its_writer_put_them() {
    // The projection is under test: no answers from the instance's memory.
    let mut config = test_config();
    config.user_cache_bytes = 0;
    let topic = config.topic.clone();

    // The topic as the Go service left it, before this service ever ran.
    ensure_topics(
        &kafka_link(),
        &[&topic],
        PARTITIONS,
        1,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let p = producer();
    let mut misplaced = 0;
    for (partition, id, value) in go_era() {
        misplaced += usize::from(partition != home(id));
        p.send(
            FutureRecord::to(&topic)
                .partition(partition)
                .key(&id.to_string())
                .payload(&value),
            Duration::from_secs(10),
        )
        .await
        .expect("the broker acknowledges");
    }
    // What cannot be applied, in either format: an article's event without
    // an email (the Go service accepts it), and this service's own event
    // outside its id's partition.
    let no_email = article_event(1_000_099, "no email", "", "2025-11-25T13:41:00Z");
    let ours = UserCreated::new(
        user_service::domain::User {
            id: UserId::parse(1_000_098).unwrap(),
            name: user_service::domain::UserName::parse("ours").unwrap(),
            email: user_service::domain::Email::parse("o@example.com").unwrap(),
            created_at_ms: 0,
        },
        None,
    );
    for (partition, key, value) in [
        (0, "1000099".to_owned(), no_email),
        (
            (home(1_000_098) + 1) % PARTITIONS,
            ours.key(),
            ours.to_json(),
        ),
    ] {
        p.send(
            FutureRecord::to(&topic)
                .partition(partition)
                .key(&key)
                .payload(&value),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
    assert!(misplaced >= 10, "{misplaced} events outside their home");

    let app = spawn_app_with(config.clone()).await;
    let users = read_users(&app).await;
    wait_until(Duration::from_secs(30), || async {
        let s = app.stats();
        s.rehomed == misplaced as u64 && s.dead_lettered == 2 && s.legacy_superseded == 1
    })
    .await
    .unwrap_or_else(|_| panic!("{misplaced} re-homed, 2 dead letters: {:?}", app.stats()));
    let reasons = dead_letters(&app, 2).await;
    assert!(reasons.iter().any(|r| r.contains("email")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("belong in partition")),
        "{reasons:?}"
    );
    let metrics = scrape(&app).await;
    assert!(
        metrics.contains("user_service_projector_legacy_superseded_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "user_service_projector_events_rehomed_total {misplaced}"
        )),
        "{metrics}"
    );

    // The log: each misplaced event copied once to its id's partition, key
    // and value unchanged, naming its origin; the rest left as they were.
    let log = read_log_all(&topic);
    let by_origin: HashMap<String, &crate::helpers::LogRecord> = log
        .iter()
        .map(|r| (format!("{topic}:{}:{}", r.partition, r.offset), r))
        .collect();
    let copies: Vec<_> = log
        .iter()
        .filter(|r| r.header(REHOMED_FROM).is_some())
        .collect();
    assert_eq!(copies.len(), misplaced);
    for copy in &copies {
        let original = by_origin[copy.header(REHOMED_FROM).unwrap()];
        let id: i64 = String::from_utf8_lossy(copy.key.as_deref().unwrap())
            .parse()
            .unwrap();
        assert_eq!(copy.partition, home(id));
        assert_ne!(original.partition, home(id));
        assert_eq!(
            (&copy.key, &copy.payload),
            (&original.key, &original.payload)
        );
    }
    let config = app.config.clone();
    app.stop().await.expect("clean stop");

    // A replay with the checkpoints' marks intact (a failover to a replica
    // that was behind): the copies already made are not made again.
    let ends = log_end_offsets(&topic);
    let keys = Keys::new(&config.redis_key_prefix, &topic);
    for partition in 0..PARTITIONS {
        raw_hset(&config, &keys.checkpoint(partition), "applied", "-1").await;
    }
    let app = spawn_app_with(config.clone()).await;
    wait_caught_up(&app, &topic).await;
    assert_eq!(read_users(&app).await, users);
    let s = app.stats();
    assert_eq!((s.rehomed, s.legacy_superseded), (0, 1), "{s:?}");
    assert_eq!(log_end_offsets(&topic), ends, "nothing copied again");

    // Redis loses everything, the marks too: the replay copies again, and the
    // later copies create nothing (the first wins in the home partition).
    delete_keys(&config).await;
    wait_until(Duration::from_secs(60), || async {
        app.stats().rehomed >= misplaced as u64
    })
    .await
    .unwrap_or_else(|_| panic!("copied again after the loss: {:?}", app.stats()));
    wait_caught_up(&app, &topic).await;
    assert_eq!(
        read_users(&app).await,
        users,
        "the same users, the same events"
    );
    let after = log_end_offsets(&topic);
    assert!(after.values().sum::<i64>() - ends.values().sum::<i64>() >= misplaced as i64);
    app.stop().await.expect("clean stop");
}
