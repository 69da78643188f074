//! Which objects a reader looked at lately (their access time, see
//! [`super::touches`]). Every hit of every worker asks it, so it takes no
//! lock and hashes with one multiply: a fixed table of cache-line buckets
//! of eight slots, each slot a key's tag and the time it was looked at. A
//! key has one bucket and, when the bucket is full, pushes out its oldest
//! slot. Two workers writing one bucket at once may overwrite each other:
//! the key lost is only looked at once more, as is one pushed out early.
//!
//! Keys are digest prefixes, mixed with a secret drawn per table before a
//! bucket is picked, so a store cannot cheaply grind digests into one
//! bucket; were it to, its keys would only be looked at more often.
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

const WAYS: usize = 8;
/// Time is kept in steps of this, in a slot's low 15 bits (a step count
/// that wraps every six days; an entry left that long unseen may look
/// recent once).
const STEP: Duration = Duration::from_secs(16);
const STEP_MASK: u64 = 0x7fff;
/// Set in every slot in use, so no used slot reads as empty (zero).
const USED: u64 = 0x8000;
const TAG_MASK: u64 = !0xffff;
/// An odd constant (the golden ratio's fraction of 2^64): multiplying by
/// it carries every bit of the key into the top ones that pick a bucket.
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Default)]
#[repr(align(64))]
struct Bucket([AtomicU64; WAYS]);

pub struct LookedAt {
    buckets: Box<[Bucket]>,
    /// log2 of the bucket count, for picking by the mixed key's top bits.
    bits: u32,
    /// Steps an entry stays recent (at least one, less than half the
    /// step count's range).
    fresh: u64,
    seed: u64,
    start: Instant,
}

impl LookedAt {
    /// Remembers about `capacity` keys (rounded up to a power of two, at
    /// least one bucket), each for `recheck` rounded down to whole steps
    /// (one step at least, three days at most).
    pub fn new(capacity: usize, recheck: Duration) -> Self {
        let buckets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        Self {
            buckets: std::iter::repeat_with(Bucket::default)
                .take(buckets)
                .collect(),
            bits: buckets.trailing_zeros(),
            fresh: (recheck.as_secs() / STEP.as_secs()).clamp(1, STEP_MASK / 2),
            seed: RandomState::new().hash_one(0u64),
            start: Instant::now(),
        }
    }

    /// Whether `key` was not looked at within the recheck time; if so, it
    /// is remembered as looked at now.
    pub fn due(&self, key: u64) -> bool {
        let step = self.start.elapsed().as_secs() / STEP.as_secs();
        self.due_at(key, step)
    }

    /// The key's bucket, its tag, and the slot its scan starts at.
    fn place(&self, key: u64) -> (Option<&Bucket>, u64, usize) {
        let mixed = (key ^ self.seed).wrapping_mul(MIX);
        let index = mixed.checked_shr(64 - self.bits).unwrap_or(0) as usize;
        (
            self.buckets.get(index),
            mixed & TAG_MASK,
            mixed as usize % WAYS,
        )
    }

    fn due_at(&self, key: u64, step: u64) -> bool {
        let (Some(bucket), tag, first) = self.place(key) else {
            return true;
        };
        let now = step & STEP_MASK;
        // Scanned from a slot the key picks, so that among slots of equal
        // age (all written within one step) the one pushed out varies.
        let mut victim = first;
        let mut victim_age = 0;
        for i in (first..WAYS).chain(0..first) {
            let v = bucket.0[i].load(Relaxed);
            let age = age(v, now);
            if v & USED != 0 && v & TAG_MASK == tag {
                if age < self.fresh {
                    return false;
                }
                victim = i;
                break;
            }
            if age > victim_age {
                victim = i;
                victim_age = age;
            }
        }
        bucket.0[victim].store(tag | USED | now, Relaxed);
        true
    }
}

