//! Directories through the cache. A tree is served from the directory
//! when every directory in it is there; otherwise the filler fetches it
//! with one recursive call (checked by the remote client: digests, order,
//! completeness) and writes each directory as it arrives, and a reader
//! asks its store, which is the filler. Neither a fetched nor a served
//! tree is held whole in memory: both are bounded in bytes.
use super::flights::{self, Key, Outcome, Reporter};
use super::space::cost;
use super::stats::Kind;
use super::{Cache, RoleState};
use crate::castore::{B3Digest, Directory, ValidatedGraph};
use crate::store::directory::DirectoryService;
use crate::store::{Error, Result};
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

pub struct CachedDirectoryService(pub(super) Arc<Cache>);

/// Most directories one tree may have to be served from the cache in one
/// piece; larger trees are streamed from the store instead.
const MAX_LOCAL_TREE: usize = 1 << 20;
/// Bytes (as [`Directory::heap_size`] counts them) of a cached tree held
/// in memory to be sent: a tree within this (most) is read once and sent
/// from memory; a larger one is checked complete first and then read
/// again a batch at a time while it is sent, so that serving a tree of a
/// million directories does not hold it all.
const LOCAL_TREE_HELD_BYTES: u64 = 16 << 20;
/// Bytes of directories one batch of a large cached tree reads ahead of
/// the sending (besides the one directory that crosses it).
const LOCAL_TREE_BATCH_BYTES: u64 = 4 << 20;
/// Bytes of fetched directories waiting for the writer, across all the
/// filler's tree fetches: what remote trees cost its memory however large
/// they are. A single directory larger than this (up to the largest
/// message accepted from a remote) waits until it can go alone.
pub(super) const TREE_BYTES_IN_FLIGHT: u32 = 32 << 20;
/// What a queued directory costs besides its bytes, in bytes: its digest
/// (32), its buffer's and permit's headers (40) and the queue's node
/// (some 48), so that many tiny ones are bounded too.
const TREE_ENTRY_OVERHEAD: u32 = 128;

/// A cached tree as the first look found it.
enum LocalTree {
    /// All there, and small enough to be held: root first.
    Held(Vec<Directory>),
    /// All there, too large to hold: read again as it is sent.
    Large,
    /// Not all there (or more than [`MAX_LOCAL_TREE`] directories).
    Missing,
}

/// A breadth-first walk of a cached tree, root first, each directory once.
struct Walk {
    queue: VecDeque<B3Digest>,
    seen: HashSet<B3Digest>,
}

impl Walk {
    fn new(root: B3Digest) -> Self {
        Self {
            queue: VecDeque::from([root]),
            seen: HashSet::from([root]),
        }
    }

    fn done(&self) -> bool {
        self.queue.is_empty()
    }

    /// The next directory of the walk; `Ok(None)` when it is not cached.
    fn next(&mut self, cache: &Cache, hit: bool) -> Result<Option<Directory>> {
        let Some(d) = self.queue.pop_front() else {
            return Ok(None);
        };
        let Some(dir) = cache.local_dir(&d, hit)? else {
            return Ok(None);
        };
        for (_, child, _) in dir.child_directories() {
            if self.seen.insert(child) {
                self.queue.push_back(child);
            }
        }
        Ok(Some(dir))
    }
}

impl Cache {
    /// A directory from the cache directory, on this thread, counted as a
    /// hit when `hit`; damaged objects count as absent, other errors are
    /// the caller's.
    pub(super) fn local_dir(&self, digest: &B3Digest, hit: bool) -> Result<Option<Directory>> {
        self.found(
            self.local.dirs.get_blocking(digest),
            Kind::Directory,
            Key::Directory(*digest),
            || self.local.dirs.path_of(digest),
            hit,
        )
    }

    /// Looks whether the whole tree below `root` is in the cache
    /// directory, holding it when it is small.
    fn local_tree(&self, root: &B3Digest, hit: bool) -> Result<LocalTree> {
        let mut walk = Walk::new(*root);
        let mut held = Vec::new();
        let mut bytes = 0u64;
        let mut count = 0usize;
        let mut holding = true;
        while !walk.done() {
            let Some(dir) = walk.next(self, hit)? else {
                return Ok(LocalTree::Missing);
            };
            count += 1;
            if count > MAX_LOCAL_TREE {
                return Ok(LocalTree::Missing);
            }
            if holding {
                bytes += dir.heap_size();
                if bytes > LOCAL_TREE_HELD_BYTES {
                    holding = false;
                    held = Vec::new();
                } else {
                    held.push(dir);
                }
            }
        }
        Ok(if holding {
            LocalTree::Held(held)
        } else {
            LocalTree::Large
        })
    }

