//! Small blobs prefetched in batches: when the remote is one daemon of
//! ours, the filler asks it for up to [`BATCH_BLOBS`] small blobs in one
//! `CacheService/ReadBlobs` call instead of one `Read` each, so a link of
//! milliseconds costs a round trip per batch. Each blob still has its own
//! flight (a guest's read of it joins), is checked against its digest and
//! its directory entry's size, and is written like any fill. A remote
//! that has no ReadBlobs (not ours) is asked blob by blob from then on; a
//! batch that fails is fetched blob by blob.
//!
//! Guests' misses of small blobs go in batches too ([`Misses`]), as many
//! out at once as [`super::batch_slots`] lets go.
use super::batch_slots::{self, Counts};
use super::flights::{Key, Reporter};
use super::prefetch::{alive, Interest};
use super::Cache;
use crate::castore::B3Digest;
use crate::lock;
use crate::store::{Error, Result};
use crate::wire::cache as pb;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Blobs in one batch (the remote answers up to 64).
const BATCH_BLOBS: usize = 32;
/// Largest blob batched; larger ones are fetched alone.
const BATCH_BLOB_MAX: u64 = 256 << 10;
/// Bytes of one batch, by the sizes their directories give.
const BATCH_BYTES: u64 = 2 << 20;
/// Blobs of a batch per prefetch fill slot it takes.
const BLOBS_PER_SLOT: usize = 4;

/// Guests' misses waiting for a batch, and the batches out.
#[derive(Default)]
pub(super) struct Misses {
    inner: Mutex<MissQueue>,
}

#[derive(Default)]
struct MissQueue {
    waiting: Vec<Wanted>,
    batches: Counts,
}

/// Small blobs a walk has met and not asked for yet.
#[derive(Default)]
pub(super) struct Batch {
    blobs: Vec<(B3Digest, u64)>,
    bytes: u64,
}

impl Batch {
    pub(super) fn fits(&self, size: u64) -> bool {
        size <= BATCH_BLOB_MAX
    }

    /// Adds a blob; true when the batch is full.
    pub(super) fn add(&mut self, digest: B3Digest, size: u64) -> bool {
        self.blobs.push((digest, size));
        self.bytes += size;
        self.blobs.len() >= BATCH_BLOBS || self.bytes >= BATCH_BYTES
    }

    pub(super) fn take(&mut self) -> Vec<(B3Digest, u64)> {
        self.bytes = 0;
        std::mem::take(&mut self.blobs)
    }
}

/// One blob of a batch on its way: its flight's reporter, and where its
/// outcome goes.
struct Wanted {
    digest: B3Digest,
    size: u64,
    rep: Reporter,
    done: oneshot::Sender<Result<bool>>,
}

impl Cache {
    /// Whether a guest's miss of a blob of `size` goes in a batch.
    pub(super) fn batches_miss(&self, size: Option<u64>) -> bool {
        size.is_some_and(|s| s <= BATCH_BLOB_MAX) && self.batches()
    }

    /// A guest's miss, to be fetched in the next batch of misses; its
    /// outcome comes on `done` (see [`Misses`]).
    pub(super) fn queue_miss(
        self: &Arc<Self>,
        digest: B3Digest,
        size: u64,
        rep: Reporter,
        done: oneshot::Sender<Result<bool>>,
    ) {
        let Ok(f) = self.filler() else {
            let _ = done.send(Err(Error::InvalidRequest("not a filler".into())));
            return;
        };
        let mut q = lock(&f.misses.inner);
        q.waiting.push(Wanted {
            digest,
            size,
            rep,
            done,
        });
        self.send_misses(&mut q);
    }

    /// Sends the waiting misses (up to a batch) as one batch, if a batch
    /// may go out now (see [`super::batch_slots`]).
    fn send_misses(self: &Arc<Self>, q: &mut MissQueue) {
        let n = q.waiting.len().min(BATCH_BLOBS);
        if n == 0 || !q.batches.may_send() {
            return;
        }
        let batch: Vec<Wanted> = q.waiting.drain(..n).collect();
        let (this, back) = (self.clone(), self.clone());
        let run = async move { this.run_batch(batch, None).await };
        batch_slots::spawn(&mut q.batches, run, move |r| {
            if let Ok(f) = back.filler() {
                let mut q = lock(&f.misses.inner);
                q.batches.give_back(r);
                back.send_misses(&mut q);
            }
        });
    }

    /// Whether small blobs go to the remote in batches.
    pub(super) fn batches(&self) -> bool {
        self.filler()
            .is_ok_and(|f| f.batch.is_some() && f.batching.load(Relaxed))
    }

