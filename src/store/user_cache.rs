//! Users in process memory, in front of the read model: a repeat GetUser is
//! answered without a Redis round trip.
//!
//! Why it stays correct: a user never changes once created. The log decides
//! who owns an id (the first `UserCreated` of the id in its partition), so
//! a user the read model has answered, or a CreateUser has seen win, is the
//! same user in every replay of the log: after Redis is rebuilt, on every
//! other instance, forever. Only presence is cached, never an absence (a
//! NOT_FOUND may be followed by the create), and only users whose creating
//! event is known. The cache is bounded in bytes (moka's TinyLFU admission
//! and LRU eviction, weighed by what each entry holds), so its size is a
//! setting, not a function of the traffic.

use crate::domain::{EventPosition, User, UserId};
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

/// What a cached entry holds: the user and the position of its creating event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedUser {
    pub user: User,
    pub position: EventPosition,
}

/// Bytes an entry is counted for beyond its strings: an estimate of the
/// key, the fixed fields, the two string headers, the `Arc` and moka's own
/// bookkeeping per entry.
const ENTRY_OVERHEAD: u32 = 160;

/// The cache; cheap to clone (an `Arc` inside). `None` inside: turned off.
#[derive(Clone, Default)]
pub struct UserCache {
    inner: Option<moka::sync::Cache<UserId, Arc<CachedUser>>>,
    hits: Arc<AtomicU64>,
    misses: Arc<AtomicU64>,
}

impl UserCache {
    /// A cache of at most `max_bytes` (0 turns it off).
    pub fn new(max_bytes: u64) -> Self {
        let inner = (max_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_id: &UserId, u: &Arc<CachedUser>| weight(u))
                .build()
        });
        Self {
            inner,
            ..Self::default()
        }
    }

    /// The user, if cached; counts the hit or the miss.
    pub fn get(&self, id: UserId) -> Option<Arc<CachedUser>> {
        let cache = self.inner.as_ref()?;
        let found = cache.get(&id);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Remembers a user the log has decided (read from the read model, or a
    /// create that won).
    pub fn insert(&self, user: User, position: EventPosition) {
        if let Some(cache) = &self.inner {
            cache.insert(user.id, Arc::new(CachedUser { user, position }));
        }
    }

    /// Hits and misses so far (for the metrics endpoint).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Entries and their weighed bytes now, after moka's pending upkeep.
    pub fn size(&self) -> Option<(u64, u64)> {
        let cache = self.inner.as_ref()?;
        cache.run_pending_tasks();
        Some((cache.entry_count(), cache.weighted_size()))
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }
}

fn weight(u: &CachedUser) -> u32 {
    let strings = u.user.name.as_str().len() + u.user.email.as_str().len();
    ENTRY_OVERHEAD.saturating_add(u32::try_from(strings).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Email, UserName};

    fn user(id: i64) -> User {
        User {
            id: UserId::parse(id).unwrap(),
            name: UserName::parse("Ada Lovelace").unwrap(),
            email: Email::parse("ada@example.com").unwrap(),
            created_at_ms: 0,
        }
    }

    fn at(offset: i64) -> EventPosition {
        EventPosition {
            partition: 0,
            offset,
        }
    }

    #[test]
    fn a_remembered_user_is_served_and_counted() {
        let c = UserCache::new(1 << 20);
        let id = UserId::parse(7).unwrap();
        assert!(c.get(id).is_none());
        c.insert(user(7), at(3));
        let got = c.get(id).unwrap();
        assert_eq!(got.user, user(7));
        assert_eq!(got.position, at(3));
        assert_eq!(c.counts(), (1, 1));
    }

    #[test]
    fn off_holds_nothing() {
        let c = UserCache::new(0);
        c.insert(user(7), at(3));
        assert!(c.get(UserId::parse(7).unwrap()).is_none());
        assert!(!c.enabled());
        assert_eq!(c.counts(), (0, 0));
    }

    #[test]
    fn the_weight_bounds_the_bytes_held() {
        let budget = 100
            * u64::from(weight(&CachedUser {
                user: user(1),
                position: at(0),
            }));
        let c = UserCache::new(budget);
        for id in 1..=1_000 {
            c.insert(user(id), at(id));
        }
        let (entries, bytes) = c.size().unwrap();
        assert!(bytes <= budget, "{bytes} > {budget}");
        assert!(entries <= 100, "{entries} entries");
        assert!(entries > 0);
    }
}
