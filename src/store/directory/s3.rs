//! Directories in an S3-compatible bucket, one object each under its
//! digest (see [`crate::store::bucket`]). What is read is checked against
//! the digest it was asked by and decoded within the size a gRPC answer
//! may have; what is written is content-addressed, so a second writer of
//! the same directory writes the same bytes. A tree written whole (an
//! import) is also written as one object (`packs/trees/`), so reading it
//! whole, as a host cache does at a store path's first lookup, is one GET
//! instead of one per directory: every directory in it is named by the
//! hash of its bytes, and a tree object that lacks one is not used at all.
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

/// A tree of this many directories or more is also written as one object.
const TREE_PACK_FROM: usize = 8;
/// How long a tree pack may take to arrive before the tree is walked
/// instead: an object of blocks can wait on a frozen node for the
/// bucket's own RPC timeout, where directories (small, kept inline by
/// Garage) do not.
const TREE_PACK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// Trees read from their packs at once (each held whole until handed out).
static TREE_PACK_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
/// Most bytes of one tree pack (written or read); larger trees are read
/// directory by directory.
const TREE_PACK_MAX: u64 = 32 << 20;
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
        Box::pin(async_stream::try_stream! {
            // a tree read from its pack is held whole (up to 32 MiB, and
            // decoded) until handed out: a few at once, the rest walk
            let reading = TREE_PACK_READS.try_acquire().ok();
            let packed = match reading {
                Some(_) => self.tree_pack(&root).await?,
                None => None,
            };
            match packed {
                Some(dirs) => {
                    let _held = reading;
                    for d in dirs { yield d }
                }
                None => {
                    drop(reading);
                    let mut walk = super::walk_tree(self, root, GETS_IN_FLIGHT);
                    while let Some(d) = walk.next().await {
                        yield d?;
                    }
                }
            }
        })
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
        if graph.dirs.len() >= TREE_PACK_FROM {
            // after the directories: a speed-up, never their only copy
            if let Err(e) = self.put_tree_pack(&root, &graph).await {
                tracing::warn!("the tree pack of {root} was not stored ({e}): it is read directory by directory");
            }
        }
        Ok(root)
    }
}

impl S3DirectoryService {
    /// Stores every directory of `graph` in one object: each as its
    /// length (4 bytes, little endian) and canonical encoding.
    async fn put_tree_pack(&self, root: &B3Digest, graph: &ValidatedGraph) -> Result<()> {
        let mut out = Vec::new();
        for (_, dir) in &graph.dirs {
            let enc = dir.encode();
            out.extend_from_slice(&(enc.len() as u32).to_le_bytes());
            out.extend_from_slice(&enc);
            if out.len() as u64 > TREE_PACK_MAX {
                return Ok(());
            }
        }
        let b = &self.bucket;
        let key = b.tree_pack_key(root);
        b.within(
            format!("storing the tree pack of {root}"),
            b.store.put(&key, PutPayload::from(Bytes::from(out))),
        )
        .await?;
        Ok(())
    }

    /// The tree below `root` from its tree pack, root first and
    /// breadth-first as `get_recursive` answers; `None` (walk it) when
    /// there is none, or it is unusable: too large, cut, a directory
    /// that does not decode, or one below the root missing from it, or no
    /// answer within [`TREE_PACK_WAIT`]. A bucket that fails is an error:
    /// walking it would only fail again.
    async fn tree_pack(&self, root: &B3Digest) -> Result<Option<Vec<Directory>>> {
        match tokio::time::timeout(TREE_PACK_WAIT, self.tree_pack_now(root)).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    "the tree pack of {root}: no answer within {TREE_PACK_WAIT:?}; walking the tree"
                );
                Ok(None)
            }
        }
    }

    async fn tree_pack_now(&self, root: &B3Digest) -> Result<Option<Vec<Directory>>> {
        let b = &self.bucket;
        let what = format!("the tree pack of {root}");
        let Some(got) = b.within(&what, b.store.get(&b.tree_pack_key(root))).await? else {
            return Ok(None);
        };
        if got.meta.size > TREE_PACK_MAX {
            tracing::warn!(
                "{what}: {} bytes, more than a tree pack may be",
                got.meta.size
            );
            return Ok(None);
        }
        let bytes = match b.bounded_bytes(&what, got).await {
            Ok(bytes) => bytes,
            Err(e @ Error::Timeout(_)) => return Err(e),
            Err(e) => {
                tracing::warn!("{e}: walking the tree");
                return Ok(None);
            }
        };
        match tree_from_pack(root, bytes) {
            Ok(dirs) => Ok(Some(dirs)),
            Err(why) => {
                tracing::warn!("{what} is refused ({why}): walking the tree");
                Ok(None)
            }
        }
    }
}

