//! Blob storage: byte streams addressed by their BLAKE3 digest.
use crate::castore::pack::PackIndex;
use crate::castore::B3Digest;
use crate::store::{Error, Result};
use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncSeek};

pub mod failover;
pub mod grpc;
pub mod local;
pub mod memory;
pub mod s3;
pub(crate) mod spool;
pub mod warm;

/// A seekable reader over one blob's bytes.
pub trait BlobReader: AsyncRead + AsyncSeek + Send + Unpin {
    /// The bytes in memory, or the file that holds exactly them, where the
    /// backend has them at hand: the view then reads at an offset straight
    /// into guest memory, without the async runtime or a bounce buffer.
    fn direct(&mut self) -> Option<Direct<'_>> {
        None
    }

    /// The reader as something many readers can share at once: the view
    /// keeps one per blob, however many handles the guest opens on it.
    fn into_shared(self: Box<Self>) -> Shared;

    /// The blob's length, when the reader itself checks every byte it
    /// hands out against the digest it was opened by (a large blob read
    /// leaf by leaf): the view need not read it whole to check it first.
    fn checks_itself(&self) -> Option<u64> {
        None
    }
}

/// See [`BlobReader::into_shared`].
pub enum Shared {
    Bytes(bytes::Bytes),
    /// Read it only at offsets (pread), from any thread.
    File(std::fs::File),
    /// No positional access: readers take turns.
    Stream(Box<dyn BlobReader>),
}

/// See [`BlobReader::direct`].
pub enum Direct<'a> {
    Bytes(&'a [u8]),
    /// Read it only at offsets (pread): its file position is the reader's.
    File(&'a mut std::fs::File),
}

impl BlobReader for std::io::Cursor<bytes::Bytes> {
    fn direct(&mut self) -> Option<Direct<'_>> {
        Some(Direct::Bytes(self.get_ref()))
    }

    fn into_shared(self: Box<Self>) -> Shared {
        Shared::Bytes(self.into_inner())
    }
}

/// A blob held in a whole file: the file itself for positional reads,
/// and async reads for streaming (set up on first use: the view only
/// ever reads at offsets).
pub struct FileReader {
    std: std::fs::File,
    tokio: Option<tokio::fs::File>,
}

impl FileReader {
    pub fn new(file: std::fs::File) -> std::io::Result<Self> {
        Ok(Self {
            std: file,
            tokio: None,
        })
    }

    fn tokio(&mut self) -> std::io::Result<&mut tokio::fs::File> {
        if self.tokio.is_none() {
            self.tokio = Some(tokio::fs::File::from_std(self.std.try_clone()?));
        }
        self.tokio
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no async file"))
    }
}

impl AsyncRead for FileReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let t = self.tokio()?;
        std::pin::Pin::new(t).poll_read(cx, buf)
    }
}

impl AsyncSeek for FileReader {
    fn start_seek(
        mut self: std::pin::Pin<&mut Self>,
        pos: std::io::SeekFrom,
    ) -> std::io::Result<()> {
        let t = self.tokio()?;
        std::pin::Pin::new(t).start_seek(pos)
    }

    fn poll_complete(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<u64>> {
        let t = self.tokio()?;
        std::pin::Pin::new(t).poll_complete(cx)
    }
}

impl BlobReader for FileReader {
    fn direct(&mut self) -> Option<Direct<'_>> {
        Some(Direct::File(&mut self.std))
    }

    fn into_shared(self: Box<Self>) -> Shared {
        Shared::File(self.std)
    }
}

/// Receives a blob's bytes; `close` stores it and answers its digest.
/// Dropping a writer without closing it stores nothing.
#[async_trait]
pub trait BlobWriter: Send {
    async fn write(&mut self, data: &[u8]) -> Result<()>;
    async fn close(self: Box<Self>) -> Result<B3Digest>;
}

