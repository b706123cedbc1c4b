//! The round trip the rest relies on, with the engines alone: a 3-partition
//! topic, keyed records, a consumer group that commits and resumes at its
//! committed offsets, and a key through the bb8 Redis pool.

use crate::helpers::{kafka_link, producer, unique};
use rdkafka::{
    Message, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
    producer::FutureRecord,
};
use std::{collections::HashMap, time::Duration};

fn group_consumer(group: &str) -> StreamConsumer {
    kafka_link()
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("a consumer")
}

async fn produce(topic: &str, keys: impl Iterator<Item = String>) -> Vec<(String, i32, i64)> {
    let p = producer();
    let mut out = Vec::new();
    for key in keys {
        let d = p
            .send(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&format!("v-{key}")),
                Duration::from_secs(10),
            )
            .await
            .expect("the broker acknowledges");
        out.push((key, d.partition, d.offset));
    }
    out
}

async fn consume(c: &StreamConsumer, n: usize) -> Vec<(String, i32, i64)> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
            .await
            .expect("records arrive")
            .expect("no consumer error");
        got.push((
            String::from_utf8_lossy(m.key().unwrap()).into_owned(),
            m.partition(),
            m.offset(),
        ));
    }
    got
}

#[tokio::test]
async fn kafka_group_commits_and_resumes_and_redis_pool_round_trips() {
    let topic = unique("roundtrip");
    let group = unique("roundtrip-group");
    user_service::kafka::ensure_topics(&kafka_link(), &[&topic], 3, 1, Duration::from_secs(10))
        .await
        .expect("topic created");

    // Keyed records land where Java's murmur2 partitioner puts them.
    let first = produce(&topic, (0..30).map(|i| format!("user-{i}"))).await;
    for (key, partition, _) in &first {
        assert_eq!(
            *partition,
            user_service::domain::partition_map::partition_for_key(key.as_bytes(), 3),
            "key {key}"
        );
    }
    assert_eq!(
        first
            .iter()
            .map(|r| r.1)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        3
    );

    // A group member reads all 30 and commits.
    let c = group_consumer(&group);
    c.subscribe(&[&topic]).unwrap();
    let mut got = consume(&c, 30).await;
    got.sort();
    let mut want = first.clone();
    want.sort();
    assert_eq!(got, want);
    c.commit_consumer_state(CommitMode::Sync).expect("commit");
    drop(c);

    // More records; a new member of the same group starts at the committed
    // offsets: it sees exactly the new ones.
    let second = produce(&topic, (30..39).map(|i| format!("user-{i}"))).await;
    let c = group_consumer(&group);
    c.subscribe(&[&topic]).unwrap();
    let mut got = consume(&c, 9).await;
    got.sort();
    let mut want = second.clone();
    want.sort();
    assert_eq!(got, want, "resumed at the committed offsets");
    // Nothing else is waiting.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.recv())
            .await
            .is_err()
    );

    // The committed offsets are what a new member resumed from: the first batch's ends.
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(&topic, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for (_, p, o) in &first {
        let e = ends.entry(*p).or_default();
        *e = (*e).max(o + 1);
    }
    for (p, end) in ends {
        let offset = committed
            .find_partition(&topic, p)
            .unwrap()
            .offset()
            .to_raw()
            .unwrap();
        assert_eq!(offset, end, "partition {p}");
    }

    // Redis through the bb8 pool.
    let manager = bb8_redis::RedisConnectionManager::new(
        crate::helpers::redis_client(&crate::helpers::test_config())
            .get_connection_info()
            .clone(),
    )
    .unwrap();
    let pool = bb8::Pool::builder()
        .max_size(4)
        .build(manager)
        .await
        .unwrap();
    let key = unique("roundtrip-key");
    let mut conn = pool.get().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("hello")
        .arg("EX")
        .arg(60)
        .query_async(&mut *conn)
        .await
        .unwrap();
    let back: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut *conn)
        .await
        .unwrap();
    assert_eq!(back, "hello");
}
