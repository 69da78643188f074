//! The read-only /nix/store view of a store, as a fuse-backend-rs
//! `FileSystem`: served to the host kernel over /dev/fuse (`crate::fuse`)
//! and, later, to guests over virtio-fs. Store paths appear as
//! `<hash>-<name>` below the root; trees are fetched on first access and a
//! blob is checked against its BLAKE3 digest before its first byte is
//! served (and again once the view has forgotten checking it: between the
//! two, the view trusts the store not to rewrite a blob it holds, which
//! our stores never do: they write each object once and rename it in).
mod attr;
mod blobs;
pub mod closure;
pub mod inline;
mod inodes;
pub mod metrics;
mod sequential;
mod verified;

use crate::castore::{B3Digest, Directory, Node};
use crate::nix::store_path::StorePath;
use crate::services::blob::{BlobReader, Direct};
use crate::services::Store;
use attr::{dtype, stat, NEGATIVE_TTL, TTL};
use blobs::{OpenBlob, OpenBlobs};
use bytes::Bytes;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use futures::TryStreamExt;
pub use inodes::{InodeKind, Inodes, ROOT_INO};
use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

const XATTR_BLOB: &[u8] = b"user.tvix.castore.blob.digest";
const XATTR_DIR: &[u8] = b"user.tvix.castore.directory.digest";
/// The same, as snix names them.
const XATTR_BLOB_SNIX: &[u8] = b"user.snix.castore.blob.digest";
const XATTR_DIR_SNIX: &[u8] = b"user.snix.castore.directory.digest";

/// How the view behaves.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Let `readdir` of the root list every store path.
    pub list_root: bool,
    /// Upper bound for one store request (for a blob: without progress;
    /// for a directory: more for a larger one); past it the reader gets
    /// ETIMEDOUT.
    pub store_timeout: Duration,
    /// Bytes of decoded directories kept in memory.
    pub dir_cache_bytes: u64,
    /// Blobs remembered as checked (each is checked again once forgotten).
    pub verified_blobs: usize,
    /// Open file and directory handles a guest may hold at once; past it
    /// OPEN and OPENDIR answer ENFILE (a guest kernel that never releases
    /// cannot grow the daemon without bound).
    pub max_handles: usize,
    /// What the guest may keep in its page cache.
    pub cache: CachePolicy,
    /// Files read ahead at most when the guest reads a directory's files
    /// in order (0: none).
    pub read_ahead_files: usize,
}

/// virtiofsd's `--cache` modes, for content that never changes: metadata
/// can never go stale, so only data pages (and directory pages) differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CachePolicy {
    /// Files with direct I/O (no data pages in the guest), directory
    /// listings not kept either. For many guests sharing one store.
    Never,
    /// Files with direct I/O; directory listings kept.
    Metadata,
    /// Data cached while a file is open, dropped when it is opened again.
    Auto,
    /// Data kept across opens (nothing can change it).
    #[default]
    Always,
}

impl CachePolicy {
    fn file(self) -> OpenOptions {
        match self {
            // MAP_PRIVATE mappings (programs, shared libraries) still work
            // with direct I/O; shared ones need the kernel's
            // FUSE_DIRECT_IO_ALLOW_MMAP, which the vhost-user transport
            // grants where offered (`vhost_user::grant_direct_io_mmap`).
            CachePolicy::Never | CachePolicy::Metadata => OpenOptions::DIRECT_IO,
            CachePolicy::Auto => OpenOptions::empty(),
            CachePolicy::Always => OpenOptions::KEEP_CACHE,
        }
    }

    fn dir(self) -> OpenOptions {
        match self {
            CachePolicy::Never => OpenOptions::empty(),
            _ => OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE,
        }
    }
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            list_root: false,
            store_timeout: Duration::from_secs(30),
            dir_cache_bytes: DEFAULT_DIR_CACHE_BYTES,
            verified_blobs: DEFAULT_VERIFIED_BLOBS,
            max_handles: DEFAULT_MAX_HANDLES,
            cache: CachePolicy::Always,
            read_ahead_files: usize::from(DEFAULT_READ_AHEAD_FILES),
        }
    }
}

/// Default [`FsConfig::dir_cache_bytes`]: a few thousand directories.
pub const DEFAULT_DIR_CACHE_BYTES: u64 = 2 << 20;
/// Entries (recursively) from which a directory is fetched one at a time:
/// its own entries may then take megabytes decoded.
const LARGE_DIRECTORY: u64 = 1 << 16;
/// Directory entries a store must send per second, at the least: a
/// directory may take the store timeout plus its declared size (entries
/// below it) at this rate, up to [`DIRECTORY_EXTRA_MAX`] store timeouts
/// more. One Get of a directory of a million entries (some 55 MB) is a
/// single message, whose progress cannot be watched as a blob's chunks
/// are; a loaded host took more than 2 s for it.
const DIRECTORY_ENTRIES_PER_SEC: u64 = 100_000;
/// See [`DIRECTORY_ENTRIES_PER_SEC`]: a hostile store declaring a huge size
/// holds a stalled request at most this many store timeouts longer.
const DIRECTORY_EXTRA_MAX: u32 = 4;
/// How long the one large directory is kept unused.
const LARGE_DIRECTORY_IDLE: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(30)
};
/// Default [`FsConfig::read_ahead_files`]: 16 files of 256 KiB at most
/// in flight, far more than a disk needs to stay busy.
pub const DEFAULT_READ_AHEAD_FILES: u16 = 16;
/// Default [`FsConfig::verified_blobs`]: a large closure's files, each
/// checked once per daemon, in at most about 2.2 MiB (8,192 before: a
/// warm walk of a 26,000-file tree read and hashed every file again).
pub const DEFAULT_VERIFIED_BLOBS: usize = 65_536;
/// Default [`FsConfig::max_handles`]: far above what a guest's programs
/// keep open, far below what would strain the host (a descriptor and a
/// few hundred bytes each).
pub const DEFAULT_MAX_HANDLES: usize = 65_536;

/// A directory's entries in name order, as readdir walks them.
type Listing = Arc<[(Bytes, Node)]>;

/// A directory as the view keeps it: its entries in one allocation, their
/// names slices of the decoded buffer. Cheaper to hold than a `Directory`
/// (a tree node per few entries), and an open handle shares it.
struct DirView {
    entries: Listing,
    subdirs: u64,
    weight: u64,
}

impl DirView {
    fn new(d: Directory) -> Self {
        let weight = d.heap_size();
        let subdirs = d.child_directories().count() as u64;
        Self {
            entries: d
                .entries()
                .map(|(n, node)| (n.clone(), node.clone()))
                .collect(),
            subdirs,
            weight,
        }
    }

    fn get(&self, name: &[u8]) -> Option<&Node> {
        self.entries.get(self.position(name)?).map(|(_, node)| node)
    }

