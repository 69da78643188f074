//! The read-only /nix/store view of a store, as a fuse-backend-rs
//! `FileSystem`: served to the host kernel over /dev/fuse (`crate::serve::fuse`)
//! and, later, to guests over virtio-fs. Store paths appear as
//! `<hash>-<name>` below the root; trees are fetched on first access and a
//! blob is checked against its BLAKE3 digest before its first byte is
//! served (and again once the view has forgotten checking it: between the
//! two, the view trusts the store not to rewrite a blob it holds, which
//! our stores never do: they write each object once and rename it in).
//!
//! The view is split by the state each part owns: `config` (settings),
//! `dircache` (decoded directories and lookups in them), `handles` (open
//! files and directories), `open` (blob opening, checking and read-ahead
//! hooks) and `filesystem` (the FUSE requests). This root holds
//! [`StoreFs`], its constructor and what every part shares: the store
//! call with its time limit.
mod attr;
mod blobs;
pub mod bounded_set;
mod config;
mod dircache;
mod filesystem;
mod handles;
pub mod inline;
mod inodes;
pub mod metrics;
mod open;
mod sequential;
#[cfg(test)]
mod tests;
mod verified;

use crate::castore::B3Digest;
use crate::store::Store;
use blobs::OpenBlobs;
pub use config::{
    CachePolicy, FsConfig, DEFAULT_DIR_CACHE_BYTES, DEFAULT_MAX_HANDLES, DEFAULT_READ_AHEAD_FILES,
    DEFAULT_VERIFIED_BLOBS,
};
use dircache::{DirView, DirWeight, LargeSlot, Listing};
use fuse_backend_rs::api::filesystem::OpenOptions;
use handles::OpenFile;
pub use inodes::{InodeKind, Inodes, ROOT_INO};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The view of one store: every FUSE request is answered from the state
/// below, each part of it kept by the sibling module named above.
pub struct StoreFs {
    store: Store,
    rt: tokio::runtime::Handle,
    cfg: FsConfig,
    inodes: Inodes,
    /// Decoded directories, bounded by bytes.
    dirs: quick_cache::sync::Cache<B3Digest, Arc<DirView>, DirWeight>,
    /// The last directory too large for `dirs` on its own, and when it was
    /// last used: let go after [`dircache::LARGE_DIRECTORY_IDLE`].
    large: Arc<LargeSlot>,
    /// Held while a directory declared [`dircache::LARGE_DIRECTORY`] or more is fetched.
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
    closure: std::sync::RwLock<Option<Arc<crate::store::closure::Closure>>>,
    /// Entries of `files` and `dir_handles` together.
    handles: AtomicUsize,
}

/// An errno as the `io::Error` FUSE answers with.
fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Takes a lock even when a panicking thread poisoned it: one failed
/// request must not stop the view from serving the next.
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
    pub fn set_closure(&self, closure: Option<crate::store::closure::Closure>) {
        *self.closure.write().unwrap_or_else(|e| e.into_inner()) = closure.map(Arc::new);
        *lock(&self.root_snapshot) = None;
    }

    fn closure(&self) -> Option<Arc<crate::store::closure::Closure>> {
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
        fut: impl std::future::Future<Output = crate::store::Result<T>>,
    ) -> io::Result<T> {
        self.block_within(Some(self.cfg.store_timeout), what, fut)
    }

    /// As `block`; `None` leaves the limit to the call itself (a blob
    /// fetch fails when it stalls, not when it is long).
    fn block_within<T>(
        &self,
        limit: Option<Duration>,
        what: impl std::fmt::Display,
        fut: impl std::future::Future<Output = crate::store::Result<T>>,
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

    /// A service's answer from a local disk, where it has one (`None`:
    /// only the async call can answer).
    fn local<T>(
        &self,
        what: impl std::fmt::Display,
        r: Option<crate::store::Result<T>>,
    ) -> Option<io::Result<T>> {
        Some(r?.map_err(|e| {
            tracing::error!("{what}: {e}");
            err(libc::EIO)
        }))
    }

    fn kind(&self, ino: u64) -> io::Result<InodeKind> {
        self.inodes.get(ino).ok_or_else(|| err(libc::ENOENT))
    }
}