    /// Prefetches `blobs` (files of the tree whose root is `tree`, which a
    /// remote that keeps packs reads them from) in one batch once fill slots for all of them are
    /// free; false when the walk stops (the bound of unread bytes, or the
    /// VM went). Blobs present or being fetched already are left out.
    pub(super) async fn prefetch_batch(
        self: &Arc<Self>,
        mut blobs: Vec<(B3Digest, u64)>,
        tree: Option<B3Digest>,
        interest: &Interest,
    ) -> bool {
        if blobs.is_empty() {
            return true;
        }
        let Ok(f) = self.filler() else { return false };
        let p = &f.prefetch;
        if !alive(interest) {
            self.stats.prefetch_cancelled.fetch_add(1, Relaxed);
            return false;
        }
        // What fits under the bound of unread bytes; the walk stops after.
        let mut room = p.budget.load(Relaxed).saturating_sub(p.unread_bytes());
        let fit = blobs
            .iter()
            .take_while(|(_, s)| {
                let ok = *s <= room;
                room = room.saturating_sub(*s);
                ok
            })
            .count();
        let go_on = fit == blobs.len();
        blobs.truncate(fit);
        if blobs.is_empty() {
            p.at_bound(&self.stats);
            return false;
        }
        // one call for the whole batch: it costs a quarter of a fill slot
        // a blob, so a latency-bound remote (a bucket behind a daemon)
        // gets a dozen batches in flight, not three
        // (until the remote has answered one: a remote without ReadBlobs
        // gets each blob fetched alone, which must hold a slot each)
        let per_slot = if f.batch_answered.load(Relaxed) {
            BLOBS_PER_SLOT
        } else {
            1
        };
        let n = u32::try_from(blobs.len().div_ceil(per_slot)).unwrap_or(u32::MAX);
        let Ok(permit) = p.fills.clone().acquire_many_owned(n).await else {
            return false;
        };
        if !alive(interest) {
            self.stats.prefetch_cancelled.fetch_add(1, Relaxed);
            return false;
        }
        let mut wanted = Vec::with_capacity(blobs.len());
        for (digest, size) in blobs {
            let path = self.local.blobs.path_of(&digest);
            if tokio::fs::try_exists(path).await.unwrap_or(false)
                || f.flights.is_flying(&Key::Blob(digest))
            {
                continue;
            }
            p.note(digest, size);
            let (done, outcome) = oneshot::channel::<Result<bool>>();
            let slot: Arc<Mutex<Option<Reporter>>> = Arc::default();
            let mine = slot.clone();
            let this = self.clone();
            // The flight's fetch is the batch's answer for this blob.
            let _ = f.flights.join_batched(Key::Blob(digest), move |rep| {
                *lock(&mine) = Some(rep);
                async move {
                    let got = outcome.await.unwrap_or_else(|_| {
                        Err(Error::Fetch(format!("blob {digest}: its batch ended")))
                    });
                    // written with its size checked: `size` is what it is
                    this.prefetched(&digest, size, got)
                }
            });
            // None: a fetch of it started meanwhile, which it joined.
            let rep = lock(&slot).take();
            if let Some(rep) = rep {
                wanted.push(Wanted {
                    digest,
                    size,
                    rep,
                    done,
                });
            }
        }
        if !wanted.is_empty() {
            self.stats.prefetch_batches.fetch_add(1, Relaxed);
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                this.run_batch(wanted, tree).await;
            });
        }
        if !go_on {
            p.at_bound(&self.stats);
        }
        go_on
    }

    /// Asks the remote for a batch and writes what it answers; what it
    /// does not answer is fetched blob by blob.
    async fn run_batch(self: Arc<Self>, wanted: Vec<Wanted>, tree: Option<B3Digest>) {
        let Ok(f) = self.filler() else { return };
        let Some(mut client) = f.batch.as_deref().cloned() else {
            return self.one_by_one(wanted).await;
        };
        let req = pb::ReadBlobsRequest {
            digests: wanted.iter().map(|w| w.digest.into()).collect(),
            tree: tree.map(Into::into).unwrap_or_default(),
        };
        let mut stream = match tokio::time::timeout(self.idle, client.read_blobs(req)).await {
            Ok(Ok(r)) => {
                f.batch_answered.store(true, Relaxed);
                r.into_inner()
            }
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                tracing::info!("the remote store has no ReadBlobs: prefetching blob by blob");
                f.batching.store(false, Relaxed);
                return self.one_by_one(wanted).await;
            }
            Ok(Err(s)) => {
                tracing::debug!("prefetch batch: {}", s.message());
                return self.one_by_one(wanted).await;
            }
            Err(_) => return self.one_by_one(wanted).await,
        };
        let mut slots: Vec<Option<Wanted>> = wanted.into_iter().map(Some).collect();
        loop {
            let piece = match tokio::time::timeout(self.idle, stream.message()).await {
                Ok(Ok(Some(p))) => p,
                Ok(Ok(None)) => break,
                Ok(Err(s)) => {
                    tracing::debug!("prefetch batch: {}", s.message());
                    break;
                }
                Err(_) => break,
            };
            let Some(w) = slots.get_mut(piece.index as usize).and_then(Option::take) else {
                tracing::warn!(
                    "prefetch batch: the remote answered blob {} twice or unasked",
                    piece.index
                );
                break;
            };
            if piece.missing {
                let _ = w.done.send(Ok(false));
                continue;
            }
            if piece.too_large {
                let got = super::blob::fetch(&self, w.digest, Some(w.size), &w.rep).await;
                let _ = w.done.send(got);
                continue;
            }
            let got = async {
                let room = f.space.reserve(0, self.idle).await?;
                let data: crate::store::blob::ChunkStream =
                    Box::pin(futures::stream::once(async move { Ok(piece.data) }));
                super::blob::write_checked(&self, w.digest, Some(w.size), &w.rep, room, data).await
            }
            .await;
            let _ = w.done.send(got);
        }
        self.one_by_one(slots.into_iter().flatten().collect()).await;
    }

    /// Fetches each blob alone (all at once: they hold the batch's slots).
    async fn one_by_one(&self, wanted: Vec<Wanted>) {
        futures::future::join_all(wanted.into_iter().map(|w| async move {
            let got = super::blob::fetch(self, w.digest, Some(w.size), &w.rep).await;
            let _ = w.done.send(got);
        }))
        .await;
    }
}
