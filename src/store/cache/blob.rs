//! Blobs through the cache. The filler streams a missing blob from the
//! remote into a temporary file, hashing as it goes, and renames it into
//! place once digest and size match; nothing is held in memory. A reader
//! asks the filler for it and then opens the file like any hit.
use super::fill_batch::Answer;
use super::flights::{self, Key, Reporter};
use super::space::cost;
use super::stats::Kind;
use super::{is_not_found, is_unimplemented, Cache, RoleState};
use crate::castore::B3Digest;
use crate::store::blob::{BlobReader, BlobService, BlobWriter, Direct, FileReader, Shared};
use crate::store::{Error, Result};
use crate::wire::cache as pb;
use async_trait::async_trait;
use futures::StreamExt;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncSeek};

pub struct CachedBlobService(pub(super) Arc<Cache>);

fn stalled(digest: &B3Digest, idle: std::time::Duration) -> Error {
    Error::Timeout(format!(
        "blob {digest}: no data from the remote store for {idle:?}"
    ))
}

impl Cache {
    /// A reader asks the filler for a blob the guest is about to read (it
    /// reads its directory in order) that the directory lacks, at most
    /// [`FILLS_AHEAD`](super::FILLS_AHEAD) at a time; beyond that the
    /// guest's own read asks. Called by the look-ahead thread, which found
    /// it missing; the fill runs on the runtime, its errors only logged
    /// (the guest's read of the blob reports its own).
    pub(super) fn fill_ahead(self: &Arc<Self>, digest: B3Digest, size: u64) {
        let (RoleState::Reader(r), Some(rt)) = (&self.role, &self.rt) else {
            return;
        };
        if !r.fills.load(Relaxed) {
            return;
        }
        let Ok(permit) = r.ahead.clone().try_acquire_owned() else {
            return;
        };
        self.stats.fills_ahead.fetch_add(1, Relaxed);
        let me = self.clone();
        rt.spawn(async move {
            let _permit = permit;
            if let Err(e) = me.ask_fill(&digest, Some(size)).await {
                tracing::debug!("blob {digest}: asked ahead: {e}");
            }
        });
    }

    /// A blob served from the cache directory; `reader` is its open file.
    fn blob_hit(&self, digest: &B3Digest, reader: &mut dyn BlobReader) {
        self.hit_stale(
            Kind::Blob,
            || self.local.blobs.path_of(digest),
            Key::Blob(*digest),
            || match reader.direct() {
                Some(crate::store::blob::Direct::File(f)) => f.metadata().ok(),
                _ => None,
            },
        );
    }

    async fn open_blob(
        self: &Arc<Self>,
        digest: &B3Digest,
        size: Option<u64>,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        if let Some(mut r) = self.local.blobs.open_read(digest).await? {
            if let Some(s) = size {
                crate::store::blob::refuse_longer(&mut *r, digest, s)?;
            }
            self.blob_hit(digest, &mut *r);
            return Ok(Some(r));
        }
        match &self.role {
            RoleState::Filler(_) => {
                let rx = self.fill_blob(*digest, size)?;
                match flights::wait(rx, self.idle).await.into_result() {
                    Ok(true) => {}
                    Ok(false) => return Ok(None),
                    Err(Error::ResourceExhausted(m)) => {
                        // Larger than the cache (or no room now): served
                        // from the remote, checked, but not kept.
                        tracing::warn!("blob {digest}: {m}; serving it without caching");
                        return self.pass_through(digest, size).await;
                    }
                    Err(e) => return Err(e),
                }
                let r = self.local.blobs.open_read(digest).await?;
                r.map(Some).ok_or_else(|| {
                    Error::Fetch(format!(
                        "blob {digest} was evicted as soon as it was fetched: the cache is too small"
                    ))
                })
            }
            RoleState::Reader(reader) => {
                self.stats.miss(Kind::Blob);
                // A blob evicted between its fill and our open is asked for
                // once more; absent twice, the store fills another directory.
                for attempt in 0..2 {
                    if !reader.fills.load(Relaxed) {
                        break;
                    }
                    match self.ask_fill(digest, size).await {
                        Ok(false) => return Ok(None),
                        Ok(true) => {
                            // Just written, so in memory: opened on this
                            // thread, not through the blocking pool (the hop
                            // cost more than the open).
                            if let Some(r) = self.local.blobs.open_file_here(digest)? {
                                return Ok(Some(r));
                            }
                            if attempt == 0 {
                                continue;
                            }
                            tracing::warn!(
                                "the store filled blob {digest} but {} does not have it: it fills \
                                 another cache directory; reading blobs through memory instead",
                                self.root.display()
                            );
                            reader.fills.store(false, Relaxed);
                        }
                        Err(e) if is_unimplemented(&e) => {
                            tracing::warn!(
                                "the store does not fill cache directories (not a `daemon \
                                 --cache-dir`); reading blobs through memory instead"
                            );
                            reader.fills.store(false, Relaxed);
                        }
                        // Too large for the cache: read through the store.
                        Err(Error::Remote(s)) if s.code() == tonic::Code::ResourceExhausted => {
                            break
                        }
                        Err(e) => return Err(e),
                    }
                }
                let r = self.remote_blob(digest, size).await?;
                if r.is_some() {
                    self.stats
                        .fetched_bytes
                        .fetch_add(size.unwrap_or(0), Relaxed);
                }
                Ok(r)
            }
        }
    }

