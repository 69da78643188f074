//! The host cache: an embedded store (the `local://` layout, so a hit takes
//! the embedded store's fast paths) in front of a remote store, which may
//! forget objects to stay within its size and knows where to fetch them
//! again.
//!
//! One directory, two roles:
//! - the **filler** (`daemon --cache-dir`) is the only process that writes
//!   it. A miss is fetched from the remote once however many ask
//!   ([`flights`]), checked against its digest (and a blob against its
//!   size) while it is written, and renamed into place only when complete;
//!   the least recently used objects are evicted to stay within the bound
//!   ([`space`]).
//! - **readers** (`virtiofs`, `mount`; sandboxed, the directory mounted
//!   read-only) serve hits straight from the directory and ask their store,
//!   the filler, to fill misses (`tvix_virtiofsd.cache.v1.CacheService`);
//!   they report their hits so that eviction sees them.
//!
//! Readers still check what they serve (directories and path infos on
//! every read, blobs before their first byte in the view), so not even a
//! corrupted cache directory makes a guest read wrong bytes.
mod batch;
mod batch_slots;
mod blob;
mod directory;
mod fill_batch;
pub mod flights;
pub mod looked_at;
pub mod order;
mod pathinfo;
pub mod prefetch;
pub mod scope;
pub mod sink;
pub mod space;
pub mod stats;
pub mod tenant;
mod touches;

use crate::castore::B3Digest;
use crate::lock;
use crate::store::blob::local::LocalBlobService;
use crate::store::channel::WireChannel;
use crate::store::directory::local::LocalDirectoryService;
use crate::store::disk::store_dir::{Access, StoreDir};
use crate::store::pathinfo::local::LocalPathInfoService;
use crate::store::{Error, Result, Store};
use crate::wire::cache::cache_service_client::CacheServiceClient;
use flights::{Flights, Key, Outcome, Progress};
use space::Space;
use stats::{CacheStats, Kind};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Default `--cache-size`.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 30;
/// How long the filler remembers that the remote lacks a store path: new
/// paths can appear at any time.
const ABSENT_TTL: Duration = Duration::from_secs(1);
/// Most absent store paths remembered.
const MAX_ABSENT: usize = 4096;

/// Which part a process plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Fetches misses into the directory and evicts; one per directory.
    Filler,
    /// Reads the directory, asks its store to fill misses.
    Reader,
}

/// A cache directory and how it is used.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    pub dir: PathBuf,
    /// The size bound (filler only).
    pub max_bytes: u64,
    pub role: Role,
}

/// Creates a cache directory (mode 0700: it holds store contents) if it is
/// not there yet.
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

pub(crate) fn is_not_found(e: &Error) -> bool {
    match e {
        Error::NotFound(_) => true,
        Error::Remote(s) => s.code() == tonic::Code::NotFound,
        _ => false,
    }
}

fn is_unimplemented(e: &Error) -> bool {
    matches!(e, Error::Remote(s) if s.code() == tonic::Code::Unimplemented)
}

