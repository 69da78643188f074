//! Blob storage: byte streams addressed by their BLAKE3 digest.
use crate::castore::B3Digest;
use crate::services::Result;
use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncSeek};

pub mod grpc;
pub mod local;
pub mod memory;

/// A seekable reader over one blob's bytes.
pub trait BlobReader: AsyncRead + AsyncSeek + Send + Unpin {}
impl<T: AsyncRead + AsyncSeek + Send + Unpin> BlobReader for T {}

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
    async fn open_write(&self) -> Result<Box<dyn BlobWriter>>;
}

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
