//! A stage in the filler's cache directory: a store to write into for an
//! upstream that computes its objects rather than storing them (a Nix
//! binary cache, whose NARs become blobs and directories as they are
//! read). What is written waits in a staging directory, its room taken
//! from the cache's bound as it grows, and moves into the cache only when
//! the upstream has checked the whole (a NAR against its NarHash): a
//! refused NAR leaves nothing behind, and nothing is written twice.
//!
//! Blobs are hashed as they are written and named by the digest they hash
//! to; directories come as a validated graph. Path infos are not written
//! here: the cache stores the one its upstream answers.
use super::space::{cost, Reservation};
use super::{Cache, RoleState};
use crate::castore::{B3Digest, Directory, ValidatedGraph};
use crate::nix::path_info::PathInfo;
use crate::store::blob::{BlobReader, BlobService, BlobWriter};
use crate::store::directory::DirectoryService;
use crate::store::pathinfo::PathInfoService;
use crate::store::{Error, Result, Store};
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// How stage directories' names start (in the cache's `tmp`).
pub(super) const STAGE_PREFIX: &str = ".stage";

/// Objects written to a stage and the room each holds.
#[derive(Default)]
struct Staged {
    /// (digest, staged file, length, its room)
    blobs: Vec<(B3Digest, PathBuf, u64, Reservation)>,
    /// The staged directories of each graph, and their room.
    graphs: Vec<(Vec<StagedFile>, Reservation)>,
}

/// An object's digest, its staged file and its length.
type StagedFile = (B3Digest, PathBuf, u64);

/// A staging directory in the cache; removed with what is left in it when
/// dropped (and by the next filler, if this one is killed).
pub struct Stage {
    cache: Arc<Cache>,
    dir: Arc<tempfile::TempDir>,
    staged: Arc<Mutex<Staged>>,
    /// Room the stage's closed objects hold.
    held: Arc<AtomicU64>,
}

/// A stage may hold at most this share of the cache (1/2): a NAR of a
/// million tiny files, each charged a block, cannot evict the whole cache
/// before its NarHash is found wrong.
fn stage_cap(cache: &Cache) -> u64 {
    cache.max_bytes() / 2
}

/// What a stage put into the cache.
#[derive(Debug, Default)]
pub struct Committed {
    pub blobs: Vec<B3Digest>,
    pub directories: Vec<B3Digest>,
}

impl Cache {
    /// A new stage (the filler's only).
    pub fn stage(self: &Arc<Self>) -> Result<Stage> {
        self.filler()?;
        let dir = tempfile::Builder::new()
            .prefix(STAGE_PREFIX)
            .tempdir_in(self.root.join("tmp"))?;
        Ok(Stage {
            cache: self.clone(),
            dir: Arc::new(dir),
            staged: Arc::default(),
            held: Arc::default(),
        })
    }
}

impl Cache {
    /// A blob the cache holds, without fetching it or counting a hit.
    pub async fn held_blob(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        self.local.blobs.open_read(digest).await
    }

    /// A directory the cache holds, as [`Cache::held_blob`].
    pub async fn held_directory(self: &Arc<Self>, digest: &B3Digest) -> Result<Option<Directory>> {
        let d = *digest;
        self.clone()
            .blocking(move |c| c.local_dir(&d, false))
            .await?
    }

    /// Whether the cache holds this blob or directory (a cheap look).
    pub fn holds(&self, digest: &B3Digest, directory: bool) -> bool {
        if directory {
            self.local.dirs.path_of(digest).exists()
        } else {
            self.local.blobs.path_of(digest).exists()
        }
    }
}

impl Stage {
    /// The stage as a store to write into.
    pub fn store(&self) -> Store {
        let s = Arc::new(StageStore {
            cache: self.cache.clone(),
            dir: self.dir.clone(),
            staged: self.staged.clone(),
            held: self.held.clone(),
        });
        Store {
            blob: s.clone(),
            directory: s.clone(),
            path_info: s,
        }
    }

    /// Moves everything staged into the cache (what it holds already
    /// stays as it is, charged once); answers every object of the stage,
    /// moved or already there.
    pub async fn commit(self) -> Result<Committed> {
        let staged = std::mem::take(&mut *crate::lock(&self.staged));
        let cache = self.cache.clone();
        let dir = self.dir.clone();
        let done = cache
            .clone()
            .blocking(move |c| -> std::io::Result<Committed> {
                let _dir = dir;
                let mut out = Committed::default();
                for (digest, file, len, room) in staged.blobs {
                    out.blobs.push(digest);
                    if place(&file, &c.local.blobs.path_of(&digest))? {
                        room.commit(cost(len));
                        c.stats.fetched_bytes.fetch_add(len, Relaxed);
                    }
                }
                for (dirs, room) in staged.graphs {
                    let mut moved = 0;
                    for (digest, file, len) in dirs {
                        out.directories.push(digest);
                        if place(&file, &c.local.dirs.path_of(&digest))? {
                            moved += cost(len);
                        }
                    }
                    room.commit(moved);
                }
                Ok(out)
            })
            .await??;
        Ok(done)
    }
}

