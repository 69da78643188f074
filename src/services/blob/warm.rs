//! Looks up blob files ahead of their first read, in the background. A
//! guest lists a directory, then opens its files. virtiofsd pays the disk
//! reads for those files' inodes while it answers the listing (it stats
//! every entry); the view answers listings from memory, and would pay them
//! one at a time on each file's first read instead: the blob's name in its
//! shard directory and its inode, each a disk read while cold. A thread
//! looks the files up as soon as their directory is listed, so the read
//! finds them in the kernel's caches. Only metadata: no file data is read.
//! Hints beyond the queue's bound are dropped (they are only hints), and
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
/// The thread exits after this long without a hint.
const IDLE_EXIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Queue {
    digests: VecDeque<B3Digest>,
    /// A thread is serving the queue.
    running: bool,
}

/// The look-ahead for one blob directory (`ROOT/blobs`).
pub struct Warmer {
    blobs: PathBuf,
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Warmer {
    pub fn new(blobs: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            blobs,
            queue: Mutex::default(),
            wake: Condvar::new(),
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
        if q.digests.is_empty() {
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
            }
        }
    }

    /// The next digest, or `None` when idle too long (the thread then
    /// ends, marked as not running under the same lock).
    fn next(&self) -> Option<B3Digest> {
        let mut q = self.lock();
        loop {
            if let Some(d) = q.digests.pop_front() {
                return Some(d);
            }
            q.digests.shrink_to(64);
            let (guard, timeout) = self
                .wake
                .wait_timeout(q, IDLE_EXIT)
                .unwrap_or_else(|e| e.into_inner());
            q = guard;
            if timeout.timed_out() && q.digests.is_empty() {
                q.running = false;
                return None;
            }
        }
    }

    fn look_up(&self, digest: &B3Digest) {
        let hex = digest.to_hex();
        // The answer does not matter (a missing blob is fetched when read):
        // the lookup leaves the name and the inode in the kernel's caches.
        let _ = std::fs::symlink_metadata(self.blobs.join(&hex[..2]).join(hex));
    }

    /// Hints waiting, for tests.
    pub fn waiting(&self) -> usize {
        self.lock().digests.len()
    }
}

fn run(warmer: Weak<Warmer>) {
    // Holds the warmer only while it works: dropping the store ends it.
    while let Some(w) = warmer.upgrade() {
        match w.next() {
            Some(d) => w.look_up(&d),
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
