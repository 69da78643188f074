//! Blob uploads that overlap while an importer walks on. The importers
//! ([`crate::ingest::tree`], [`crate::ingest::nar`]) read contents in NAR
//! order on one task, because the NAR hash is taken in that order; an
//! upload to a remote store, though, spends nearly all its time waiting
//! for an answer (a PUT to a replicated bucket waits for a write quorum:
//! 47 ms a blob on three Garage nodes, the CPU idle). So the walk hashes
//! each blob itself and hands it to a task here, and goes on reading.
//!
//! What is held is bounded twice, by an [`UploadBudget`]: the number of
//! uploads in flight and the bytes they hold. A file small enough
//! ([`MAX_BUFFERED_BLOB`]) is read whole into memory and uploaded in the
//! background; a larger one is streamed by the walk itself as before, one
//! of the uploads in flight while it lasts. The first upload that fails
//! fails the import with its error: the others are stopped and waited for
//! before it is returned, and since the importers store directories only
//! after [`Uploads::finish`], nothing refers to a blob that is not stored.
use crate::castore::B3Digest;
use crate::store::{BlobService, Error, Result};
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Blob uploads one import keeps in flight by default. Each costs one
/// round trip of latency and almost no CPU, so more overlap helps until
/// the server is the limit: with 32, an import into three Garage nodes on
/// loopback went from 47 ms a file to under 4 ms (BENCHMARKS.md, "The
/// object storage tier"). It stays well under what a store daemon lets one
/// connection open (128 HTTP/2 streams), and is a modest number of
/// connections for an object store's client pool and a small server.
pub const MAX_IN_FLIGHT: usize = 32;

/// Bytes of file contents held by the uploads in flight, by default: the
/// memory an import may add for them, whatever the tree.
pub const MAX_BUFFERED: u64 = 64 << 20;

/// Largest blob read whole and uploaded in the background. Larger ones
/// are streamed by the importer (an object store uploads them in parts),
/// so a few large files cannot take the whole budget from the small ones.
pub const MAX_BUFFERED_BLOB: u64 = 8 << 20;

/// Bytes a streamed blob is counted with while it is streamed: what an
/// object store's writer holds of it (one 8 MiB part), the importer's read
/// buffer besides.
pub const STREAM_COST: u64 = 9 << 20;

/// Bounds on uploads in flight and the bytes they hold. Cloning shares
/// them: imports running side by side (`copy --jobs`, a daemon's binary
/// cache uploads) given clones of one budget hold that much together.
#[derive(Clone)]
pub struct UploadBudget {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    /// The bytes budget, in the semaphore's permits.
    bytes_total: u32,
}

impl std::fmt::Debug for UploadBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadBudget")
            .field("slots_free", &self.slots.available_permits())
            .field("bytes_free", &self.bytes.available_permits())
            .field("bytes_total", &self.bytes_total)
            .finish()
    }
}

impl Default for UploadBudget {
    fn default() -> Self {
        Self::new(MAX_IN_FLIGHT, MAX_BUFFERED)
    }
}

impl UploadBudget {
    /// At most `in_flight` uploads (at least one) holding at most `bytes`
    /// (at most 4 GiB; at least one byte).
    pub fn new(in_flight: usize, bytes: u64) -> Self {
        let bytes_total = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
        Self {
            slots: Arc::new(Semaphore::new(in_flight.max(1))),
            bytes: Arc::new(Semaphore::new(bytes_total as usize)),
            bytes_total,
        }
    }

    /// Whether a blob of `size` bytes is read whole and uploaded in the
    /// background (else the importer streams it).
    pub fn buffers(&self, size: u64) -> bool {
        size <= MAX_BUFFERED_BLOB.min(u64::from(self.bytes_total))
    }

    /// The permits a blob of `size` bytes is counted with: never more than
    /// the whole budget, so that it can always be had.
    fn cost(&self, size: u64) -> u32 {
        u32::try_from(size)
            .unwrap_or(u32::MAX)
            .min(self.bytes_total)
    }
}

/// Room for one upload: a slot and its bytes, given back when dropped.
pub struct Reservation {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
    _count: InFlight,
}

