//! Which store path each cached object came from, so that one the host
//! cache evicted can be fetched again: a Nix cache answers only by store
//! path, and the path info that names the tree stays cached after one of
//! its blobs went. One symlink per object, `nix-origins/<ab>/<b|d><hex>`
//! pointing at the store path's hash: written once the objects are in the
//! cache, read only on such a miss.
//!
//! Bounded: an origin outlives its object (that is its use), so origins
//! of objects no longer cached are removed whenever there are more than
//! [`MAX_ORIGINS`] (counted at start and as they are written), and again
//! each time a tenth of the bound more were written: what is left is at
//! most one origin per cached object plus that tenth.
use crate::castore::B3Digest;
use crate::nix::nixbase32;
use crate::store::cache::Cache;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Most origins kept: about twice the objects of a 10 GiB cache of small
/// files (a symlink costs an inode, no data block).
pub const MAX_ORIGINS: u64 = 4_000_000;

pub struct Origins {
    dir: PathBuf,
    count: AtomicU64,
    /// The count at which the next prune runs: the bound, or a tenth of
    /// it above what the last prune left (a cache holding more objects
    /// than the bound would prune on every fetch).
    next_prune: AtomicU64,
    pruning: AtomicBool,
    full_logged: AtomicBool,
}

fn name(digest: &B3Digest, directory: bool) -> (String, String) {
    let hex = digest.to_hex();
    (
        hex[..2].to_string(),
        format!("{}{hex}", if directory { 'd' } else { 'b' }),
    )
}

impl Origins {
    /// The origins in `cache_dir`, created if need be; counted (and pruned
    /// if over the bound) in the background.
    pub fn open(cache_dir: &Path) -> std::io::Result<Arc<Self>> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = cache_dir.join("nix-origins");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Arc::new(Self {
            dir,
            count: AtomicU64::new(0),
            next_prune: AtomicU64::new(MAX_ORIGINS),
            pruning: AtomicBool::new(false),
            full_logged: AtomicBool::new(false),
        }))
    }

    /// Counts what is there (on a blocking thread), pruning if need be.
    pub fn take_stock(self: &Arc<Self>, cache: Arc<Cache>) {
        let me = self.clone();
        self.pruning.store(true, Relaxed);
        tokio::task::spawn_blocking(move || {
            let n = me.walk(|_, _| false);
            me.count.store(n, Relaxed);
            me.pruning.store(false, Relaxed);
            me.prune_if_full(&cache);
        });
    }

    /// Visits every origin (shard, entry name); removes those `remove`
    /// says; answers how many are left.
    fn walk(&self, mut remove: impl FnMut(&str, &str) -> bool) -> u64 {
        let mut left = 0;
        let Ok(shards) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        for shard in shards.flatten() {
            // only our own shard directories, never a link out of here
            if !shard.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            let s = shard.file_name().to_string_lossy().into_owned();
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if remove(&s, &n) && std::fs::remove_file(e.path()).is_ok() {
                    continue;
                }
                left += 1;
            }
        }
        left
    }

    /// Removes the origins of objects the cache no longer holds, on a
    /// blocking thread, when there are more than the bound.
    fn prune_if_full(self: &Arc<Self>, cache: &Arc<Cache>) {
        if self.count.load(Relaxed) <= self.next_prune.load(Relaxed)
            || self.pruning.swap(true, Relaxed)
        {
            return;
        }
        let (me, cache) = (self.clone(), cache.clone());
        let prune = move || {
            let left = me.walk(|_, n| {
                let (directory, hex) = match (n.strip_prefix('d'), n.strip_prefix('b')) {
                    (Some(hex), _) => (true, hex),
                    (_, Some(hex)) => (false, hex),
                    _ => return true,
                };
                let digest = data_encoding::HEXLOWER
                    .decode(hex.as_bytes())
                    .ok()
                    .and_then(|b| B3Digest::try_from(&b[..]).ok());
                match digest {
                    Some(d) => !cache.holds(&d, directory),
                    None => true,
                }
            });
            tracing::info!(
                "nix cache origins: {left} left after removing those of evicted objects"
            );
            me.count.store(left, Relaxed);
            me.next_prune
                .store(MAX_ORIGINS.max(left + MAX_ORIGINS / 10), Relaxed);
            me.pruning.store(false, Relaxed);
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::spawn_blocking(prune);
        } else {
            prune();
        }
    }

    /// Notes that `blobs` and `directories` came with the store path
    /// `hash` (blocking: call it off the runtime's threads).
    pub fn record(
        self: &Arc<Self>,
        cache: &Arc<Cache>,
        hash: &[u8; 20],
        blobs: &[B3Digest],
        directories: &[B3Digest],
    ) {
        let target = nixbase32::encode(hash);
        let all = blobs
            .iter()
            .map(|d| (d, false))
            .chain(directories.iter().map(|d| (d, true)));
        for (d, is_dir) in all {
            if self.count.load(Relaxed) >= self.next_prune.load(Relaxed) {
                self.prune_if_full(cache);
                if !self.full_logged.swap(true, Relaxed) {
                    tracing::warn!(
                        "nix cache origins: {} kept, more than {MAX_ORIGINS}: the cache holds \
                         that many objects; origins of evicted ones are removed now and then",
                        self.count.load(Relaxed)
                    );
                }
            }
            let (shard, file) = name(d, is_dir);
            let shard = self.dir.join(shard);
            let link = shard.join(file);
            let made = std::os::unix::fs::symlink(&target, &link).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    std::fs::create_dir_all(&shard)?;
                    std::os::unix::fs::symlink(&target, &link)
                } else {
                    Err(e)
                }
            });
            match made {
                Ok(()) => {
                    self.count.fetch_add(1, Relaxed);
                }
                // an object shared with a path recorded before: either
                // path gives it back
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    tracing::warn!("nix cache origins: {}: {e}", link.display());
                    return;
                }
            }
        }
    }

    /// The store path hash an object came with, if recorded.
    pub fn of(&self, digest: &B3Digest, directory: bool) -> Option<[u8; 20]> {
        let (shard, file) = name(digest, directory);
        let target = std::fs::read_link(self.dir.join(shard).join(file)).ok()?;
        nixbase32::decode_fixed::<20>(target.to_str()?.as_bytes()).ok()
    }
}