    /// The filler's read of a blob it cannot keep (larger than the whole
    /// cache, or no room now): fetched for this read into an unnamed file
    /// in the cache directory's staging area (the disk the operator gave
    /// the cache, not the temporary directory, which may be memory),
    /// checked against digest and size before its first byte is served,
    /// and gone when the reader is. At most [`MAX_PASS_THROUGH`] at once,
    /// so what they take beside `--cache-size` is bounded by that many of
    /// the largest blobs; more wait for one to end, and fail with
    /// RESOURCE_EXHAUSTED after the store timeout.
    async fn pass_through(
        &self,
        digest: &B3Digest,
        size: Option<u64>,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        let f = self.filler()?;
        let place = tokio::time::timeout(self.idle, f.pass_through.clone().acquire_owned())
            .await
            .map_err(|_| {
                Error::ResourceExhausted(format!(
                    "blob {digest}: {MAX_PASS_THROUGH} blobs too large for the cache are being \
                     read already"
                ))
            })?
            .map_err(|_| Error::Fetch("cache is shutting down".into()))?;
        let opened = tokio::time::timeout(self.idle, self.remote.blob.read_stream(digest))
            .await
            .map_err(|_| stalled(digest, self.idle))?;
        let mut stream = match opened {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(None),
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let staging = self.root.join("tmp");
        let file = match tempfile::tempfile_in(&staging) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&staging)?;
                tempfile::tempfile_in(&staging)?
            }
            r => r?,
        };
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = blake3::Hasher::new();
        let mut n = 0u64;
        loop {
            let next = tokio::time::timeout(self.idle, stream.next())
                .await
                .map_err(|_| stalled(digest, self.idle))?;
            let chunk = match next {
                None => break,
                Some(Ok(c)) => c,
                Some(Err(e)) if n == 0 && is_not_found(&e) => return Ok(None),
                Some(Err(e)) => return Err(e),
            };
            n += chunk.len() as u64;
            if let Some(expected) = size.filter(|&s| n > s) {
                return Err(Error::SizeMismatch {
                    digest: *digest,
                    expected,
                    actual: n,
                });
            }
            hasher.update(&chunk);
            out.write_all(&chunk)?;
        }
        let actual = B3Digest::from(hasher.finalize());
        if actual != *digest {
            tracing::error!(expected = %digest, %actual, "remote store sent a corrupt blob");
            return Err(Error::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        if let Some(expected) = size.filter(|&s| s != n) {
            return Err(Error::SizeMismatch {
                digest: *digest,
                expected,
                actual: n,
            });
        }
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        std::io::Seek::rewind(&mut file)?;
        self.stats.fetched_bytes.fetch_add(n, Relaxed);
        Ok(Some(Box::new(PassedThrough {
            file: FileReader::new(file)?,
            _place: place,
        })))
    }

    async fn remote_blob(
        &self,
        digest: &B3Digest,
        size: Option<u64>,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        match size {
            Some(s) => self.remote.blob.open_read_sized(digest, s).await,
            None => self.remote.blob.open_read(digest).await,
        }
    }

    /// A reader asks the filler to fill a blob; `Ok(false)` when the remote
    /// has no such blob.
    async fn ask_fill(&self, digest: &B3Digest, size: Option<u64>) -> Result<bool> {
        let RoleState::Reader(r) = &self.role else {
            return Err(Error::InvalidRequest("not a reader".into()));
        };
        let Some(client) = &r.client else {
            return Err(Error::InvalidRequest("no store to ask".into()));
        };
        self.stats.fill_requests.fetch_add(1, Relaxed);
        if let Some(b) = r.batches.as_ref().filter(|b| b.takes(size)) {
            match b.ask(*digest, size.unwrap_or(0)).await {
                Answer::Done { .. } => return Ok(true),
                Answer::Missing => return Ok(false),
                Answer::Failed(e) if is_not_found(&e) => return Ok(false),
                Answer::Failed(e) => return Err(e),
                Answer::Alone => {}
            }
        }
        let req = pb::FillBlobRequest {
            digest: (*digest).into(),
            size: size.unwrap_or(0),
        };
        let not_found = |e: Error| if is_not_found(&e) { Ok(false) } else { Err(e) };
        let mut stream = match tokio::time::timeout(self.idle, client.clone().fill_blob(req)).await
        {
            Err(_) => return Err(stalled(digest, self.idle)),
            Ok(Err(s)) => return not_found(s.into()),
            Ok(Ok(r)) => r.into_inner(),
        };
        loop {
            match tokio::time::timeout(self.idle, stream.message()).await {
                Err(_) => return Err(stalled(digest, self.idle)),
                Ok(Ok(Some(p))) if p.done => {
                    // Read the end of the stream too: a stream dropped
                    // before its end is reset, and h2 allows a client only
                    // so many resets.
                    let _ = tokio::time::timeout(self.idle, stream.message()).await;
                    return Ok(true);
                }
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => {
                    return Err(Error::Protocol(format!(
                        "the store's fill of blob {digest} ended without completing"
                    )))
                }
                Ok(Err(s)) => return not_found(s.into()),
            }
        }
    }
}

