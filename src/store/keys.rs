//! Key names, so that every part of the service (and every test, by its own
//! prefix) agrees on them. All sit behind the configurable prefix.
//!
//! Every key of one Kafka partition carries the partition's hash tag,
//! `{<topic>:<partition>}`: a Redis Cluster keeps them in one slot, so the
//! projector writes a partition's users and its checkpoint in one atomic
//! script, and the partitions spread over the masters. The partition is
//! already the unit of order and of the checkpoint; readers find a user's
//! partition from its id with the producer's murmur2. One layout serves every
//! Redis mode (a tag is an ordinary part of the name to a single server).

use crate::domain::UserId;

/// The read model's keys.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    topic: String,
}

impl Keys {
    pub fn new(prefix: &str, topic: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            topic: topic.to_owned(),
        }
    }

    /// The hash tag of a partition's keys.
    fn tag(&self, partition: i32) -> String {
        format!("{}{{{}:{partition}}}", self.prefix, self.topic)
    }

    /// `{<topic>:<partition>}user_<id>`: the user, the position of the event
    /// that created it and that event's request id (the Go service's
    /// `user_<id>`, behind its partition's tag).
    pub fn user(&self, id: UserId, partition: i32) -> String {
        format!("{}user_{id}", self.tag(partition))
    }

    /// `{<topic>:<partition>}projection`: the partition's checkpoint, a hash
    /// of `applied` (offset of the last event applied to the read model,
    /// written in the same script as the users it covers) and, while the
    /// partition is replayed from the start (Redis lost its data, or never
    /// had it), `rebuild` (the log end it must reach before it answers for
    /// every user of the partition again).
    pub fn projection(&self, partition: i32) -> String {
        format!("{}projection", self.tag(partition))
    }

    /// `user-request:{<request id>}`: the id of the user a request created,
    /// for `REQUEST_ID_TTL` after its event (a guard against a request id
    /// reused for another request; in its own slot).
    pub fn request(&self, request_id: &crate::domain::RequestId) -> String {
        format!("{}user-request:{{{}}}", self.prefix, request_id.as_str())
    }

    /// The topic's partition count, as a broker last told it: lets an
    /// instance find a user's key before any broker answered it.
    pub fn partition_count(&self) -> String {
        format!("{}projection:{}:partitions", self.prefix, self.topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partitions_keys_share_one_hash_tag() {
        let k = Keys::new("t1:", "users");
        let id = UserId::parse(42).unwrap();
        assert_eq!(k.user(id, 3), "t1:{users:3}user_42");
        assert_eq!(k.projection(3), "t1:{users:3}projection");
        // Redis Cluster hashes the first `{...}` of a key: the same for both.
        let tag = |key: &str| {
            let open = key.find('{').unwrap();
            key[open..=open + key[open..].find('}').unwrap()].to_owned()
        };
        assert_eq!(tag(&k.user(id, 3)), "{users:3}");
        assert_eq!(tag(&k.projection(3)), "{users:3}");
    }
}
