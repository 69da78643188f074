//! Looks up blob files ahead of their first read, in the background. A
//! guest lists a directory, then opens its files. virtiofsd pays the disk
//! reads for those files' inodes while it answers the listing (it stats
//! every entry); the view answers listings from memory, and would pay them
//! one at a time on each file's first read instead: the blob's name in its
//! shard directory and its inode, each a disk read while cold. A thread
//! looks the files up as soon as their directory is listed, so the read
//! finds them in the kernel's caches.
//!
//! Data is read ahead only when asked separately ([`Warmer::read_ahead`]):
//! the view asks once the guest reads a directory's files in order, so a
//! guest that lists a directory and reads one file pays for one. Those
//! requests go first and start the disk reads without waiting for them
//! (the kernel's readahead), so several files' reads are in flight while
//! the guest still reads the one before.
//!
//! Hints beyond the queues' bounds are dropped (they are only hints), and
//! the thread exits when idle, so an idle daemon keeps no thread for it.
use crate::castore::B3Digest;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// Hints waiting at most (32 bytes each: 1 MiB, given back once drained).
/// A guest's `find` lists everything before it reads: the bound covers a
/// few tens of thousands of files, the rest is looked up when read.
const QUEUE_BOUND: usize = 32768;
/// Files whose data is waiting to be read ahead: the view asks for a few
/// at a time, and a backlog past this is stale (the guest is past it).
const DATA_BOUND: usize = 64;
/// Bytes read ahead from the start of each file: small files whole, and
/// the start of a large one (the kernel's own readahead follows the
/// guest's reads from there).
const DATA_BYTES: i64 = 256 << 10;
/// The thread exits after this long without a hint.
const IDLE_EXIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Queue {
    /// Files to look up.
    digests: VecDeque<B3Digest>,
    /// Files to read ahead (digest, size), served first.
    data: VecDeque<(B3Digest, u64)>,
    /// A thread is serving the queue.
    running: bool,
}

