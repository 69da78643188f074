//! A "done that already" set that input can grow, bounded by count: split
//! in shards by key so threads rarely meet on a lock, and a shard that is
//! full (or older than the set's age limit) is forgotten whole. Forgetting
//! only repeats the work the set saves, and an LRU's links per entry would
//! cost more memory than the keys themselves.
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const SHARDS: usize = 16;

/// A key that picks its own shard: keys are digests or fingerprints, so
/// their top bits are already spread evenly.
pub trait ShardKey: Copy + Eq + Hash {
    fn shard(&self) -> usize;
}

impl ShardKey for u64 {
    fn shard(&self) -> usize {
        (self >> 60) as usize
    }
}

impl ShardKey for u128 {
    fn shard(&self) -> usize {
        (self >> 124) as usize
    }
}

struct Shard<K> {
    keys: HashSet<K>,
    since: Instant,
}

pub struct BoundedSet<K> {
    shards: [Mutex<Shard<K>>; SHARDS],
    per_shard: usize,
    max_age: Option<Duration>,
}

impl<K: ShardKey> BoundedSet<K> {
    /// Holds at most `capacity` keys, rounded up to a multiple of the
    /// shards; with `max_age`, a shard is also forgotten once that old.
    pub fn new(capacity: usize, max_age: Option<Duration>) -> Self {
        Self {
            shards: std::array::from_fn(|_| {
                Mutex::new(Shard {
                    keys: HashSet::new(),
                    since: Instant::now(),
                })
            }),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            max_age,
        }
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K>> {
        let mut s = self.shards[key.shard() % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.max_age.is_some_and(|age| s.since.elapsed() > age) {
            s.keys = HashSet::new();
            s.since = Instant::now();
        }
        s
    }

    pub fn contains(&self, key: &K) -> bool {
        self.shard(key).keys.contains(key)
    }

    /// The key held that equals `key` (for keys that carry more than what
    /// they are compared by).
    pub fn get(&self, key: &K) -> Option<K> {
        self.shard(key).keys.get(key).copied()
    }

    /// Adds `key` (replacing an equal one); whether none was there.
    pub fn insert(&self, key: K) -> bool {
        let mut s = self.shard(&key);
        // One lookup while the shard has room (every cache hit comes here).
        if s.keys.len() >= self.per_shard && !s.keys.contains(&key) {
            s.keys = HashSet::new();
            s.since = Instant::now();
        }
        s.keys.replace(key).is_none()
    }

    /// Keys held now, over all shards.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).keys.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key `i` of shard `shard`.
    fn key(shard: u128, i: u128) -> u128 {
        shard << 124 | i
    }

    #[test]
    fn a_full_shard_is_forgotten_alone() {
        // 16 shards of 64.
        let s = BoundedSet::new(1024, None);
        assert!(s.insert(key(9, 0)), "new");
        assert!(!s.insert(key(9, 0)), "held");
        assert!(s.contains(&key(9, 0)));
        assert!(!s.contains(&key(9, 1)));
        for i in 0..64 {
            s.insert(key(3, i));
        }
        assert!(
            (0..64).all(|i| s.contains(&key(3, i))),
            "a shard holds its share"
        );
        assert_eq!(s.len(), 65);
        // One more: that shard starts over, the others keep theirs.
        assert!(s.insert(key(3, 64)));
        assert!(s.contains(&key(3, 64)));
        assert!(!s.contains(&key(3, 0)), "the full shard was forgotten");
        assert!(s.contains(&key(9, 0)), "another shard was not");
        assert_eq!(s.len(), 2);
        for i in 0..100_000 {
            s.insert(key(i % 16, i));
        }
        assert!(s.len() <= 1024, "bounded: {}", s.len());
    }

    #[test]
    fn an_old_shard_is_forgotten() {
        let s = BoundedSet::new(1024, Some(Duration::from_millis(300)));
        s.insert(7u64 << 60);
        assert!(s.contains(&(7u64 << 60)));
        std::thread::sleep(Duration::from_millis(600));
        assert!(!s.contains(&(7u64 << 60)), "older than its age limit");
        assert!(s.insert(7u64 << 60), "remembered anew");
    }
}