/// Renames a staged object into place unless one is there already (one
/// atomic step: two stages of one object charge it once); marks it as
/// just used, as the evictor goes by use and its file is as old as the
/// stage. Answers whether it moved.
fn place(file: &std::path::Path, dest: &std::path::Path) -> std::io::Result<bool> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, file, CWD, dest, RenameFlags::NOREPLACE) {
        Ok(()) => {
            super::space::touch(dest);
            Ok(true)
        }
        Err(rustix::io::Errno::EXIST) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Drop for Stage {
    /// What is left (a refused NAR's files) is removed off the runtime's
    /// threads: a NAR of many files takes a while.
    fn drop(&mut self) {
        let dir = self.dir.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn_blocking(move || drop(dir));
        }
    }
}

struct StageStore {
    cache: Arc<Cache>,
    dir: Arc<tempfile::TempDir>,
    staged: Arc<Mutex<Staged>>,
    held: Arc<AtomicU64>,
}

/// Refuses room past the stage's cap.
fn within_cap(cache: &Cache, held: &AtomicU64, more: u64) -> Result<()> {
    let cap = stage_cap(cache);
    let total = held.load(Relaxed).saturating_add(more);
    if total > cap {
        return Err(Error::ResourceExhausted(format!(
            "the objects being read in take more than {cap} bytes, half the cache"
        )));
    }
    Ok(())
}

impl StageStore {
    fn room(&self) -> Result<&Arc<super::space::Space>> {
        match &self.cache.role {
            RoleState::Filler(f) => Ok(&f.space),
            RoleState::Reader(_) => Err(Error::InvalidRequest(
                "this process only reads its cache directory".into(),
            )),
        }
    }
}

/// A blob being written: a staged file, hashed and charged as it grows.
struct StageWriter {
    cache: Arc<Cache>,
    held: Arc<AtomicU64>,
    idle: std::time::Duration,
    file: tempfile::NamedTempFile,
    hasher: blake3::Hasher,
    len: u64,
    room: Reservation,
    staged: Arc<Mutex<Staged>>,
}

#[async_trait]
impl BlobWriter for StageWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.len += data.len() as u64;
        within_cap(&self.cache, &self.held, cost(self.len))?;
        self.room.grow(cost(self.len), self.idle).await?;
        self.hasher.update(data);
        self.file.write_all(data)?;
        Ok(())
    }

    async fn close(self: Box<Self>) -> Result<B3Digest> {
        let digest = B3Digest::from(self.hasher.finalize());
        let (_, path) = self.file.keep().map_err(|e| e.error)?;
        self.held.fetch_add(cost(self.len), Relaxed);
        crate::lock(&self.staged)
            .blobs
            .push((digest, path, self.len, self.room));
        Ok(digest)
    }
}

#[async_trait]
impl BlobService for StageStore {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        self.cache.local.blobs.has(digest).await
    }

    /// Only what the cache holds: staged blobs are not checked yet.
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        self.cache.local.blobs.open_read(digest).await
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        let room = self.room()?.reserve(0, self.cache.idle).await?;
        Ok(Box::new(StageWriter {
            cache: self.cache.clone(),
            held: self.held.clone(),
            idle: self.cache.idle,
            file: tempfile::NamedTempFile::new_in(self.dir.path())?,
            hasher: blake3::Hasher::new(),
            len: 0,
            room,
            staged: self.staged.clone(),
        }))
    }
}

#[async_trait]
impl DirectoryService for StageStore {
    /// Only what the cache holds, as for blobs.
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        let d = *digest;
        self.cache
            .clone()
            .blocking(move |c| c.local_dir(&d, false))
            .await?
    }

    async fn put_graph(&self, graph: ValidatedGraph) -> Result<B3Digest> {
        let root = graph
            .root()
            .ok_or_else(|| Error::InvalidRequest("empty directory graph".into()))?;
        let encoded: Vec<(B3Digest, Vec<u8>)> = graph
            .dirs
            .into_iter()
            .map(|(d, dir)| (d, dir.encode()))
            .collect();
        let total: u64 = encoded.iter().map(|(_, b)| cost(b.len() as u64)).sum();
        within_cap(&self.cache, &self.held, total)?;
        self.held.fetch_add(total, Relaxed);
        let mut room = self.room()?.reserve(0, self.cache.idle).await?;
        room.grow(total, self.cache.idle).await?;
        let dir = self.dir.clone();
        let files = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let mut files = Vec::with_capacity(encoded.len());
            for (digest, bytes) in encoded {
                let mut f = tempfile::NamedTempFile::new_in(dir.path())?;
                f.write_all(&bytes)?;
                let (_, path) = f.keep().map_err(|e| e.error)?;
                files.push((digest, path, bytes.len() as u64));
            }
            Ok(files)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        crate::lock(&self.staged).graphs.push((files, room));
        Ok(root)
    }
}

#[async_trait]
impl PathInfoService for StageStore {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>> {
        self.cache.clone().blocking_info(*digest, false).await?
    }

    async fn put(&self, _info: PathInfo) -> Result<PathInfo> {
        Err(Error::InvalidRequest(
            "the cache stores the path infos its upstream answers itself".into(),
        ))
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        self.cache.local.infos.list()
    }
}
