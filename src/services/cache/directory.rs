//! Directories through the cache. A tree is served from the directory
//! when every directory in it is there; otherwise the filler fetches it
//! with one recursive call (checked by the remote client: digests, order,
//! completeness) and writes each directory as it arrives, and a reader
//! asks its store, which is the filler.
use super::flights::{self, Key, Outcome, Reporter};
use super::space::cost;
use super::stats::Kind;
use super::{Cache, RoleState};
use crate::castore::{B3Digest, Directory, ValidatedGraph};
use crate::services::directory::DirectoryService;
use crate::services::{Error, Result};
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

pub struct CachedDirectoryService(pub(super) Arc<Cache>);

/// Most directories one tree may have to be served from the cache in one
/// piece; larger trees are streamed from the store instead.
const MAX_LOCAL_TREE: usize = 1 << 20;

impl Cache {
    /// A directory from the cache directory, on this thread, counted as a
    /// hit when `hit`; damaged objects count as absent.
    fn local_dir(&self, digest: &B3Digest, hit: bool) -> Option<Directory> {
        self.found(
            self.local.dirs.get_blocking(digest),
            Kind::Directory,
            Key::Directory(*digest),
            || self.local.dirs.path_of(digest),
            hit,
        )
    }

    /// The whole tree below `root` from the cache directory, root first;
    /// `None` unless all of it is there.
    fn local_tree(&self, root: &B3Digest, hit: bool) -> Option<Vec<Directory>> {
        let mut out = Vec::new();
        let mut queue = VecDeque::from([*root]);
        let mut seen = HashSet::from([*root]);
        while let Some(d) = queue.pop_front() {
            let dir = self.local_dir(&d, hit)?;
            for (_, child, _) in dir.child_directories() {
                if seen.insert(child) {
                    queue.push_back(child);
                }
            }
            out.push(dir);
            if out.len() > MAX_LOCAL_TREE {
                return None;
            }
        }
        Some(out)
    }

    /// Writes a fetched directory, within the size bound; answers its
    /// encoded size.
    async fn store_dir(&self, dir: &Directory) -> Result<u64> {
        let f = self.filler()?;
        let bytes = dir.encode();
        let len = bytes.len() as u64;
        let room = f.space.reserve(cost(len), self.idle).await?;
        let written = self.local.dirs.write_one(&B3Digest::of(&bytes), &bytes)?;
        room.commit(if written > 0 { cost(written) } else { 0 });
        Ok(len)
    }

    async fn fetch_dir(&self, digest: B3Digest) -> Result<bool> {
        let got = tokio::time::timeout(self.idle, self.remote.directory.get(&digest))
            .await
            .map_err(|_| stalled(&digest, self.idle))??;
        let Some(dir) = got else { return Ok(false) };
        self.store_dir(&dir).await?;
        Ok(true)
    }

    /// Fetches a whole tree: received in full first, then written. A
    /// stream of many small messages must be read as fast as it comes:
    /// h2 ends a connection on which too many small frames wait unread
    /// (`ENHANCE_YOUR_CALM`), which writing a file per message provoked.
    async fn fetch_tree(self: &Arc<Self>, root: B3Digest, rep: &Reporter) -> Result<bool> {
        let mut s = self.remote.directory.get_recursive(root);
        let mut tree: Vec<(B3Digest, Vec<u8>)> = Vec::new();
        let mut bytes = 0u64;
        loop {
            let next = tokio::time::timeout(self.idle, s.try_next())
                .await
                .map_err(|_| stalled(&root, self.idle))??;
            let Some(dir) = next else { break };
            let encoded = dir.encode();
            bytes += encoded.len() as u64;
            tree.push((B3Digest::of(&encoded), encoded));
            if tree.len() > MAX_LOCAL_TREE {
                return Err(Error::ResourceExhausted(format!(
                    "directory tree {root} has more than {MAX_LOCAL_TREE} directories"
                )));
            }
            rep.send_modify(|p| p.bytes = bytes);
        }
        drop(s);
        if tree.is_empty() {
            return Ok(false);
        }
        let f = self.filler()?;
        let need = tree.iter().map(|(_, b)| cost(b.len() as u64)).sum();
        let room = f.space.reserve(need, self.idle).await?;
        let written = self
            .clone()
            .blocking(move |c| -> std::io::Result<u64> {
                let mut written = 0;
                for (digest, encoded) in &tree {
                    let n = c.local.dirs.write_one(digest, encoded)?;
                    if n > 0 {
                        written += cost(n);
                    }
                }
                Ok(written)
            })
            .await??;
        room.commit(written);
        Ok(true)
    }

