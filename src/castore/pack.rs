//! Packs: a tree's small blobs side by side in a few large objects, in the
//! order a walk of the tree meets them (depth first, by name, as `find`
//! and the host cache's prefetch go). An object store charges a request,
//! and a round trip, per object: read one by one, the 25,000 small files of
//! a documentation tree cost 25,000 GETs; from packs, a run of them that a
//! reader wants next is one ranged GET. Packs are kept beside the blobs,
//! never instead of them, and only speed reads up.
//!
//! A pack is parts (each up to [`PART`] bytes: blobs' bytes back to back)
//! and an index naming each part by its digest and each blob by its part,
//! offset and length. The index is untrusted input: it is checked here for
//! shape and bounds only; every blob read through it is checked against
//! its own digest before use, so a wrong index or part costs a fallback
//! read, never wrong bytes.
use crate::castore::B3Digest;
use std::collections::HashMap;

/// Largest blob put in a pack: the host cache's batches take blobs up to
/// this size, larger ones are read alone (and by leaves above 4 MiB).
pub const MAX_PACKED: u64 = 256 << 10;
/// Bytes a part fills up to before the next one starts.
pub const PART: usize = 8 << 20;
/// Most blobs one index names (an index of about 12 MiB): a larger tree
/// packs its first ones and leaves the rest to be read alone.
pub const MAX_ENTRIES: usize = 1 << 18;
/// Most parts one index names (2 GiB of small blobs).
const MAX_PARTS: usize = 256;
const MAGIC: &[u8; 8] = b"tvixpk1\n";
const PART_LEN: usize = 32 + 8;
const ENTRY_LEN: usize = 32 + 4 + 8 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    #[error("not a pack index (no magic)")]
    Magic,
    #[error("a pack index is cut short")]
    Short,
    #[error("a pack index has {0} bytes past its end")]
    Trailing(usize),
    #[error("a pack index names {0} parts, more than {MAX_PARTS}")]
    TooManyParts(usize),
    #[error("a pack index names {0} blobs, more than {MAX_ENTRIES}")]
    TooManyEntries(usize),
    #[error("a pack part of {0} bytes is larger than a part may be")]
    PartTooLarge(u64),
    #[error("blob {0} of a pack index lies outside its part")]
    Outside(B3Digest),
    #[error("blob {0} of a pack index is {1} bytes, more than a packed blob may be")]
    TooLarge(B3Digest, u64),
    #[error("blob {0} is named twice in a pack index")]
    Twice(B3Digest),
    #[error("blob {0} of a pack index is empty")]
    Empty(B3Digest),
}

/// Where a packed blob's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub part: u32,
    pub offset: u64,
    pub len: u32,
}

/// A tree's pack index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackIndex {
    /// Each part's digest (its key) and size.
    pub parts: Vec<(B3Digest, u64)>,
    /// Each packed blob, in the order it was packed.
    pub entries: Vec<(B3Digest, Entry)>,
}

