//! Blobs in an S3-compatible bucket (see [`crate::store::bucket`] for the
//! keys). Every byte read is checked against the blob's digest before it
//! is handed out, as from any remote. A blob over `RANGED_ABOVE` is read
//! leaf by leaf with ranged GETs, each leaf checked against the blob's
//! leaf list (kept beside it, checked against its digest): a read at an
//! offset fetches that leaf only (see `ranged.rs`). Other blobs, and large
//! ones without a usable leaf list (written by older versions or other
//! tools), are spooled whole while hashed. Every chunk of a body is waited
//! for at most the idle limit, so a stalled node fails the read instead of
//! hanging it, and no body is taken past the length it declared. A write is hashed as it comes: small blobs are PUT under
//! their digest at close; large ones are uploaded in parts to a temporary
//! key while they are hashed (one part in memory at a time), then copied
//! to their digest's key once it is known, their leaf list stored first.
//! What all writers of one service buffer together is bounded (`room.rs`).
//! An import also writes each tree's small blobs into packs, which
//! batches of them are read from (`packs.rs`).
mod packs;
mod ranged;
mod room;

use super::spool::Checking;
use super::{BlobReader, BlobService, BlobWriter, ChunkStream};
use crate::castore::leaves::MAX_LEAVES;
use crate::castore::{B3Digest, LeafHasher, Leaves, LEAF};
use crate::store::bucket::Bucket;
use crate::store::{Error, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use std::sync::Arc;

/// Bytes of one part of a multipart upload (S3 wants 5 MiB or more for
/// every part but the last); a blob up to this size is one PUT.
const PART: usize = 8 << 20;
/// Blobs larger than this are read by leaves and get a leaf list: below
/// it one GET of the whole blob costs about what one leaf does.
const RANGED_ABOVE: u64 = 4 * LEAF;
/// Bytes of the size that heads a leaf list object.
const SIZE_HEADER: usize = 8;

#[derive(Clone)]
pub struct S3BlobService {
    bucket: Bucket,
    /// Spool large blobs into memory files (inside the sandbox there is no
    /// writable directory).
    memfd_spool: bool,
    /// What every writer of this service may buffer, together.
    room: Arc<room::Room>,
    /// Pack indexes of the trees read lately.
    packs: Arc<packs::Indexes>,
}

impl S3BlobService {
    pub fn new(bucket: Bucket) -> Self {
        let room = room::Room::new(bucket.idle);
        Self {
            bucket,
            memfd_spool: false,
            room,
            packs: Arc::new(packs::indexes()),
        }
    }

    /// Large blobs are spooled into memory files, not the temp directory.
    pub fn with_memfd_spool(mut self) -> Self {
        self.memfd_spool = true;
        self
    }

    /// The object's size and its body as it comes, each chunk waited for
    /// at most the idle limit and the whole refused past that size; `None`
    /// when there is no such object.
    async fn body(&self, digest: &B3Digest) -> Result<Option<(u64, ChunkStream)>> {
        let key = self.bucket.blob_key(digest);
        let what = format!("blob {digest}");
        let Some(got) = self
            .bucket
            .within(&what, self.bucket.store.get(&key))
            .await?
        else {
            return Ok(None);
        };
        let size = got.meta.size;
        let (bucket, mut inner) = (self.bucket.clone(), got.into_stream());
        Ok(Some((
            size,
            Box::pin(async_stream::try_stream! {
                let mut n = 0u64;
                loop {
                    match tokio::time::timeout(bucket.idle, inner.next()).await {
                        Err(_) => Err(Error::Timeout(format!(
                            "{what}: no data from the bucket for {:?}",
                            bucket.idle
                        )))?,
                        Ok(None) => break,
                        Ok(Some(Err(e))) => Err(bucket.error(&what, e))?,
                        Ok(Some(Ok(b))) => {
                            // held to its declared length, which callers
                            // size their checks and spools by
                            n += b.len() as u64;
                            if n > size {
                                Err(bucket.longer(&what, size))?;
                            }
                            yield b
                        }
                    }
                }
            }),
        )))
    }

    /// A reader by leaves of a large blob, when its leaf list is there,
    /// hashes to its digest and agrees with the size the blob object has
    /// or is asked for; `None` (read it whole, which checks the size)
    /// otherwise.
    async fn by_leaves(
        &self,
        digest: &B3Digest,
        limit: Option<u64>,
        object_size: Option<u64>,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        let b = &self.bucket;
        let what = format!("the leaf list of blob {digest}");
        let Some(got) = b.within(&what, b.store.get(&b.leaves_key(digest))).await? else {
            return Ok(None);
        };
        let longest = limit
            .or(object_size)
            .unwrap_or(u64::MAX)
            .min(MAX_LEAVES * LEAF);
        let most = SIZE_HEADER as u64 + 32 * Leaves::count(longest);
        if got.meta.size > most {
            tracing::warn!(
                "{what}: {} bytes, more than {most}; reading the blob whole",
                got.meta.size
            );
            return Ok(None);
        }
        let bytes = b.bounded_bytes(&what, got).await?;
        let Some((size, list)) = bytes.split_first_chunk::<SIZE_HEADER>() else {
            tracing::warn!(
                "{what}: {} bytes, no size; reading the blob whole",
                bytes.len()
            );
            return Ok(None);
        };
        let size = u64::from_le_bytes(*size);
        // the list is a hint: the object (and the digest) are the truth
        if let Some(known) = object_size.or(limit).filter(|&k| k != size) {
            tracing::warn!("{what} is for {size} bytes, the blob has {known}; reading it whole");
            return Ok(None);
        }
        match Leaves::decode(digest, size, list) {
            Ok(leaves) => Ok(Some(Box::new(ranged::Ranged::new(
                b.clone(),
                b.blob_key(digest),
                *digest,
                leaves,
            )))),
            Err(e) => {
                tracing::warn!("{what} in the bucket is refused ({e}); reading the blob whole");
                Ok(None)
            }
        }
    }

    /// Fetches and checks a blob, stopping past `limit` bytes; a large one
    /// is read by leaves where it can be.
    async fn fetch(
        &self,
        digest: &B3Digest,
        limit: Option<u64>,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        if limit.is_some_and(|l| l > RANGED_ABOVE) {
            if let Some(r) = self.by_leaves(digest, limit, None).await? {
                return Ok(Some(r));
            }
        }
        let Some((size, mut body)) = self.body(digest).await? else {
            return Ok(None);
        };
        if limit.is_none() && size > RANGED_ABOVE {
            // the size was not known before asking: leave the body unread
            if let Some(r) = self.by_leaves(digest, None, Some(size)).await? {
                return Ok(Some(r));
            }
        }
        let mut checking = Checking::new(*digest, limit, self.memfd_spool);
        while let Some(chunk) = body.next().await {
            checking.push(&chunk?)?;
        }
        Ok(Some(checking.finish("the bucket")?))
    }
}

#[async_trait]
impl BlobService for S3BlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        let key = self.bucket.blob_key(digest);
        Ok(self
            .bucket
            .within(format!("blob {digest}"), self.bucket.store.head(&key))
            .await?
            .is_some())
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        self.fetch(digest, None).await
    }

    async fn open_read_sized(
        &self,
        digest: &B3Digest,
        size: u64,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        self.fetch(digest, Some(size)).await
    }

    async fn read_stream(&self, digest: &B3Digest) -> Result<Option<ChunkStream>> {
        Ok(self.body(digest).await?.map(|(_, body)| body))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(S3Writer {
            bucket: self.bucket.clone(),
            hasher: LeafHasher::default(),
            buf: Vec::new(),
            upload: None,
            room: self.room.clone(),
            held: room::Held::default(),
        }))
    }

    fn keeps_packs(&self) -> bool {
        true
    }

    async fn put_pack_part(&self, digest: &B3Digest, part: Bytes) -> Result<()> {
        packs::put_part(&self.bucket, digest, part).await
    }

    async fn put_pack_index(
        &self,
        tree: &B3Digest,
        index: &crate::castore::pack::PackIndex,
    ) -> Result<()> {
        packs::put_index(&self.bucket, tree, index).await
    }

    async fn read_packed(
        &self,
        tree: &B3Digest,
        digests: &[B3Digest],
    ) -> Result<Vec<Option<Bytes>>> {
        packs::read(&self.bucket, &self.packs, tree, digests).await
    }
}

