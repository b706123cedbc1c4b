//! `UserCreated`, the event the command side publishes and the projector
//! applies. JSON, like the Go service's messages, with a schema version so that
//! the format can evolve; see docs/design.md, "The event".
//!
//! Two formats are read, one is written:
//!
//! - **This service's** (`schema_version` 1): `type`, `id`, `name`, `email`,
//!   `created_at_ms`, and `request_id` when the client sent one. What it
//!   writes also carries the article's `create_time`, so that the Go
//!   service's consumer reads every field it knows.
//! - **The article's Go service's** ("legacy"), recognised by having no
//!   `schema_version`: `{"id", "name", "email", "create_time"}`, the
//!   `create_time` as Go's `time.Time` marshals it (RFC 3339). It is what a
//!   topic the Go service wrote holds, and the service takes such a topic over.
//!
//! Both are validated by the same rules (`src/domain/user.rs`).

use super::{Email, RequestId, User, UserId, UserName};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCreated {
    pub schema_version: u32,
    pub event_type: String,
    pub user: User,
    /// The client's idempotency key, carried in the log so that the rule
    /// "one request, one user" is a rule over the log: a retry with the same
    /// key is recognised by every replay, not only by a cache that can be lost.
    pub request_id: Option<RequestId>,
}

/// Which writer's format a record came in. The projector treats the two alike
/// except where the article's writer differs: it spread an id's events over
/// partitions (kafka-go's `LeastBytes`), so a legacy event outside its id's
/// partition is re-homed there rather than dead-lettered (docs/design.md, "The
/// article's events").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFormat {
    /// This service's, with a `schema_version`.
    Current,
    /// The article's Go service's: no `schema_version`, no request id.
    Legacy,
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

/// The record as written: this service's fields and, beside them, the
/// article's `create_time`, in the order the golden files pin
/// (`tests/golden/`).
#[derive(Serialize)]
struct Wire<'a> {
    schema_version: u32,
    #[serde(rename = "type")]
    event_type: &'a str,
    id: UserId,
    name: &'a UserName,
    email: &'a Email,
    created_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    create_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a RequestId>,
}

/// Every field either format may carry; which ones must be there depends on
/// the format, which `schema_version` tells.
#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default, rename = "type")]
    event_type: Option<String>,
    id: i64,
    name: String,
    email: String,
    #[serde(default)]
    created_at_ms: Option<i64>,
    #[serde(default)]
    create_time: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
}

fn malformed(why: String) -> EventDecodeError {
    EventDecodeError::Malformed(serde::de::Error::custom(why))
}

/// `ms` since the epoch as Go's `time.Time` marshals it in UTC: RFC 3339, the
/// fraction of a second without trailing zeros (none when whole), `Z`. `None`
/// outside the years 0 to 9999, which Go refuses to marshal: the field is then
/// left out, and the Go consumer reads its zero time, as for an older event.
pub fn go_time(ms: i64) -> Option<String> {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    if !(0..=9999).contains(&t.year()) {
        return None;
    }
    t.format(&Rfc3339).ok()
}

