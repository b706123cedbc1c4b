//! Reads a group's progress from Kafka with rdkafka's consumer API: a consumer
//! that carries the group's id but never subscribes asks for the committed
//! offsets, the watermarks and the group's description (members, client ids,
//! hosts, assignments). rdkafka 0.39's admin client lacks those calls; this
//! route needs no `unsafe`.

use super::model::{GroupState, Member, Observation, RawPartition};
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use std::time::{Duration, SystemTime};

/// Why progress could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("group {0:?} is not known to Kafka")]
    UnknownGroup(String),
    #[error("kafka unavailable: {0}")]
    Unavailable(String),
}

/// A non-subscribing consumer in the watched group.
pub struct GroupReader {
    consumer: BaseConsumer,
    group: String,
    topic: String,
    timeout: Duration,
}

impl GroupReader {
    pub fn new(
        link: &crate::kafka::KafkaLink,
        group: &str,
        topic: &str,
        timeout: Duration,
    ) -> Result<Self, ProgressError> {
        let consumer = link
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set(
                "client.id",
                format!("{}-progress", crate::kafka::client_id()),
            )
            .create()
            .map_err(|e| ProgressError::Unavailable(e.to_string()))?;
        Ok(Self {
            consumer,
            group: group.to_owned(),
            topic: topic.to_owned(),
            timeout,
        })
    }

    /// One poll. Blocking: call it from `spawn_blocking`.
    pub fn observe(&self) -> Result<Observation, ProgressError> {
        let unavailable = |e: rdkafka::error::KafkaError| ProgressError::Unavailable(e.to_string());
        let time = SystemTime::now();
        let at = std::time::Instant::now();

        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), self.timeout)
            .map_err(unavailable)?;
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .ok_or_else(|| ProgressError::UnknownTopic(self.topic.clone()))?;
        let mut ids: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();

        let mut tpl = TopicPartitionList::new();
        for &p in &ids {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, self.timeout)
            .map_err(unavailable)?;

        let mut partitions = Vec::with_capacity(ids.len());
        for &p in &ids {
            let (log_start, log_end) = self
                .consumer
                .fetch_watermarks(&self.topic, p, self.timeout)
                .map_err(unavailable)?;
            let committed =
                committed
                    .find_partition(&self.topic, p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) if o >= 0 => Some(o),
                        _ => None,
                    });
            partitions.push(RawPartition {
                partition: p,
                committed,
                log_start,
                log_end,
            });
        }

        let groups = self
            .consumer
            .fetch_group_list(Some(&self.group), self.timeout)
            .map_err(unavailable)?;
        let (state, members) = match groups.groups().iter().find(|g| g.name() == self.group) {
            Some(g) => (
                GroupState::from_kafka(g.state()),
                g.members()
                    .iter()
                    .map(|m| Member {
                        member_id: m.id().to_owned(),
                        client_id: m.client_id().to_owned(),
                        host: m.client_host().to_owned(),
                        partitions: m
                            .assignment()
                            .map(|a| assigned_partitions(a, &self.topic))
                            .unwrap_or_default(),
                    })
                    .collect(),
            ),
            None => (GroupState::Dead, Vec::new()),
        };
        Ok(Observation {
            time,
            at,
            state,
            members,
            partitions,
        })
    }
}

/// The partitions of `topic` in a classic consumer-protocol assignment
/// (`ConsumerProtocolAssignment`, versions 0–3: int16 version, then an array of
/// (string topic, array of int32 partitions), then user data). Malformed
/// bytes give what was read so far.
pub fn assigned_partitions(bytes: &[u8], topic: &str) -> Vec<i32> {
    struct Reader<'a>(&'a [u8]);
    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
            let (head, rest) = self.0.split_at_checked(N)?;
            self.0 = rest;
            head.try_into().ok()
        }
        fn i16(&mut self) -> Option<i16> {
            self.take::<2>().map(i16::from_be_bytes)
        }
        fn i32(&mut self) -> Option<i32> {
            self.take::<4>().map(i32::from_be_bytes)
        }
        fn string(&mut self) -> Option<&[u8]> {
            let len = usize::try_from(self.i16()?).ok()?;
            let (s, rest) = self.0.split_at_checked(len)?;
            self.0 = rest;
            Some(s)
        }
    }
    let mut r = Reader(bytes);
    let mut out = Vec::new();
    let _version = r.i16();
    let Some(topics) = r.i32() else { return out };
    for _ in 0..topics.max(0) {
        let Some(name) = r.string() else { return out };
        let mine = name == topic.as_bytes();
        let Some(n) = r.i32() else { return out };
        for _ in 0..n.max(0) {
            let Some(p) = r.i32() else { return out };
            if mine {
                out.push(p);
            }
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_consumer_protocol_assignment() {
        let mut b = vec![0, 1]; // version 1
        b.extend(2i32.to_be_bytes()); // two topics
        for (name, parts) in [("other", vec![9i32]), ("users", vec![2, 0])] {
            b.extend((name.len() as i16).to_be_bytes());
            b.extend(name.as_bytes());
            b.extend((parts.len() as i32).to_be_bytes());
            for p in parts {
                b.extend(p.to_be_bytes());
            }
        }
        b.extend((-1i32).to_be_bytes()); // null user data
        assert_eq!(assigned_partitions(&b, "users"), vec![0, 2]);
        assert_eq!(assigned_partitions(&b, "other"), vec![9]);
        assert!(assigned_partitions(&b[..5], "users").is_empty());
        assert!(assigned_partitions(&[], "users").is_empty());
    }
}
