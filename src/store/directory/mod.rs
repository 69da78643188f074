//! Directory storage: validated directories addressed by their digest.
use crate::castore::{B3Digest, Directory, LeavesFirst, ValidatedGraph};
use crate::store::{Error, Result};
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::collections::{HashSet, VecDeque};

pub mod failover;
pub mod grpc;
pub mod local;
pub mod memory;
pub mod s3;

#[async_trait]
pub trait DirectoryService: Send + Sync + 'static {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>>;

    /// As `get`, on the calling thread and without the async runtime,
    /// where the backend has the directory on a local disk; `None` where
    /// it would have to ask elsewhere. For the view's request threads.
    fn get_blocking(&self, _digest: &B3Digest) -> Option<Result<Option<Directory>>> {
        None
    }

    /// The tree below `root`: root first, breadth-first, each directory once.
    /// The stream is empty when `root` is unknown.
    fn get_recursive(&self, root: B3Digest) -> BoxStream<'_, Result<Directory>> {
        walk_tree(self, root, 1)
    }

    /// As `get_recursive`, counting the bytes of the answer into
    /// `received` as they arrive, where the backend can (a remote one): a
    /// caller can then wait for a large directory as long as it keeps
    /// coming. Others leave the count alone.
    fn get_recursive_watched(
        &self,
        root: B3Digest,
        received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> BoxStream<'_, Result<Directory>> {
        let _ = received;
        self.get_recursive(root)
    }

    /// Stores a validated graph (leaves first) and answers its root digest.
    async fn put_graph(&self, graph: ValidatedGraph) -> Result<B3Digest>;

    /// As `get`, for a caller that waits only while the answer makes
    /// progress: fails when nothing arrives for `idle`, and tells
    /// `progress` the bytes received so far. A backend that cannot watch
    /// its transfer (a local one has nothing to wait for) limits the whole
    /// call to `idle`.
    async fn get_watched(
        &self,
        digest: &B3Digest,
        idle: std::time::Duration,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Option<Directory>> {
        let _ = progress;
        tokio::time::timeout(idle, self.get(digest))
            .await
            .map_err(|_| {
                Error::Timeout(format!(
                    "directory {digest}: no answer from the store for {idle:?}"
                ))
            })?
    }
}

/// The tree below `root` by `get`: root first, breadth-first, each
/// directory once, with `in_flight` gets ahead of what is handed out
/// (answered in the order asked); empty when `root` is unknown, an error
/// when a directory below it is.
pub fn walk_tree<S: DirectoryService + ?Sized>(
    svc: &S,
    root: B3Digest,
    in_flight: usize,
) -> BoxStream<'_, Result<Directory>> {
    use futures::StreamExt;
    Box::pin(async_stream::try_stream! {
        let mut pending = VecDeque::from([root]);
        let mut seen = HashSet::from([root]);
        let mut flying = futures::stream::FuturesOrdered::new();
        loop {
            while flying.len() < in_flight.max(1) {
                let Some(d) = pending.pop_front() else { break };
                flying.push_back(async move { (d, svc.get(&d).await) });
            }
            let Some((digest, got)) = flying.next().await else {
                return;
            };
            let Some(dir) = got? else {
                if digest == root {
                    return;
                }
                Err(Error::NotFound(format!("directory {digest} (below {root})")))?;
                return;
            };
            for (_, child, _) in dir.child_directories() {
                if seen.insert(child) {
                    pending.push_back(child);
                }
            }
            yield dir;
        }
    })
}

/// Stores one directory whose children are already stored (or that has none).
pub async fn put_one(svc: &dyn DirectoryService, dir: Directory) -> Result<B3Digest> {
    let mut g = LeavesFirst::new();
    // children already stored elsewhere are fine here: validate names/sizes only
    if dir.child_directories().next().is_some() {
        let digest = dir.digest();
        svc.put_graph(ValidatedGraph {
            dirs: vec![(digest, dir)],
        })
        .await
    } else {
        g.add(dir)?;
        svc.put_graph(g.finish()?).await
    }
}

/// Most directories one tree held whole in memory may have (a NAR is
/// rendered from it), as a writable daemon accepts in one Put.
pub const MAX_TREE_DIRECTORIES: usize = 1_000_000;
/// Most bytes those directories may take.
pub const MAX_TREE_BYTES: u64 = 512 << 20;

/// Collects a whole tree, for callers that walk it (NAR rendering), within
/// `MAX_TREE_DIRECTORIES` and `MAX_TREE_BYTES`.
pub async fn get_tree(
    svc: &dyn DirectoryService,
    root: B3Digest,
) -> Result<std::collections::HashMap<B3Digest, Directory>> {
    get_tree_within(svc, root, MAX_TREE_DIRECTORIES, MAX_TREE_BYTES).await
}

/// [`get_tree`] with the bounds given.
pub async fn get_tree_within(
    svc: &dyn DirectoryService,
    root: B3Digest,
    max_dirs: usize,
    max_bytes: u64,
) -> Result<std::collections::HashMap<B3Digest, Directory>> {
    use futures::TryStreamExt;
    let mut out = std::collections::HashMap::new();
    let mut s = svc.get_recursive(root);
    let mut bytes = 0u64;
    while let Some(d) = s.try_next().await? {
        bytes += d.heap_size();
        if out.len() >= max_dirs || bytes > max_bytes {
            return Err(Error::ResourceExhausted(format!(
                "directory tree {root}: more than {max_dirs} directories or {} MiB",
                max_bytes >> 20
            )));
        }
        out.insert(d.digest(), d);
    }
    if out.is_empty() {
        return Err(Error::NotFound(format!("directory {root}")));
    }
    Ok(out)
}
