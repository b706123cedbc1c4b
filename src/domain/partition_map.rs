//! The partition map: which partition of the topic an id's events belong in.
//!
//! "The first `UserCreated` of an id in its partition creates the user" is a
//! rule over the log only while every writer and every reader, on every
//! instance and in every replay, puts an id in the same partition. Kafka's own
//! partitioners take the partition count the broker reports *now*, which an
//! operator changes with `kafka-topics --alter --partitions`. So the count
//! that routes ids is a fact of the log instead: the first [`MapRecord`] of
//! partition 0, written once when the topic is first used (docs/design.md,
//! "The partition map"). Partitions added later stay unused; spreading users
//! over more partitions is a move to a new topic (`user-service move-topic`).

use super::UserId;
use serde::{Deserialize, Serialize};

/// The record key (and `id`) of a partition map record. Not a decimal, so it
/// never names a user; and the article's Go consumer, which decodes every
/// value as `{"id": <int64>, ...}`, skips it with a warning instead of
/// storing a user 0.
pub const MAP_KEY: &str = "partition-map";

/// The most partitions a map may route over: a record asking for more is
/// not a map this build honours (every partition costs a checkpoint, a tag
/// and a slot in each reader's tables).
pub const MAX_PARTITIONS: i32 = 10_000;

const MAP_TYPE: &str = "PartitionMap";

/// The partition count in force for a topic, and where the log says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionMap {
    /// Ids are routed over partitions `0..partitions`.
    pub partitions: i32,
    /// The offset of the map record in partition 0.
    pub offset: i64,
}

impl PartitionMap {
    /// The partition an id's events belong in: Kafka's Java partitioner
    /// (`toPositive(murmur2(key)) % n`, as kafka-go's `Murmur2Balancer`) on the
    /// decimal id, over the map's count rather than the topic's current one.
    pub fn home(&self, id: UserId) -> i32 {
        user_partition(id, self.partitions)
    }

    /// Whether ids are routed to `partition` at all (partitions added after
    /// the map was recorded are not).
    pub fn routes(&self, partition: i32) -> bool {
        (0..self.partitions).contains(&partition)
    }

    /// How the map is kept beside the read model (`<partitions>@<offset>`),
    /// so a reader can find a user's partition before any broker answers.
    pub fn to_stored(self) -> String {
        format!("{}@{}", self.partitions, self.offset)
    }

    /// The inverse of [`PartitionMap::to_stored`]; `None` for anything else.
    pub fn from_stored(s: &str) -> Option<Self> {
        let (n, offset) = s.split_once('@')?;
        let partitions: i32 = n.parse().ok()?;
        let offset: i64 = offset.parse().ok()?;
        ((1..=MAX_PARTITIONS).contains(&partitions) && offset >= 0)
            .then_some(Self { partitions, offset })
    }
}

/// The partition Kafka's Java client puts `key` on among `partitions`:
/// `toPositive(murmur2(key)) % partitions`.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    let hash = murmur2::murmur2(key, murmur2::KAFKA_SEED) as i32;
    (hash & 0x7fff_ffff) % partitions.max(1)
}

/// The partition of `id` among `partitions`: what a map of that count says.
pub fn user_partition(id: UserId, partitions: i32) -> i32 {
    partition_for_key(id.to_string().as_bytes(), partitions)
}

/// The record that fixes a topic's partition map: key [`MAP_KEY`], value
/// `{"schema_version": 1, "type": "PartitionMap", "id": "partition-map",
/// "partitions": 12}`, in partition 0. The first one in partition 0's order is
/// the map; later ones (two instances that found none at once) change nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRecord {
    pub schema_version: u32,
    #[serde(rename = "type")]
    pub record_type: String,
    pub id: String,
    pub partitions: i32,
}

/// Why a record keyed [`MAP_KEY`] is not a map this build honours.
#[derive(Debug, thiserror::Error)]
pub enum MapDecodeError {
    #[error("value is not a PartitionMap record: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("a partition map of {0} partitions (this build routes over 1 to {MAX_PARTITIONS})")]
    OutOfRange(i32),
}

impl MapRecord {
    pub fn new(partitions: i32) -> Self {
        Self {
            schema_version: super::SCHEMA_VERSION,
            record_type: MAP_TYPE.to_owned(),
            id: MAP_KEY.to_owned(),
            partitions,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a MapRecord always serialises")
    }

    /// `None` when the record is not keyed as a map (a user's event, say);
    /// otherwise the map's count, or why it is not one.
    pub fn decode(key: Option<&[u8]>, value: Option<&[u8]>) -> Option<Result<i32, MapDecodeError>> {
        if key != Some(MAP_KEY.as_bytes()) {
            return None;
        }
        let decoded = serde_json::from_slice::<MapRecord>(value.unwrap_or_default())
            .map_err(MapDecodeError::from)
            .and_then(|r| {
                if r.record_type != MAP_TYPE || r.id != MAP_KEY {
                    return Err(MapDecodeError::Malformed(serde::de::Error::custom(
                        "not a PartitionMap record",
                    )));
                }
                if (1..=MAX_PARTITIONS).contains(&r.partitions) {
                    Ok(r.partitions)
                } else {
                    Err(MapDecodeError::OutOfRange(r.partitions))
                }
            });
        Some(decoded)
    }
}

/// The record key (and `id`) of a topic move record.
pub const MOVE_KEY: &str = "topic-move";

const MOVE_TYPE: &str = "TopicMove";

/// The record `user-service move-topic` writes when it moves a topic's users
/// to a new topic: key [`MOVE_KEY`], value `{"schema_version": 1, "type":
/// "TopicMove", "id": "topic-move", "from": "<old>", "to": "<new>"}`.
///
/// - In every partition of the old topic it is a **seal**: events after it in
///   its partition create nothing (the mover copies everything before it to
///   the new topic, so nothing after it could reach there).
/// - In partition 0 of the new topic it is the first record, written before
///   any copy: while no map follows it, no instance may record a map (and so
///   none may route a create) on a topic that is still being filled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub schema_version: u32,
    #[serde(rename = "type")]
    pub record_type: String,
    pub id: String,
    pub from: String,
    pub to: String,
}