/// Counts an upload in flight for [`Uploads`]' peak, while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(now: &Arc<AtomicUsize>, peak: &Arc<AtomicUsize>) -> Self {
        let n = now.fetch_add(1, Ordering::Relaxed) + 1;
        peak.fetch_max(n, Ordering::Relaxed);
        Self(now.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The uploads of one import. Dropping it aborts those still running
/// (an import that is itself dropped leaves nothing behind); an import
/// that fails calls [`Uploads::abort`] to also wait until they ended.
pub struct Uploads {
    blob: Arc<dyn BlobService>,
    budget: UploadBudget,
    tasks: JoinSet<Result<()>>,
    started: u64,
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Uploads {
    pub fn new(blob: Arc<dyn BlobService>, budget: &UploadBudget) -> Self {
        Self {
            blob,
            budget: budget.clone(),
            tasks: JoinSet::new(),
            started: 0,
            now: Arc::default(),
            peak: Arc::default(),
        }
    }

    /// Whether a blob of `size` bytes should be read whole and handed to
    /// [`Uploads::spawn`] (else streamed under a [`Uploads::reserve_stream`]).
    pub fn buffers(&self, size: u64) -> bool {
        self.budget.buffers(size)
    }

    /// Waits for room for a blob of `size` bytes held in memory: a slot and
    /// the bytes. An upload that failed before or meanwhile is returned as
    /// the error.
    pub async fn reserve(&mut self, size: u64) -> Result<Reservation> {
        let cost = self.budget.cost(size);
        self.reserve_cost(cost).await
    }

    /// As [`Uploads::reserve`], for a blob the importer streams itself.
    pub async fn reserve_stream(&mut self) -> Result<Reservation> {
        let cost = self.budget.cost(STREAM_COST);
        self.reserve_cost(cost).await
    }

    async fn reserve_cost(&mut self, cost: u32) -> Result<Reservation> {
        self.reap()?;
        let slots = self.budget.slots.clone();
        let slot = self.wait_for(slots.acquire_many_owned(1)).await?;
        let bytes = self.budget.bytes.clone();
        let bytes = self.wait_for(bytes.acquire_many_owned(cost)).await?;
        Ok(Reservation {
            _slot: slot,
            _bytes: bytes,
            _count: InFlight::new(&self.now, &self.peak),
        })
    }

    /// Waits for `permit`, answering the first failed upload meanwhile.
    async fn wait_for(
        &mut self,
        permit: impl std::future::Future<
            Output = std::result::Result<OwnedSemaphorePermit, tokio::sync::AcquireError>,
        >,
    ) -> Result<OwnedSemaphorePermit> {
        tokio::pin!(permit);
        loop {
            tokio::select! {
                p = &mut permit => {
                    return p.map_err(|_| Error::Io(std::io::Error::other("the upload budget was closed")));
                }
                Some(done) = self.tasks.join_next() => outcome(done)?,
            }
        }
    }

    /// Stores `data`, whose digest the caller computed as `digest`, in the
    /// background, holding `room` until it is stored. The store's answer
    /// must be that digest.
    pub fn spawn(&mut self, room: Reservation, data: Bytes, digest: B3Digest) {
        let blob = self.blob.clone();
        self.started += 1;
        self.tasks.spawn(async move {
            let stored = crate::store::blob::put_bytes(&*blob, &data).await;
            drop(room);
            let actual = stored?;
            if actual != digest {
                return Err(Error::DigestMismatch {
                    expected: digest,
                    actual,
                });
            }
            Ok(())
        });
    }

    /// Collects the uploads that ended; the first failure is the error.
    fn reap(&mut self) -> Result<()> {
        while let Some(done) = self.tasks.try_join_next() {
            outcome(done)?;
        }
        Ok(())
    }

    /// Waits for every upload. The first failure is the error, once the
    /// others have been stopped and have ended.
    pub async fn finish(mut self) -> Result<()> {
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = outcome(done) {
                self.tasks.shutdown().await;
                return Err(e);
            }
        }
        tracing::debug!(
            blobs = self.started,
            peak_in_flight = self.peak.load(Ordering::Relaxed),
            "import: background blob uploads done"
        );
        Ok(())
    }

    /// Stops every upload and waits until each has ended (an import that
    /// failed on its own account).
    pub async fn abort(mut self) {
        self.tasks.shutdown().await;
    }
}

/// A finished task's result: a panic in an upload becomes an error.
fn outcome(done: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match done {
        Ok(r) => r,
        Err(e) => Err(Error::Io(std::io::Error::other(format!(
            "a blob upload ended abnormally: {e}"
        )))),
    }
}