    /// Where `name` is in the listing (names are sorted).
    fn position(&self, name: &[u8]) -> Option<usize> {
        self.entries
            .binary_search_by(|(n, _)| n.as_ref().cmp(name))
            .ok()
    }
}

/// Weighs cached directories by what they hold.
#[derive(Clone)]
struct DirWeight;

impl quick_cache::Weighter<B3Digest, Arc<DirView>> for DirWeight {
    fn weight(&self, _: &B3Digest, d: &Arc<DirView>) -> u64 {
        d.weight.max(1)
    }
}

/// An open file. The blob is opened (and verified) on the first read, not
/// at open: with a warm page cache (KEEP_CACHE) no read ever comes.
struct OpenFile {
    digest: B3Digest,
    size: u64,
    blob: Option<Arc<OpenBlob>>,
}

pub struct StoreFs {
    store: Store,
    rt: tokio::runtime::Handle,
    cfg: FsConfig,
    inodes: Inodes,
    /// Decoded directories, bounded by bytes.
    dirs: quick_cache::sync::Cache<B3Digest, Arc<DirView>, DirWeight>,
    /// The last directory too large for `dirs` on its own, and when it was
    /// last used: let go after [`LARGE_DIRECTORY_IDLE`].
    large: Arc<LargeSlot>,
    /// Held while a directory declared [`LARGE_DIRECTORY`] or more is fetched.
    large_fetch: Mutex<()>,
    /// Which directories the guest reads in order, to read ahead.
    sequential: sequential::Sequential,
    /// Blobs checked against (digest, size), bounded by count.
    verified: verified::Verified,
    files: Mutex<HashMap<u64, Arc<Mutex<OpenFile>>>>,
    /// What the open files read from: one per blob.
    blobs: OpenBlobs,
    /// Listings of open directories, by handle: one snapshot per OPENDIR,
    /// so every READDIR of it is an index, and the root's offsets stay
    /// valid while the store changes.
    dir_handles: Mutex<HashMap<u64, Listing>>,
    /// The newest root listing (`--list-root`) and when it was made: open
    /// handles share it while it is fresh or while the store has not
    /// changed, so a guest opening the root again and again holds one
    /// listing, not one per handle.
    root_snapshot: Mutex<Option<(std::time::Instant, Listing)>>,
    next_handle: AtomicU64,
    /// What it served, for Prometheus.
    metrics: metrics::ViewMetrics,
    /// The store paths the guest may see; `None`: all of them.
    closure: std::sync::RwLock<Option<Arc<closure::Closure>>>,
    /// Entries of `files` and `dir_handles` together.
    handles: AtomicUsize,
}

type LargeSlot = Mutex<Option<(B3Digest, Arc<DirView>, std::time::Instant)>>;

