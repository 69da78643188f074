//! The guest's open handles: files (their blob opened on first read) and
//! directories (a listing snapshot each), counted against one bound, the
//! shared root listing, and the reset when a guest kernel starts over.
//! Listing directories through them is [`super::listing`].
//! Apart because this is the state a guest grows by itself, and what it
//! holds must be let go when it reboots.
use super::blobs::OpenBlob;
use super::dircache::Listing;
use super::errno::err;
use crate::castore::{B3Digest, Node};
use crate::lock;
use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An open file. The blob is opened (and verified) on the first read, not
/// at open: with a warm page cache (KEEP_CACHE) no read ever comes.
pub(super) struct OpenFile {
    pub(super) digest: B3Digest,
    pub(super) size: u64,
    pub(super) blob: Option<Arc<OpenBlob>>,
}

/// Every open handle, counted against one bound.
pub(super) struct Handles {
    files: Mutex<HashMap<u64, Arc<Mutex<OpenFile>>>>,
    /// Listings of open directories, by handle: one snapshot per OPENDIR,
    /// so every READDIR of it is an index, and the root's offsets stay
    /// valid while the store changes.
    pub(super) dirs: Mutex<HashMap<u64, Listing>>,
    /// The newest root listing (`--list-root`) and when it was made: open
    /// handles share it while it is fresh or while the store has not
    /// changed, so a guest opening the root again and again holds one
    /// listing, not one per handle.
    root: Mutex<Option<(Instant, Listing)>>,
    next: AtomicU64,
    /// Entries of `files` and `dirs` together.
    count: AtomicUsize,
    max: usize,
}

impl Handles {
    pub(super) fn new(max: usize) -> Self {
        Self {
            files: Mutex::default(),
            dirs: Mutex::default(),
            root: Mutex::default(),
            next: AtomicU64::new(1),
            count: AtomicUsize::new(0),
            max,
        }
    }

    /// A handle number, counted against the bound until it is removed.
    fn new_handle(&self) -> io::Result<u64> {
        if self.count.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                "the guest holds {} open handles: refusing more (ENFILE)",
                self.max
            );
            return Err(err(libc::ENFILE));
        }
        Ok(self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn gone(&self, removed: bool) {
        if removed {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Opens a file handle.
    pub(super) fn open_file(&self, f: OpenFile) -> io::Result<u64> {
        let h = self.new_handle()?;
        lock(&self.files).insert(h, Arc::new(Mutex::new(f)));
        Ok(h)
    }

    pub(super) fn file(&self, h: u64) -> Option<Arc<Mutex<OpenFile>>> {
        lock(&self.files).get(&h).cloned()
    }

    pub(super) fn close_file(&self, h: u64) -> Option<Arc<Mutex<OpenFile>>> {
        let removed = lock(&self.files).remove(&h);
        self.gone(removed.is_some());
        removed
    }

    /// Opens a directory handle on its listing's snapshot.
    pub(super) fn open_dir(&self, listing: Listing) -> io::Result<u64> {
        let h = self.new_handle()?;
        lock(&self.dirs).insert(h, listing);
        Ok(h)
    }

    pub(super) fn dir(&self, h: u64) -> Option<Listing> {
        lock(&self.dirs).get(&h).cloned()
    }

    pub(super) fn close_dir(&self, h: u64) {
        let removed = lock(&self.dirs).remove(&h).is_some();
        self.gone(removed);
    }

    /// The shared root listing while it is younger than `fresh`.
    pub(super) fn root_if_fresh(&self, fresh: Duration) -> Option<Listing> {
        match &*lock(&self.root) {
            Some((at, l)) if at.elapsed() < fresh => Some(l.clone()),
            _ => None,
        }
    }

    /// Shares `all` (sorted, deduplicated) as the root listing, or the one
    /// shared before when it is the same.
    pub(super) fn share_root(&self, all: Vec<(Bytes, Node)>) -> Listing {
        let mut snap = lock(&self.root);
        let listing: Listing = match &*snap {
            Some((_, old)) if old[..] == all[..] => old.clone(),
            _ => all.into(),
        };
        *snap = Some((Instant::now(), listing.clone()));
        listing
    }

    /// Drops the shared root listing (the closure changed).
    pub(super) fn forget_root(&self) {
        *lock(&self.root) = None;
    }

    /// Drops every handle; answers how many files and directories were open.
    pub(super) fn clear(&self) -> (usize, usize) {
        let files = std::mem::take(&mut *lock(&self.files)).len();
        let dirs = std::mem::take(&mut *lock(&self.dirs)).len();
        self.count.fetch_sub(files + dirs, Ordering::AcqRel);
        (files, dirs)
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.files).len() + lock(&self.dirs).len()
    }
}