/// An RFC 3339 time (as Go's `time.Time` marshals it, in any offset) in
/// milliseconds since the epoch, rounded down: the service keeps times to the
/// millisecond.
fn parse_go_time(s: &str) -> Result<i64, EventDecodeError> {
    let invalid =
        |why: String| malformed(format!("create_time {s:?} is not an RFC 3339 time: {why}"));
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| invalid(e.to_string()))?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000))
        .map_err(|_| invalid("out of range".into()))
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

    /// This service's format, with the article's `create_time` beside
    /// `created_at_ms` (additive: readers of either ignore what they do not
    /// know).
    pub fn to_json(&self) -> Vec<u8> {
        let wire = Wire {
            schema_version: self.schema_version,
            event_type: &self.event_type,
            id: self.user.id,
            name: &self.user.name,
            email: &self.user.email,
            created_at_ms: self.user.created_at_ms,
            create_time: go_time(self.user.created_at_ms),
            request_id: self.request_id.as_ref(),
        };
        // Serialising plain strings and integers cannot fail.
        serde_json::to_vec(&wire).expect("a UserCreated always serialises")
    }

    /// Decodes and re-validates a record of either format: the log is an
    /// input like any other.
    pub fn decode(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Self, EventDecodeError> {
        Self::decode_with_format(key, value).map(|(event, _)| event)
    }

    /// [`UserCreated::decode`], saying which format the record came in.
    pub fn decode_with_format(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<(Self, EventFormat), EventDecodeError> {
        let value = value
            .filter(|v| !v.is_empty())
            .ok_or(EventDecodeError::Empty)?;
        let raw: Raw = serde_json::from_slice(value)?;
        let missing = |field: &'static str| {
            EventDecodeError::Malformed(serde::de::Error::missing_field(field))
        };
        let (format, created_at_ms) = match raw.schema_version {
            Some(version) => {
                if version == 0 || version > SCHEMA_VERSION {
                    return Err(EventDecodeError::UnsupportedVersion(version));
                }
                let event_type = raw.event_type.ok_or_else(|| missing("type"))?;
                if event_type != EVENT_TYPE {
                    return Err(EventDecodeError::UnknownType(event_type));
                }
                let ms = raw.created_at_ms.ok_or_else(|| missing("created_at_ms"))?;
                // The Go consumer reads `create_time`, this service
                // `created_at_ms`: an event on which they disagree would make
                // two read models of one log.
                if let Some(t) = &raw.create_time
                    && parse_go_time(t)? != ms
                {
                    return Err(malformed(format!(
                        "create_time {t:?} is not created_at_ms {ms}"
                    )));
                }
                (EventFormat::Current, ms)
            }
            // The article's event: `create_time` is its only time, and it
            // names no request.
            None => {
                let t = raw.create_time.ok_or_else(|| {
                    malformed(
                        "no schema_version (this service's events) and no create_time (the \
                         article's)"
                            .into(),
                    )
                })?;
                (EventFormat::Legacy, parse_go_time(&t)?)
            }
        };
        let invalid = |e: super::ValidationError| malformed(e.to_string());
        let user = User {
            id: UserId::parse(raw.id).map_err(invalid)?,
            name: UserName::parse(&raw.name).map_err(invalid)?,
            email: Email::parse(&raw.email).map_err(invalid)?,
            created_at_ms,
        };
        let request_id = match (format, raw.request_id.as_deref()) {
            (EventFormat::Legacy, _) | (_, None | Some("")) => None,
            (EventFormat::Current, Some(r)) => RequestId::parse(r).map_err(invalid)?,
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
        Ok((event, format))
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
                "name": "Ada", "email": "ada@example.com", "created_at_ms": 1_700_000_000_000i64,
                "create_time": "2023-11-14T22:13:20Z"})
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
    fn user(id: i64, name: &str, email: &str, created_at_ms: i64) -> User {
        User {
            id: UserId::parse(id).unwrap(),
            name: UserName::parse(name).unwrap(),
            email: Email::parse(email).unwrap(),
            created_at_ms,
        }
    }

    /// The article's Go service's events, byte for byte as its
    /// `json.Marshal(userInfo)` writes them (tests/golden/README.md): each is
    /// a `UserCreated` of the legacy format, its time to the millisecond.
    #[test]
    fn the_articles_events_decode_as_user_created() {
        let cases: [(&[u8], User); 4] = [
            (
                include_bytes!("../../tests/golden/article-utc-nanos.json"),
                user(
                    1_764_078_000_123_456,
                    "Ada Lovelace",
                    "ada@example.com",
                    1_764_078_000_123,
                ),
            ),
            (
                include_bytes!("../../tests/golden/article-whole-second.json"),
                user(
                    1_764_078_000_123_457,
                    "Grace Hopper",
                    "grace@example.com",
                    1_764_078_001_000,
                ),
            ),
            (
                // 21:40:02.5 at +08:00 is 13:40:02.5 UTC.
                include_bytes!("../../tests/golden/article-offset.json"),
                user(
                    1_764_078_000_123_458,
                    "李雷",
                    "li.lei@example.cn",
                    1_764_078_002_500,
                ),
            ),
            (
                // Go escapes `&`, `<` and `>` as \u0026, \u003c and \u003e.
                include_bytes!("../../tests/golden/article-html-escaped.json"),
                user(
                    1_764_078_000_123_459,
                    "Ada & <Bob>",
                    "ada.bob@example.com",
                    1_764_078_003_010,
                ),
            ),
        ];
        for (bytes, want) in cases {
            let key = want.id.to_string();
            let (event, format) =
                UserCreated::decode_with_format(Some(key.as_bytes()), Some(bytes))
                    .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(bytes)));
            assert_eq!(format, EventFormat::Legacy);
            assert_eq!(event, UserCreated::new(want, None));
        }
    }

    /// This service's events, byte for byte: what it writes now is what the
    /// golden files hold (an older build and the Go consumer read them, see
    /// `tests/migration/golden_test.go`), and they decode to themselves.
    #[test]
    fn our_events_encode_to_the_golden_bytes_and_back() {
        let cases: [(&[u8], UserCreated); 3] = [
            (
                include_bytes!("../../tests/golden/ours-plain.json"),
                UserCreated::new(
                    user(42, "Ada Lovelace", "ada@example.com", 1_764_078_000_123),
                    None,
                ),
            ),
            (
                include_bytes!("../../tests/golden/ours-request-id.json"),
                UserCreated::new(
                    user(
                        5_000_000_000_001,
                        "Zoë 李",
                        "zoe@bücher.example",
                        1_764_078_001_000,
                    ),
                    RequestId::parse("req-7f3a").unwrap(),
                ),
            ),
            (
                include_bytes!("../../tests/golden/ours-html.json"),
                UserCreated::new(
                    user(43, "Ada & <Bob>", "ada.bob@example.com", 1_764_078_002_500),
                    None,
                ),
            ),
        ];
        for (bytes, event) in cases {
            assert_eq!(
                String::from_utf8_lossy(&event.to_json()),
                String::from_utf8_lossy(bytes)
            );
            let key = event.key();
            let (decoded, format) =
                UserCreated::decode_with_format(Some(key.as_bytes()), Some(bytes)).unwrap();
            assert_eq!(format, EventFormat::Current);
            assert_eq!(decoded, event);
        }
    }

    /// The rules are the same for either format: what this service would
    /// dead-letter, it dead-letters in the article's shape too, with a reason.
    #[test]
    fn the_articles_events_are_validated_like_any_other() {
        let refused: [&[u8]; 6] = [
            // The Go service accepts an empty email; this one does not.
            br#"{"id":7,"name":"Ada","email":"","create_time":"2025-11-25T13:40:00Z"}"#,
            br#"{"id":0,"name":"Ada","email":"a@example.com","create_time":"2025-11-25T13:40:00Z"}"#,
            br#"{"id":7,"name":"Ada","email":"a@example.com"}"#,
            br#"{"id":7,"name":"Ada","email":"a@example.com","create_time":"yesterday"}"#,
            br#"{"id":7,"name":"Ada","email":"a@example.com","create_time":null}"#,
            br#"{"id":7,"id":8,"name":"Ada","email":"a@example.com","create_time":"2025-11-25T13:40:00Z"}"#,
        ];
        for bytes in refused {
            let got = UserCreated::decode(Some(b"7"), Some(bytes));
            assert!(
                matches!(got, Err(EventDecodeError::Malformed(_))),
                "{}: {got:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let ok = br#"{"id":7,"name":" Ada ","email":"a@EXAMPLE.com","create_time":"2025-11-25T13:40:00Z"}"#;
        assert!(matches!(
            UserCreated::decode(Some(b"8"), Some(ok)),
            Err(EventDecodeError::KeyMismatch { .. })
        ));
        // Normalised as a command would be; no request id, whatever it says.
        let with_extras = br#"{"id":7,"name":" Ada ","email":"a@EXAMPLE.com","create_time":"2025-11-25T13:40:00Z","request_id":"r","type":"Other"}"#;
        let event = UserCreated::decode(Some(b"7"), Some(with_extras)).unwrap();
        assert_eq!(
            event,
            UserCreated::new(user(7, "Ada", "a@example.com", 1_764_078_000_000), None)
        );
    }

    /// The two times of this service's event must agree: the Go consumer reads
    /// one, this service the other.
    #[test]
    fn a_create_time_that_is_not_created_at_ms_is_refused() {
        let e = String::from_utf8(UserCreated::new(ada(), None).to_json()).unwrap();
        let older = e.replace("22:13:20Z", "22:13:19Z");
        assert!(matches!(
            UserCreated::decode(None, Some(older.as_bytes())),
            Err(EventDecodeError::Malformed(_))
        ));
        // Without it (an event of an older build) the event stands.
        let without = e.replace(r#","create_time":"2023-11-14T22:13:20Z""#, "");
        assert_eq!(
            UserCreated::decode(None, Some(without.as_bytes())).unwrap(),
            UserCreated::new(ada(), None)
        );
    }

    #[test]
    fn times_are_written_as_go_writes_them() {
        assert_eq!(go_time(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(go_time(1).as_deref(), Some("1970-01-01T00:00:00.001Z"));
        assert_eq!(go_time(-1).as_deref(), Some("1969-12-31T23:59:59.999Z"));
        assert_eq!(
            go_time(1_764_078_000_100).as_deref(),
            Some("2025-11-25T13:40:00.1Z")
        );
        // Go's zero time, and the edges of what Go marshals.
        assert_eq!(
            go_time(-62_135_596_800_000).as_deref(),
            Some("0001-01-01T00:00:00Z")
        );
        assert_eq!(
            go_time(253_402_300_799_999).as_deref(),
            Some("9999-12-31T23:59:59.999Z")
        );
        assert_eq!(go_time(253_402_300_800_000), None);
        assert_eq!(go_time(i64::MIN), None);
        assert_eq!(go_time(i64::MAX), None);
        for ms in [
            0,
            1,
            -1,
            1_764_078_000_123,
            -62_135_596_800_000,
            253_402_300_799_999,
        ] {
            assert_eq!(parse_go_time(&go_time(ms).unwrap()).unwrap(), ms);
        }
    }
}
