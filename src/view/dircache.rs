//! The decoded directory cache and what is looked up in it: directories
//! bounded by bytes, the one directory too large for that bound kept on its
//! own while used, whole trees fetched ahead from a remote store, and the
//! entries for names below the root and below a directory. Apart because
//! it is the view's only state that grows with the store, and its bounds
//! (bytes, time per entry, one large fetch at a time) are what a hostile
//! store meets.
use super::attr::{stat, NEGATIVE_TTL, TTL};
use super::{err, inline, lock, InodeKind, StoreFs, ROOT_INO};
use crate::castore::{B3Digest, Directory, Node};
use crate::nix::store_path::StorePath;
use bytes::Bytes;
use fuse_backend_rs::api::filesystem::Entry;
use futures::TryStreamExt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Entries (recursively) from which a directory is fetched one at a time:
/// its own entries may then take megabytes decoded.
pub(super) const LARGE_DIRECTORY: u64 = 1 << 16;
/// Directory entries a store must send per second, at the least: a
/// directory may take the store timeout plus its declared size (entries
/// below it) at this rate, up to [`DIRECTORY_EXTRA_MAX`] store timeouts
/// more. One Get of a directory of a million entries (some 55 MB) is a
/// single message, whose progress cannot be watched as a blob's chunks
/// are; a loaded host took more than 2 s for it.
pub(super) const DIRECTORY_ENTRIES_PER_SEC: u64 = 100_000;
/// See [`DIRECTORY_ENTRIES_PER_SEC`]: a hostile store declaring a huge size
/// holds a stalled request at most this many store timeouts longer.
pub(super) const DIRECTORY_EXTRA_MAX: u32 = 4;
/// How long the one large directory is kept unused.
pub(super) const LARGE_DIRECTORY_IDLE: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(30)
};

/// A directory's entries in name order, as readdir walks them.
pub(super) type Listing = Arc<[(Bytes, Node)]>;

/// A directory as the view keeps it: its entries in one allocation, their
/// names slices of the decoded buffer. Cheaper to hold than a `Directory`
/// (a tree node per few entries), and an open handle shares it.
pub(super) struct DirView {
    pub(super) entries: Listing,
    pub(super) subdirs: u64,
    pub(super) weight: u64,
}

impl DirView {
    pub(super) fn new(d: Directory) -> Self {
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

    pub(super) fn get(&self, name: &[u8]) -> Option<&Node> {
        self.entries.get(self.position(name)?).map(|(_, node)| node)
    }

    /// Where `name` is in the listing (names are sorted).
    pub(super) fn position(&self, name: &[u8]) -> Option<usize> {
        self.entries
            .binary_search_by(|(n, _)| n.as_ref().cmp(name))
            .ok()
    }
}

/// Weighs cached directories by what they hold.
#[derive(Clone)]
pub(super) struct DirWeight;

impl quick_cache::Weighter<B3Digest, Arc<DirView>> for DirWeight {
    fn weight(&self, _: &B3Digest, d: &Arc<DirView>) -> u64 {
        d.weight.max(1)
    }
}

pub(super) type LargeSlot = Mutex<Option<(B3Digest, Arc<DirView>, std::time::Instant)>>;

/// Drops the one large directory once unused for [`LARGE_DIRECTORY_IDLE`];
/// ends then, or with the view.
pub(super) async fn let_go_of_idle(large: std::sync::Weak<LargeSlot>) {
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

    pub(super) fn remembered(&self, digest: &B3Digest) -> Option<Arc<DirView>> {
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
    pub(super) fn remember(&self, digest: B3Digest, d: Arc<DirView>) {
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
    pub(super) fn prefetch_tree(&self, root: &B3Digest, size: u64) -> io::Result<()> {
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
