//! The cache's size bound: what its objects take, the room fetches under
//! way have reserved, and eviction of the least recently used objects
//! (oldest access time; hits refresh it) when a new object would not fit.
//! Only the filling process keeps this; readers never write.
use super::stats::CacheStats;
use crate::lock;
use crate::store::{Error, Result};
use std::collections::{BinaryHeap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// The object areas of a store directory, as `local://` lays them out.
pub const AREAS: [&str; 3] = ["blobs", "directories", "pathinfo"];
pub use crate::store::disk::TEMP_PREFIX;

/// What an object of `len` bytes takes on disk, near enough: whole 4 KiB
/// blocks, at least one.
pub fn cost(len: u64) -> u64 {
    len.div_ceil(4096).max(1).saturating_mul(4096)
}

/// Eviction makes room down to this share of the bound, so that it runs
/// in batches rather than once per new object.
const LOW_WATER_PERCENT: u64 = 90;
/// Most eviction candidates one pass keeps in memory; a pass that needs
/// more frees what it can and the next pass goes on.
const MAX_CANDIDATES: usize = 65_536;
/// The evictor re-checks this often even when nobody asks.
const EVICT_PERIOD: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    used: u64,
    reserved: u64,
    /// The largest reservation waiting for room.
    wanted: u64,
    /// Reservations holding room (fetches under way).
    holders: usize,
    /// The holders waiting for more room: what each wants, by ticket.
    waiting: HashMap<u64, u64>,
    next_ticket: u64,
}

/// A holder's place among those waiting for room; left when dropped.
struct Waiting<'a> {
    space: &'a Space,
    ticket: Option<u64>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket {
            lock(&self.space.state).waiting.remove(&t);
        }
    }
}

pub struct Space {
    root: PathBuf,
    max: u64,
    state: Mutex<State>,
    /// Wakes reservations waiting for room.
    freed: Notify,
    /// Wakes the evictor thread.
    evict: (Mutex<bool>, Condvar),
    stats: Arc<CacheStats>,
}

/// Calls `f` with every object file of the cache at `root`:
/// `blobs/ab/<hex>`, `directories/ab/<hex>`, `pathinfo/<hash>`; fills
/// under way go to `temp` instead.
fn for_each_object(
    root: &Path,
    mut f: impl FnMut(&Path, &std::fs::Metadata),
    mut temp: impl FnMut(&Path),
) {
    fn walk(
        dir: &Path,
        depth: u8,
        f: &mut dyn FnMut(&Path, &std::fs::Metadata),
        temp: &mut dyn FnMut(&Path),
    ) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let path = e.path();
            if e.file_name()
                .as_encoded_bytes()
                .starts_with(TEMP_PREFIX.as_bytes())
            {
                temp(&path);
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if m.is_dir() && depth > 0 {
                walk(&path, depth - 1, f, temp);
            } else if m.is_file() {
                f(&path, &m);
            }
        }
    }
    for area in AREAS {
        let depth = if area == "pathinfo" { 0 } else { 1 };
        walk(&root.join(area), depth, &mut f, &mut temp);
    }
}

fn atime(m: &std::fs::Metadata) -> (i64, i64) {
    (m.atime(), m.atime_nsec())
}

/// Objects used within this long count as recently used: their access
/// time is not moved again (eviction orders by it at this granularity),
/// which spares a write of the inode and a report per hit.
pub const FRESH: Duration = Duration::from_secs(600);

/// Whether an object's access time is older than [`FRESH`].
pub fn is_stale(m: &std::fs::Metadata) -> bool {
    m.accessed()
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|age| age > FRESH)
}

/// Marks `path` as just used, unless it was recently. Best effort: a
/// vanished object is fine.
pub fn touch(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !is_stale(&m) => return,
        Ok(_) => {}
        Err(_) => return,
    }
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    // SAFETY: `c` is a valid C string and `times` two valid timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::debug!("touching {}: {e}", path.display());
        }
    }
}

/// An eviction candidate; ordered by access time, newest greatest.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    atime: (i64, i64),
    cost: u64,
    path: PathBuf,
}