    async fn get_directory(self: &Arc<Self>, digest: &B3Digest) -> Result<Option<Directory>> {
        let d = *digest;
        if let Some(dir) = self
            .clone()
            .blocking(move |c| c.local_dir(&d, true))
            .await?
        {
            return Ok(Some(dir));
        }
        self.stats.miss(Kind::Directory);
        let f = match &self.role {
            RoleState::Reader(_) => return self.remote.directory.get(digest).await,
            RoleState::Filler(f) => f,
        };
        let this = self.clone();
        let rx = f.flights.join(Key::Directory(d), move |_| async move {
            match this.fetch_dir(d).await {
                Ok(true) => Outcome::Stored,
                Ok(false) => Outcome::Absent,
                Err(e) => Outcome::failed(&e),
            }
        });
        if !flights::wait(rx, self.idle).await.into_result()? {
            return Ok(None);
        }
        let again = self
            .clone()
            .blocking(move |c| c.local_dir(&d, false))
            .await?;
        again.map(Some).ok_or_else(|| evicted(digest))
    }

    /// Runs a directory walk on the blocking pool.
    async fn blocking<T: Send + 'static>(
        self: Arc<Self>,
        f: impl FnOnce(&Cache) -> T + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(move || f(&self))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))
    }
}

fn stalled(digest: &B3Digest, idle: std::time::Duration) -> Error {
    Error::Timeout(format!(
        "directory {digest}: no answer from the remote store for {idle:?}"
    ))
}

fn evicted(digest: &B3Digest) -> Error {
    Error::Fetch(format!(
        "directory {digest} was evicted as soon as it was fetched: the cache is too small"
    ))
}

#[async_trait]
impl DirectoryService for CachedDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        self.0.get_directory(digest).await
    }

    /// Hits only: a miss goes the async way, which fetches.
    fn get_blocking(&self, digest: &B3Digest) -> Option<Result<Option<Directory>>> {
        self.0.local_dir(digest, true).map(|d| Ok(Some(d)))
    }

    fn get_recursive(&self, root: B3Digest) -> BoxStream<'_, Result<Directory>> {
        let cache = self.0.clone();
        Box::pin(async_stream::try_stream! {
            if let Some(tree) = cache.clone().blocking(move |c| c.local_tree(&root, true)).await? {
                for d in tree {
                    yield d;
                }
                return;
            }
            cache.stats.miss(Kind::Directory);
            match &cache.role {
                RoleState::Reader(_) => {
                    let mut s = cache.remote.directory.get_recursive(root);
                    while let Some(d) = s.try_next().await? {
                        yield d;
                    }
                }
                RoleState::Filler(f) => {
                    let this = cache.clone();
                    let rx = f.flights.join(Key::Tree(root), move |rep| async move {
                        match this.fetch_tree(root, &rep).await {
                            Ok(true) => Outcome::Stored,
                            Ok(false) => Outcome::Absent,
                            Err(e) => Outcome::failed(&e),
                        }
                    });
                    if flights::wait(rx, cache.idle).await.into_result()? {
                        let tree = cache.clone().blocking(move |c| c.local_tree(&root, false)).await?;
                        for d in tree.ok_or_else(|| evicted(&root))? {
                            yield d;
                        }
                    }
                }
            }
        })
    }

    async fn put_graph(&self, graph: ValidatedGraph) -> Result<B3Digest> {
        self.0.remote.directory.put_graph(graph).await
    }
}
