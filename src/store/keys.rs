//! Key names, so that every part of the service (and every test, by its own
//! prefix) agrees on them. All sit behind the configurable prefix.

use crate::domain::{RequestId, UserId};

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

    /// `user_<id>`, the Go service's cache key: the user and the position of
    /// the event that created it.
    pub fn user(&self, id: UserId) -> String {
        format!("{}user_{id}", self.prefix)
    }

    /// The checkpoint: hash of partition → offset of the last event applied
    /// to the read model. Written in the same script as the users it covers.
    pub fn checkpoint(&self) -> String {
        format!("{}projection:{}:applied", self.prefix, self.topic)
    }

    /// Hash of partition → the log end the read model must reach before it
    /// answers for every user of that partition again; present only while a
    /// partition is replayed from the start (Redis lost its data, or never had it).
    pub fn rebuild(&self) -> String {
        format!("{}projection:{}:rebuild", self.prefix, self.topic)
    }

    /// A request id → the id of the user its request created; expires
    /// `REQUEST_ID_TTL` after the event's time.
    pub fn request(&self, request_id: &RequestId) -> String {
        format!("{}user-request:{}", self.prefix, request_id.as_str())
    }
}