impl Space {
    /// Takes stock of the cache at `root` (its temporary files are
    /// leftovers of a killed filler: the caller holds the cache's lock and
    /// emptied `tmp`, its areas checked) and starts the evictor thread.
    pub fn open(root: &Path, max: u64, stats: Arc<CacheStats>) -> Result<Arc<Self>> {
        let mut used = 0u64;
        for_each_object(
            root,
            |_, m| used = used.saturating_add(cost(m.len())),
            |leftover| {
                let _ = std::fs::remove_file(leftover);
            },
        );
        stats.used_bytes.store(used, Relaxed);
        stats.max_bytes.store(max, Relaxed);
        let space = Arc::new(Self {
            root: root.to_path_buf(),
            max,
            state: Mutex::new(State {
                used,
                ..Default::default()
            }),
            freed: Notify::new(),
            evict: (Mutex::new(used > max), Condvar::new()),
            stats,
        });
        let weak = Arc::downgrade(&space);
        std::thread::Builder::new()
            .name("cache-evict".into())
            .spawn(move || evictor(weak))
            .map_err(|e| Error::Io(std::io::Error::other(format!("evictor thread: {e}"))))?;
        tracing::info!(
            "cache {}: {} MiB of {} MiB in use",
            root.display(),
            used >> 20,
            max >> 20
        );
        Ok(space)
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    fn set_used(&self, st: &mut State, used: u64) {
        st.used = used;
        self.stats.used_bytes.store(used, Relaxed);
    }

    fn request_eviction(&self) {
        *lock(&self.evict.0) = true;
        self.evict.1.notify_one();
    }

    /// Reserves room for `bytes` of a new object, waiting up to `patience`
    /// for eviction (or fetches under way) to make it.
    pub async fn reserve(self: &Arc<Self>, bytes: u64, patience: Duration) -> Result<Reservation> {
        let mut r = Reservation {
            space: self.clone(),
            bytes: 0,
        };
        r.grow(bytes, patience).await?;
        Ok(r)
    }

    /// Whether no fetch under way can ever finish: every holder but the
    /// asking one (`me`, when it holds room) waits for more room, and no
    /// wait can be met by evicting stored objects.
    fn nobody_can_finish(&self, st: &State, holding: bool, me: Option<u64>) -> bool {
        let others = st.holders.saturating_sub(usize::from(holding));
        let mut waiting = st.waiting.iter().filter(|(t, _)| Some(**t) != me);
        waiting.clone().count() == others && waiting.all(|(_, w)| st.reserved + w > self.max)
    }

    /// Takes `bytes` more room for a reservation (`holding` when it holds
    /// some already).
    async fn take(&self, bytes: u64, holding: bool, patience: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut waiting = Waiting {
            space: self,
            ticket: None,
        };
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&self.state);
                if st.used + st.reserved + bytes <= self.max {
                    st.reserved += bytes;
                    st.holders += usize::from(!holding);
                    return Ok(());
                }
                // Eviction frees stored objects only; the room fetches
                // under way hold comes back when they end. If this cannot
                // fit even with nothing stored and every other fetch waits
                // for room too, none of them can end: give up now rather
                // than all of them waiting out their patience.
                if st.reserved + bytes > self.max
                    && self.nobody_can_finish(&st, holding, waiting.ticket)
                {
                    return Err(Error::ResourceExhausted(format!(
                        "{bytes} more bytes do not fit in the cache's {} bytes: fetches under \
                         way hold {} bytes of it",
                        self.max, st.reserved
                    )));
                }
                st.wanted = st.wanted.max(bytes);
                if holding {
                    let t = match waiting.ticket {
                        Some(t) => t,
                        None => {
                            st.next_ticket += 1;
                            st.next_ticket
                        }
                    };
                    waiting.ticket = Some(t);
                    st.waiting.insert(t, bytes);
                }
            }
            self.request_eviction();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let st = lock(&self.state);
                return Err(Error::ResourceExhausted(format!(
                    "cache full: {bytes} bytes wanted, {} used and {} reserved of {}",
                    st.used, st.reserved, self.max
                )));
            }
        }
    }

    fn release(&self, reserved: u64, used: u64) {
        let mut st = lock(&self.state);
        st.reserved = st.reserved.saturating_sub(reserved);
        if reserved > 0 {
            st.holders = st.holders.saturating_sub(1);
        }
        let u = st.used.saturating_add(used);
        self.set_used(&mut st, u);
        drop(st);
        self.freed.notify_waiters();
    }

    /// An object of `cost` bytes was removed (found corrupt).
    pub fn removed(&self, cost: u64) {
        let mut st = lock(&self.state);
        let u = st.used.saturating_sub(cost);
        self.set_used(&mut st, u);
    }

    /// One eviction pass: frees what brings the cache down to its low
    /// water mark (and below what waiting reservations need).
    fn evict_pass(&self) {
        let to_free = {
            let mut st = lock(&self.state);
            let low = self.max / 100 * LOW_WATER_PERCENT;
            let target = if st.used + st.reserved + st.wanted > self.max {
                low.min(self.max.saturating_sub(st.reserved + st.wanted))
            } else {
                self.max
            };
            st.wanted = 0;
            st.used.saturating_sub(target)
        };
        if to_free == 0 {
            return;
        }
        // The oldest objects that together make `to_free`: a max-heap on
        // access time drops the newest while the rest still suffice.
        let mut heap = BinaryHeap::new();
        let mut sum = 0u64;
        for_each_object(
            &self.root,
            |path, m| {
                let c = cost(m.len());
                heap.push(Candidate {
                    atime: atime(m),
                    cost: c,
                    path: path.to_path_buf(),
                });
                sum += c;
                while let Some(top) = heap.peek() {
                    if sum - top.cost >= to_free || heap.len() > MAX_CANDIDATES {
                        sum -= top.cost;
                        heap.pop();
                    } else {
                        break;
                    }
                }
            },
            |_| {},
        );
        let mut freed = 0u64;
        let mut count = 0u64;
        for c in heap.into_sorted_vec() {
            if freed >= to_free {
                break;
            }
            // Used since the scan: keep it.
            match std::fs::symlink_metadata(&c.path) {
                Ok(m) if atime(&m) == c.atime => {}
                _ => continue,
            }
            if std::fs::remove_file(&c.path).is_ok() {
                freed += c.cost;
                count += 1;
            }
        }
        if count > 0 {
            self.removed(freed);
            self.stats.evictions.fetch_add(count, Relaxed);
            self.stats.evicted_bytes.fetch_add(freed, Relaxed);
            tracing::info!("cache: evicted {count} objects ({} KiB)", freed >> 10);
        }
    }

    fn over(&self) -> bool {
        let st = lock(&self.state);
        st.used + st.reserved + st.wanted > self.max
    }
}