impl MoveRecord {
    pub fn new(from: &str, to: &str) -> Self {
        Self {
            schema_version: super::SCHEMA_VERSION,
            record_type: MOVE_TYPE.to_owned(),
            id: MOVE_KEY.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a MoveRecord always serialises")
    }

    /// `None` when the record is not keyed as a move record.
    pub fn decode(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Option<Result<MoveRecord, MapDecodeError>> {
        if key != Some(MOVE_KEY.as_bytes()) {
            return None;
        }
        let decoded = serde_json::from_slice::<MoveRecord>(value.unwrap_or_default())
            .map_err(MapDecodeError::from)
            .and_then(|r| {
                if r.record_type == MOVE_TYPE && r.id == MOVE_KEY {
                    Ok(r)
                } else {
                    Err(MapDecodeError::Malformed(serde::de::Error::custom(
                        "not a TopicMove record",
                    )))
                }
            });
        Some(decoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_like_kafkas_java_client() {
        // Kafka's UtilsTest murmur2 vectors, through toPositive(h) % n.
        for (key, hash) in [
            (&b"21"[..], -973_932_308i32),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
        ] {
            assert_eq!(murmur2::murmur2(key, murmur2::KAFKA_SEED) as i32, hash);
            for n in [1, 3, 7, 1000] {
                assert_eq!(
                    partition_for_key(key, n),
                    (hash & 0x7fff_ffff) % n,
                    "{key:?}"
                );
            }
        }
    }

    #[test]
    fn the_map_not_the_topic_routes_an_id() {
        let map = PartitionMap {
            partitions: 12,
            offset: 0,
        };
        for id in 1..2_000i64 {
            let id = UserId::parse(id).unwrap();
            let home = map.home(id);
            assert!(map.routes(home));
            assert_eq!(home, partition_for_key(id.to_string().as_bytes(), 12));
        }
        assert!(!map.routes(12) && !map.routes(-1));
    }

    #[test]
    fn the_record_round_trips_and_is_not_a_user() {
        let json = MapRecord::new(12).to_json();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"schema_version": 1, "type": "PartitionMap",
                "id": "partition-map", "partitions": 12})
        );
        assert_eq!(
            MapRecord::decode(Some(MAP_KEY.as_bytes()), Some(&json)).map(|r| r.ok()),
            Some(Some(12))
        );
        // A user's event is not a map record, and not one decodes as a user.
        assert!(MapRecord::decode(Some(b"42"), Some(&json)).is_none());
        assert!(super::super::UserCreated::decode(Some(MAP_KEY.as_bytes()), Some(&json)).is_err());
        for bad in [0, -1, MAX_PARTITIONS + 1] {
            let json = MapRecord::new(bad).to_json();
            assert!(matches!(
                MapRecord::decode(Some(MAP_KEY.as_bytes()), Some(&json)),
                Some(Err(MapDecodeError::OutOfRange(_)))
            ));
        }
        assert!(matches!(
            MapRecord::decode(Some(MAP_KEY.as_bytes()), Some(b"{}")),
            Some(Err(_))
        ));
    }

    #[test]
    fn a_move_record_round_trips_and_is_neither_a_user_nor_a_map() {
        let json = MoveRecord::new("old", "new").to_json();
        let key = Some(MOVE_KEY.as_bytes());
        assert_eq!(
            MoveRecord::decode(key, Some(&json)).map(|r| r.ok()),
            Some(Some(MoveRecord::new("old", "new")))
        );
        assert!(MapRecord::decode(key, Some(&json)).is_none());
        assert!(super::super::UserCreated::decode(key, Some(&json)).is_err());
        assert!(matches!(MoveRecord::decode(key, Some(b"[]")), Some(Err(_))));
    }

    #[test]
    fn the_stored_copy_round_trips() {
        let map = PartitionMap {
            partitions: 24,
            offset: 7,
        };
        assert_eq!(PartitionMap::from_stored(&map.to_stored()), Some(map));
        for bad in ["", "12", "0@0", "12@-1", "x@1", "10001@0"] {
            assert_eq!(PartitionMap::from_stored(bad), None, "{bad}");
        }
    }
}
