//! A blob's leaves: BLAKE3 is a hash tree, so the chaining values of a
//! blob's aligned 1 MiB pieces hash up to its digest. Kept beside a large
//! blob (32 bytes a MiB), they let one piece be fetched alone and checked
//! against the digest before any of its bytes is used: a read at an offset
//! costs one piece, not the whole blob. The list itself is untrusted input
//! and is checked against the digest as a whole when decoded.
use crate::castore::B3Digest;
use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

/// Bytes of a leaf: a power of two of at least one BLAKE3 chunk (1 KiB),
/// so that every leaf is a whole subtree of the blob's hash tree.
pub const LEAF: u64 = 1 << 20;
/// Bytes of one chaining value.
const CV: usize = 32;
/// Most leaves a list may have (a 128 GiB blob, a list of 4 MiB): bounds
/// what one open may hold; larger blobs are read whole.
pub const MAX_LEAVES: u64 = 1 << 17;

#[derive(Debug, thiserror::Error)]
pub enum LeavesError {
    #[error("a leaf list is for blobs over one leaf ({LEAF} bytes), not {0} bytes")]
    TooSmall(u64),
    #[error("a leaf list of {0} bytes is too long")]
    TooLong(u64),
    #[error("a leaf list for {size} bytes holds {got} bytes, not {want}")]
    Length { size: u64, got: usize, want: u64 },
    #[error("the leaf list of blob {0} does not hash to it")]
    Root(B3Digest),
}

/// The checked chaining values of a blob's leaves.
#[derive(Clone, Debug)]
pub struct Leaves {
    size: u64,
    cvs: Vec<[u8; CV]>,
}

impl Leaves {
    /// Number of leaves of a blob of `size` bytes.
    pub fn count(size: u64) -> u64 {
        size.div_ceil(LEAF).max(1)
    }

    /// The list of blob `digest`, `size` bytes long, from its encoding:
    /// refused unless it hashes up to `digest`.
    pub fn decode(digest: &B3Digest, size: u64, bytes: &[u8]) -> Result<Leaves, LeavesError> {
        if size <= LEAF {
            return Err(LeavesError::TooSmall(size));
        }
        let n = Self::count(size);
        if n > MAX_LEAVES {
            return Err(LeavesError::TooLong(size));
        }
        if bytes.len() as u64 != n * CV as u64 {
            return Err(LeavesError::Length {
                size,
                got: bytes.len(),
                want: n * CV as u64,
            });
        }
        let cvs: Vec<[u8; CV]> = bytes
            .chunks_exact(CV)
            .map(|c| {
                let mut cv = [0u8; CV];
                cv.copy_from_slice(c);
                cv
            })
            .collect();
        if B3Digest::from(root(&cvs)) != *digest {
            return Err(LeavesError::Root(*digest));
        }
        Ok(Leaves { size, cvs })
    }

    /// The encoding: the chaining values in order.
    pub fn encode(&self) -> Vec<u8> {
        self.cvs.concat()
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.cvs.len() as u64
    }

    /// Always false: a list has at least two leaves.
    pub fn is_empty(&self) -> bool {
        self.cvs.is_empty()
    }

    /// Byte range of leaf `i` in the blob.
    pub fn range(&self, i: u64) -> std::ops::Range<u64> {
        let start = (i * LEAF).min(self.size);
        start..(start + LEAF).min(self.size)
    }

    /// Whether `data` is exactly leaf `i` of the blob.
    pub fn check(&self, i: u64, data: &[u8]) -> bool {
        let r = self.range(i);
        let Some(want) = self.cvs.get(i as usize) else {
            return false;
        };
        data.len() as u64 == r.end - r.start && leaf_cv(r.start, data) == *want
    }
}

