//! Directories in an S3-compatible bucket, one object each under its
//! digest (see [`crate::store::bucket`]). What is read is checked against
//! the digest it was asked by and decoded within the size a gRPC answer
//! may have; what is written is content-addressed, so a second writer of
//! the same directory writes the same bytes.
use super::DirectoryService;
use crate::castore::{B3Digest, Directory, ValidatedGraph};
use crate::store::bucket::Bucket;
use crate::store::channel::MAX_MESSAGE_SIZE;
use crate::store::{Error, Result};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutPayload};

/// Directories written at once by one `put_graph`.
const PUTS_IN_FLIGHT: usize = 16;
/// Directories read at once by one `get_recursive`: a GET from a bucket
/// takes milliseconds, and a tree of a thousand directories read one at
/// a time kept a first VM waiting for seconds.
const GETS_IN_FLIGHT: usize = 16;

#[derive(Clone)]
pub struct S3DirectoryService {
    bucket: Bucket,
}

impl S3DirectoryService {
    pub fn new(bucket: Bucket) -> Self {
        Self { bucket }
    }
}

#[async_trait]
impl DirectoryService for S3DirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        let b = &self.bucket;
        let key = b.directory_key(digest);
        let what = format!("directory {digest}");
        let Some(got) = b.within(&what, b.store.get(&key)).await? else {
            return Ok(None);
        };
        let mut body = got.into_stream();
        let mut bytes = BytesMut::new();
        loop {
            match tokio::time::timeout(b.idle, body.next()).await {
                Err(_) => {
                    return Err(Error::Timeout(format!(
                        "{what}: no data from the bucket for {:?}",
                        b.idle
                    )))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(b.error(&what, e)),
                Ok(Some(Ok(chunk))) => {
                    if bytes.len() + chunk.len() > MAX_MESSAGE_SIZE {
                        return Err(Error::ResourceExhausted(format!(
                            "{what}: more than {MAX_MESSAGE_SIZE} bytes in the bucket"
                        )));
                    }
                    bytes.extend_from_slice(&chunk);
                }
            }
        }
        let actual = B3Digest::of(&bytes);
        if actual != *digest {
            tracing::error!(
                expected = %digest, %actual,
                "the bucket holds other bytes under directory {digest}"
            );
            return Err(Error::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        Ok(Some(Directory::decode(bytes.freeze())?))
    }

    /// Root first, breadth-first, each directory once, as the trait says;
    /// [`GETS_IN_FLIGHT`] GETs ahead of what is handed out, answered in
    /// the order asked.
    fn get_recursive(&self, root: B3Digest) -> BoxStream<'_, Result<Directory>> {
        super::walk_tree(self, root, GETS_IN_FLIGHT)
    }

    async fn put_graph(&self, graph: ValidatedGraph) -> Result<B3Digest> {
        let root = graph
            .root()
            .ok_or_else(|| Error::InvalidRequest("empty directory graph".into()))?;
        let puts: Vec<_> = graph
            .dirs
            .iter()
            .map(|(digest, dir)| {
                let b = self.bucket.clone();
                let key = b.directory_key(digest);
                let body = PutPayload::from(Bytes::from(dir.encode()));
                let what = format!("storing directory {digest}");
                async move { b.within(what, b.store.put(&key, body)).await.map(|_| ()) }
            })
            .collect();
        futures::stream::iter(puts)
            .buffer_unordered(PUTS_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(root)
    }
}