/// A blob on its way into the bucket.
struct S3Writer {
    bucket: Bucket,
    hasher: LeafHasher,
    /// Bytes not yet sent: at most one part.
    buf: Vec<u8>,
    /// A large blob's upload under its temporary key, once begun.
    upload: Option<(Key, Box<dyn MultipartUpload>)>,
    /// Room for `buf`, shared by the service's writers (see `room.rs`).
    room: Arc<room::Room>,
    held: room::Held,
}

impl S3Writer {
    /// Sends what is buffered as the upload's next part.
    async fn send_part(&mut self) -> Result<()> {
        if self.upload.is_none() {
            let key = self.bucket.temp_key();
            let up = self
                .bucket
                .within("starting an upload", self.bucket.store.put_multipart(&key))
                .await?
                .ok_or_else(|| Error::Bucket(format!("starting an upload of {key}: not found")))?;
            self.upload = Some((key, up));
        }
        let part = PutPayload::from(Bytes::from(std::mem::take(&mut self.buf)));
        if let Some((key, up)) = &mut self.upload {
            let what = format!("uploading a part of {key}");
            self.bucket.within(what, up.put_part(part)).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for S3Writer {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.hasher.update(data);
        let mut data = data;
        while !data.is_empty() {
            let n = (PART - self.buf.len()).min(data.len());
            self.held
                .ensure(&self.room, self.buf.len() + n, PART)
                .await?;
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == PART {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<B3Digest> {
        let (digest, leaves) = std::mem::take(&mut self.hasher).finish();
        let dest = self.bucket.blob_key(&digest);
        let what = format!("storing blob {digest}");
        if let Some(leaves) = leaves.filter(|l| l.size() > RANGED_ABOVE) {
            // before the blob: a reader that finds the blob finds its list
            let mut list = leaves.size().to_le_bytes().to_vec();
            list.extend_from_slice(&leaves.encode());
            let key = self.bucket.leaves_key(&digest);
            let body = PutPayload::from(Bytes::from(list));
            self.bucket
                .within(&what, self.bucket.store.put(&key, body))
                .await?;
        }
        let Some((temp, mut up)) = self.upload.take() else {
            // One PUT: S3 never shows half an object. A blob already there
            // holds the same bytes (its name is their digest).
            let body = PutPayload::from(Bytes::from(std::mem::take(&mut self.buf)));
            self.bucket
                .within(&what, self.bucket.store.put(&dest, body))
                .await?;
            return Ok(digest);
        };
        if !self.buf.is_empty() {
            let part = PutPayload::from(Bytes::from(std::mem::take(&mut self.buf)));
            self.bucket.within(&what, up.put_part(part)).await?;
        }
        self.bucket.within(&what, up.complete()).await?;
        let copied = match self
            .bucket
            .within(&what, self.bucket.store.head(&dest))
            .await?
        {
            Some(_) => Ok(None), // stored before: the same bytes
            None => {
                self.bucket
                    .within(&what, self.bucket.store.copy(&temp, &dest))
                    .await
            }
        };
        let removing = format!("removing the upload {temp}");
        let removed = self.bucket.store.delete(&temp);
        if let Err(e) = self.bucket.within(&removing, removed).await {
            tracing::warn!("{e}");
        }
        copied?;
        Ok(digest)
    }
}

impl Drop for S3Writer {
    /// A writer dropped unclosed stores nothing: its parts are let go.
    fn drop(&mut self) {
        if let (Some((key, mut up)), Ok(rt)) =
            (self.upload.take(), tokio::runtime::Handle::try_current())
        {
            let idle = self.bucket.idle;
            rt.spawn(async move {
                match tokio::time::timeout(idle, up.abort()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("abandoning the upload {key}: {e}"),
                    Err(_) => tracing::warn!("abandoning the upload {key}: no answer"),
                }
            });
        }
    }
}