/// The chaining value of the leaf that starts at `offset`.
fn leaf_cv(offset: u64, data: &[u8]) -> [u8; CV] {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

/// The root hash over at least two leaves. BLAKE3's left subtree holds the
/// largest power of two of chunks below the whole; with leaves of a power
/// of two of chunks that is the largest power of two of leaves below `n`.
fn root(cvs: &[[u8; CV]]) -> blake3::Hash {
    let split = left_leaves(cvs.len());
    merge_subtrees_root(&subtree(&cvs[..split]), &subtree(&cvs[split..]), Mode::Hash)
}

fn subtree(cvs: &[[u8; CV]]) -> [u8; CV] {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let split = left_leaves(cvs.len());
    merge_subtrees_non_root(&subtree(&cvs[..split]), &subtree(&cvs[split..]), Mode::Hash)
}

/// Largest power of two below `n` (`n` at least 2).
fn left_leaves(n: usize) -> usize {
    n.saturating_sub(1)
        .checked_next_power_of_two()
        .map_or(1, |p| if p >= n { p / 2 } else { p })
}

/// Hashes a blob as it is written, leaf by leaf: answers its digest and,
/// when it is over one leaf and has at most [`MAX_LEAVES`], its leaf list.
/// Its memory does not grow with the blob past that list: the digest is
/// kept as BLAKE3's own stack of completed subtrees (one per bit of the
/// leaf count).
pub struct LeafHasher {
    leaf: blake3::Hasher,
    /// Bytes in the current leaf.
    fill: u64,
    size: u64,
    /// Leaves completed so far.
    done: u64,
    /// Chaining values of the completed subtrees, largest first.
    stack: Vec<[u8; CV]>,
    /// Every completed leaf's chaining value, until there are too many.
    list: Option<Vec<[u8; CV]>>,
    list_cap: u64,
}

impl Default for LeafHasher {
    fn default() -> Self {
        Self::with_list_cap(MAX_LEAVES)
    }
}

impl LeafHasher {
    /// A hasher that keeps a list of at most `cap` leaves.
    pub fn with_list_cap(cap: u64) -> Self {
        Self {
            leaf: blake3::Hasher::new(),
            fill: 0,
            size: 0,
            done: 0,
            stack: Vec::new(),
            list: Some(Vec::new()),
            list_cap: cap,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.fill == LEAF {
                // more follows, so the leaf is not the root
                self.push(self.leaf.finalize_non_root());
                self.leaf = blake3::Hasher::new();
                self.leaf.set_input_offset(self.size);
                self.fill = 0;
            }
            let n = ((LEAF - self.fill) as usize).min(data.len());
            self.leaf.update(&data[..n]);
            self.fill += n as u64;
            self.size += n as u64;
            data = &data[n..];
        }
    }

    /// Adds a completed leaf once the next one has begun: every subtree it
    /// completes (one per trailing zero bit of the new count) is merged.
    fn push(&mut self, mut cv: [u8; CV]) {
        if let Some(list) = &mut self.list {
            if (list.len() as u64) < self.list_cap {
                list.push(cv);
            } else {
                self.list = None;
            }
        }
        self.done += 1;
        let mut n = self.done;
        while n & 1 == 0 {
            let Some(left) = self.stack.pop() else { break };
            cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
            n >>= 1;
        }
        self.stack.push(cv);
    }

    /// The digest, and the leaf list when the blob is over one leaf and
    /// the list was kept.
    pub fn finish(self) -> (B3Digest, Option<Leaves>) {
        if self.done == 0 {
            return (B3Digest::from(self.leaf.finalize()), None);
        }
        let last = self.leaf.finalize_non_root();
        let mut cv = last;
        let mut stack = self.stack;
        while stack.len() > 1 {
            if let Some(left) = stack.pop() {
                cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
            }
        }
        let digest = B3Digest::from(match stack.pop() {
            Some(left) => merge_subtrees_root(&left, &cv, Mode::Hash),
            // one leaf only (not reached: `done` > 0): it is the root
            None => self.leaf.finalize(),
        });
        let leaves = self
            .list
            .filter(|l| (l.len() as u64) < self.list_cap)
            .map(|mut cvs| {
                cvs.push(last);
                Leaves {
                    size: self.size,
                    cvs,
                }
            });
        (digest, leaves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 1000) as u8).collect()
    }

    #[test]
    fn leaves_hash_up_to_blake3_for_every_shape_of_tree() {
        let l = LEAF as usize;
        for size in [
            0,
            1,
            l - 1,
            l,
            l + 1,
            2 * l,
            2 * l + 1,
            3 * l,
            3 * l + 17,
            4 * l,
            5 * l - 1,
            7 * l + 1024,
            8 * l,
            9 * l + 1,
        ] {
            let d = data(size);
            let want = B3Digest::from(blake3::hash(&d));
            let mut h = LeafHasher::default();
            // odd write sizes cross leaf boundaries
            for piece in d.chunks(300_007) {
                h.update(piece);
            }
            let (digest, leaves) = h.finish();
            assert_eq!(digest, want, "size {size}");
            assert_eq!(leaves.is_some(), size > l, "size {size}");
            let Some(leaves) = leaves else { continue };
            let back = Leaves::decode(&want, size as u64, &leaves.encode()).unwrap();
            assert_eq!(back.len(), Leaves::count(size as u64));
            for i in 0..back.len() {
                let r = back.range(i);
                let piece = &d[r.start as usize..r.end as usize];
                assert!(back.check(i, piece), "size {size} leaf {i}");
                let mut bad = piece.to_vec();
                bad[0] ^= 1;
                assert!(!back.check(i, &bad), "size {size} leaf {i} flipped");
                assert!(!back.check(i, &piece[1..]), "size {size} leaf {i} short");
            }
            assert!(!back.check(back.len(), &[]));
        }
    }

    #[test]
    fn a_list_that_does_not_hash_to_the_digest_is_refused() {
        let d = data(3 * LEAF as usize + 5);
        let mut h = LeafHasher::default();
        h.update(&d);
        let (digest, leaves) = h.finish();
        let enc = leaves.unwrap().encode();
        let mut bad = enc.clone();
        bad[40] ^= 1;
        assert!(matches!(
            Leaves::decode(&digest, d.len() as u64, &bad),
            Err(LeavesError::Root(_))
        ));
        assert!(matches!(
            Leaves::decode(&digest, d.len() as u64, &enc[..enc.len() - 32]),
            Err(LeavesError::Length { .. })
        ));
        // a size with as many leaves but another last leaf hashes alike
        // here; the fetched last leaf then fails its check
        let other = Leaves::decode(&digest, d.len() as u64 + 1, &enc).unwrap();
        let last = &d[3 * LEAF as usize..];
        assert!(!other.check(3, last), "shorter than the list's size");
        assert!(!other.check(3, &[last, &[0]].concat()), "other bytes");
        assert!(matches!(
            Leaves::decode(&digest, LEAF, &enc),
            Err(LeavesError::TooSmall(_))
        ));
        assert!(matches!(
            Leaves::decode(&digest, u64::MAX, &enc),
            Err(LeavesError::TooLong(_))
        ));
    }

    #[test]
    fn past_its_list_cap_the_hasher_still_answers_the_digest() {
        for leaves in [2u64, 3, 5, 8, 13] {
            let d = data((leaves * LEAF) as usize - 3);
            let mut h = LeafHasher::with_list_cap(2);
            h.update(&d);
            let (digest, list) = h.finish();
            assert_eq!(digest, B3Digest::from(blake3::hash(&d)), "{leaves} leaves");
            assert_eq!(list.is_some(), leaves <= 2, "{leaves} leaves");
        }
    }

    #[test]
    fn left_subtree_is_the_largest_power_of_two_below() {
        for (n, want) in [(2, 1), (3, 2), (4, 2), (5, 4), (8, 4), (9, 8), (17, 16)] {
            assert_eq!(left_leaves(n), want, "n {n}");
        }
    }
}
