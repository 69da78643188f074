//! Packs in the bucket ([`crate::castore::pack`]): parts stored under
//! their digest and an index under the tree's root directory, both
//! written once by an import. A batch of a tree's small blobs is read as
//! a few ranged GETs of runs of its parts instead of a GET per blob; every
//! blob so read is checked against its digest, and one that is not there
//! or does not match is left to be read alone.
use crate::castore::pack::{Entry, PackIndex};
use crate::castore::B3Digest;
use crate::store::bucket::Bucket;
use crate::store::{Error, Result};
use bytes::Bytes;
use futures::StreamExt;
use object_store::{GetOptions, ObjectStoreExt, PutPayload};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of pack indexes held in memory (decoded, about 100 bytes a
/// blob; two of the largest fit): the trees being read now, not every
/// tree ever read.
const INDEX_BYTES: u64 = 64 << 20;
/// A tree found without packs is asked again after this long (an import
/// may write them meanwhile).
const ABSENT_FOR: Duration = Duration::from_secs(30);
/// Bytes between two wanted blobs of a part read rather than split into
/// two GETs.
const GAP: u64 = 64 << 10;
/// Most bytes one ranged GET of a part asks for, and one batch reads
/// from packs: what a batch can make the daemon hold.
const RUN: u64 = 4 << 20;
/// How long a pack index may take to arrive.
const INDEX_WAIT: Duration = Duration::from_secs(3);
/// Ranged GETs of one batch at once.
const GETS_AT_ONCE: usize = 4;

/// A tree's index as the reader uses it.
pub(super) enum Known {
    Packed {
        parts: Vec<(B3Digest, u64)>,
        by: HashMap<B3Digest, Entry>,
    },
    Absent(Instant),
}

#[derive(Clone)]
pub(super) struct Weight;

/// What an index takes in memory: its map's slots (hashbrown keeps a
/// control byte each) and parts, and what any entry costs around it.
impl quick_cache::Weighter<B3Digest, Arc<Known>> for Weight {
    fn weight(&self, _: &B3Digest, k: &Arc<Known>) -> u64 {
        const AROUND: u64 = 256;
        match &**k {
            Known::Packed { by, parts } => {
                let slot = std::mem::size_of::<(B3Digest, Entry)>() as u64 + 1;
                by.capacity() as u64 * slot
                    + parts.capacity() as u64 * std::mem::size_of::<(B3Digest, u64)>() as u64
                    + AROUND
            }
            Known::Absent(_) => AROUND,
        }
    }
}

pub(super) type Indexes = quick_cache::sync::Cache<B3Digest, Arc<Known>, Weight>;

pub(super) fn indexes() -> Indexes {
    quick_cache::sync::Cache::with_options(
        quick_cache::OptionsBuilder::new()
            .shards(1)
            .estimated_items_capacity(64)
            .weight_capacity(INDEX_BYTES)
            .build()
            .unwrap_or_else(|_| unreachable!("all options are set")),
        Weight,
        Default::default(),
        Default::default(),
    )
}

/// Stores a part under the digest its packer computed (not hashed again:
/// a part under a wrong name only costs its blobs a fallback read, each
/// being checked against its own digest when read).
pub(super) async fn put_part(bucket: &Bucket, digest: &B3Digest, part: Bytes) -> Result<()> {
    let key = bucket.pack_part_key(digest);
    bucket
        .within(
            format!("storing pack part {digest}"),
            bucket.store.put(&key, PutPayload::from(part)),
        )
        .await?;
    Ok(())
}

pub(super) async fn put_index(bucket: &Bucket, tree: &B3Digest, index: &PackIndex) -> Result<()> {
    let key = bucket.pack_key(tree);
    let body = PutPayload::from(Bytes::from(index.encode()));
    bucket
        .within(
            format!("storing the pack index of tree {tree}"),
            bucket.store.put(&key, body),
        )
        .await?;
    Ok(())
}

/// The tree's index, from memory or the bucket (one GET however many
/// batches ask at once). A tree without usable packs (none, refused, or
/// the bucket failing) is remembered as such for [`ABSENT_FOR`].
async fn index(bucket: &Bucket, cache: &Indexes, tree: &B3Digest) -> Arc<Known> {
    match cache.get_value_or_guard_async(tree).await {
        Ok(k) => match &*k {
            Known::Absent(since) if since.elapsed() >= ABSENT_FOR => {
                let fresh = Arc::new(load_within(bucket, tree).await);
                cache.insert(*tree, fresh.clone());
                fresh
            }
            _ => k,
        },
        Err(guard) => {
            let k = Arc::new(load_within(bucket, tree).await);
            let _ = guard.insert(k.clone());
            k
        }
    }
}

/// [`load`] within [`INDEX_WAIT`]: an index is an object of blocks, which
/// a frozen node can hold for the bucket's own RPC timeout; the batch
/// then reads its blobs alone rather than wait.
async fn load_within(bucket: &Bucket, tree: &B3Digest) -> Known {
    match tokio::time::timeout(INDEX_WAIT, load(bucket, tree)).await {
        Ok(k) => k,
        Err(_) => {
            tracing::warn!(
                "the pack index of tree {tree}: no answer within {INDEX_WAIT:?}; reading its blobs alone for {ABSENT_FOR:?}"
            );
            Known::Absent(Instant::now())
        }
    }
}

async fn load(bucket: &Bucket, tree: &B3Digest) -> Known {
    let what = format!("the pack index of tree {tree}");
    let got = match bucket
        .within(&what, bucket.store.get(&bucket.pack_key(tree)))
        .await
    {
        Ok(Some(got)) => got,
        Ok(None) => return Known::Absent(Instant::now()),
        Err(e) => {
            tracing::warn!("{e}: reading the tree's blobs alone for {ABSENT_FOR:?}");
            return Known::Absent(Instant::now());
        }
    };
    if got.meta.size > PackIndex::max_encoded_len() {
        tracing::warn!("{what}: {} bytes, more than an index may be", got.meta.size);
        return Known::Absent(Instant::now());
    }
    let decoded = match bucket.bounded_bytes(&what, got).await {
        Ok(bytes) => PackIndex::decode(&bytes).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match decoded {
        Ok(i) => Known::Packed {
            by: i.by_digest(),
            parts: i.parts,
        },
        Err(e) => {
            tracing::warn!("{what} is refused ({e}): reading the tree's blobs alone");
            Known::Absent(Instant::now())
        }
    }
}

/// One ranged GET: a run of one part, and the wanted blobs in it (their
/// place in the answer, digest and entry).
struct Run {
    part: B3Digest,
    start: u64,
    end: u64,
    blobs: Vec<(usize, B3Digest, Entry)>,
}

/// Wanted blobs grouped into runs of their parts, within [`RUN`] bytes in
/// all; blobs past that are left out (read alone).
fn runs(parts: &[(B3Digest, u64)], found: Vec<(usize, B3Digest, Entry)>) -> Vec<Run> {
    let mut found = found;
    found.sort_by_key(|(_, _, e)| (e.part, e.offset));
    let mut runs: Vec<Run> = Vec::new();
    let mut total = 0u64;
    for (i, d, e) in found {
        let Some((part, _)) = parts.get(e.part as usize) else {
            continue;
        };
        let end = e.offset + u64::from(e.len);
        if let Some(r) = runs.last_mut() {
            let extra = end.saturating_sub(r.end);
            if r.part == *part
                && e.offset >= r.start
                && e.offset <= r.end + GAP
                && end - r.start <= RUN
                && total + extra <= RUN
            {
                total += extra;
                r.end = r.end.max(end);
                r.blobs.push((i, d, e));
                continue;
            }
        }
        if total + u64::from(e.len) > RUN {
            break;
        }
        total += u64::from(e.len);
        runs.push(Run {
            part: *part,
            start: e.offset,
            end,
            blobs: vec![(i, d, e)],
        });
    }
    runs
}

/// See [`crate::store::blob::BlobService::read_packed`].
pub(super) async fn read(
    bucket: &Bucket,
    cache: &Indexes,
    tree: &B3Digest,
    digests: &[B3Digest],
) -> Result<Vec<Option<Bytes>>> {
    let mut out = vec![None; digests.len()];
    if digests.is_empty() {
        return Ok(out);
    }
    let known = index(bucket, cache, tree).await;
    let Known::Packed { parts, by } = &*known else {
        return Ok(out);
    };
    let found: Vec<(usize, B3Digest, Entry)> = digests
        .iter()
        .enumerate()
        .filter_map(|(i, d)| by.get(d).map(|e| (i, *d, *e)))
        .collect();
    if found.is_empty() {
        return Ok(out);
    }
    let fetched = futures::stream::iter(runs(parts, found))
        .map(|run| async move {
            let what = format!("pack part {} (bytes {}..{})", run.part, run.start, run.end);
            let opts = GetOptions::new().with_range(Some(run.start..run.end));
            let key = bucket.pack_part_key(&run.part);
            let got = match bucket
                .within(&what, bucket.store.get_opts(&key, opts))
                .await
            {
                Ok(Some(got)) => bucket.bounded_bytes(&what, got).await,
                Ok(None) => Err(Error::NotFound(what.clone())),
                Err(e) => Err(e),
            };
            (run, what, got)
        })
        .buffer_unordered(GETS_AT_ONCE)
        .collect::<Vec<_>>()
        .await;
    for (run, what, got) in fetched {
        let bytes = match got {
            Ok(b) if b.len() as u64 == run.end - run.start => b,
            Ok(b) => {
                tracing::warn!(
                    "{what}: {} bytes answered; reading its blobs alone",
                    b.len()
                );
                continue;
            }
            Err(e) => {
                tracing::warn!("{e}; reading its blobs alone");
                continue;
            }
        };
        for (i, d, e) in run.blobs {
            let at = (e.offset - run.start) as usize;
            let blob = bytes.slice(at..at + e.len as usize);
            if B3Digest::of(&blob) == d {
                out[i] = Some(blob);
            } else {
                tracing::error!(
                    digest = %d,
                    "the bucket's pack part {} holds other bytes for blob {d} (bytes {}..{}); \
                     reading it alone",
                    run.part,
                    e.offset,
                    e.offset + u64::from(e.len)
                );
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(part: u32, offset: u64, len: u32) -> Entry {
        Entry { part, offset, len }
    }

    #[test]
    fn near_blobs_share_a_get_and_far_ones_do_not() {
        let parts = vec![
            (B3Digest::of(b"p0"), 8 << 20),
            (B3Digest::of(b"p1"), 8 << 20),
        ];
        let d = |i: u8| B3Digest::of(&[i]);
        let found = vec![
            (0, d(0), e(0, 0, 1000)),
            (1, d(1), e(0, 1000, 1000)),
            // a gap under GAP: same GET
            (2, d(2), e(0, 30_000, 1000)),
            // far: a GET of its own
            (3, d(3), e(0, 1 << 20, 1000)),
            // another part
            (4, d(4), e(1, 0, 1000)),
        ];
        let r = runs(&parts, found);
        let shape: Vec<(u64, u64, usize)> =
            r.iter().map(|r| (r.start, r.end, r.blobs.len())).collect();
        assert_eq!(
            shape,
            vec![
                (0, 31_000, 3),
                ((1 << 20), (1 << 20) + 1000, 1),
                (0, 1000, 1)
            ]
        );
    }

    #[test]
    fn a_batch_reads_at_most_run_bytes_from_packs() {
        let parts = vec![(B3Digest::of(b"p0"), 16 << 20)];
        let found: Vec<_> = (0..64u32)
            .map(|i| {
                (
                    i as usize,
                    B3Digest::of(&i.to_le_bytes()),
                    e(0, u64::from(i) * (256 << 10), 256 << 10),
                )
            })
            .collect();
        let r = runs(&parts, found);
        let bytes: u64 = r.iter().map(|r| r.end - r.start).sum();
        assert!(bytes <= RUN, "{bytes}");
        assert_eq!(r.iter().map(|r| r.blobs.len()).sum::<usize>(), 16);
    }
}
