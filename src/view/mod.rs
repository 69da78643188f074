//! The read-only /nix/store view of a store, as a fuse-backend-rs
//! `FileSystem`: served to the host kernel over /dev/fuse (`crate::serve::fuse`)
//! and, later, to guests over virtio-fs. Store paths appear as
//! `<hash>-<name>` below the root; trees are fetched on first access and a
//! blob is checked against its BLAKE3 digest before its first byte is
//! served (and again once the view has forgotten checking it: between the
//! two, the view trusts the store not to rewrite a blob it holds, which
//! our stores never do: they write each object once and rename it in).
//!
//! The view is split by the state each part owns, and no part imports
//! this root: `config` (settings), `inodes`, `dircache` (decoded
//! directories), `handles` (open files and directories), `blobs` and
//! `verified` (open and checked blobs), `sequential` (read-ahead) and
//! `metrics`. This root holds [`StoreFs`], which owns one of each, and the
//! store call with its time limit. What combines parts is written on
//! `StoreFs` in the files above them: `lookup` (names to entries),
//! `listing` (directory listings), `open` (opening and checking blobs) and
//! `filesystem` (the FUSE requests).
mod attr;
mod blobs;
pub mod bounded_set;
mod config;
mod dircache;
mod errno;
mod filesystem;
mod handles;
pub mod inline;
mod inodes;
mod listing;
mod lookup;
pub mod metrics;
mod open;
mod sequential;
#[cfg(test)]
mod tests;
mod verified;

use crate::store::Store;
use blobs::OpenBlobs;
pub use config::{
    CachePolicy, FsConfig, DEFAULT_DIR_CACHE_BYTES, DEFAULT_MAX_HANDLES, DEFAULT_READ_AHEAD_FILES,
    DEFAULT_VERIFIED_BLOBS,
};
use dircache::DirCache;
use errno::err;
use fuse_backend_rs::api::filesystem::OpenOptions;
use handles::Handles;
pub use inodes::{InodeKind, Inodes, ROOT_INO};
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// The view of one store: every FUSE request is answered from the state
/// below, each part of it kept by the sibling module named above.
pub struct StoreFs {
    store: Store,
    rt: tokio::runtime::Handle,
    cfg: FsConfig,
    inodes: Inodes,
    /// Decoded directories, bounded by bytes.
    dircache: DirCache,
    /// Which directories the guest reads in order, to read ahead.
    sequential: sequential::Sequential,
    /// Blobs checked against (digest, size), bounded by count.
    verified: verified::Verified,
    /// Open files and directories, counted against one bound.
    handles: Handles,
    /// What the open files read from: one per blob.
    blobs: OpenBlobs,
    /// What it served, for Prometheus.
    metrics: metrics::ViewMetrics,
    /// The store paths the guest may see; `None`: all of them.
    closure: std::sync::RwLock<Option<Arc<crate::store::closure::Closure>>>,
}

impl StoreFs {
    /// `rt` runs the store calls; FUSE workers block on it from their own threads.
    pub fn new(store: Store, rt: tokio::runtime::Handle, cfg: FsConfig) -> Self {
        Self {
            store,
            rt,
            inodes: Inodes::default(),
            dircache: DirCache::new(cfg.dir_cache_bytes),
            handles: Handles::new(cfg.max_handles),
            sequential: sequential::Sequential::new(cfg.read_ahead_files),
            verified: verified::Verified::new(cfg.verified_blobs),
            blobs: OpenBlobs::default(),
            closure: Default::default(),
            metrics: Default::default(),
            cfg,
        }
    }

    /// Limits the view to `closure` (`None`: the whole store). Inodes the
    /// guest already holds stay valid; names outside are absent from the
    /// next lookup on.
    pub fn set_closure(&self, closure: Option<crate::store::closure::Closure>) {
        *self.closure.write().unwrap_or_else(|e| e.into_inner()) = closure.map(Arc::new);
        self.handles.forget_root();
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
        self.handles.len()
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

    /// Drops every inode and handle of the previous guest kernel: a guest
    /// that reboots keeps the vhost-user connection and sends INIT again
    /// (after DESTROY, or without it) and never releases what the old
    /// kernel held.
    pub(super) fn reset(&self, why: &str) {
        let inodes = self.inodes.reset();
        let (files, dirs) = self.handles.clear();
        self.blobs.clear();
        if inodes + files + dirs > 0 {
            tracing::info!(
                "{why}: dropped {inodes} inodes, {files} open files and {dirs} open directories of the previous guest kernel"
            );
        }
    }

    fn kind(&self, ino: u64) -> io::Result<InodeKind> {
        self.inodes.get(ino).ok_or_else(|| err(libc::ENOENT))
    }
}
