//! A record that cannot be decoded goes to the dead-letter topic, is counted,
//! and does not hold its partition back.

use crate::helpers::{group_lag, kafka_link, producer, spawn_app, unique, wait_until};
use rdkafka::{
    Message,
    consumer::{Consumer, StreamConsumer},
    message::Headers,
    producer::FutureRecord,
};
use std::{collections::HashMap, time::Duration};

#[tokio::test]
async fn poison_records_go_to_the_dead_letter_topic_and_the_partitions_move_on() {
    let app = spawn_app().await;
    let p = producer();
    let poison: [&[u8]; 3] = [
        b"{not json",
        br#"{"schema_version":99,"type":"UserCreated"}"#,
        b"\xff\xfe",
    ];
    for (partition, payload) in poison.iter().enumerate() {
        p.send(
            FutureRecord::to(&app.config.topic)
                .partition(partition as i32)
                .key("poison")
                .payload(*payload),
            Duration::from_secs(10),
        )
        .await
        .expect("poison produced");
    }
    // Users after the poison, on every partition, still arrive.
    let mut created = Vec::new();
    for i in 0..12 {
        created.push(
            app.create(&format!("after {i}"), "after@example.com")
                .await
                .unwrap(),
        );
    }
    for c in &created {
        let u = c.user.clone().unwrap();
        assert_eq!(
            app.get_at(u.id, c.position, Duration::from_secs(30))
                .await
                .unwrap(),
            u
        );
    }
    wait_until(Duration::from_secs(30), || async {
        app.stats().dead_lettered == 3
    })
    .await
    .unwrap_or_else(|_| panic!("3 dead letters, got {:?}", app.stats()));

    // The dead-letter topic has the records, with why and where from.
    let c: StreamConsumer = kafka_link()
        .client_config()
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[&app.config.dlq_topic()]).unwrap();
    let mut seen = HashMap::new();
    while seen.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
            .await
            .unwrap()
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
        assert!(!headers["dlq.reason"].is_empty());
        assert_eq!(headers["dlq.topic"], app.config.topic);
        seen.insert(
            headers["dlq.partition"].clone(),
            m.payload().unwrap_or_default().to_vec(),
        );
    }
    assert_eq!(seen["0"], poison[0]);
    assert!(seen["1"].starts_with(b"{\"schema_version\":99"));

    let config = app.config.clone();
    app.stop().await.expect("clean stop");
    assert_eq!(
        group_lag(&config.consumer_group, &config.topic, 3),
        0,
        "poison committed too"
    );
}
