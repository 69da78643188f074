//! Which blobs have been checked against their digest and size, so that a
//! warm walk neither reads and hashes every file again nor sends its opens
//! to the worker pool to do so. Remembered by a keyed 64-bit fingerprint
//! of (digest, size) and, for a blob read from a file, a keyed 64-bit
//! stamp of that file's identity (device, inode, size, modification and
//! change times): 16 bytes where the pair is 40 (34 with the table's
//! slack), so the default bound of a large closure's files costs at most
//! about 2.2 MiB. A file opened again is trusted only while it is the file
//! that was checked: one replaced (a cache object evicted and fetched
//! again, a store file swapped) or written to since is checked again.
//! Damage that leaves a file's metadata alone (a failing disk under an
//! unchanged inode) is not seen until the blob is forgotten or the view
//! restarts. The key is secret, drawn from the OS for each view, so no
//! store or guest can aim a blob at a fingerprint already checked.
use crate::castore::B3Digest;
use crate::view::bounded_set::{BoundedSet, ShardKey};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

/// A remembered blob: compared (and hashed) by its fingerprint alone, so
/// it is found without knowing its file; `file` is the stamp of the file
/// that was checked, 0 for a blob not read from a file.
#[derive(Clone, Copy, Debug)]
struct Entry {
    fp: u64,
    file: u64,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.fp == other.fp
    }
}

impl Eq for Entry {}

impl Hash for Entry {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.fp.hash(h)
    }
}

impl ShardKey for Entry {
    fn shard(&self) -> usize {
        self.fp.shard()
    }
}

pub struct Verified {
    key: [u8; 32],
    set: BoundedSet<Entry>,
}

impl Verified {
    /// Remembers at most `capacity` blobs (rounded up to a multiple of 16).
    pub fn new(capacity: usize) -> Self {
        Self {
            key: secret(),
            set: BoundedSet::new(capacity, None),
        }
    }

    fn fingerprint(&self, digest: &B3Digest, size: u64) -> u64 {
        let mut input = [0u8; 41];
        input[0] = b'b';
        input[1..33].copy_from_slice(digest.as_bytes());
        input[33..].copy_from_slice(&size.to_le_bytes());
        self.keyed(&input)
    }

    fn keyed(&self, input: &[u8]) -> u64 {
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&blake3::keyed_hash(&self.key, input).as_bytes()[..8]);
        u64::from_le_bytes(fp)
    }

    /// The stamp of an opened file's identity; None when it cannot be
    /// told (then it is checked every time).
    pub fn stamp(&self, f: &std::fs::File) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata().ok()?;
        let mut input = [0u8; 1 + 7 * 8];
        input[0] = b'f';
        let fields = [
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime() as u64,
            m.mtime_nsec() as u64,
            m.ctime() as u64,
            m.ctime_nsec() as u64,
        ];
        for (i, v) in fields.iter().enumerate() {
            input[1 + i * 8..9 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        // 0 means "no file"
        Some(self.keyed(&input).max(1))
    }

    /// Whether the blob was checked, from whatever source: for hints, and
    /// for readers that are not files.
    pub fn contains(&self, digest: &B3Digest, size: u64) -> bool {
        self.set.contains(&Entry {
            fp: self.fingerprint(digest, size),
            file: 0,
        })
    }

    /// Whether the blob was checked as read from the file of `stamp`.
    pub fn contains_file(&self, digest: &B3Digest, size: u64, stamp: u64) -> bool {
        let probe = Entry {
            fp: self.fingerprint(digest, size),
            file: 0,
        };
        self.set.get(&probe).is_some_and(|e| e.file == stamp)
    }

    /// The blob was checked, read from the file of `stamp` when given.
    pub fn insert(&self, digest: &B3Digest, size: u64, stamp: Option<u64>) {
        self.set.insert(Entry {
            fp: self.fingerprint(digest, size),
            file: stamp.unwrap_or(0),
        });
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
        v.insert(&digest(1), 10, None);
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
    fn a_file_is_trusted_only_while_it_is_the_file_that_was_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("blob");
        std::fs::write(&path, b"one").unwrap();
        let v = Verified::new(1024);
        let stamp = v.stamp(&std::fs::File::open(&path).unwrap()).unwrap();
        v.insert(&digest(1), 3, Some(stamp));
        assert!(v.contains(&digest(1), 3), "known, for hints");
        let again = v.stamp(&std::fs::File::open(&path).unwrap()).unwrap();
        assert!(v.contains_file(&digest(1), 3, again), "the same file");
        // replaced by rename: another inode
        let new = tmp.path().join("new");
        std::fs::write(&new, b"two").unwrap();
        std::fs::rename(&new, &path).unwrap();
        let replaced = v.stamp(&std::fs::File::open(&path).unwrap()).unwrap();
        assert!(!v.contains_file(&digest(1), 3, replaced));
        // written in place: another change time
        v.insert(&digest(1), 3, Some(replaced));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, b"six").unwrap();
        let written = v.stamp(&std::fs::File::open(&path).unwrap()).unwrap();
        assert!(!v.contains_file(&digest(1), 3, written));
        // checked from a stream: no file is trusted on that account
        v.insert(&digest(2), 3, None);
        assert!(!v.contains_file(&digest(2), 3, written));
    }

    #[test]
    fn fingerprints_spread_over_the_shards() {
        // Half the bound: were the fingerprints to crowd some shards, those
        // would fill and forget before the others.
        let v = Verified::new(32_768);
        for i in 0..16_384 {
            v.insert(&digest(i), u64::from(i), None);
        }
        assert_eq!(v.set.len(), 16_384);
        assert!((0..16_384).all(|i| v.contains(&digest(i), u64::from(i))));
    }
}