/// The look-ahead for one blob directory (`ROOT/blobs`).
pub struct Warmer {
    blobs: PathBuf,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Told of a blob to read ahead that the directory lacks (a cache
    /// asks for it to be fetched).
    missing: std::sync::OnceLock<Missing>,
}

/// See [`Warmer::on_missing`].
pub type Missing = Box<dyn Fn(B3Digest, u64) + Send + Sync>;

impl Warmer {
    pub fn new(blobs: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            blobs,
            queue: Mutex::default(),
            wake: Condvar::new(),
            missing: std::sync::OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `digests` to be looked up soon; starts the thread if none runs.
    pub fn hint(self: &Arc<Self>, digests: &mut dyn Iterator<Item = B3Digest>) {
        // The caller's iterator runs outside the lock: the thread keeps
        // taking hints meanwhile.
        let room = QUEUE_BOUND.saturating_sub(self.lock().digests.len());
        let new: Vec<B3Digest> = digests.take(room).collect();
        let mut q = self.lock();
        let room = QUEUE_BOUND.saturating_sub(q.digests.len());
        q.digests.extend(new.into_iter().take(room));
        self.start(q);
    }

    /// Calls `f` with each blob to read ahead that is not in the directory
    /// (on the look-ahead thread, which found it missing: it must not
    /// block). Set once; later calls are ignored.
    pub fn on_missing(&self, f: Missing) {
        let _ = self.missing.set(f);
    }

    /// Queues blobs (digest, size) to have the start of their data read
    /// ahead, before any lookup waiting; starts the thread if none runs.
    pub fn read_ahead(self: &Arc<Self>, blobs: &mut dyn Iterator<Item = (B3Digest, u64)>) {
        let new: Vec<(B3Digest, u64)> = blobs.take(DATA_BOUND).collect();
        let mut q = self.lock();
        // The oldest requests are the ones the guest has most likely
        // passed: they make room.
        let held = q.data.len();
        let excess = (held + new.len()).saturating_sub(DATA_BOUND);
        q.data.drain(..excess.min(held));
        q.data.extend(new);
        self.start(q);
    }

    /// Wakes the thread for what `q` holds, or starts one.
    fn start(self: &Arc<Self>, mut q: MutexGuard<'_, Queue>) {
        if q.digests.is_empty() && q.data.is_empty() {
            return;
        }
        if q.running {
            self.wake.notify_one();
            return;
        }
        let me = Arc::downgrade(self);
        let started = std::thread::Builder::new()
            .name("blob-lookahead".into())
            .spawn(move || run(me));
        match started {
            Ok(_) => q.running = true,
            Err(e) => {
                tracing::debug!("blob look-ahead: no thread: {e}");
                q.digests.clear();
                q.data.clear();
            }
        }
    }

    /// The next piece of work, or `None` when idle too long (the thread
    /// then ends, marked as not running under the same lock).
    fn next(&self) -> Option<Work> {
        let mut q = self.lock();
        loop {
            if let Some((d, size)) = q.data.pop_front() {
                return Some(Work::Data(d, size));
            }
            if let Some(d) = q.digests.pop_front() {
                return Some(Work::Lookup(d));
            }
            q.digests.shrink_to(64);
            let (guard, timeout) = self
                .wake
                .wait_timeout(q, IDLE_EXIT)
                .unwrap_or_else(|e| e.into_inner());
            q = guard;
            if timeout.timed_out() && q.digests.is_empty() && q.data.is_empty() {
                q.running = false;
                return None;
            }
        }
    }

    fn path_of(&self, digest: &B3Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.blobs.join(&hex[..2]).join(hex)
    }

    fn look_up(&self, digest: &B3Digest) {
        // The answer does not matter (a missing blob is fetched when read):
        // the lookup leaves the name and the inode in the kernel's caches.
        let _ = std::fs::symlink_metadata(self.path_of(digest));
    }

    fn read_data(&self, digest: &B3Digest, size: u64) {
        use std::os::fd::AsRawFd;
        let f = match std::fs::File::open(self.path_of(digest)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(missing) = self.missing.get() {
                    missing(*digest, size);
                }
                return;
            }
            // Fails again when read, and is reported then.
            Err(_) => return,
        };
        // SAFETY: an advice call on a descriptor this function owns; no
        // memory is passed. WILLNEED starts the reads and returns.
        let rc =
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, DATA_BYTES, libc::POSIX_FADV_WILLNEED) };
        if rc != 0 {
            tracing::trace!("blob {digest}: read-ahead: errno {rc}");
        }
    }

    /// Hints waiting (lookups and data), for tests.
    pub fn waiting(&self) -> usize {
        let q = self.lock();
        q.digests.len() + q.data.len()
    }
}

/// Lowers this thread's priority to the least (nice 19): a hint must not
/// delay the requests it is meant to speed up, and the queue's thread that
/// wakes it keeps its CPU. Not SCHED_IDLE: an idle-class thread preempted
/// inside a read-ahead leaves the guest's read waiting on its pages for
/// milliseconds (BENCHMARKS.md, "Depth 1: reading the next files ahead": the
/// priorities tried).
fn background() {
    // SAFETY: plain syscalls on this thread's own id, no memory passed.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19)
    };
    if rc != 0 {
        tracing::debug!(
            "blob look-ahead: nice 19: {}",
            std::io::Error::last_os_error()
        );
    }
}

enum Work {
    Lookup(B3Digest),
    Data(B3Digest, u64),
}

fn run(warmer: Weak<Warmer>) {
    background();
    // Holds the warmer only while it works: dropping the store ends it.
    while let Some(w) = warmer.upgrade() {
        match w.next() {
            Some(Work::Lookup(d)) => w.look_up(&d),
            Some(Work::Data(d, size)) => w.read_data(&d, size),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bounded_and_drains() {
        let dir = tempfile::tempdir().unwrap();
        let w = Warmer::new(dir.path().to_path_buf());
        let many =
            (0..QUEUE_BOUND as u32 * 2).map(|i| B3Digest::from(blake3::hash(&i.to_le_bytes())));
        w.hint(&mut many.into_iter());
        assert!(w.waiting() <= QUEUE_BOUND);
        let start = std::time::Instant::now();
        while w.waiting() > 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "not drained");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
