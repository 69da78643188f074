//! Recorded access order: the blobs a tenant's VM opened, in the order it
//! first opened them, kept per closure (by its roots) when the VM goes, so
//! that the next first VM of that closure on this host is prefetched in
//! that order, not in a tree walk's: a VM's boot reads its loader, libc
//! and init long before the documentation the walk would reach first.
//!
//! A tenant opens every blob through its scoped connection (the filler
//! passes it the file), so the filler sees the exact order. Only blobs of
//! the closure are recorded (the scope refused the others), at most
//! [`MAX_ORDER`]; a tenant that records a bogus order only changes which
//! of its own closure's blobs the next VM gets first. The file is
//! `ORDERS/<blake3 of the sorted roots>` (mode 0600): `tvx-ord1`, then 40
//! bytes a blob (its digest, its size little-endian), written whole to a
//! temporary file and renamed.
use crate::castore::B3Digest;
use crate::lock;
use crate::nix::store_path::StorePath;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Most blobs one order holds: 2.5 MiB of file, read back whole.
pub const MAX_ORDER: usize = 65_536;
const MAGIC: &[u8; 8] = b"tvx-ord1";
const ENTRY: usize = 40;

/// The file holding the order of the closure of `roots` under `dir`.
pub fn path_of(dir: &Path, roots: &[StorePath]) -> PathBuf {
    let mut names: Vec<String> = roots.iter().map(StorePath::to_basename).collect();
    names.sort();
    names.dedup();
    let mut h = blake3::Hasher::new();
    for n in &names {
        h.update(n.as_bytes());
        h.update(b"\n");
    }
    dir.join(h.finalize().to_hex().as_str())
}

/// The recorded order at `path`, if there is a sound one.
pub fn load(path: &Path) -> Option<Vec<(B3Digest, u64)>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Not a link, not a FIFO that would block the reader.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        tracing::warn!(
            "prefetch order {}: not a regular file; ignored",
            path.display()
        );
        return None;
    }
    let mut bytes = Vec::new();
    let max = (MAGIC.len() + MAX_ORDER * ENTRY) as u64;
    if let Err(e) = f.take(max + 1).read_to_end(&mut bytes) {
        tracing::warn!("prefetch order {}: {e}", path.display());
        return None;
    }
    let body = bytes.strip_prefix(MAGIC.as_slice());
    let Some(body) = body.filter(|b| b.len() % ENTRY == 0 && b.len() as u64 <= max) else {
        tracing::warn!(
            "prefetch order {}: not an order file; ignored",
            path.display()
        );
        return None;
    };
    let mut out = Vec::with_capacity(body.len() / ENTRY);
    for e in body.chunks_exact(ENTRY) {
        let digest = B3Digest::try_from(&e[..32]).ok()?;
        let mut size = [0u8; 8];
        size.copy_from_slice(&e[32..]);
        out.push((digest, u64::from_le_bytes(size)));
    }
    Some(out)
}

/// Blobs in the order first opened, and which were.
#[derive(Default)]
struct Opened {
    order: Vec<(B3Digest, u64)>,
    seen: HashSet<B3Digest>,
}

/// Records a VM's first opens; saves them when dropped.
pub struct Recorder {
    path: PathBuf,
    opened: Mutex<Opened>,
}

impl Recorder {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            opened: Mutex::default(),
        }
    }

    /// The VM opened `digest` (of `size` bytes, as its directory says).
    pub fn opened(&self, digest: B3Digest, size: u64) {
        let mut o = lock(&self.opened);
        if o.order.len() < MAX_ORDER && o.seen.insert(digest) {
            o.order.push((digest, size));
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let order = std::mem::take(&mut lock(&self.opened).order);
        if order.is_empty() {
            return;
        }
        let path = std::mem::take(&mut self.path);
        let save = move || {
            if let Err(e) = save(&path, &order) {
                tracing::warn!("saving the prefetch order {}: {e}", path.display());
            }
        };
        // Dropped on a runtime thread when the tenant's connection ends.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(save);
            }
            Err(_) => save(),
        }
    }
}

fn save(path: &Path, order: &[(B3Digest, u64)]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // One temporary file per save: two tenants of the same roots may end
    // at once.
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let mut bytes = Vec::with_capacity(MAGIC.len() + order.len() * ENTRY);
    bytes.extend_from_slice(MAGIC);
    for (d, size) in order {
        bytes.extend_from_slice(d.as_bytes());
        bytes.extend_from_slice(&size.to_le_bytes());
    }
    f.write_all(&bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_saved_and_loaded_back_and_bad_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let roots = [StorePath::new([1; 20], "a").unwrap()];
        let path = path_of(dir.path(), &roots);
        let d = |i: u8| B3Digest::from(blake3::hash(&[i]));
        {
            let r = Recorder::new(path.clone());
            r.opened(d(3), 30);
            r.opened(d(1), 10);
            r.opened(d(3), 30);
        }
        assert_eq!(load(&path), Some(vec![(d(3), 30), (d(1), 10)]));
        // the same roots, another order: the same file
        let again = [roots[0].clone(), roots[0].clone()];
        assert_eq!(path_of(dir.path(), &again), path);
        std::fs::write(&path, b"tvx-ord1short").unwrap();
        assert_eq!(load(&path), None);
        std::fs::write(&path, b"something else entirely, forty bytes long").unwrap();
        assert_eq!(load(&path), None);
    }
}
