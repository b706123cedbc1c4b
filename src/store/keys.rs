//! Key names, so that every part of the service (and every test, by its own
//! prefix) agrees on them. All sit behind the configurable prefix.
//!
//! Every key of one Kafka partition carries the partition's hash tag,
//! `{<topic>:<partition>:<salt>}`: a Redis Cluster keeps them in one slot, so
//! the projector writes a partition's users and its checkpoint in one atomic
//! script. The partition is already the unit of order and of the checkpoint;
//! readers find a user's partition from its id with the producer's murmur2.
//! One layout serves every Redis mode (a tag is an ordinary part of the name
//! to a single server).
//!
//! The salt spreads the partitions over the slot space on purpose, not by
//! chance: it is the first one that puts partition `p`'s slot in cell
//! [`SPREAD`]`[p % 12]` of twelve equal cells. A cluster's masters own equal
//! runs of slots (`redis-cli --cluster create` and `rebalance` make them so),
//! so 12 partitions (the default count) land 4/4/4 on three masters, 6/6 on
//! two, 3 each on four and 2 each on six, and any first `k` partitions are as
//! even as `k` allows. CRC16 of `{users:p}` alone spread the default topic's
//! 12 partitions 5/4/3; no partition count makes hashing even.

use crate::domain::UserId;
use std::sync::{Arc, RwLock};

/// Redis Cluster's slot count.
const SLOTS: u32 = 16384;

/// The order in which partitions take the twelve cells of the slot space:
/// every prefix of it is as even as it can be over 2, 3, 4 and 6 equal runs
/// of cells (found by search; `spread_is_even` checks it).
const SPREAD: [u32; 12] = [0, 11, 5, 7, 9, 2, 3, 6, 10, 1, 4, 8];

/// How many bucket hashes a partition's users are spread over. A bucket
/// stays a compact listpack while it holds at most `hash-max-listpack-entries`
/// users (512 by default) whose values fit `hash-max-listpack-value` (the
/// stack sets 1024; Redis' default, 64, is less than most users take), so the
/// default 12 partitions keep about 25 million users compact. Fewer, fuller
/// buckets save little more memory and cost Redis more per write and read (a
/// listpack is searched end to end): 4096 a partition measured 3.4 µs of
/// Redis CPU per write against 7.7 µs for 1024, at the same memory
/// (`scripts/bench.d/ab-layout`). It is part of the layout: changing it moves
/// every user, so the checkpoint's name must change with it and the read
/// model be rebuilt from the log.
pub const USER_BUCKETS: u64 = 4096;

/// A user's bucket: Fibonacci hashing of the id, so that ids in any pattern
/// (sequential, multiples of a power of two) spread evenly.
fn bucket_of(id: UserId) -> u64 {
    (id.get() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - USER_BUCKETS.trailing_zeros())
}

/// A user's place in the read model: a field of a bucket hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSlot {
    pub key: String,
    pub field: String,
}

/// The read model's keys.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    topic: String,
    /// Each partition's `{...}` tag with its prefix, computed once.
    tags: Arc<RwLock<Vec<Arc<str>>>>,
}

/// The slot Redis Cluster gives a hash tag's content (CRC16/XMODEM).
pub fn slot_of(tag: &str) -> u16 {
    (u32::from(crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes())) % SLOTS) as u16
}

/// The tag content of `partition`: `<topic>:<partition>:<salt>`, the first
/// salt whose slot falls in the partition's cell.
fn spread_tag(topic: &str, partition: i32) -> String {
    let cell = SPREAD[partition.unsigned_abs() as usize % SPREAD.len()];
    let cells = SPREAD.len() as u32;
    // Clear of the cell's edges by a few slots, where a run of one master
    // may end one slot off an even split (redis-cli rounds).
    let range = cell * SLOTS / cells + 4..(cell + 1) * SLOTS / cells - 4;
    (0u32..)
        .map(|salt| format!("{topic}:{partition}:{salt}"))
        .find(|tag| range.contains(&u32::from(slot_of(tag))))
        .expect("some salt lands in every cell")
}