    /// The next batch of a large cached tree's walk (the walk is handed
    /// back with it); a directory gone since the first look is an error.
    fn local_batch(&self, mut walk: Walk, root: &B3Digest) -> Result<(Walk, Vec<Directory>)> {
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        while !walk.done() && bytes < LOCAL_TREE_BATCH_BYTES {
            let dir = walk.next(self, false)?.ok_or_else(|| evicted(root))?;
            bytes += dir.heap_size();
            batch.push(dir);
        }
        Ok((walk, batch))
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

    /// Fetches one directory; waits for as long as its bytes keep coming
    /// (a directory of a million entries is one message of some 55 MB),
    /// and tells those waiting for it (`rep`) that they do.
    async fn fetch_dir(&self, digest: B3Digest, rep: &Reporter) -> Result<bool> {
        let progress = |n: u64| rep.send_modify(|p| p.bytes = n);
        let got = self
            .remote
            .directory
            .get_watched(&digest, self.idle, &progress)
            .await?;
        let Some(dir) = got else { return Ok(false) };
        self.store_dir(&dir).await?;
        Ok(true)
    }

    /// Fetches a whole tree, written as it arrives: each directory (checked
    /// by the remote client against the digest that named it) goes to a
    /// writer on a blocking thread through a queue bounded in bytes
    /// ([`TREE_BYTES_IN_FLIGHT`]), and room is reserved for it as it
    /// comes. The stream is read on its own, not between file writes: h2
    /// ends a connection on which too many small frames wait unread
    /// (`ENHANCE_YOUR_CALM`), which writing a file per message provoked.
    /// Directories written before a failure stay (each is sound by its
    /// digest) and are charged; the tree is served only once complete.
    pub(super) async fn fetch_tree(
        self: &Arc<Self>,
        root: B3Digest,
        rep: &Reporter,
    ) -> Result<bool> {
        let f = self.filler()?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(
            B3Digest,
            Vec<u8>,
            tokio::sync::OwnedSemaphorePermit,
        )>();
        let this = self.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut written = 0u64;
            while let Some((digest, encoded, _permit)) = rx.blocking_recv() {
                match this.local.dirs.write_one(&digest, &encoded) {
                    Ok(n) if n > 0 => written += cost(n),
                    Ok(_) => {}
                    Err(e) => return (written, Err(e)),
                }
            }
            (written, Ok(()))
        });
        let mut room = f.space.reserve(0, self.idle).await?;
        let mut reserved = 0u64;
        let read: Result<usize> = async {
            let received = Arc::new(AtomicU64::new(0));
            let mut s = self
                .remote
                .directory
                .get_recursive_watched(root, received.clone());
            let mut count = 0usize;
            let mut bytes = 0u64;
            loop {
                let next = next_progressing(&mut s, &received, self.idle, rep)
                    .await
                    .map_err(|_| stalled(&root, self.idle))?
                    .transpose()?;
                let Some(dir) = next else { break };
                let encoded = dir.encode();
                drop(dir);
                count += 1;
                if count > MAX_LOCAL_TREE {
                    return Err(Error::ResourceExhausted(format!(
                        "directory tree {root} has more than {MAX_LOCAL_TREE} directories"
                    )));
                }
                let len = encoded.len() as u64;
                bytes += len;
                reserved += cost(len);
                room.grow(reserved, self.idle).await?;
                let weight = u32::try_from(len)
                    .unwrap_or(u32::MAX)
                    .saturating_add(TREE_ENTRY_OVERHEAD)
                    .min(TREE_BYTES_IN_FLIGHT);
                let permit = tokio::time::timeout(
                    self.idle,
                    f.tree_bytes.clone().acquire_many_owned(weight),
                )
                .await
                .map_err(|_| {
                    Error::Timeout(format!(
                        "directory tree {root}: the cache directory took more than {:?} to \
                         write {} bytes",
                        self.idle, TREE_BYTES_IN_FLIGHT
                    ))
                })?
                .map_err(|_| Error::Fetch("cache is shutting down".into()))?;
                if tx.send((B3Digest::of(&encoded), encoded, permit)).is_err() {
                    // The writer failed: its error says why.
                    break;
                }
                rep.send_modify(|p| p.bytes = bytes);
            }
            Ok(count)
        }
        .await;
        drop(tx);
        let (written, wrote) = writer
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        room.commit(written);
        wrote?;
        Ok(read? > 0)
    }

    async fn get_directory(self: &Arc<Self>, digest: &B3Digest) -> Result<Option<Directory>> {
        let d = *digest;
        if let Some(dir) = self
            .clone()
            .blocking(move |c| c.local_dir(&d, true))
            .await??
        {
            return Ok(Some(dir));
        }
        self.stats.miss(Kind::Directory);
        let f = match &self.role {
            RoleState::Reader(_) => return self.remote.directory.get(digest).await,
            RoleState::Filler(f) => f,
        };
        let this = self.clone();
        let rx = f.flights.join(Key::Directory(d), move |rep| async move {
            match this.fetch_dir(d, &rep).await {
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
            .await??;
        again.map(Some).ok_or_else(|| evicted(digest))
    }

    /// Runs a directory walk on the blocking pool.
    pub(super) async fn blocking<T: Send + 'static>(
        self: Arc<Self>,
        f: impl FnOnce(&Cache) -> T + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(move || f(&self))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))
    }
}

