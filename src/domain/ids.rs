//! Ids the service assigns. They are derived from the request id, so that a
//! retry of a request (same request id) names the same user even when the
//! first attempt's outcome is unknown and every cache was lost: a second
//! event for that id then creates nothing (the first in the log wins), where
//! a fresh id would leave a second user behind. No sequence, no lease, no
//! state: nothing to lose.
//!
//! `id(r, k) = ASSIGNED_MIN + (u64 from the first 8 bytes, big-endian, of
//! SHA-256("user-id:" + r + ":" + k)) mod (ASSIGNED_MAX - ASSIGNED_MIN + 1)`,
//! for attempts k = 0, 1, 2, ...: attempt k+1 is used only once the log shows
//! that attempt k's id belongs to another request (a collision, about one in
//! 9·10^15 per existing user). Ids stay below 2^53, so JavaScript clients
//! read them exactly, and above 2^32, clear of the small ids clients choose.

use super::{RequestId, UserId};
use sha2::{Digest, Sha256};

/// Smallest id the service assigns (2^32).
pub const ASSIGNED_MIN: i64 = 1 << 32;
/// Largest id the service assigns (2^53 - 1).
pub const ASSIGNED_MAX: i64 = (1 << 53) - 1;

/// The id the service assigns to `request_id`'s request at `attempt`.
pub fn assigned_id(request_id: &RequestId, attempt: u32) -> UserId {
    let digest = Sha256::digest(format!("user-id:{}:{attempt}", request_id.as_str()));
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    id_from_seed(u64::from_be_bytes(first))
}

/// Attempts of one request: ids `id(r, 0..MAX_ATTEMPTS)` are tried, each only
/// once the log gave the previous one to another request.
pub const MAX_ATTEMPTS: u32 = 8;

/// Whether `id` is one the service derives from `request_id`: such a user
/// is found from its request id alone, with no index.
pub fn is_derived(request_id: &RequestId, id: UserId) -> bool {
    (ASSIGNED_MIN..=ASSIGNED_MAX).contains(&id.get())
        && (0..MAX_ATTEMPTS).any(|k| assigned_id(request_id, k) == id)
}

/// An assigned id from 64 random bits: for requests without a request id,
/// whose retries cannot be recognised anyway.
pub fn id_from_seed(seed: u64) -> UserId {
    let span = (ASSIGNED_MAX - ASSIGNED_MIN + 1) as u64;
    UserId::parse(ASSIGNED_MIN + (seed % span) as i64).expect("assigned ids are positive")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_always_names_the_same_ids_in_range() {
        let r = RequestId::parse("req-1").unwrap().unwrap();
        assert_eq!(assigned_id(&r, 0), assigned_id(&r, 0));
        assert_ne!(assigned_id(&r, 0), assigned_id(&r, 1));
        // Pinned: the derivation is part of the contract (docs/design.md).
        assert_eq!(assigned_id(&r, 0).get(), PINNED_REQ_1);
        for k in 0..100 {
            let id = assigned_id(&r, k).get();
            assert!((ASSIGNED_MIN..=ASSIGNED_MAX).contains(&id));
        }
        assert_eq!(id_from_seed(0).get(), ASSIGNED_MIN);
        assert!(is_derived(&r, assigned_id(&r, 0)));
        assert!(is_derived(&r, assigned_id(&r, MAX_ATTEMPTS - 1)));
        assert!(!is_derived(&r, assigned_id(&r, MAX_ATTEMPTS)));
        assert!(!is_derived(&r, UserId::parse(5).unwrap()));
        assert!(id_from_seed(u64::MAX).get() <= ASSIGNED_MAX);
    }

    // Computed independently: python3 -c "import hashlib; d = hashlib.sha256(b'user-id:req-1:0').digest(); print((1 << 32) + int.from_bytes(d[:8], 'big') % ((1 << 53) - (1 << 32)))"
    const PINNED_REQ_1: i64 = 8_520_103_694_629_851;
}