impl Keys {
    pub fn new(prefix: &str, topic: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            topic: topic.to_owned(),
            tags: Arc::default(),
        }
    }

    /// The prefix and hash tag of a partition's keys.
    fn tag(&self, partition: i32) -> Arc<str> {
        let index = partition.max(0) as usize;
        if let Some(tag) = self.tags.read().expect("tags lock").get(index) {
            return tag.clone();
        }
        let mut tags = self.tags.write().expect("tags lock");
        while tags.len() <= index {
            let p = tags.len() as i32;
            tags.push(format!("{}{{{}}}", self.prefix, spread_tag(&self.topic, p)).into());
        }
        tags[index].clone()
    }

    /// Where a user lives: field `<id>` of the bucket hash
    /// `{<topic>:<partition>:<salt>}users:<bucket>`, the value the user, the
    /// position of the event that created it and that event's request id.
    /// Buckets of small hashes rather than a key per user: Redis packs a
    /// small hash into one listpack, a few bytes per field, where a key costs
    /// its own entry, object and name (see [`USER_BUCKETS`]).
    pub fn user(&self, id: UserId, partition: i32) -> UserSlot {
        UserSlot {
            key: format!("{}users:{}", self.tag(partition), bucket_of(id)),
            field: id.to_string(),
        }
    }

    /// `{<topic>:<partition>:<salt>}checkpoint`: the partition's checkpoint, a hash
    /// of `applied` (offset of the last event applied to the read model,
    /// written in the same script as the users it covers) and, while the
    /// partition is replayed from the start (Redis lost its data, or never
    /// had it), `rebuild` (the log end it must reach before it answers for
    /// every user of the partition again).
    pub fn checkpoint(&self, partition: i32) -> String {
        format!("{}checkpoint", self.tag(partition))
    }

    /// `user-request:{<request id>}`: the id of the user a request created,
    /// for `REQUEST_ID_TTL` after its event (a guard against a request id
    /// reused for another request; in its own slot).
    pub fn request(&self, request_id: &crate::domain::RequestId) -> String {
        format!("{}user-request:{{{}}}", self.prefix, request_id.as_str())
    }

    /// `projection:<topic>:partition-map`: the topic's partition map as the
    /// log records it (`<partitions>@<offset>`, see
    /// [`crate::domain::PartitionMap`]), so an instance that starts while no
    /// broker answers still finds a user's partition, and instances that
    /// disagree on it notice.
    pub fn partition_map(&self) -> String {
        format!("{}projection:{}:partition-map", self.prefix, self.topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The content of a key's first `{...}`, as Redis Cluster hashes it.
    fn tag_of(key: &str) -> &str {
        let open = key.find('{').unwrap();
        &key[open + 1..open + key[open..].find('}').unwrap()]
    }

    #[test]
    fn a_partitions_keys_share_one_hash_tag() {
        let k = Keys::new("t1:", "users");
        let id = UserId::parse(42).unwrap();
        let user = k.user(id, 3);
        assert!(user.key.starts_with("t1:{users:3:"), "{user:?}");
        assert!(user.key.contains("}users:"), "{user:?}");
        assert_eq!(user.field, "42");
        assert_eq!(tag_of(&user.key), tag_of(&k.checkpoint(3)));
        assert_ne!(tag_of(&k.checkpoint(3)), tag_of(&k.checkpoint(4)));
    }

    #[test]
    fn ids_in_any_pattern_spread_evenly_over_the_buckets() {
        let n = USER_BUCKETS as usize;
        for (pattern, ids) in [
            ("sequential", (1..=200 * n as i64).collect::<Vec<_>>()),
            (
                "multiples of 1024",
                (1..=200 * n as i64).map(|i| i * 1024).collect(),
            ),
            (
                "multiples of 1000",
                (1..=200 * n as i64).map(|i| i * 1000).collect(),
            ),
        ] {
            let mut per = vec![0usize; n];
            for id in ids {
                per[bucket_of(UserId::parse(id).unwrap()) as usize] += 1;
            }
            let (min, max) = (per.iter().min().unwrap(), per.iter().max().unwrap());
            // 200 a bucket on average.
            assert!(*min >= 150 && *max <= 250, "{pattern}: {min}..{max}");
        }
    }

    #[test]
    fn slots_follow_redis_cluster() {
        // The cluster specification's test vector, and `CLUSTER KEYSLOT foo`.
        assert_eq!(
            crc16::State::<crc16::XMODEM>::calculate(b"123456789"),
            0x31C3
        );
        assert_eq!(slot_of("foo"), 12182);
    }

    /// The master that owns `slot` when `redis-cli --cluster create` splits
    /// the slots over `masters` (its rounding, from redis-cli.c).
    fn master_of(slot: u16, masters: u32) -> usize {
        let per = SLOTS as f64 / f64::from(masters);
        let (mut first, mut cursor) = (0i64, 0f64);
        for i in 0..masters {
            let mut last = (cursor + per - 1.0).round() as i64;
            if i == masters - 1 {
                last = i64::from(SLOTS) - 1;
            }
            if (first..=last).contains(&i64::from(slot)) {
                return i as usize;
            }
            first = last + 1;
            cursor += per;
        }
        unreachable!("slot {slot} past the last master")
    }

    #[test]
    fn partitions_spread_evenly_over_the_masters() {
        for topic in ["topic-user-creating", "users", "fc-kafka-kill9-1764-1", "a"] {
            let k = Keys::new("", topic);
            for masters in [2u32, 3, 4, 6] {
                for partitions in 1..=48i32 {
                    let mut per = vec![0; masters as usize];
                    for p in 0..partitions {
                        per[master_of(slot_of(tag_of(&k.checkpoint(p))), masters)] += 1;
                    }
                    let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
                    // Even when the count allows it; never more than one apart.
                    assert!(
                        hi - lo <= 1,
                        "{topic}: {partitions} over {masters}: {per:?}"
                    );
                    if partitions % 12 == 0 {
                        assert_eq!(lo, hi, "{topic}: {partitions} over {masters}: {per:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn spread_is_even() {
        // Every prefix of SPREAD, over 2, 3, 4 and 6 equal runs of cells.
        for masters in [2usize, 3, 4, 6] {
            let width = SPREAD.len() / masters;
            for n in 1..=SPREAD.len() {
                let mut per = vec![0; masters];
                for cell in &SPREAD[..n] {
                    per[*cell as usize / width] += 1;
                }
                let spread = per.iter().max().unwrap() - per.iter().min().unwrap();
                assert!(spread <= 1, "{n} cells over {masters}: {per:?}");
            }
        }
    }
}
