//! What the watchdog does to a wedged producer (librdkafka #5301) costs no
//! acknowledged write: the replacement publishes at once, and a call whose
//! message the old client held gets an error its caller retries.

use crate::helpers::{kafka_link, unique};
use std::time::Duration;
use user_service::{
    domain::{Email, User, UserCreated, UserId, UserName},
    kafka::{EventPublisher, KafkaError, ensure_topics},
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
    let timeout = Duration::from_secs(5);
    let publisher =
        EventPublisher::new(&kafka_link(), &topic, timeout, Duration::from_millis(2)).unwrap();
    let before = publisher.publish(&event(1), 0).await.unwrap();
    // Replace while calls are in flight: each ends, acknowledged or with an
    // error its caller retries (purged), never hanging.
    let in_flight: Vec<_> = (2..50)
        .map(|id| {
            let p = publisher.clone();
            tokio::spawn(async move { p.publish(&event(id), (id % 3) as i32).await })
        })
        .collect();
    assert_eq!(publisher.replacements(), 0);
    publisher.replace();
    assert_eq!(publisher.replacements(), 1, "the client was replaced");
    for call in in_flight {
        let ended = tokio::time::timeout(timeout * 2, call)
            .await
            .expect("a call in flight at the replacement ends")
            .unwrap();
        if let Err(e) = ended {
            assert!(matches!(e, KafkaError::Unavailable(_)), "retryable: {e:?}");
        }
    }
    // The new client's first publish: acknowledged, well within the
    // publish timeout (a client that had to wait out the old one's
    // messages, or never reached the broker, would not be).
    let began = std::time::Instant::now();
    let after = tokio::time::timeout(Duration::from_secs(2), publisher.publish(&event(100), 0))
        .await
        .expect("the replacement publishes at once")
        .expect("and is acknowledged");
    assert_eq!(after.partition, 0);
    assert!(
        after.offset > before.offset,
        "after {after:?}, before {before:?}"
    );
    eprintln!("first publish of the new client: {:?}", began.elapsed());
}