impl PackIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(16 + self.parts.len() * PART_LEN + self.entries.len() * ENTRY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.parts.len() as u32).to_le_bytes());
        for (d, size) in &self.parts {
            out.extend_from_slice(d.as_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (d, e) in &self.entries {
            out.extend_from_slice(d.as_bytes());
            out.extend_from_slice(&e.part.to_le_bytes());
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
        }
        out
    }

    /// Bytes the encoding of an index of this many parts and blobs takes
    /// at most: what a reader may fetch before decoding it.
    pub fn max_encoded_len() -> u64 {
        (16 + MAX_PARTS * PART_LEN + MAX_ENTRIES * ENTRY_LEN) as u64
    }

    pub fn decode(mut b: &[u8]) -> Result<Self, PackError> {
        let magic = take(&mut b, MAGIC.len()).map_err(|_| PackError::Magic)?;
        if magic != MAGIC {
            return Err(PackError::Magic);
        }
        let n = u32_le(take(&mut b, 4)?) as usize;
        if n > MAX_PARTS {
            return Err(PackError::TooManyParts(n));
        }
        let mut parts = Vec::with_capacity(n);
        for _ in 0..n {
            let d = digest(take(&mut b, 32)?);
            let size = u64_le(take(&mut b, 8)?);
            if size > (PART as u64) + MAX_PACKED {
                return Err(PackError::PartTooLarge(size));
            }
            parts.push((d, size));
        }
        let m = u32_le(take(&mut b, 4)?) as usize;
        if m > MAX_ENTRIES {
            return Err(PackError::TooManyEntries(m));
        }
        if b.len() < m * ENTRY_LEN {
            return Err(PackError::Short);
        }
        let mut entries = Vec::with_capacity(m);
        let mut seen = std::collections::HashSet::with_capacity(m);
        for _ in 0..m {
            let d = digest(take(&mut b, 32)?);
            let e = Entry {
                part: u32_le(take(&mut b, 4)?),
                offset: u64_le(take(&mut b, 8)?),
                len: u32_le(take(&mut b, 4)?),
            };
            if u64::from(e.len) > MAX_PACKED {
                return Err(PackError::TooLarge(d, e.len.into()));
            }
            // what a packer never writes: refused, so that an index's
            // weight in memory is what its blobs make it
            if e.len == 0 {
                return Err(PackError::Empty(d));
            }
            if !seen.insert(d) {
                return Err(PackError::Twice(d));
            }
            let within = parts
                .get(e.part as usize)
                .and_then(|(_, size)| e.offset.checked_add(e.len.into()).map(|end| end <= *size));
            if within != Some(true) {
                return Err(PackError::Outside(d));
            }
            entries.push((d, e));
        }
        if !b.is_empty() {
            return Err(PackError::Trailing(b.len()));
        }
        Ok(Self { parts, entries })
    }

    /// The entries by blob digest (the first, where one is named twice).
    pub fn by_digest(&self) -> HashMap<B3Digest, Entry> {
        let mut m = HashMap::new();
        for (d, e) in &self.entries {
            m.entry(*d).or_insert(*e);
        }
        m.shrink_to_fit();
        m
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], PackError> {
    if b.len() < n {
        return Err(PackError::Short);
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

fn u32_le(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

fn u64_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn digest(b: &[u8]) -> B3Digest {
    let mut a = [0u8; 32];
    a.copy_from_slice(b);
    B3Digest::from(a)
}

/// Builds a pack as a tree is walked: blobs are added in walk order, and
/// a part is handed out each time one fills.
#[derive(Default)]
pub struct Packer {
    part: Vec<u8>,
    index: PackIndex,
    seen: std::collections::HashSet<B3Digest>,
}

impl Packer {
    /// Whether a blob of `size` bytes goes in a pack.
    pub fn takes(size: u64) -> bool {
        size <= MAX_PACKED
    }

    /// Adds a blob (once per digest, while the index has room); answers a
    /// part that filled and its digest, for the caller to store before it
    /// stores the index.
    pub fn add(&mut self, digest: B3Digest, data: &[u8]) -> Option<(B3Digest, Vec<u8>)> {
        // an empty blob needs no read: its digest says it all
        if data.is_empty()
            || !Self::takes(data.len() as u64)
            || self.index.entries.len() >= MAX_ENTRIES
            || self.index.parts.len() >= MAX_PARTS
            || !self.seen.insert(digest)
        {
            return None;
        }
        self.index.entries.push((
            digest,
            Entry {
                part: self.index.parts.len() as u32,
                offset: self.part.len() as u64,
                len: data.len() as u32,
            },
        ));
        self.part.extend_from_slice(data);
        (self.part.len() >= PART).then(|| self.seal())
    }

    /// Ends the current part (when it has any bytes) and answers it.
    pub fn flush(&mut self) -> Option<(B3Digest, Vec<u8>)> {
        (!self.part.is_empty()).then(|| self.seal())
    }

    fn seal(&mut self) -> (B3Digest, Vec<u8>) {
        let part = std::mem::take(&mut self.part);
        let digest = B3Digest::of(&part);
        self.index.parts.push((digest, part.len() as u64));
        (digest, part)
    }

    /// The index, once every part is flushed and stored; `None` when
    /// nothing was packed.
    pub fn finish(self) -> Option<PackIndex> {
        (!self.index.entries.is_empty()).then_some(self.index)
    }

    /// Blobs packed so far.
    pub fn len(&self) -> usize {
        self.index.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(n: usize, size: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, PackIndex) {
        let mut p = Packer::default();
        let mut parts = Vec::new();
        let blobs: Vec<Vec<u8>> = (0..n)
            .map(|i| (0..size).map(|j| (i * 7 + j) as u8).collect())
            .collect();
        for b in &blobs {
            parts.extend(p.add(B3Digest::of(b), b).map(|(_, p)| p));
        }
        parts.extend(p.flush().map(|(_, p)| p));
        let index = p.finish().unwrap();
        (blobs, parts, index)
    }

    #[test]
    fn blobs_are_found_where_the_index_says_and_parts_fill_in_order() {
        let (blobs, parts, index) = packed(100, 200 << 10);
        assert_eq!(parts.len(), 3, "20 MB in parts of 8 MiB");
        assert_eq!(index.parts.len(), parts.len());
        for (p, (d, size)) in parts.iter().zip(&index.parts) {
            assert_eq!(B3Digest::of(p), *d);
            assert_eq!(p.len() as u64, *size);
        }
        let back = PackIndex::decode(&index.encode()).unwrap();
        assert_eq!(back, index);
        let by = back.by_digest();
        for b in &blobs {
            let e = by[&B3Digest::of(b)];
            let part = &parts[e.part as usize];
            assert_eq!(
                &part[e.offset as usize..][..e.len as usize],
                &b[..],
                "a blob read back through the index"
            );
        }
    }

    #[test]
    fn large_and_repeated_blobs_are_left_out() {
        let mut p = Packer::default();
        let big = vec![1u8; (MAX_PACKED + 1) as usize];
        assert!(p.add(B3Digest::of(&big), &big).is_none());
        assert!(p.is_empty());
        p.add(B3Digest::of(b"a"), b"a");
        p.add(B3Digest::of(b"a"), b"a");
        assert_eq!(p.len(), 1);
        // empty blobs are not packed: an index whose last entries were
        // empty would name a part never stored
        let mut p = Packer::default();
        assert!(p.add(B3Digest::of(b""), b"").is_none());
        assert!(p.flush().is_none());
        assert!(p.finish().is_none());
    }

    #[test]
    fn bad_indexes_are_refused() {
        let (_, _, index) = packed(3, 1000);
        let good = index.encode();
        assert_eq!(PackIndex::decode(b"nope"), Err(PackError::Magic));
        assert_eq!(
            PackIndex::decode(&good[..good.len() - 1]),
            Err(PackError::Short)
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(PackIndex::decode(&long), Err(PackError::Trailing(1)));
        // a blob past its part's end
        let mut outside = index.clone();
        outside.entries[2].1.offset = 2_500;
        assert!(matches!(
            PackIndex::decode(&outside.encode()),
            Err(PackError::Outside(_))
        ));
        let mut no_part = index.clone();
        no_part.entries[0].1.part = 1;
        assert!(matches!(
            PackIndex::decode(&no_part.encode()),
            Err(PackError::Outside(_))
        ));
        let mut wrap = index.clone();
        wrap.entries[0].1.offset = u64::MAX;
        assert!(matches!(
            PackIndex::decode(&wrap.encode()),
            Err(PackError::Outside(_))
        ));
        let mut twice = index.clone();
        twice.entries[1].0 = twice.entries[0].0;
        assert!(matches!(
            PackIndex::decode(&twice.encode()),
            Err(PackError::Twice(_))
        ));
        let mut empty = index.clone();
        empty.entries[1].1.len = 0;
        assert!(matches!(
            PackIndex::decode(&empty.encode()),
            Err(PackError::Empty(_))
        ));
        // a count that claims more than is there, or than is allowed
        let mut many = good.clone();
        let at = 8 + 4 + PART_LEN;
        many[at..at + 4].copy_from_slice(&(MAX_ENTRIES as u32 + 1).to_le_bytes());
        assert_eq!(
            PackIndex::decode(&many),
            Err(PackError::TooManyEntries(MAX_ENTRIES + 1))
        );
        many[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(PackIndex::decode(&many), Err(PackError::Short));
        let mut parts = good;
        parts[8..12].copy_from_slice(&(MAX_PARTS as u32 + 1).to_le_bytes());
        assert_eq!(
            PackIndex::decode(&parts),
            Err(PackError::TooManyParts(MAX_PARTS + 1))
        );
    }
}
