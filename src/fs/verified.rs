//! Which blobs have been checked against their digest and size, so that a
//! warm walk neither reads and hashes every file again nor sends its opens
//! to the worker pool to do so. Remembered by a keyed 128-bit fingerprint
//! of (digest, size): 16 bytes where the pair is 40 (34 with the table's
//! slack), so the default bound of a large closure's files costs at most
//! about 2.2 MiB. The key is secret, drawn from the OS for each view, so no
//! store or guest can aim a blob at a fingerprint already checked; by
//! chance, two collide once in 2^128.
use crate::bounded_set::BoundedSet;
use crate::castore::B3Digest;
use std::hash::{BuildHasher, RandomState};

pub struct Verified {
    key: [u8; 32],
    set: BoundedSet<u128>,
}

impl Verified {
    /// Remembers at most `capacity` blobs (rounded up to a multiple of 16).
    pub fn new(capacity: usize) -> Self {
        Self {
            key: secret(),
            set: BoundedSet::new(capacity, None),
        }
    }

    fn fingerprint(&self, digest: &B3Digest, size: u64) -> u128 {
        let mut input = [0u8; 40];
        input[..32].copy_from_slice(digest.as_bytes());
        input[32..].copy_from_slice(&size.to_le_bytes());
        let mut fp = [0u8; 16];
        fp.copy_from_slice(&blake3::keyed_hash(&self.key, &input).as_bytes()[..16]);
        u128::from_le_bytes(fp)
    }

    pub fn contains(&self, digest: &B3Digest, size: u64) -> bool {
        self.set.contains(&self.fingerprint(digest, size))
    }

    pub fn insert(&self, digest: &B3Digest, size: u64) {
        self.set.insert(self.fingerprint(digest, size));
    }
}

/// 32 bytes from the OS. Should it fail (it does not on Linux 3.17 and
/// later), the key falls back to the standard library's hash-table seed:
/// 128 bits from the OS too, drawn at the thread's first table.
fn secret() -> [u8; 32] {
    let mut key = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut key) {
        tracing::warn!("no random key from the OS ({e}): using the hash tables' seed");
        let s = RandomState::new();
        for (i, part) in key.chunks_exact_mut(8).enumerate() {
            part.copy_from_slice(&s.hash_one(i).to_le_bytes());
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u32) -> B3Digest {
        B3Digest::from(blake3::hash(&i.to_le_bytes()))
    }

    #[test]
    fn a_blob_is_known_by_digest_and_size() {
        let v = Verified::new(1024);
        v.insert(&digest(1), 10);
        assert!(v.contains(&digest(1), 10));
        assert!(!v.contains(&digest(1), 11), "another size");
        assert!(!v.contains(&digest(2), 10), "another digest");
        let other = Verified::new(1024);
        assert_ne!(
            v.fingerprint(&digest(1), 10),
            other.fingerprint(&digest(1), 10),
            "each set draws its own key"
        );
    }

    #[test]
    fn fingerprints_spread_over_the_shards() {
        // Half the bound: were the fingerprints to crowd some shards, those
        // would fill and forget before the others.
        let v = Verified::new(32_768);
        for i in 0..16_384 {
            v.insert(&digest(i), u64::from(i));
        }
        assert_eq!(v.set.len(), 16_384);
        assert!((0..16_384).all(|i| v.contains(&digest(i), u64::from(i))));
    }
}
