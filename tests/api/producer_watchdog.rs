//! What the watchdog does to a wedged producer (librdkafka #5301) costs no
//! acknowledged write: the replacement publishes at once, and a call whose
//! message the old client held gets an error its caller retries.

use crate::helpers::{kafka_link, unique};
use std::time::Duration;
use user_service::{
    domain::{Email, User, UserCreated, UserId, UserName},
    kafka::{EventPublisher, ensure_topics},
};

fn event(id: i64) -> UserCreated {
    UserCreated::new(
        User {
            id: UserId::parse(id).unwrap(),
            name: UserName::parse("Ada").unwrap(),
            email: Email::parse("ada@example.com").unwrap(),
            created_at_ms: 0,
        },
        None,
    )
}

#[tokio::test]
async fn a_replaced_producer_publishes_at_once() {
    let topic = unique("watchdog");
    ensure_topics(&kafka_link(), &[&topic], 3, 1, Duration::from_secs(10))
        .await
        .unwrap();
    let publisher = EventPublisher::new(
        &kafka_link(),
        &topic,
        Duration::from_secs(5),
        Duration::from_millis(2),
    )
    .unwrap();
    let before = publisher.publish(&event(1), 0).await.unwrap();
    // Replace while calls are in flight: each ends, acknowledged or with an
    // error (purged), never hanging.
    let in_flight: Vec<_> = (2..50)
        .map(|id| {
            let p = publisher.clone();
            tokio::spawn(async move { p.publish(&event(id), (id % 3) as i32).await })
        })
        .collect();
    assert_eq!(publisher.client_health().replacements(), 0);
    publisher.replace();
    // Counted, for user_service_kafka_client_replacements_total.
    assert_eq!(publisher.client_health().replacements(), 1);
    for call in in_flight {
        let _ = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("a call in flight at the replacement ends");
    }
    let after = publisher.publish(&event(100), 1).await.unwrap();
    assert!(after.offset >= 0 && before.offset >= 0);
}
