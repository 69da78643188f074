//! A reader's hits, reported to the filler: readers serve hits straight
//! from the cache directory (read-only, so the access times the eviction
//! goes by do not move), and tell the filler in batches which objects they
//! used (`CacheService/Touch`), now and then and sooner when many pile up.
//! Only objects whose access time is old are reported, and a reader looks
//! at an object's access time once per [`RECHECK`], not on every hit: an
//! `fstat` per opened file was the reader's one cost per request that the
//! embedded store does not pay.
use super::flights::Key;
use super::looked_at::LookedAt;
use crate::castore::B3Digest;
use crate::store::channel::WireChannel;
use crate::wire::cache as pb;
use crate::wire::cache::cache_service_client::CacheServiceClient;
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// Most hits held before reporting; more are dropped (an object missed
/// here is only evicted a little sooner).
const MAX_HELD: usize = 16_384;
/// Reported early once this many are held.
const REPORT_SOON: usize = 4096;
/// Reported at least this often.
pub const PERIOD: Duration = Duration::from_secs(10);
/// Most digests in one Touch call.
const BATCH: usize = 8192;
/// How often an object in use has its access time looked at: well within
/// [`super::space::FRESH`], so an object used all along is reported
/// before it goes stale for long.
const RECHECK: Duration = Duration::from_secs(300);
/// Objects remembered as looked at: 8 bytes each, a fixed 512 KiB.
const MAX_SEEN: usize = 65_536;

#[derive(Default)]
struct Held {
    blobs: HashSet<B3Digest>,
    dirs: HashSet<B3Digest>,
    infos: HashSet<[u8; 20]>,
    fresh: HashSet<B3Digest>,
}

impl Held {
    fn len(&self) -> usize {
        self.blobs.len() + self.dirs.len() + self.infos.len() + self.fresh.len()
    }
}

/// Hits not reported yet.
pub struct Touches {
    held: Mutex<Held>,
    /// Objects whose access time was looked at lately, by a prefix of
    /// their digest (a collision only delays one object's report).
    seen: LookedAt,
    /// Wakes the reporter early.
    pub wake: Arc<Notify>,
}

impl Default for Touches {
    fn default() -> Self {
        Self {
            held: Mutex::default(),
            seen: LookedAt::new(MAX_SEEN, RECHECK),
            wake: Arc::default(),
        }
    }
}

fn prefix(key: &Key) -> u64 {
    let (bytes, kind): (&[u8], u64) = match key {
        Key::Blob(d) => (d.as_bytes(), 0),
        Key::Directory(d) | Key::Tree(d) => (d.as_bytes(), 1),
        Key::PathInfo(p) => (p, 2),
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b) ^ kind
}

impl Touches {
    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key`'s access time is due to be looked at: the first hit
    /// on it since it was last looked at, [`RECHECK`] ago at most.
    pub fn due(&self, key: &Key) -> bool {
        self.seen.due(prefix(key))
    }

    /// A blob first read while recently fetched (so not marked again).
    pub fn record_fresh(&self, digest: B3Digest) {
        let mut h = self.lock();
        if h.len() < MAX_HELD {
            h.fresh.insert(digest);
        }
        if h.len() == REPORT_SOON {
            self.wake.notify_one();
        }
    }

    pub fn record(&self, key: Key) {
        let mut h = self.lock();
        if h.len() < MAX_HELD {
            match key {
                Key::Blob(d) => h.blobs.insert(d),
                Key::Directory(d) | Key::Tree(d) => h.dirs.insert(d),
                Key::PathInfo(p) => h.infos.insert(p),
            };
        }
        if h.len() == REPORT_SOON {
            self.wake.notify_one();
        }
    }

    /// Sends what is held to the filler (each call within `idle`); a
    /// failed report is dropped.
    pub async fn report(&self, client: &CacheServiceClient<WireChannel>, idle: Duration) {
        let h = std::mem::take(&mut *self.lock());
        let blobs: Vec<Bytes> = h.blobs.into_iter().map(Bytes::from).collect();
        let dirs: Vec<Bytes> = h.dirs.into_iter().map(Bytes::from).collect();
        let infos: Vec<Bytes> = h.infos.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        let fresh: Vec<Bytes> = h.fresh.into_iter().map(Bytes::from).collect();
        let mut chunks = (
            blobs.chunks(BATCH),
            dirs.chunks(BATCH),
            infos.chunks(BATCH),
            fresh.chunks(BATCH),
        );
        loop {
            let req = pb::TouchRequest {
                blobs: chunks.0.next().map(<[_]>::to_vec).unwrap_or_default(),
                directories: chunks.1.next().map(<[_]>::to_vec).unwrap_or_default(),
                path_infos: chunks.2.next().map(<[_]>::to_vec).unwrap_or_default(),
                fresh_blobs: chunks.3.next().map(<[_]>::to_vec).unwrap_or_default(),
            };
            if req.blobs.is_empty()
                && req.directories.is_empty()
                && req.path_infos.is_empty()
                && req.fresh_blobs.is_empty()
            {
                return;
            }
            let mut client = client.clone();
            match tokio::time::timeout(idle, client.touch(req)).await {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => {
                    tracing::debug!("reporting cache hits: {}", s.message());
                    return;
                }
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(i: u32) -> Key {
        Key::Blob(B3Digest::from(blake3::hash(&i.to_le_bytes())))
    }

    #[test]
    fn an_object_is_looked_at_once() {
        let t = Touches::default();
        assert!(t.due(&blob(0)), "first hit");
        assert!(!t.due(&blob(0)), "second hit");
        assert!(t.due(&blob(1)), "another blob");
        let Key::Blob(d) = blob(0) else {
            unreachable!()
        };
        assert!(t.due(&Key::Directory(d)), "a directory of the same digest");
    }
}