/// The next item of a remote stream, waited for as long as `received`
/// (the bytes of the answer so far) keeps growing, each growth told to
/// `rep`'s waiters; `Err` after `idle` without a byte. A tree's directory
/// is one message however large, so the time to the next one says
/// nothing of whether the remote is stalled.
async fn next_progressing<S: futures::Stream + Unpin>(
    s: &mut S,
    received: &AtomicU64,
    idle: Duration,
    rep: &Reporter,
) -> std::result::Result<Option<S::Item>, ()> {
    let tick = idle / PROGRESS_TICKS;
    let mut seen = received.load(Relaxed);
    let mut since = tokio::time::Instant::now();
    loop {
        if let Ok(item) = tokio::time::timeout(tick, s.next()).await {
            return Ok(item);
        }
        let now = received.load(Relaxed);
        if now != seen {
            seen = now;
            since = tokio::time::Instant::now();
            rep.send_modify(|_| {});
        } else if since.elapsed() >= idle {
            return Err(());
        }
    }
}

/// How often a fetch looks whether bytes arrived, as a share of its idle
/// limit: often enough that those waiting on it (with the same limit)
/// hear of the progress in time.
const PROGRESS_TICKS: u32 = 4;

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
        self.0
            .local_dir(digest, true)
            .transpose()
            .map(|r| r.map(Some))
    }

    fn get_recursive(&self, root: B3Digest) -> BoxStream<'_, Result<Directory>> {
        let cache = self.0.clone();
        Box::pin(async_stream::try_stream! {
            let mut tree = cache.clone().blocking(move |c| c.local_tree(&root, true)).await??;
            if matches!(tree, LocalTree::Missing) {
                cache.stats.miss(Kind::Directory);
                match &cache.role {
                    RoleState::Reader(_) => {
                        let mut s = cache.remote.directory.get_recursive(root);
                        while let Some(d) = s.try_next().await? {
                            yield d;
                        }
                        return;
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
                        if !flights::wait(rx, cache.idle).await.into_result()? {
                            return;
                        }
                        tree = cache.clone().blocking(move |c| c.local_tree(&root, false)).await??;
                    }
                }
            }
            match tree {
                LocalTree::Held(dirs) => {
                    for d in dirs {
                        yield d;
                    }
                }
                LocalTree::Large => {
                    let mut walk = Walk::new(root);
                    loop {
                        let (w, batch) = cache
                            .clone()
                            .blocking(move |c| c.local_batch(walk, &root))
                            .await??;
                        for d in batch {
                            yield d;
                        }
                        if w.done() {
                            break;
                        }
                        walk = w;
                    }
                }
                LocalTree::Missing => Err(evicted(&root))?,
            }
        })
    }

    async fn put_graph(&self, graph: ValidatedGraph) -> Result<B3Digest> {
        self.0.remote.directory.put_graph(graph).await
    }
}