/// Decodes a tree pack: each directory keyed by the hash of its bytes,
/// then handed out from `root` breadth-first, each once.
fn tree_from_pack(root: &B3Digest, bytes: Bytes) -> std::result::Result<Vec<Directory>, String> {
    let mut by = std::collections::HashMap::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let len = bytes
            .get(at..at + 4)
            .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .ok_or("cut in a length")?;
        at += 4;
        if len > MAX_MESSAGE_SIZE {
            return Err(format!("a directory of {len} bytes"));
        }
        let enc = bytes.get(at..at + len).ok_or("cut in a directory")?;
        let digest = B3Digest::of(enc);
        let dir = Directory::decode(bytes.slice(at..at + len)).map_err(|e| e.to_string())?;
        at += len;
        by.insert(digest, dir);
    }
    let mut out = Vec::with_capacity(by.len());
    let mut pending = std::collections::VecDeque::from([*root]);
    let mut seen = std::collections::HashSet::from([*root]);
    while let Some(d) = pending.pop_front() {
        let dir = by
            .remove(&d)
            .ok_or_else(|| format!("directory {d} is not in it"))?;
        for (_, child, _) in dir.child_directories() {
            if seen.insert(child) {
                pending.push_back(child);
            }
        }
        out.push(dir);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::castore::Node;

    fn pack(dirs: &[&Directory]) -> Bytes {
        let mut out = Vec::new();
        for d in dirs {
            let enc = d.encode();
            out.extend_from_slice(&(enc.len() as u32).to_le_bytes());
            out.extend_from_slice(&enc);
        }
        out.into()
    }

    /// root -> a, b; a -> c; b -> c (one directory in two places)
    fn tree() -> (Directory, Directory, Directory, Directory) {
        let mut c = Directory::new();
        let f = Node::File {
            digest: B3Digest::of(b"x"),
            size: 1,
            executable: false,
        };
        c.add(Bytes::from_static(b"f"), f).unwrap();
        let sub = |c: &Directory, name: &'static [u8]| {
            let mut d = Directory::new();
            let node = Node::Directory {
                digest: c.digest(),
                size: c.size(),
            };
            d.add(Bytes::from_static(name), node).unwrap();
            d
        };
        let a = sub(&c, b"c");
        let b = sub(&c, b"cc");
        let mut root = Directory::new();
        for (n, d) in [(&b"a"[..], &a), (&b"b"[..], &b)] {
            let node = Node::Directory {
                digest: d.digest(),
                size: d.size(),
            };
            root.add(Bytes::copy_from_slice(n), node).unwrap();
        }
        (root, a, b, c)
    }

    #[test]
    fn a_tree_pack_is_handed_out_root_first_each_directory_once() {
        let (root, a, b, c) = tree();
        let got = tree_from_pack(&root.digest(), pack(&[&c, &b, &a, &root, &c])).unwrap();
        let order: Vec<B3Digest> = got.iter().map(Directory::digest).collect();
        assert_eq!(
            order,
            vec![root.digest(), a.digest(), b.digest(), c.digest()]
        );
    }

    #[test]
    fn an_unusable_tree_pack_is_refused_whole() {
        let (root, a, b, c) = tree();
        let r = root.digest();
        // one directory below the root missing
        assert!(tree_from_pack(&r, pack(&[&root, &a, &b])).is_err());
        // cut in a length, cut in a directory
        let full = pack(&[&root, &a, &b, &c]);
        assert!(tree_from_pack(&r, full.slice(..full.len() - 1)).is_err());
        let mut cut = full.to_vec();
        cut.extend_from_slice(&[1, 0]);
        assert!(tree_from_pack(&r, cut.into()).is_err());
        // bytes that do not decode as a directory
        let mut junk = full.to_vec();
        junk.extend_from_slice(&3u32.to_le_bytes());
        junk.extend_from_slice(b"\xff\xff\xff");
        assert!(tree_from_pack(&r, junk.into()).is_err());
        // a root that is not in it
        assert!(tree_from_pack(&B3Digest::of(b"other"), full).is_err());
    }
}