/// The filler's fetch of one blob: streamed into a temporary file while
/// hashed, room reserved as it grows, renamed into place once digest and
/// size check out. `Ok(false)` when the remote has no such blob.
pub(super) async fn fetch(
    cache: &Cache,
    digest: B3Digest,
    size: Option<u64>,
    rep: &Reporter,
) -> Result<bool> {
    let f = cache.filler()?;
    let dest = cache.local.blobs.path_of(&digest);
    if dest.exists() {
        return Ok(true);
    }
    // No room is taken before the remote has answered, and then only for
    // the bytes it sent: a size declared by a directory entry or a reader
    // is a claim, and reserving it up front let one fill of a missing blob
    // evict the whole cache.
    let room = f.space.reserve(0, cache.idle).await?;
    let opened = tokio::time::timeout(cache.idle, cache.remote.blob.read_stream(&digest))
        .await
        .map_err(|_| stalled(&digest, cache.idle))?;
    let stream = match opened {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(false),
        Err(e) if is_not_found(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    if dest.exists() {
        // put in place while the remote answered (an upstream that reads
        // whole store paths into the cache): not copied onto itself
        return Ok(true);
    }
    write_checked(cache, digest, size, rep, room, stream).await
}

/// Writes a blob's bytes as they come from `stream` into the cache,
/// checked against its digest (and `size`) before it is renamed into
/// place; `Ok(false)` when the stream says the blob is absent.
pub(super) async fn write_checked(
    cache: &Cache,
    digest: B3Digest,
    size: Option<u64>,
    rep: &Reporter,
    mut room: super::space::Reservation,
    mut stream: crate::store::blob::ChunkStream,
) -> Result<bool> {
    let dest = cache.local.blobs.path_of(&digest);
    let tmp = crate::store::disk::staged_temp(&cache.root)?;
    // Chunks go straight to the file: they come in tens or hundreds of KiB,
    // and a buffer per fill cost a mapping (and its unmapping) per blob.
    let mut out = tmp;
    let mut hasher = blake3::Hasher::new();
    let mut n = 0u64;
    loop {
        let next = tokio::time::timeout(cache.idle, stream.next())
            .await
            .map_err(|_| stalled(&digest, cache.idle))?;
        let chunk = match next {
            None => break,
            Some(Ok(c)) => c,
            Some(Err(e)) if n == 0 && is_not_found(&e) => return Ok(false),
            Some(Err(e)) => return Err(e),
        };
        n += chunk.len() as u64;
        if let Some(expected) = size.filter(|&s| n > s) {
            return Err(Error::SizeMismatch {
                digest,
                expected,
                actual: n,
            });
        }
        // Reported first: a blob that outgrows the whole cache is known
        // by its progress.
        rep.send_modify(|p| p.bytes = n);
        room.grow(cost(n), cache.idle).await?;
        hasher.update(&chunk);
        out.write_all(&chunk)?;
    }
    let actual = B3Digest::from(hasher.finalize());
    if actual != digest {
        tracing::error!(expected = %digest, %actual, "remote store sent a corrupt blob");
        return Err(Error::DigestMismatch {
            expected: digest,
            actual,
        });
    }
    if let Some(expected) = size.filter(|&s| s != n) {
        return Err(Error::SizeMismatch {
            digest,
            expected,
            actual: n,
        });
    }
    if dest.exists() {
        // put in place meanwhile (by an upstream that stores whole store
        // paths): charged once, by whoever put it there
        return Ok(true);
    }
    let tmp = out;
    tmp.persist(&dest).map_err(|e| e.error)?;
    room.commit(cost(n));
    cache.stats.fetched_bytes.fetch_add(n, Relaxed);
    Ok(true)
}

/// Blobs too large for the cache that the filler serves at once (see
/// [`Cache::pass_through`]).
pub(super) const MAX_PASS_THROUGH: usize = 2;

/// A blob passed through: its unnamed spool file, and its place among
/// the [`MAX_PASS_THROUGH`], given back when the reader is dropped.
struct PassedThrough {
    file: FileReader,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl AsyncRead for PassedThrough {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncSeek for PassedThrough {
    fn start_seek(mut self: Pin<&mut Self>, pos: std::io::SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.file).start_seek(pos)
    }

    fn poll_complete(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

impl BlobReader for PassedThrough {
    fn direct(&mut self) -> Option<Direct<'_>> {
        self.file.direct()
    }

    /// Shared as a stream, so that the place is held for as long as the
    /// file is.
    fn into_shared(self: Box<Self>) -> Shared {
        Shared::Stream(self)
    }
}

#[async_trait]
impl BlobService for CachedBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        if self.0.local.blobs.has(digest).await? {
            return Ok(true);
        }
        self.0.remote.blob.has(digest).await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        self.0.open_blob(digest, None).await
    }

    async fn open_read_sized(
        &self,
        digest: &B3Digest,
        size: u64,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        self.0.open_blob(digest, Some(size)).await
    }

    /// Hits only: a miss goes the async way, which fetches.
    fn read_soon(&self, digests: &mut dyn Iterator<Item = B3Digest>) {
        // Hits are looked up ahead; a miss's lookup finds nothing, cheaply.
        self.0.local.blobs.read_soon(digests);
    }

    /// Hits are read ahead from the directory; a reader also asks the
    /// filler for the misses (the read-ahead tells, `Cache::fill_ahead`).
    fn read_ahead(&self, blobs: &mut dyn Iterator<Item = (B3Digest, u64)>) {
        self.0.local.blobs.read_ahead(blobs);
    }

    fn open_read_blocking(&self, digest: &B3Digest) -> Option<Result<Option<Box<dyn BlobReader>>>> {
        match self.0.local.blobs.open_read_blocking(digest)? {
            Ok(Some(mut r)) => {
                self.0.blob_hit(digest, &mut *r);
                Some(Ok(Some(r)))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        self.0.remote.blob.open_write().await
    }
}