/// Drops the one large directory once unused for [`LARGE_DIRECTORY_IDLE`];
/// ends then, or with the view.
async fn let_go_of_idle(large: std::sync::Weak<LargeSlot>) {
    loop {
        tokio::time::sleep(LARGE_DIRECTORY_IDLE / 3).await;
        let Some(large) = large.upgrade() else { return };
        let mut slot = lock(&large);
        match &*slot {
            Some((_, _, used)) if used.elapsed() < LARGE_DIRECTORY_IDLE => {}
            _ => {
                *slot = None;
                return;
            }
        }
    }
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StoreFs {
    /// `rt` runs the store calls; FUSE workers block on it from their own threads.
    pub fn new(store: Store, rt: tokio::runtime::Handle, cfg: FsConfig) -> Self {
        Self {
            large: Arc::default(),
            store,
            rt,
            inodes: Inodes::default(),
            // One shard: a big directory may take any share of the bound
            // (sharding splits the bound, and what exceeds a shard's
            // share is never kept: decoded again on every request).
            dirs: quick_cache::sync::Cache::with_options(
                quick_cache::OptionsBuilder::new()
                    .shards(1)
                    .estimated_items_capacity(1024)
                    .weight_capacity(cfg.dir_cache_bytes.max(1))
                    .build()
                    .unwrap_or_else(|_| unreachable!("all options are set")),
                DirWeight,
                Default::default(),
                Default::default(),
            ),
            large_fetch: Mutex::new(()),
            sequential: sequential::Sequential::new(cfg.read_ahead_files),
            verified: verified::Verified::new(cfg.verified_blobs),
            files: Mutex::new(HashMap::new()),
            blobs: OpenBlobs::default(),
            dir_handles: Mutex::new(HashMap::new()),
            root_snapshot: Mutex::new(None),
            next_handle: AtomicU64::new(1),
            closure: Default::default(),
            metrics: Default::default(),
            handles: AtomicUsize::new(0),
            cfg,
        }
    }

    /// Limits the view to `closure` (`None`: the whole store). Inodes the
    /// guest already holds stay valid; names outside are absent from the
    /// next lookup on.
    pub fn set_closure(&self, closure: Option<closure::Closure>) {
        *self.closure.write().unwrap_or_else(|e| e.into_inner()) = closure.map(Arc::new);
        *lock(&self.root_snapshot) = None;
    }

    fn closure(&self) -> Option<Arc<closure::Closure>> {
        self.closure
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether files are opened with direct I/O (`--cache never` or
    /// `metadata`): the transport then grants shared mappings of them
    /// where the guest kernel offers it.
    pub fn direct_io(&self) -> bool {
        self.cfg.cache.file().contains(OpenOptions::DIRECT_IO)
    }

    /// What the view counts; the transport records each request in it.
    pub fn metrics(&self) -> &metrics::ViewMetrics {
        &self.metrics
    }

    /// The view's metrics in Prometheus text.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        self.metrics.render(
            &mut out,
            self.inode_count(),
            self.handle_count(),
            self.open_blob_count(),
        );
        out
    }

    /// Live inodes, for tests.
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Open file and directory handles, for tests.
    pub fn handle_count(&self) -> usize {
        lock(&self.files).len() + lock(&self.dir_handles).len()
    }

    /// Blobs held open by file handles, for tests.
    pub fn open_blob_count(&self) -> usize {
        self.blobs.len()
    }

    /// Every store path, sorted: the shared snapshot when it is under a
    /// second old or unchanged, else a new one.
    fn root_listing(&self) -> io::Result<Listing> {
        const FRESH: Duration = Duration::from_secs(1);
        if let Some((at, l)) = &*lock(&self.root_snapshot) {
            if at.elapsed() < FRESH {
                return Ok(l.clone());
            }
        }
        let mut all = match self.closure() {
            Some(c) => c
                .entries()
                .map(|(name, node)| (Bytes::from(name), node.clone()))
                .collect(),
            None => self.block("listing store paths", async {
                let mut s = self.store.path_info.list();
                let mut out = Vec::new();
                while let Some(info) = s.try_next().await? {
                    out.push((Bytes::from(info.store_path.to_basename()), info.node));
                }
                Ok(out)
            })?,
        };
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.dedup_by(|a, b| a.0 == b.0);
        let mut snap = lock(&self.root_snapshot);
        let listing: Listing = match &*snap {
            Some((_, old)) if old[..] == all[..] => old.clone(),
            _ => all.into(),
        };
        *snap = Some((std::time::Instant::now(), listing.clone()));
        Ok(listing)
    }

    /// Drops every inode and handle of the previous guest kernel: a guest
    /// that reboots keeps the vhost-user connection and sends INIT again
    /// (after DESTROY, or without it) and never releases what the old
    /// kernel held.
    fn reset(&self, why: &str) {
        let inodes = self.inodes.reset();
        let files = std::mem::take(&mut *lock(&self.files)).len();
        self.blobs.clear();
        let dirs = std::mem::take(&mut *lock(&self.dir_handles)).len();
        self.handles.fetch_sub(files + dirs, Ordering::AcqRel);
        if inodes + files + dirs > 0 {
            tracing::info!(
                "{why}: dropped {inodes} inodes, {files} open files and {dirs} open directories of the previous guest kernel"
            );
        }
    }

    /// Serves one request as an inline attempt (see [`inline`]): answers
    /// its result and whether it must be run again on a thread that may
    /// wait for the store.
    pub fn attempt_inline<T>(&self, f: impl FnOnce() -> T) -> (T, bool) {
        inline::attempt(f, |ino| self.inodes.forget(ino, 1))
    }

    /// Runs a store call with the configured time limit; failures become
    /// errnos for the reader and a log line for the operator.
    fn block<T>(
        &self,
        what: impl std::fmt::Display,
        fut: impl std::future::Future<Output = crate::services::Result<T>>,
    ) -> io::Result<T> {
        self.block_within(Some(self.cfg.store_timeout), what, fut)
    }

    /// As `block`; `None` leaves the limit to the call itself (a blob
    /// fetch fails when it stalls, not when it is long).
    fn block_within<T>(
        &self,
        limit: Option<Duration>,
        what: impl std::fmt::Display,
        fut: impl std::future::Future<Output = crate::services::Result<T>>,
    ) -> io::Result<T> {
        if inline::defer() {
            return Err(err(libc::EAGAIN));
        }
        let t0 = std::time::Instant::now();
        let r = self.rt.block_on(async move {
            match limit {
                // The timer must be created inside the runtime.
                Some(l) => tokio::time::timeout(l, fut).await,
                None => Ok(fut.await),
            }
        });
        self.metrics
            .store_call(t0.elapsed(), !matches!(r, Ok(Ok(_))));
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => {
                tracing::error!("{what}: {e}");
                Err(err(libc::ETIMEDOUT))
            }
            Ok(Err(e)) => {
                tracing::error!("{what}: {e}");
                Err(err(libc::EIO))
            }
            Err(_) => {
                let limit = limit.unwrap_or(self.cfg.store_timeout);
                tracing::error!("{what}: store did not answer within {limit:?}");
                Err(err(libc::ETIMEDOUT))
            }
        }
    }

    /// The time a fetch of a directory declaring `size` entries below it
    /// may take (see [`DIRECTORY_ENTRIES_PER_SEC`]).
    fn directory_limit(&self, size: u64) -> Duration {
        let base = self.cfg.store_timeout;
        let extra = Duration::from_secs(size / DIRECTORY_ENTRIES_PER_SEC);
        base + extra.min(base * DIRECTORY_EXTRA_MAX)
    }

    /// A service's answer from a local disk, where it has one (`None`:
    /// only the async call can answer).
    fn local<T>(
        &self,
        what: impl std::fmt::Display,
        r: Option<crate::services::Result<T>>,
    ) -> Option<io::Result<T>> {
        Some(r?.map_err(|e| {
            tracing::error!("{what}: {e}");
            err(libc::EIO)
        }))
    }

    fn kind(&self, ino: u64) -> io::Result<InodeKind> {
        self.inodes.get(ino).ok_or_else(|| err(libc::ENOENT))
    }

    /// A directory's listing, from memory, a local disk or the store.
    /// `size` is what its node declares (entries below it, recursively):
    /// large ones are fetched one at a time, so a guest cannot have a
    /// hostile store's huge directories decoded on every thread at once.
    fn directory(&self, digest: &B3Digest, size: u64) -> io::Result<Arc<DirView>> {
        if let Some(d) = self.remembered(digest) {
            return Ok(d);
        }
        let _one_at_a_time = (size >= LARGE_DIRECTORY).then(|| lock(&self.large_fetch));
        if let Some(d) = self.remembered(digest) {
            return Ok(d);
        }
        let what = format_args!("directory {digest}");
        let got = match self.local(what, self.store.directory.get_blocking(digest)) {
            Some(r) => r?,
            None => {
                let limit = Some(self.directory_limit(size));
                self.block_within(limit, what, self.store.directory.get(digest))?
            }
        };
        let d = Arc::new(DirView::new(got.ok_or_else(|| {
            tracing::error!("directory {digest} is missing from the store");
            err(libc::EIO)
        })?));
        self.remember(*digest, d.clone());
        Ok(d)
    }

    fn remembered(&self, digest: &B3Digest) -> Option<Arc<DirView>> {
        if let Some(d) = self.dirs.get(digest) {
            return Some(d);
        }
        let mut large = lock(&self.large);
        let (k, d, used) = large.as_mut()?;
        if k != digest {
            return None;
        }
        *used = std::time::Instant::now();
        Some(d.clone())
    }

    /// Keeps a directory in the cache, or, when it alone outweighs the
    /// cache, as the one large directory (a guest looking names up in it
    /// one by one must not have it fetched and decoded for each).
    fn remember(&self, digest: B3Digest, d: Arc<DirView>) {
        if d.weight > self.cfg.dir_cache_bytes {
            let was = lock(&self.large).replace((digest, d, std::time::Instant::now()));
            if was.is_none() {
                self.rt.spawn(let_go_of_idle(Arc::downgrade(&self.large)));
            }
        } else {
            self.dirs.insert(digest, d);
        }
    }

    /// Before a store path's first directory is needed: a store that must
    /// be asked over the network sends the whole tree in one call; a local
    /// one is read a directory at a time, as the guest walks it.
    fn prefetch_tree(&self, root: &B3Digest, size: u64) -> io::Result<()> {
        if self.remembered(root).is_some() {
            return Ok(());
        }
        let _one_at_a_time = (size >= LARGE_DIRECTORY).then(|| lock(&self.large_fetch));
        if self.remembered(root).is_some() {
            return Ok(());
        }
        let what = format_args!("directory tree {root}");
        if let Some(r) = self.local(what, self.store.directory.get_blocking(root)) {
            if let Some(d) = r? {
                self.remember(*root, Arc::new(DirView::new(d)));
                return Ok(());
            }
        }
        // At most what the directory cache holds: a store's tree of a
        // million directories is not buffered whole; the rest is fetched a
        // directory at a time if the guest walks that far.
        let cap = self.cfg.dir_cache_bytes;
        let limit = Some(self.directory_limit(size));
        let tree = self.block_within(limit, what, async {
            let mut s = self.store.directory.get_recursive(*root);
            let (mut out, mut bytes) = (Vec::new(), 0u64);
            while let Some(d) = s.try_next().await? {
                bytes += d.heap_size();
                out.push(d);
                if bytes > cap {
                    tracing::debug!("directory tree {root}: past {cap} bytes, the rest on demand");
                    break;
                }
            }
            Ok(out)
        })?;
        for d in tree {
            self.remember(d.digest(), Arc::new(DirView::new(d)));
        }
        Ok(())
    }

    fn dir_nlink(&self, kind: &InodeKind) -> io::Result<u64> {
        match kind {
            InodeKind::Node(Node::Directory { digest, size }) => {
                let d = self.directory(digest, *size)?;
                Ok(2 + d.subdirs)
            }
            _ => Ok(2),
        }
    }

    /// The entry for `name` in `parent`: attributes first (they may need
    /// the store), then the inode reference the kernel will hold (the
    /// caller reports it to [`inline::took`] once handed out).
    fn child_entry(&self, parent: u64, name: &Bytes, node: &Node) -> io::Result<Entry> {
        let kind = InodeKind::Node(node.clone());
        let nlink = self.dir_nlink(&kind)?;
        let ino = self.inodes.lookup(parent, name, node);
        Ok(Entry {
            inode: ino,
            generation: self.inodes.generation(ino),
            attr: stat(ino, &kind, nlink),
            attr_flags: 0,
            attr_timeout: TTL,
            entry_timeout: TTL,
        })
    }

    fn negative(timeout: Duration) -> Entry {
        Entry {
            entry_timeout: timeout,
            ..Default::default()
        }
    }

    /// Resolves a store path basename below the root.
    fn lookup_store_path(&self, name: &[u8]) -> io::Result<Entry> {
        // Not a store path basename: it can never exist, no store call.
        let Some(sp) = std::str::from_utf8(name)
            .ok()
            .and_then(|n| StorePath::from_basename(n).ok())
        else {
            return Ok(Self::negative(TTL));
        };
        let node = match self.closure() {
            // Outside the closure: absent, told from the set alone.
            Some(c) => match c.get(&sp) {
                Some(node) => node.clone(),
                None => return Ok(Self::negative(NEGATIVE_TTL)),
            },
            None => {
                let what = format_args!("path info {sp}");
                let info = match self.local(what, self.store.path_info.get_blocking(sp.digest())) {
                    Some(r) => r?,
                    None => self.block(what, self.store.path_info.get(sp.digest()))?,
                };
                // The name is part of the store path: `<hash>-<othername>` is absent.
                match info.filter(|i| i.store_path == sp) {
                    Some(info) => info.node,
                    None => return Ok(Self::negative(NEGATIVE_TTL)),
                }
            }
        };
        if let Node::Directory { digest, size } = &node {
            self.prefetch_tree(digest, *size)?;
        }
        let e = self.child_entry(ROOT_INO, &Bytes::copy_from_slice(name), &node)?;
        inline::took(e.inode);
        Ok(e)
    }

    /// Opens a blob and checks it against its digest and size (once, while
    /// it is remembered as checked and, for a file, while it is the file
    /// that was checked), so no byte of a blob is served before the blob
    /// was checked.
    fn open_blob(&self, digest: &B3Digest, size: u64) -> io::Result<Box<dyn BlobReader>> {
        let known = self.verified.contains(digest, size);
        if !known && size > INLINE_CHECK_MAX && inline::defer() {
            return Err(err(libc::EAGAIN));
        }
        // A local blob opens, and is checked, right here: no runtime hop.
        if let Some(opened) = self.store.blob.open_read_blocking(digest) {
            let mut r = match opened.and_then(|r| r.ok_or_else(|| not_found(digest))) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("blob {digest}: {e}");
                    return Err(err(libc::EIO));
                }
            };
            let (trusted, stamp) = self.already_checked(&mut *r, digest, size, known);
            if trusted {
                return Ok(r);
            }
            // Remembered, but its file changed since: a large one is
            // checked again off the queue thread.
            if known && size > INLINE_CHECK_MAX && inline::defer() {
                return Err(err(libc::EAGAIN));
            }
            match check_direct(&mut *r, digest, size) {
                Ok(true) => {
                    self.verified.insert(digest, size, stamp);
                    return Ok(r);
                }
                Ok(false) => {} // no direct access: check it the async way
                Err(e) => {
                    tracing::error!("blob {digest}: {e}");
                    return Err(err(libc::EIO));
                }
            }
        }
        // Fetches take as long as they keep moving: the services time out
        // a stalled transfer, not a long one.
        let (r, trusted, stamp) =
            self.block_within(None, format_args!("blob {digest}"), async {
                let mut r = self
                    .store
                    .blob
                    .open_read_sized(digest, size)
                    .await?
                    .ok_or_else(|| not_found(digest))?;
                let (trusted, stamp) = self.already_checked(&mut *r, digest, size, known);
                if !trusted && !check_direct(&mut *r, digest, size)? {
                    let mut h = blake3::Hasher::new();
                    let mut buf = vec![0u8; 1 << 17];
                    let mut n_total = 0u64;
                    loop {
                        let n = r.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                        n_total += n as u64;
                    }
                    check(digest, size, h, n_total)?;
                    r.rewind().await?;
                }
                Ok((r, trusted, stamp))
            })?;
        if !trusted {
            self.verified.insert(digest, size, stamp);
        }
        Ok(r)
    }

    /// Whether an opened blob was checked already, and the stamp of its
    /// file to remember once it is: a file is trusted only while it is the
    /// file that was checked, bytes in memory are hashed again (cheaply:
    /// they are at hand), and a stream (a remote's, which checks what it
    /// sends) is trusted once checked.
    fn already_checked(
        &self,
        r: &mut dyn BlobReader,
        digest: &B3Digest,
        size: u64,
        known: bool,
    ) -> (bool, Option<u64>) {
        match r.direct() {
            Some(Direct::File(f)) => {
                let stamp = self.verified.stamp(f);
                let trusted =
                    known && stamp.is_some_and(|s| self.verified.contains_file(digest, size, s));
                (trusted, stamp)
            }
            Some(Direct::Bytes(_)) => (false, None),
            None => (known, None),
        }
    }

    /// The blob an open file reads from: its own, another handle's on the
    /// same blob, or newly opened and checked.
    fn blob_of(&self, f: &mut OpenFile) -> io::Result<Arc<OpenBlob>> {
        if let Some(b) = &f.blob {
            return Ok(b.clone());
        }
        let key = (f.digest, f.size);
        let b = match self.blobs.get(&key) {
            Some(b) => b,
            None => {
                let r = self.open_blob(&f.digest, f.size)?;
                self.blobs.share(key, r.into_shared().into())
            }
        };
        f.blob = Some(b.clone());
        Ok(b)
    }

    /// A handle number, counted against `max_handles` until
    /// [`Self::handle_gone`].
    fn new_handle(&self) -> io::Result<u64> {
        if self.handles.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_handles {
            self.handles.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                "the guest holds {} open handles: refusing more (ENFILE)",
                self.cfg.max_handles
            );
            return Err(err(libc::ENFILE));
        }
        Ok(self.next_handle.fetch_add(1, Ordering::Relaxed))
    }

    fn handle_gone(&self, removed: bool) {
        if removed {
            self.handles.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The guest is listing a directory: the files in it not yet checked
    /// (their blobs not yet opened) are likely read next. Only the first
    /// entries are looked at, so opening a huge directory again and again
    /// costs no scan of it each time.
    fn read_soon(&self, listing: &Listing) {
        const SCAN: usize = 32_768;
        // A directory walked before has its files checked: after this many
        // in a row, stop looking (a warm walk's OPENDIRs would otherwise
        // look up every file of every large directory).
        const CHECKED_RUN: usize = 512;
        let mut run = 0;
        let mut files = listing
            .iter()
            .take(SCAN)
            .filter_map(|(_, node)| match node {
                Node::File { digest, size, .. } => Some((digest, *size)),
                _ => None,
            })
            .map_while(|(digest, size)| {
                if !self.verified.contains(digest, size) {
                    run = 0;
                    return Some(Some(*digest));
                }
                run += 1;
                (run < CHECKED_RUN).then_some(None)
            })
            .flatten();
        self.store.blob.read_soon(&mut files);
    }

    /// The guest opens file `inode` not yet read: when it reads its
    /// directory's files in order, the next ones are read ahead. Only from
    /// what the view holds in memory: no store call, no wait.
    fn opening_unread(&self, inode: u64) {
        let Some((parent, name)) = self.inodes.place(inode) else {
            return;
        };
        let Some(InodeKind::Node(Node::Directory { digest, .. })) = self.inodes.get(parent) else {
            return;
        };
        let Some(dir) = self.remembered(&digest) else {
            return;
        };
        let Some(pos) = dir.position(&name) else {
            return;
        };
        let ahead = self.sequential.opened(parent, pos);
        let Some(next) = dir
            .entries
            .get(ahead.start..ahead.end.min(dir.entries.len()))
        else {
            return;
        };
        let mut files = next.iter().filter_map(|(_, node)| match node {
            Node::File { digest, size, .. } if !self.verified.contains(digest, *size) => {
                Some((*digest, *size))
            }
            _ => None,
        });
        self.store.blob.read_ahead(&mut files);
    }

    /// The listing of a directory inode: (name, node) in order; the open
    /// handle's snapshot when there is one.
    fn listing(&self, ino: u64, handle: u64) -> io::Result<Listing> {
        if let Some(l) = lock(&self.dir_handles).get(&handle) {
            return Ok(l.clone());
        }
        match &self.kind(ino)? {
            InodeKind::Root => Ok(Arc::from([])),
            InodeKind::Node(Node::Directory { digest, size }) => {
                Ok(self.directory(digest, *size)?.entries.clone())
            }
            InodeKind::Node(_) => Err(err(libc::ENOTDIR)),
        }
    }

    /// Shared by readdir and readdirplus: `.`, `..`, then the entries, with
    /// offsets that are positions in that list (stable across calls).
    fn walk_dir(
        &self,
        ino: u64,
        handle: u64,
        offset: u64,
        mut emit: impl FnMut(DirEntry, Option<(&Bytes, &Node)>) -> io::Result<usize>,
    ) -> io::Result<()> {
        let entries = self.listing(ino, handle)?;
        let dots: [&[u8]; 2] = [b".", b".."];
        let total = entries.len() as u64 + 2;
        for pos in offset..total {
            let next = pos + 1;
            let written = if pos < 2 {
                emit(
                    DirEntry {
                        ino: if pos == 0 { ino } else { ROOT_INO },
                        offset: next,
                        type_: libc::DT_DIR as u32,
                        name: dots[pos as usize],
                    },
                    None,
                )?
            } else {
                let (name, node) = &entries[(pos - 2) as usize];
                emit(
                    DirEntry {
                        // d_ino only; the real number comes with lookup
                        ino: u64::MAX - pos,
                        offset: next,
                        type_: dtype(node),
                        name,
                    },
                    Some((name, node)),
                )?
            };
            if written == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// The xattr size protocol: size 0 asks for the length (`Err(len)`), a
/// buffer too small is ERANGE, otherwise the bytes (`Ok`).
fn xattr_reply(size: u32, bytes: Vec<u8>) -> io::Result<Result<Vec<u8>, u32>> {
    if size == 0 {
        Ok(Err(bytes.len() as u32))
    } else if (size as usize) < bytes.len() {
        Err(err(libc::ERANGE))
    } else {
        Ok(Ok(bytes))
    }
}

fn erofs<T>() -> io::Result<T> {
    Err(err(libc::EROFS))
}

fn not_found(digest: &B3Digest) -> crate::services::Error {
    crate::services::Error::NotFound(format!("blob {digest}"))
}

/// Compares what was hashed with what the directory promised.
fn check(
    digest: &B3Digest,
    size: u64,
    h: blake3::Hasher,
    n_total: u64,
) -> crate::services::Result<()> {
    let actual = B3Digest::from(h.finalize());
    if actual != *digest {
        return Err(crate::services::Error::DigestMismatch {
            expected: *digest,
            actual,
        });
    }
    if n_total != size {
        return Err(crate::services::Error::SizeMismatch {
            digest: *digest,
            expected: size,
            actual: n_total,
        });
    }
    Ok(())
}

/// Bytes hashed per read while checking a blob file: one such buffer per
/// thread that checks (up to `--thread-pool-size` workers and the queue's
/// thread), so small; a syscall per 32 KiB is noise next to hashing.
const CHECK_CHUNK: usize = 32 << 10;
/// Larger blobs are not checked on the virtio queue's own thread: the
/// request is deferred to a worker, so one big first read does not hold up
/// every other request.
const INLINE_CHECK_MAX: u64 = 1 << 20;

/// Checks a blob on this thread through its direct bytes or file; false
/// when the reader offers neither.
fn check_direct(
    r: &mut dyn BlobReader,
    digest: &B3Digest,
    size: u64,
) -> crate::services::Result<bool> {
    let mut h = blake3::Hasher::new();
    let n_total = match r.direct() {
        Some(Direct::Bytes(b)) => {
            h.update(b);
            b.len() as u64
        }
        Some(Direct::File(f)) => {
            use std::os::unix::fs::FileExt;
            thread_local! {
                static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            BUF.with_borrow_mut(|buf| -> io::Result<u64> {
                buf.resize(CHECK_CHUNK, 0);
                let mut off = 0u64;
                loop {
                    let n = f.read_at(buf, off)?;
                    h.update(&buf[..n]);
                    off += n as u64;
                    // A blob file reads short only at its end: most blobs
                    // are smaller than a chunk and take one read, not two.
                    // (Were a read short elsewhere, the digest would not
                    // match and nothing would be served.)
                    if n < buf.len() {
                        return Ok(off);
                    }
                }
            })?
        }
        None => return Ok(false),
    };
    check(digest, size, h, n_total)?;
    Ok(true)
}

impl FileSystem for StoreFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.reset("FUSE INIT");
        let want = FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::MAX_PAGES
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO;
        Ok(capable & want)
    }

    fn lookup(&self, _: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let name = name.to_bytes();
        match &self.kind(parent)? {
            InodeKind::Root => self.lookup_store_path(name),
            InodeKind::Node(Node::Directory { digest, size }) => {
                let dir = self.directory(digest, *size)?;
                let Some(node) = dir.get(name) else {
                    return Ok(Self::negative(TTL));
                };
                let e = self.child_entry(parent, &Bytes::copy_from_slice(name), node)?;
                inline::took(e.inode);
                Ok(e)
            }
            InodeKind::Node(_) => Err(err(libc::ENOTDIR)),
        }
    }

    fn destroy(&self) {
        self.reset("FUSE DESTROY");
    }

    fn forget(&self, _: &Context, inode: u64, count: u64) {
        self.inodes.forget(inode, count);
    }

    fn batch_forget(&self, _: &Context, requests: Vec<(u64, u64)>) {
        for (ino, count) in requests {
            self.inodes.forget(ino, count);
        }
    }

    fn getattr(
        &self,
        _: &Context,
        inode: u64,
        _: Option<u64>,
    ) -> io::Result<(libc::stat64, Duration)> {
        let kind = self.kind(inode)?;
        Ok((stat(inode, &kind, self.dir_nlink(&kind)?), TTL))
    }

    fn readlink(&self, _: &Context, inode: u64) -> io::Result<Vec<u8>> {
        match &self.kind(inode)? {
            InodeKind::Node(Node::Symlink { target }) => Ok(target.to_vec()),
            _ => Err(err(libc::EINVAL)),
        }
    }

    fn open(
        &self,
        _: &Context,
        inode: u64,
        flags: u32,
        _: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let flags = flags as i32;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return erofs();
        }
        let (digest, size) = match &self.kind(inode)? {
            InodeKind::Node(Node::File { digest, size, .. }) => (*digest, *size),
            InodeKind::Node(Node::Symlink { .. }) => return Err(err(libc::ELOOP)),
            _ => return Err(err(libc::EISDIR)),
        };
        let h = self.new_handle()?;
        // A guest with more requests queued keeps the disk busy itself:
        // reading ahead for it only costs CPU (measured at depth 64).
        if self.cfg.read_ahead_files > 0
            && !inline::others_waiting()
            && !self.verified.contains(&digest, size)
        {
            self.opening_unread(inode);
        }
        lock(&self.files).insert(
            h,
            Arc::new(Mutex::new(OpenFile {
                digest,
                size,
                blob: None,
            })),
        );
        Ok((Some(h), self.cfg.cache.file(), None))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _: &Context,
        _: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _: Option<u64>,
        _: u32,
    ) -> io::Result<usize> {
        let file = lock(&self.files)
            .get(&handle)
            .cloned()
            .ok_or_else(|| err(libc::EBADF))?;
        let (blob, file_size) = {
            let mut f = lock(&file);
            if offset >= f.size {
                return Ok(0);
            }
            (self.blob_of(&mut f)?, f.size)
        };
        let n = (size as u64)
            .min(file_size - offset)
            .min(w.available_bytes() as u64) as usize;
        match &*blob {
            OpenBlob::Bytes(b) => {
                let start = usize::try_from(offset).map_err(|_| err(libc::EINVAL))?;
                let chunk = b.get(start..start + n).ok_or_else(|| err(libc::EIO))?;
                w.write_all(chunk).map(|()| n)
            }
            OpenBlob::File(file) => {
                // SAFETY: the descriptor belongs to `file`, which `blob`
                // keeps open for the whole borrow; ManuallyDrop never closes
                // it. pread (at an offset) leaves its position alone, so
                // handles on other threads may read it at the same time.
                let mut alias = std::mem::ManuallyDrop::new(unsafe {
                    std::fs::File::from_raw_fd(file.as_raw_fd())
                });
                w.write_all_from(&mut *alias, n, offset)?;
                Ok(n)
            }
            OpenBlob::Stream(stream) => {
                let mut buf = vec![0u8; n];
                let mut s = lock(stream);
                let s = &mut *s;
                self.block("reading a blob", async {
                    if s.pos != offset {
                        s.reader.seek(std::io::SeekFrom::Start(offset)).await?;
                    }
                    s.reader.read_exact(&mut buf).await?;
                    Ok(())
                })?;
                s.pos = offset + n as u64;
                w.write_all(&buf)?;
                Ok(n)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        _: &Context,
        _: u64,
        _: u32,
        handle: u64,
        _: bool,
        _: bool,
        _: Option<u64>,
    ) -> io::Result<()> {
        let removed = lock(&self.files).remove(&handle);
        if let Some(file) = &removed {
            let mut f = lock(file);
            if let Some(blob) = f.blob.take() {
                self.blobs.put_back(&(f.digest, f.size), blob);
            }
        }
        self.handle_gone(removed.is_some());
        Ok(())
    }

    fn statfs(&self, _: &Context, _: u64) -> io::Result<libc::statvfs64> {
        // SAFETY: statvfs64 is plain data; all-zero is a valid value.
        let mut st: libc::statvfs64 = unsafe { std::mem::zeroed() };
        st.f_bsize = 4096;
        st.f_frsize = 4096;
        st.f_namemax = 255;
        st.f_files = self.inodes.len() as u64;
        Ok(st)
    }

    fn getxattr(
        &self,
        _: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let value = match (&self.kind(inode)?, name.to_bytes()) {
            (InodeKind::Node(Node::File { digest, .. }), XATTR_BLOB | XATTR_BLOB_SNIX)
            | (InodeKind::Node(Node::Directory { digest, .. }), XATTR_DIR | XATTR_DIR_SNIX) => {
                digest.to_string().into_bytes()
            }
            _ => return Err(err(libc::ENODATA)),
        };
        Ok(match xattr_reply(size, value)? {
            Ok(v) => GetxattrReply::Value(v),
            Err(n) => GetxattrReply::Count(n),
        })
    }

    fn listxattr(&self, _: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let both: &[&[u8]] = match &self.kind(inode)? {
            InodeKind::Node(Node::File { .. }) => &[XATTR_BLOB, XATTR_BLOB_SNIX],
            InodeKind::Node(Node::Directory { .. }) => &[XATTR_DIR, XATTR_DIR_SNIX],
            _ => &[],
        };
        let mut names = Vec::new();
        for n in both {
            names.extend_from_slice(n);
            names.push(0);
        }
        Ok(match xattr_reply(size, names)? {
            Ok(v) => ListxattrReply::Names(v),
            Err(n) => ListxattrReply::Count(n),
        })
    }

    fn opendir(&self, _: &Context, inode: u64, _: u32) -> io::Result<(Option<u64>, OpenOptions)> {
        match &self.kind(inode)? {
            InodeKind::Root => {
                if !self.cfg.list_root {
                    return Ok((None, OpenOptions::empty()));
                }
                // A snapshot per handle keeps offsets stable while the store changes.
                let listing = self.root_listing()?;
                let h = self.new_handle()?;
                lock(&self.dir_handles).insert(h, listing);
                Ok((Some(h), OpenOptions::empty()))
            }
            InodeKind::Node(Node::Directory { digest, size }) => {
                let listing = self.directory(digest, *size)?.entries.clone();
                self.read_soon(&listing);
                let h = self.new_handle()?;
                lock(&self.dir_handles).insert(h, listing);
                Ok((Some(h), self.cfg.cache.dir()))
            }
            InodeKind::Node(_) => Err(err(libc::ENOTDIR)),
        }
    }

    fn readdir(
        &self,
        _: &Context,
        inode: u64,
        handle: u64,
        _: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.walk_dir(inode, handle, offset, |d, _| add_entry(d))
    }

    fn readdirplus(
        &self,
        _: &Context,
        inode: u64,
        handle: u64,
        _: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.walk_dir(inode, handle, offset, |mut d, child| {
            let Some((name, node)) = child else {
                return add_entry(d, Entry::default());
            };
            let e = self.child_entry(inode, name, node)?;
            d.ino = e.inode;
            let written = add_entry(d, e);
            // The kernel counts a lookup only for entries it received.
            if matches!(written, Ok(n) if n > 0) {
                inline::took(e.inode);
            } else {
                self.inodes.forget(e.inode, 1);
            }
            written
        })
    }

    fn releasedir(&self, _: &Context, _: u64, _: u32, handle: u64) -> io::Result<()> {
        let removed = lock(&self.dir_handles).remove(&handle).is_some();
        self.handle_gone(removed);
        Ok(())
    }

    // Everything that would change the store is refused.

    fn setattr(
        &self,
        _: &Context,
        _: u64,
        _: libc::stat64,
        _: Option<u64>,
        _: SetattrValid,
    ) -> io::Result<(libc::stat64, Duration)> {
        erofs()
    }

    fn symlink(&self, _: &Context, _: &CStr, _: u64, _: &CStr) -> io::Result<Entry> {
        erofs()
    }

    fn mknod(&self, _: &Context, _: u64, _: &CStr, _: u32, _: u32, _: u32) -> io::Result<Entry> {
        erofs()
    }

    fn mkdir(&self, _: &Context, _: u64, _: &CStr, _: u32, _: u32) -> io::Result<Entry> {
        erofs()
    }

    fn unlink(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        erofs()
    }

    fn rmdir(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        erofs()
    }

    fn rename(&self, _: &Context, _: u64, _: &CStr, _: u64, _: &CStr, _: u32) -> io::Result<()> {
        erofs()
    }

    fn link(&self, _: &Context, _: u64, _: u64, _: &CStr) -> io::Result<Entry> {
        erofs()
    }

    fn create(
        &self,
        _: &Context,
        _: u64,
        _: &CStr,
        _: fuse_backend_rs::abi::fuse_abi::CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        erofs()
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _: &Context,
        _: u64,
        _: u64,
        _: &mut dyn ZeroCopyReader,
        _: u32,
        _: u64,
        _: Option<u64>,
        _: bool,
        _: u32,
        _: u32,
    ) -> io::Result<usize> {
        erofs()
    }

    fn setxattr(&self, _: &Context, _: u64, _: &CStr, _: &[u8], _: u32) -> io::Result<()> {
        erofs()
    }

    fn removexattr(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        erofs()
    }

    fn fallocate(&self, _: &Context, _: u64, _: u64, _: u32, _: u64, _: u64) -> io::Result<()> {
        erofs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_file_is_checked_whole_at_any_size() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 100, CHECK_CHUNK, CHECK_CHUNK + 1, 3 * CHECK_CHUNK] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let path = dir.path().join(format!("b{len}"));
            std::fs::write(&path, &data).unwrap();
            let digest = B3Digest::from(blake3::hash(&data));
            let open = || {
                crate::services::blob::FileReader::new(std::fs::File::open(&path).unwrap()).unwrap()
            };
            let ok = check_direct(&mut open(), &digest, len as u64);
            assert!(matches!(ok, Ok(true)), "{len} bytes: {ok:?}");
            // a file longer than what its digest and size name
            let mut longer = data.clone();
            longer.push(1);
            std::fs::write(&path, &longer).unwrap();
            let bad = check_direct(&mut open(), &digest, len as u64);
            assert!(bad.is_err(), "{len} bytes and one more passed");
        }
    }

    #[test]
    fn a_larger_directory_may_take_longer_within_a_bound() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cfg = FsConfig {
            store_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let fs = StoreFs::new(Store::memory(), rt.handle().clone(), cfg);
        let s = Duration::from_secs;
        assert_eq!(fs.directory_limit(0), s(2));
        assert_eq!(fs.directory_limit(99_999), s(2));
        assert_eq!(fs.directory_limit(500_000), s(7));
        assert_eq!(
            fs.directory_limit(1_000_000),
            s(10),
            "at most 4 limits more"
        );
        assert_eq!(fs.directory_limit(u64::MAX), s(10), "whatever it declares");
    }

    /// Open root handles share one listing (unchanged store): a guest that
    /// opens the root many times does not multiply it.
    #[test]
    fn root_handles_share_one_listing() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = Store::memory();
        rt.block_on(async {
            for i in 0..100u8 {
                let sp = crate::nix::store_path::StorePath::new([i; 20], format!("p{i}")).unwrap();
                store
                    .path_info
                    .put(crate::pathinfo::PathInfo::bare(
                        sp,
                        Node::Symlink { target: "x".into() },
                    ))
                    .await
                    .unwrap();
            }
        });
        let fs = StoreFs::new(
            store,
            rt.handle().clone(),
            FsConfig {
                list_root: true,
                ..Default::default()
            },
        );
        let ctx = Context::default();
        let mut handles = Vec::new();
        for round in 0..2 {
            if round == 1 {
                // past the freshness window: listed again, and still shared
                // because nothing changed
                std::thread::sleep(Duration::from_millis(1100));
            }
            for _ in 0..50 {
                handles.push(fs.opendir(&ctx, ROOT_INO, 0).unwrap().0.unwrap());
            }
        }
        let dh = lock(&fs.dir_handles);
        let first = dh[&handles[0]].clone();
        assert_eq!(first.len(), 100);
        assert!(handles.iter().all(|h| Arc::ptr_eq(&dh[h], &first)));
    }

    /// Puts `d` (no subdirectories) into `store` as the store path `sp`;
    /// answers its node.
    async fn put_store_path(
        store: &Store,
        sp: &crate::nix::store_path::StorePath,
        d: Directory,
    ) -> Node {
        let node = Node::Directory {
            digest: d.digest(),
            size: d.size(),
        };
        crate::services::directory::put_one(&*store.directory, d)
            .await
            .unwrap();
        let info = crate::pathinfo::PathInfo::bare(sp.clone(), node.clone());
        store.path_info.put(info).await.unwrap();
        node
    }

    /// Whether every page of the file at `path` is in the page cache.
    fn resident(path: &std::path::Path) -> bool {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: a read-only shared map of a file this test owns, never
        // touched (mincore does not fault pages in), unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let mut pages = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `pages` has one byte per page of the mapping.
        let rc = unsafe { libc::mincore(map, len, pages.as_mut_ptr()) };
        // SAFETY: the mapping made above, of `len` bytes.
        unsafe { libc::munmap(map, len) };
        assert_eq!(rc, 0);
        pages.iter().all(|p| p & 1 == 1)
    }

    /// The guest opening a directory's files in order has the next ones'
    /// data read ahead (on a local disk); a file opened alone, or far out
    /// of order, does not.
    #[test]
    fn files_opened_in_order_have_the_next_read_ahead() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        // On the disk: a tmpfs never lets go of a page.
        let tmp = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).unwrap();
        let blob = crate::services::blob::local::LocalBlobService::open(tmp.path()).unwrap();
        let store = Store {
            blob: Arc::new(blob.clone()),
            ..Store::memory()
        };
        let sp = crate::nix::store_path::StorePath::new([9; 20], "files".to_string()).unwrap();
        let paths = rt.block_on(async {
            let mut d = Directory::new();
            let mut paths = Vec::new();
            for i in 0..12u8 {
                let data = vec![i; 64 << 10];
                let mut w = store.blob.open_write().await.unwrap();
                w.write(&data).await.unwrap();
                let digest = w.close().await.unwrap();
                let node = Node::File {
                    digest,
                    size: data.len() as u64,
                    executable: false,
                };
                d.add(format!("f{i:02}").into(), node).unwrap();
                paths.push(blob.path_of(&digest));
            }
            put_store_path(&store, &sp, d).await;
            paths
        });
        for p in &paths {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(p).unwrap();
            f.sync_all().unwrap();
            // SAFETY: advice on a descriptor owned here, no memory passed.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0);
            assert!(
                !resident(p),
                "{}: could not drop it from the page cache",
                p.display()
            );
        }
        let fs = StoreFs::new(store, rt.handle().clone(), FsConfig::default());
        let ctx = Context::default();
        let name = std::ffi::CString::new(sp.to_basename()).unwrap();
        let top = fs.lookup(&ctx, ROOT_INO, &name).unwrap().inode;
        let open = |i: usize| {
            let name = std::ffi::CString::new(format!("f{i:02}")).unwrap();
            let e = fs.lookup(&ctx, top, &name).unwrap();
            fs.open(&ctx, e.inode, libc::O_RDONLY as u32, 0).unwrap();
        };
        let settle = || std::thread::sleep(Duration::from_millis(300));
        let nothing_ahead = |why: &str| {
            settle();
            assert!(paths.iter().all(|p| !resident(p)), "{why}: read ahead");
        };
        // A guest with more requests queued keeps the disk busy itself.
        inline::with_others_waiting(true, || (0..4).for_each(open));
        nothing_ahead("others waiting");
        open(2);
        open(11);
        nothing_ahead("opened out of order");
        open(3);
        open(4);
        let start = std::time::Instant::now();
        while !(resident(&paths[5]) && resident(&paths[6])) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "5 and 6 never read ahead"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        settle();
        for (i, p) in paths
            .iter()
            .enumerate()
            .filter(|(i, _)| ![5, 6].contains(i))
        {
            // Opening reads nothing either: the first READ does.
            assert!(!resident(p), "f{i:02} read ahead, outside the window");
        }
    }

    /// A directory heavier than the whole cache is kept on its own while
    /// it is used (not fetched again for each name), then let go.
    #[test]
    fn one_large_directory_is_kept_while_used() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = Store::memory();
        let sp = crate::nix::store_path::StorePath::new([7; 20], "wide".to_string()).unwrap();
        let dir = rt.block_on(async {
            let mut d = Directory::new();
            for i in 0..100 {
                d.add(
                    format!("e{i:03}").into(),
                    Node::Symlink { target: "x".into() },
                )
                .unwrap();
            }
            put_store_path(&store, &sp, d).await
        });
        let Node::Directory { digest, .. } = dir else {
            unreachable!()
        };
        let fs = StoreFs::new(
            store,
            rt.handle().clone(),
            FsConfig {
                dir_cache_bytes: 1024,
                ..Default::default()
            },
        );
        let ctx = Context::default();
        let name = std::ffi::CString::new(sp.to_basename()).unwrap();
        let top = fs.lookup(&ctx, ROOT_INO, &name).unwrap();
        let held = fs.remembered(&digest).expect("kept after the first lookup");
        assert!(!fs.dirs.contains_key(&digest), "too heavy for the cache");
        for i in 0..10 {
            std::thread::sleep(Duration::from_millis(50));
            let e = std::ffi::CString::new(format!("e{:03}", i * 7)).unwrap();
            assert_ne!(fs.lookup(&ctx, top.inode, &e).unwrap().inode, 0);
        }
        let again = fs.remembered(&digest).expect("kept while used");
        assert!(Arc::ptr_eq(&held, &again), "not fetched again");
        drop((held, again));
        std::thread::sleep(LARGE_DIRECTORY_IDLE * 3);
        assert!(lock(&fs.large).is_none(), "let go once idle");
    }
}