#[async_trait]
pub trait BlobService: Send + Sync + 'static {
    async fn has(&self, digest: &B3Digest) -> Result<bool>;
    /// Opens a blob; `None` when it is not stored. Readers of remote blobs
    /// only hand out bytes already checked against `digest`.
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>>;

    /// As `open_read`, for a blob a directory says is `size` bytes long:
    /// backends that fetch it stop past that size (a longer blob cannot
    /// match) and can reserve room for it; those that hold it refuse it
    /// when it is longer (see [`refuse_longer`]).
    async fn open_read_sized(
        &self,
        digest: &B3Digest,
        size: u64,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        let Some(mut r) = self.open_read(digest).await? else {
            return Ok(None);
        };
        refuse_longer(&mut *r, digest, size)?;
        Ok(Some(r))
    }

    /// The blob's bytes as they come, not yet checked against `digest`:
    /// for callers that hash them while storing them (the host cache's
    /// fill), so nothing is spooled twice.
    async fn read_stream(&self, digest: &B3Digest) -> Result<Option<ChunkStream>> {
        use futures::StreamExt;
        let Some(r) = self.open_read(digest).await? else {
            return Ok(None);
        };
        Ok(Some(Box::pin(
            tokio_util::io::ReaderStream::with_capacity(r, 256 << 10)
                .map(|c| c.map_err(Into::into)),
        )))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>>;

    /// As `open_read`, on the calling thread and without the async
    /// runtime, where the backend can (files on a local disk); `None` where
    /// it cannot. For the view's request threads, which read at offsets
    /// straight into guest memory: the reader holds the open file, not a
    /// copy of the bytes.
    fn open_read_blocking(
        &self,
        _digest: &B3Digest,
    ) -> Option<Result<Option<Box<dyn BlobReader>>>> {
        None
    }

    /// A hint that these blobs are likely to be read soon (the guest
    /// listed their directory): a backend on a local disk may look them
    /// up in the background. Must not block.
    fn read_soon(&self, _digests: &mut dyn Iterator<Item = B3Digest>) {}

    /// A hint that the guest reads these blobs' (digest, size) directory
    /// in order and will read them next: a backend on a local disk may
    /// start reading their data in the background, a cache may fetch the
    /// ones it lacks. Must not block.
    fn read_ahead(&self, _blobs: &mut dyn Iterator<Item = (B3Digest, u64)>) {}

    /// Whether this store keeps packs ([`crate::castore::pack`]): an
    /// import then also writes each tree's small blobs into packs. Worth
    /// it where every object costs a request (a bucket), not on a disk.
    fn keeps_packs(&self) -> bool {
        false
    }

    /// Stores one pack part under its digest (the packer computed it).
    async fn put_pack_part(&self, _digest: &B3Digest, _part: bytes::Bytes) -> Result<()> {
        Err(Error::InvalidRequest("this store keeps no packs".into()))
    }

    /// Stores `tree`'s pack index, once every part it names is stored.
    async fn put_pack_index(&self, _tree: &B3Digest, _index: &PackIndex) -> Result<()> {
        Err(Error::InvalidRequest("this store keeps no packs".into()))
    }

    /// Blobs of the tree whose root directory is `tree`, read from its
    /// packs, each already checked against its digest; `None` for each
    /// one not packed (or when the tree has no packs): read it alone.
    async fn read_packed(
        &self,
        _tree: &B3Digest,
        digests: &[B3Digest],
    ) -> Result<Vec<Option<bytes::Bytes>>> {
        Ok(vec![None; digests.len()])
    }
}

/// Refuses a reader whose length is at hand (bytes in memory, a file)
/// and longer than the `size` a caller asked for: every backend then
/// answers `open_read_sized` alike, the ones that fetch stopping past the
/// size and the ones that hold the blob refusing it whole. A reader
/// without direct access is left to the caller's own check.
pub fn refuse_longer(r: &mut dyn BlobReader, digest: &B3Digest, size: u64) -> Result<()> {
    let len = match r.direct() {
        Some(Direct::Bytes(b)) => b.len() as u64,
        Some(Direct::File(f)) => f.metadata()?.len(),
        None => return Ok(()),
    };
    if len > size {
        return Err(Error::SizeMismatch {
            digest: *digest,
            expected: size,
            actual: len,
        });
    }
    Ok(())
}

/// A blob's bytes in chunks, as a remote sends them.
pub type ChunkStream = futures::stream::BoxStream<'static, Result<bytes::Bytes>>;

/// Stores `data` as one blob.
pub async fn put_bytes(svc: &dyn BlobService, data: &[u8]) -> Result<B3Digest> {
    let mut w = svc.open_write().await?;
    w.write(data).await?;
    w.close().await
}

/// Reads a whole blob into memory (for tests and small blobs).
pub async fn read_to_vec(svc: &dyn BlobService, digest: &B3Digest) -> Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let Some(mut r) = svc.open_read(digest).await? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    r.read_to_end(&mut out).await?;
    Ok(Some(out))
}
