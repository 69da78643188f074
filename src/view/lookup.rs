//! Names to entries: directories fetched into the cache (one at a time
//! when large, with a time limit that grows with their declared size, a
//! store path's whole tree at once from a remote), and the entries for
//! store paths below the root (under the closure, when there is one) and
//! for names below a directory.
use super::attr::{stat, NEGATIVE_TTL, TTL};
use super::dircache::{DirView, DIRECTORY_ENTRIES_PER_SEC, DIRECTORY_EXTRA_MAX};
use super::errno::err;
use super::inodes::{InodeKind, ROOT_INO};
use super::{inline, StoreFs};
use crate::castore::{B3Digest, Node};
use crate::nix::store_path::StorePath;
use bytes::Bytes;
use fuse_backend_rs::api::filesystem::Entry;
use futures::TryStreamExt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

impl StoreFs {
    /// The time a fetch of a directory declaring `size` entries below it
    /// may take (see [`DIRECTORY_ENTRIES_PER_SEC`]).
    pub(super) fn directory_limit(&self, size: u64) -> Duration {
        let base = self.cfg.store_timeout;
        let extra = Duration::from_secs(size / DIRECTORY_ENTRIES_PER_SEC);
        base + extra.min(base * DIRECTORY_EXTRA_MAX)
    }

    /// A directory's listing, from memory, a local disk or the store.
    /// `size` is what its node declares (entries below it, recursively):
    /// large ones are fetched one at a time, so a guest cannot have a
    /// hostile store's huge directories decoded on every thread at once.
    pub(super) fn directory(&self, digest: &B3Digest, size: u64) -> io::Result<Arc<DirView>> {
        if let Some(d) = self.dircache.remembered(digest) {
            return Ok(d);
        }
        let _one_at_a_time = self.dircache.one_large_fetch(size);
        if let Some(d) = self.dircache.remembered(digest) {
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
        self.dircache.remember(*digest, d.clone(), &self.rt);
        Ok(d)
    }

    /// Before a store path's first directory is needed: a store that must
    /// be asked over the network sends the whole tree in one call; a local
    /// one is read a directory at a time, as the guest walks it.
    pub(super) fn prefetch_tree(&self, root: &B3Digest, size: u64) -> io::Result<()> {
        if self.dircache.remembered(root).is_some() {
            return Ok(());
        }
        let _one_at_a_time = self.dircache.one_large_fetch(size);
        if self.dircache.remembered(root).is_some() {
            return Ok(());
        }
        let what = format_args!("directory tree {root}");
        if let Some(r) = self.local(what, self.store.directory.get_blocking(root)) {
            if let Some(d) = r? {
                self.dircache
                    .remember(*root, Arc::new(DirView::new(d)), &self.rt);
                return Ok(());
            }
        }
        // At most what the directory cache holds: a store's tree of a
        // million directories is not buffered whole; the rest is fetched a
        // directory at a time if the guest walks that far.
        let cap = self.dircache.max_bytes();
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
            self.dircache
                .remember(d.digest(), Arc::new(DirView::new(d)), &self.rt);
        }
        Ok(())
    }

    pub(super) fn dir_nlink(&self, kind: &InodeKind) -> io::Result<u64> {
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
    pub(super) fn child_entry(&self, parent: u64, name: &Bytes, node: &Node) -> io::Result<Entry> {
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

    pub(super) fn negative(timeout: Duration) -> Entry {
        Entry {
            entry_timeout: timeout,
            ..Default::default()
        }
    }

    /// Resolves a store path basename below the root.
    pub(super) fn lookup_store_path(&self, name: &[u8]) -> io::Result<Entry> {
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
}
