//! The decoded directory cache: directories bounded by bytes, and the one
//! directory too large for that bound kept on its own while used. Apart
//! because it is the view's only state that grows with the store, and its
//! bounds (bytes, one large fetch at a time) are what a hostile store
//! meets; fetching into it is [`super::lookup`].
use crate::castore::{B3Digest, Directory, Node};
use crate::lock;
use bytes::Bytes;
use std::sync::{Arc, Mutex, MutexGuard};
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

/// Decoded directories by digest, bounded by bytes, and the one large
/// directory beside them.
pub(super) struct DirCache {
    pub(super) dirs: quick_cache::sync::Cache<B3Digest, Arc<DirView>, DirWeight>,
    /// The last directory too large for `dirs` on its own, and when it was
    /// last used: let go after [`LARGE_DIRECTORY_IDLE`].
    pub(super) large: Arc<LargeSlot>,
    /// Held while a directory declared [`LARGE_DIRECTORY`] or more is fetched.
    large_fetch: Mutex<()>,
    max_bytes: u64,
}

impl DirCache {
    pub(super) fn new(max_bytes: u64) -> Self {
        Self {
            // One shard: a big directory may take any share of the bound
            // (sharding splits the bound, and what exceeds a shard's
            // share is never kept: decoded again on every request).
            dirs: quick_cache::sync::Cache::with_options(
                quick_cache::OptionsBuilder::new()
                    .shards(1)
                    .estimated_items_capacity(1024)
                    .weight_capacity(max_bytes.max(1))
                    .build()
                    .unwrap_or_else(|_| unreachable!("all options are set")),
                DirWeight,
                Default::default(),
                Default::default(),
            ),
            large: Arc::default(),
            large_fetch: Mutex::new(()),
            max_bytes,
        }
    }

    /// The bound in bytes, which a prefetched tree also stays within.
    pub(super) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Held while a directory declaring `size` entries below it is
    /// fetched, when that makes it large: one such fetch at a time.
    pub(super) fn one_large_fetch(&self, size: u64) -> Option<MutexGuard<'_, ()>> {
        (size >= LARGE_DIRECTORY).then(|| lock(&self.large_fetch))
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
    /// one by one must not have it fetched and decoded for each); `rt`
    /// runs the timer that lets go of it.
    pub(super) fn remember(&self, digest: B3Digest, d: Arc<DirView>, rt: &tokio::runtime::Handle) {
        if d.weight > self.max_bytes {
            let was = lock(&self.large).replace((digest, d, std::time::Instant::now()));
            if was.is_none() {
                rt.spawn(let_go_of_idle(Arc::downgrade(&self.large)));
            }
        } else {
            self.dirs.insert(digest, d);
        }
    }
}
