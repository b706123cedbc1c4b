//! `UserCreated`, the event the command side publishes and the projector
//! applies. JSON, like the Go service's messages, with a schema version so that
//! the format can evolve; see `docs/events.md`.

use super::{Email, RequestId, User, UserId, UserName};
use serde::{Deserialize, Serialize};

/// Where an event sits in the log: its partition and offset. A CreateUser
/// answers with it, and the read model keeps it with the user the event
/// created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventPosition {
    pub partition: i32,
    pub offset: i64,
}

/// The version this build writes and the highest it reads.
pub const SCHEMA_VERSION: u32 = 1;

const EVENT_TYPE: &str = "UserCreated";

/// A user was created. The record's key is the user id in decimal, so one
/// user's events share a partition and stay in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCreated {
    pub schema_version: u32,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(flatten)]
    pub user: User,
    /// The client's idempotency key, carried in the log so that the rule
    /// "one request, one user" is a rule over the log: a retry with the same
    /// key is recognised by every replay, not only by a cache that can be lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
}

/// Why a record could not become an event; it goes to the dead-letter topic
/// with this text in its `dlq.reason` header.
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    #[error("record has no value")]
    Empty,
    #[error("value is not a UserCreated event: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unsupported schema_version {0} (this build reads up to {SCHEMA_VERSION})")]
    UnsupportedVersion(u32),
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("record key {key:?} does not match the event's id {id}")]
    KeyMismatch { key: String, id: UserId },
}

impl UserCreated {
    pub fn new(user: User, request_id: Option<RequestId>) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_type: EVENT_TYPE.to_owned(),
            user,
            request_id,
        }
    }

    /// The record key: the id in decimal, as the Go service writes it.
    pub fn key(&self) -> String {
        self.user.id.to_string()
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and integers cannot fail.
        serde_json::to_vec(self).expect("a UserCreated always serialises")
    }

    /// Decodes and re-validates a record: the log is an input like any other.
    pub fn decode(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Self, EventDecodeError> {
        let value = value
            .filter(|v| !v.is_empty())
            .ok_or(EventDecodeError::Empty)?;
        #[derive(Deserialize)]
        struct Raw {
            schema_version: u32,
            #[serde(rename = "type")]
            event_type: String,
            id: i64,
            name: String,
            email: String,
            created_at_ms: i64,
            #[serde(default)]
            request_id: Option<String>,
        }
        let raw: Raw = serde_json::from_slice(value)?;
        if raw.schema_version == 0 || raw.schema_version > SCHEMA_VERSION {
            return Err(EventDecodeError::UnsupportedVersion(raw.schema_version));
        }
        if raw.event_type != EVENT_TYPE {
            return Err(EventDecodeError::UnknownType(raw.event_type));
        }
        let invalid = |e: super::ValidationError| {
            EventDecodeError::Malformed(serde::de::Error::custom(e.to_string()))
        };
        let user = User {
            id: UserId::parse(raw.id).map_err(invalid)?,
            name: UserName::parse(&raw.name).map_err(invalid)?,
            email: Email::parse(&raw.email).map_err(invalid)?,
            created_at_ms: raw.created_at_ms,
        };
        let request_id = match raw.request_id.as_deref() {
            None | Some("") => None,
            Some(r) => RequestId::parse(r).map_err(invalid)?,
        };
        let event = Self::new(user, request_id);
        if let Some(key) = key {
            let key = String::from_utf8_lossy(key);
            if key != event.key() {
                return Err(EventDecodeError::KeyMismatch {
                    key: key.into_owned(),
                    id: event.user.id,
                });
            }
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ada() -> User {
        User {
            id: UserId::parse(42).unwrap(),
            name: UserName::parse("Ada").unwrap(),
            email: Email::parse("ada@example.com").unwrap(),
            created_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trips_with_the_documented_shape() {
        let e = UserCreated::new(ada(), None);
        let json: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"schema_version": 1, "type": "UserCreated", "id": 42,
                "name": "Ada", "email": "ada@example.com", "created_at_ms": 1_700_000_000_000i64})
        );
        assert_eq!(
            UserCreated::decode(Some(b"42"), Some(&e.to_json())).unwrap(),
            e
        );
    }

    #[test]
    fn rejects_what_it_cannot_trust() {
        let e = UserCreated::new(ada(), None).to_json();
        assert!(matches!(
            UserCreated::decode(None, None),
            Err(EventDecodeError::Empty)
        ));
        assert!(matches!(
            UserCreated::decode(None, Some(b"{not json")),
            Err(EventDecodeError::Malformed(_))
        ));
        assert!(matches!(
            UserCreated::decode(Some(b"7"), Some(&e)),
            Err(EventDecodeError::KeyMismatch { .. })
        ));
        let v2 = String::from_utf8(e)
            .unwrap()
            .replace("\"schema_version\":1", "\"schema_version\":2");
        assert!(matches!(
            UserCreated::decode(None, Some(v2.as_bytes())),
            Err(EventDecodeError::UnsupportedVersion(2))
        ));
        let bad_email = br#"{"schema_version":1,"type":"UserCreated","id":1,"name":"A","email":"nope","created_at_ms":0}"#;
        assert!(matches!(
            UserCreated::decode(None, Some(bad_email)),
            Err(EventDecodeError::Malformed(_))
        ));
    }
}