/// A local object that fails its check: readers skip it, the filler
/// removes it; both fetch it again. Only what the bytes themselves show
/// counts (wrong digest or size, undecodable or cut short): an I/O error
/// such as EMFILE, ENFILE or ENOMEM says nothing about the object, and
/// counting it as damage made a filler short of descriptors discard good
/// objects.
fn is_corrupt(e: &Error) -> bool {
    match e {
        Error::DigestMismatch { .. }
        | Error::SizeMismatch { .. }
        | Error::Directory(_)
        | Error::Node(_)
        | Error::PathInfo(_) => true,
        Error::Io(e) => matches!(
            e.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// The local side of the cache: the embedded store's three services.
struct Local {
    blobs: LocalBlobService,
    dirs: LocalDirectoryService,
    infos: LocalPathInfoService,
}

struct Filler {
    space: Arc<Space>,
    flights: Arc<Flights>,
    absent: Mutex<HashMap<[u8; 20], Instant>>,
    /// Blobs found larger than the whole cache: not fetched into it again
    /// (each attempt would transfer the bound's worth first).
    too_big: Mutex<HashSet<B3Digest>>,
    /// Bytes of fetched directories not yet written, shared by all tree
    /// fetches ([`directory::TREE_BYTES_IN_FLIGHT`]).
    tree_bytes: Arc<tokio::sync::Semaphore>,
    /// Places for blobs too large for the cache, served without being
    /// kept ([`blob::MAX_PASS_THROUGH`]).
    pass_through: Arc<tokio::sync::Semaphore>,
    /// Boxed: its tables are large, and a reader has none.
    prefetch: Box<prefetch::Prefetcher>,
    /// The remote's cache service, when the remote is one daemon of ours
    /// (`CacheService/ReadBlobs`), until it says it has none. Boxed: a
    /// gRPC client is large.
    batch: Option<Box<CacheServiceClient<WireChannel>>>,
    batching: AtomicBool,
    /// The remote has answered a ReadBlobs: until then a batch holds a
    /// fill slot per blob, as the blob-by-blob fetches it falls back to do.
    batch_answered: AtomicBool,
    /// Guests' misses of small blobs waiting for a batch (boxed: the
    /// filler is most of the role's size).
    misses: Box<batch::Misses>,
    /// flock'd for as long as we fill: one filler per directory.
    _lock: std::fs::File,
}

struct Reader {
    client: Option<CacheServiceClient<WireChannel>>,
    /// The store fills our directory (until it says it cannot).
    fills: AtomicBool,
    touches: touches::Touches,
    /// Fills asked ahead of the guest and not yet answered.
    ahead: Arc<tokio::sync::Semaphore>,
    /// Small blobs' fills, asked many in one call.
    batches: Option<Arc<fill_batch::FillBatches>>,
}

/// Fills a reader asks ahead of the guest at once: enough to keep a
/// remote busy while the guest reads, few enough that a guest's in-order
/// walk cannot crowd out other VMs' misses at the filler.
const FILLS_AHEAD: usize = 8;

enum RoleState {
    Filler(Filler),
    /// Boxed: a gRPC client is large, and a filler has none.
    Reader(Box<Reader>),
}

/// A cache directory in front of a remote store.
pub struct Cache {
    root: PathBuf,
    local: Local,
    remote: Store,
    stats: Arc<CacheStats>,
    /// How long a fetch may make no progress.
    idle: Duration,
    role: RoleState,
    /// The runtime the cache was opened in: background fills run there.
    rt: Option<tokio::runtime::Handle>,
}

impl Cache {
    /// Opens the cache at `opts.dir` in front of `remote`. A filler creates
    /// the directory, takes its lock and takes stock of it; a reader needs
    /// `filler`, the channel to the store that fills the directory (for a
    /// filler: the remote's, when it is one daemon, to batch small blobs).
    pub fn open(
        opts: &CacheOptions,
        remote: Store,
        filler: Option<WireChannel>,
        idle: Duration,
    ) -> Result<Arc<Self>> {
        let root = opts.dir.clone();
        let stats = Arc::new(CacheStats::default());
        let (local, role) = match opts.role {
            Role::Filler => {
                create_dir(&root)?;
                let dir =
                    StoreDir::open(&root, Access::Write, None).map_err(std::io::Error::from)?;
                let lock = take_lock(&root)?;
                let local = Local {
                    blobs: LocalBlobService::open(&root)?,
                    dirs: LocalDirectoryService::open(&root)?,
                    infos: LocalPathInfoService::open(&root)?,
                };
                // Every shard is checked too: eviction deletes in them.
                for area in ["blobs", "directories"] {
                    let a = dir.area(area, 0o755).map_err(std::io::Error::from)?;
                    for shard in 0..=255u8 {
                        a.area(&format!("{shard:02x}"), 0o755)
                            .map_err(std::io::Error::from)?;
                    }
                }
                // What a killed filler was writing (we hold the lock).
                dir.area("tmp", 0o755)
                    .map_err(std::io::Error::from)?
                    .remove_files(|_| true);
                remove_stages(&root.join("tmp"));
                let space = Space::open(&root, opts.max_bytes, stats.clone())?;
                let role = RoleState::Filler(Filler {
                    space,
                    flights: Flights::new(stats.clone()),
                    absent: Mutex::new(HashMap::new()),
                    too_big: Mutex::new(HashSet::new()),
                    tree_bytes: Arc::new(tokio::sync::Semaphore::new(
                        directory::TREE_BYTES_IN_FLIGHT as usize,
                    )),
                    pass_through: Arc::new(tokio::sync::Semaphore::new(blob::MAX_PASS_THROUGH)),
                    prefetch: Box::new(prefetch::Prefetcher::new()),
                    batching: AtomicBool::new(filler.is_some()),
                    batch_answered: AtomicBool::new(false),
                    misses: Box::default(),
                    batch: filler.clone().map(|c| {
                        Box::new(
                            CacheServiceClient::new(c)
                                .max_decoding_message_size(crate::store::channel::MAX_MESSAGE_SIZE),
                        )
                    }),
                    _lock: lock,
                });
                (local, role)
            }
            Role::Reader => {
                // Must exist: a mistyped directory is an operator's error
                // (`virtiofs` creates it before its sandbox, for a host
                // daemon that has not run yet).
                let local = Local {
                    blobs: LocalBlobService::open_existing(&root)?,
                    dirs: LocalDirectoryService::open_existing(&root)?,
                    infos: LocalPathInfoService::open_existing(&root)?,
                };
                let client = filler.map(|c| {
                    CacheServiceClient::new(c)
                        .max_decoding_message_size(crate::store::channel::MAX_MESSAGE_SIZE)
                });
                let role = RoleState::Reader(Box::new(Reader {
                    fills: AtomicBool::new(client.is_some()),
                    batches: client
                        .clone()
                        .map(|c| fill_batch::FillBatches::new(c, idle, None)),
                    client,
                    touches: touches::Touches::default(),
                    ahead: Arc::new(tokio::sync::Semaphore::new(FILLS_AHEAD)),
                }));
                (local, role)
            }
        };
        let cache = Arc::new(Self {
            root,
            local,
            remote,
            stats,
            idle,
            role,
            rt: tokio::runtime::Handle::try_current().ok(),
        });
        if let RoleState::Reader(r) = &cache.role {
            let weak = Arc::downgrade(&cache);
            cache.local.blobs.on_missing(Box::new(move |digest, size| {
                if let Some(c) = weak.upgrade() {
                    c.fill_ahead(digest, size);
                }
            }));
            if let Some(rt) = &cache.rt {
                rt.spawn(touch_reporter(
                    Arc::downgrade(&cache),
                    r.touches.wake.clone(),
                ));
            }
        }
        Ok(cache)
    }

    /// The cached store: hits from the directory, misses from the remote.
    pub fn store(self: &Arc<Self>) -> Store {
        Store {
            blob: Arc::new(blob::CachedBlobService(self.clone())),
            directory: Arc::new(directory::CachedDirectoryService(self.clone())),
            path_info: Arc::new(pathinfo::CachedPathInfoService(self.clone(), Some(None))),
        }
    }

    /// The cached store as [`Cache::store`], whose lookups queue nothing
    /// for prefetch: a tenant's, whose closure is queued whole for as long
    /// as its VM is there ([`Cache::prefetch_closure`]).
    pub fn store_quiet(self: &Arc<Self>) -> Store {
        Store {
            path_info: Arc::new(pathinfo::CachedPathInfoService(self.clone(), None)),
            ..self.store()
        }
    }

    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.stats
    }

    /// The size bound (a reader has none of its own).
    pub fn max_bytes(&self) -> u64 {
        match &self.role {
            RoleState::Filler(f) => f.space.max(),
            RoleState::Reader(_) => u64::MAX,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.root
    }

    pub fn role(&self) -> Role {
        match self.role {
            RoleState::Filler(_) => Role::Filler,
            RoleState::Reader(_) => Role::Reader,
        }
    }

    fn filler(&self) -> Result<&Filler> {
        match &self.role {
            RoleState::Filler(f) => Ok(f),
            RoleState::Reader(_) => Err(Error::InvalidRequest(
                "this process only reads its cache directory".into(),
            )),
        }
    }

    /// Counts a hit and marks the object as used (when it was not
    /// recently: see [`space::FRESH`]).
    fn hit(&self, kind: Kind, path: impl FnOnce() -> PathBuf, key: Key) {
        self.hit_stale(kind, path, key, || None)
    }

    /// As `hit`, with the object's metadata when the caller has it at hand
    /// (an open file's `fstat` spares a lookup by path); asked for only
    /// when the object is due to be looked at.
    fn hit_stale(
        &self,
        kind: Kind,
        path: impl FnOnce() -> PathBuf,
        key: Key,
        meta: impl FnOnce() -> Option<std::fs::Metadata>,
    ) {
        self.stats.hit(kind);
        match &self.role {
            RoleState::Filler(_) => {
                if let Key::Blob(d) = key {
                    self.prefetch_read(&d, true);
                }
                space::touch(&path())
            }
            RoleState::Reader(r) => {
                if !r.touches.due(&key) {
                    return;
                }
                let stale = match meta() {
                    Some(m) => space::is_stale(&m),
                    None => std::fs::symlink_metadata(path()).is_ok_and(|m| space::is_stale(&m)),
                };
                if stale {
                    r.touches.record(key);
                } else if let Key::Blob(d) = key {
                    r.touches.record_fresh(d);
                }
            }
        }
    }

    /// What a local lookup found: the object (counted as a hit when `hit`)
    /// or nothing; a damaged object counts as absent and is discarded. Any
    /// other error (out of descriptors or memory, a failing disk) is the
    /// caller's: the object may well be sound.
    fn found<T>(
        &self,
        got: Option<Result<Option<T>>>,
        kind: Kind,
        key: Key,
        path: impl Fn() -> PathBuf,
        hit: bool,
    ) -> Result<Option<T>> {
        let Some(got) = got else { return Ok(None) };
        match got {
            Ok(Some(v)) => {
                if hit {
                    self.hit(kind, &path, key);
                }
                Ok(Some(v))
            }
            Ok(None) => Ok(None),
            Err(e) if is_corrupt(&e) => {
                self.discard(&path(), &e);
                Ok(None)
            }
            Err(e) => {
                tracing::warn!("cache {key:?}: cannot read {}: {e}", path().display());
                Err(e)
            }
        }
    }

    /// A local object failed its check: the filler removes it (it is
    /// fetched again), a reader leaves that to the filler.
    fn discard(&self, path: &Path, e: &Error) {
        tracing::warn!(
            "cache object {} is damaged ({e}): fetching it again",
            path.display()
        );
        if let RoleState::Filler(f) = &self.role {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if std::fs::remove_file(path).is_ok() {
                    f.space.removed(space::cost(m.len()));
                }
            }
        }
    }

    /// Starts (or joins) the fetch of a blob into the directory; for the
    /// CacheService, which streams the progress to a reader.
    pub fn fill_blob(
        self: &Arc<Self>,
        digest: B3Digest,
        size: Option<u64>,
    ) -> Result<watch::Receiver<Progress>> {
        let f = self.filler()?;
        if self.local.blobs.path_of(&digest).exists() {
            self.hit(
                Kind::Blob,
                || self.local.blobs.path_of(&digest),
                Key::Blob(digest),
            );
            self.prefetch_read(&digest, true);
            let (_, rx) = watch::channel(Progress {
                bytes: size.unwrap_or(0),
                outcome: Some(Outcome::Stored),
            });
            return Ok(rx);
        }
        self.stats.miss(Kind::Blob);
        self.prefetch_read(&digest, false);
        let max = f.space.max();
        if size.is_some_and(|s| s > max) || lock(&f.too_big).contains(&digest) {
            let (_, rx) = watch::channel(Progress {
                bytes: 0,
                outcome: Some(Outcome::failed(&Error::ResourceExhausted(format!(
                    "blob {digest} is larger than the whole cache ({max} bytes)"
                )))),
            });
            return Ok(rx);
        }
        let this = self.clone();
        let batched = self.batches_miss(size);
        Ok(f.flights.join(Key::Blob(digest), move |rep| async move {
            let got = match (batched, size) {
                (true, Some(size)) => {
                    let (done, outcome) = tokio::sync::oneshot::channel();
                    this.queue_miss(digest, size, rep.clone(), done);
                    outcome.await.unwrap_or_else(|_| {
                        Err(Error::Fetch(format!("blob {digest}: its batch ended")))
                    })
                }
                _ => blob::fetch(&this, digest, size, &rep).await,
            };
            match got {
                Ok(true) => Outcome::Stored,
                Ok(false) => Outcome::Absent,
                Err(e) => {
                    if let (Error::ResourceExhausted(_), RoleState::Filler(f)) = (&e, &this.role) {
                        if space::cost(rep.borrow().bytes) > f.space.max() {
                            let mut big = lock(&f.too_big);
                            if big.len() >= MAX_ABSENT {
                                big.clear();
                            }
                            big.insert(digest);
                        }
                    }
                    Outcome::failed(&e)
                }
            }
        }))
    }

    /// Marks objects as used, for the CacheService's Touch (each object
    /// once per report, however often the reader served it).
    /// Blobs a reader read while fresh: counted against prefetch only.
    pub fn fresh_reads(&self, keys: impl Iterator<Item = Vec<u8>>) {
        for k in keys {
            if let Ok(d) = B3Digest::try_from(&k[..]) {
                self.prefetch_read(&d, true);
            }
        }
    }

    pub fn touch(&self, kind: Kind, keys: impl Iterator<Item = Vec<u8>>) {
        if self.filler().is_err() {
            return;
        }
        for k in keys {
            let path = match kind {
                Kind::Blob => B3Digest::try_from(&k[..])
                    .ok()
                    .map(|d| self.local.blobs.path_of(&d)),
                Kind::Directory => B3Digest::try_from(&k[..])
                    .ok()
                    .map(|d| self.local.dirs.path_of(&d)),
                Kind::PathInfo => <[u8; 20]>::try_from(&k[..])
                    .ok()
                    .map(|h| self.local.infos.path_of(&h)),
            };
            if let Some(p) = path {
                // Counted as a hit: readers serve hits themselves, and the
                // filler's counters are the fleet's view of the cache.
                self.stats.hit(kind);
                space::touch(&p);
            }
        }
    }

    /// Sends the hits a reader served to the filler.
    pub async fn report_touches(&self) {
        if let RoleState::Reader(r) = &self.role {
            if let Some(client) = &r.client {
                r.touches.report(client, self.idle).await;
            }
        }
    }
}

/// Reports a reader's hits now and then (sooner when many pile up), for
/// as long as it lives; holds no reference to it while asleep.
async fn touch_reporter(cache: Weak<Cache>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let _ = tokio::time::timeout(touches::PERIOD, wake.notified()).await;
        let Some(c) = cache.upgrade() else { return };
        c.report_touches().await;
    }
}

/// What a killed filler was staging ([`sink::Stage`]): best effort.
fn remove_stages(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let staged = e
            .file_name()
            .to_string_lossy()
            .starts_with(sink::STAGE_PREFIX);
        if staged && e.file_type().is_ok_and(|t| t.is_dir()) {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!("removing {}: {err}", e.path().display());
            }
        }
    }
}

/// One filler per cache directory: the lock is held for the process's life.
fn take_lock(root: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::Io(std::io::Error::new(
            e.kind(),
            format!(
                "cache {} is filled by another process already ({e}); give each filling \
                 daemon its own --cache-dir, and per-VM daemons the same one",
                root.display()
            ),
        )));
    }
    Ok(f)
}