/// The evictor thread: runs a pass when asked (or the cache is over its
/// bound), then wakes the reservations waiting for room.
fn evictor(space: Weak<Space>) {
    loop {
        let Some(s) = space.upgrade() else { return };
        let asked = {
            let mut asked = lock(&s.evict.0);
            if !*asked {
                asked = s
                    .evict
                    .1
                    .wait_timeout(asked, EVICT_PERIOD)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            std::mem::take(&mut *asked)
        };
        if asked || s.over() {
            s.evict_pass();
        }
        s.freed.notify_waiters();
    }
}

/// Room held for an object being fetched; given back when dropped, or
/// turned into used room by `commit`.
pub struct Reservation {
    space: Arc<Space>,
    bytes: u64,
}

impl Reservation {
    /// Holds room for `total` bytes in all.
    pub async fn grow(&mut self, total: u64, patience: Duration) -> Result<()> {
        if total > self.space.max {
            return Err(Error::ResourceExhausted(format!(
                "an object of {total} bytes or more does not fit in a cache of {} bytes",
                self.space.max
            )));
        }
        if total > self.bytes {
            self.space
                .take(total - self.bytes, self.bytes > 0, patience)
                .await?;
            self.bytes = total;
        }
        Ok(())
    }

    /// The object is in place and takes `cost` bytes.
    pub fn commit(mut self, cost: u64) {
        let bytes = std::mem::take(&mut self.bytes);
        self.space.release(bytes, cost);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.space.release(self.bytes, 0);
        }
    }
}
