//! The guest's open handles: files (their blob opened on first read) and
//! directories (a listing snapshot each), counted against one bound, the
//! shared root listing, and the reset when a guest kernel starts over.
//! Apart because this is the state a guest grows by itself, and what it
//! holds must be let go when it reboots.
use super::attr::dtype;
use super::blobs::OpenBlob;
use super::dircache::Listing;
use super::{err, lock, InodeKind, StoreFs, ROOT_INO};
use crate::castore::{B3Digest, Node};
use bytes::Bytes;
use fuse_backend_rs::api::filesystem::DirEntry;
use futures::TryStreamExt;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// An open file. The blob is opened (and verified) on the first read, not
/// at open: with a warm page cache (KEEP_CACHE) no read ever comes.
pub(super) struct OpenFile {
    pub(super) digest: B3Digest,
    pub(super) size: u64,
    pub(super) blob: Option<Arc<OpenBlob>>,
}

impl StoreFs {
    /// Every store path, sorted: the shared snapshot when it is under a
    /// second old or unchanged, else a new one.
    pub(super) fn root_listing(&self) -> io::Result<Listing> {
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
    pub(super) fn reset(&self, why: &str) {
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

    /// A handle number, counted against `max_handles` until
    /// [`Self::handle_gone`].
    pub(super) fn new_handle(&self) -> io::Result<u64> {
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

    pub(super) fn handle_gone(&self, removed: bool) {
        if removed {
            self.handles.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The listing of a directory inode: (name, node) in order; the open
    /// handle's snapshot when there is one.
    pub(super) fn listing(&self, ino: u64, handle: u64) -> io::Result<Listing> {
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
    pub(super) fn walk_dir(
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