/// Steps since slot `v` was written, as of step `now`; an empty slot is
/// oldest of all. A slot written a step ahead (by a worker that read the
/// clock a moment later) counts as just written.
fn age(v: u64, now: u64) -> u64 {
    if v & USED == 0 {
        return u64::MAX;
    }
    let steps = now.wrapping_sub(v) & STEP_MASK;
    if steps > STEP_MASK / 2 {
        0
    } else {
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&blake3::hash(&i.to_le_bytes()).as_bytes()[..8]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn a_key_is_due_once_until_its_time_passes() {
        let t = LookedAt::new(1024, Duration::from_secs(300));
        assert!(t.due_at(key(0), 5), "first hit");
        assert!(!t.due_at(key(0), 5), "second hit");
        assert!(t.due_at(key(1), 5), "another key");
        assert!(!t.due_at(key(0), 5 + 17), "still recent 272 s later");
        assert!(t.due_at(key(0), 5 + 18), "due again after 288 s");
        assert!(!t.due_at(key(0), 5 + 18), "and recent again");
        // The step count wraps: recency is measured across it.
        assert!(t.due_at(key(2), STEP_MASK));
        assert!(!t.due_at(key(2), STEP_MASK + 3));
        assert!(t.due_at(key(2), STEP_MASK + 20));
    }

    /// Whether the table holds `key` as recent at `step`, without
    /// writing.
    fn holds(t: &LookedAt, key: u64, step: u64) -> bool {
        let (Some(bucket), tag, _) = t.place(key) else {
            return false;
        };
        bucket
            .0
            .iter()
            .map(|s| s.load(Relaxed))
            .any(|v| v & USED != 0 && v & TAG_MASK == tag && age(v, step & STEP_MASK) < t.fresh)
    }

    /// Slots written at `step`.
    fn written_at(t: &LookedAt, step: u64) -> usize {
        t.buckets
            .iter()
            .flat_map(|b| b.0.iter())
            .filter(|s| {
                let v = s.load(Relaxed);
                v & USED != 0 && v & STEP_MASK == step
            })
            .count()
    }

    #[test]
    fn the_table_holds_its_bound_and_forgets_the_oldest() {
        let t = LookedAt::new(65_536, Duration::from_secs(300));
        // Half the bound fits, all but the keys of crowded buckets (about
        // 0.8% with eight slots a bucket; the count writes nothing).
        let n = 32_768;
        for i in 0..n {
            t.due_at(key(i), 1);
        }
        let kept = (0..n).filter(|&i| holds(&t, key(i), 1)).count() as u64;
        assert!(kept > n * 98 / 100, "kept {kept} of {n}");
        // Four times the bound, a step later: every slot of the first
        // step is pushed out before any of the second, and the newest keys
        // are held.
        for i in n..n + 4 * 65_536 {
            t.due_at(key(i), 2);
        }
        assert_eq!(written_at(&t, 1), 0, "slots of the first step left");
        assert!(t.due_at(key(0), 2), "pushed out by newer keys");
        let last = n + 4 * 65_536;
        let newest = (last - 1000..last)
            .filter(|&i| holds(&t, key(i), 2))
            .count();
        assert!(newest > 900, "of the newest 1000, {newest} are held");
    }

    #[test]
    fn a_slot_written_a_step_ahead_counts_as_recent() {
        // One bucket of eight. A worker that read the clock a moment later
        // wrote key 0 at step 8; the others write at step 1, then 7.
        let t = LookedAt::new(8, Duration::from_secs(300));
        assert!(t.due_at(key(0), 8));
        for i in 1..8 {
            assert!(t.due_at(key(i), 1), "key {i}");
        }
        assert!(!t.due_at(key(0), 7), "recent, not stale");
        // A ninth key pushes out one of the step-1 keys, not key 0.
        assert!(t.due_at(key(100), 7));
        assert!(holds(&t, key(0), 7));
        assert_eq!((1..8).filter(|&i| holds(&t, key(i), 7)).count(), 6);
    }

    #[test]
    fn tables_mix_keys_by_their_own_secret() {
        let a = LookedAt::new(1024, Duration::from_secs(300));
        let b = LookedAt::new(1024, Duration::from_secs(300));
        assert_ne!(a.seed, b.seed);
    }
}
