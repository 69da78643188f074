//! Prefetch: when a store path is first looked up on this host (the
//! filler fetched its path info), the filler fetches its tree and then its
//! files' blobs ahead of the guest, in the order a walk of the tree
//! (`find`, `cp -r`, `tar`) reads them, several at a time, and then does
//! the same for its references: the closure. Over a remote with a round
//! trip of milliseconds a guest that reads one file at a time otherwise
//! pays one round trip per file.
//!
//! A guest read of a blob being prefetched joins that fetch
//! ([`super::flights`]: one fetch per object), and everything prefetched
//! is checked like any fill. Bounded: the paths queued, the fills at once
//! (leaving the flights' other slots to guests' misses), the walk (one
//! directory's entries per level), and the bytes prefetched that no VM has
//! read yet (half the cache), so that prefetch never pushes out what VMs
//! use; a closure larger than that prefetches what fits and says so.
use super::flights::{self, Key, Outcome};
use super::space::cost;
use super::Cache;
use crate::castore::{B3Digest, Node};
use crate::lock;
use crate::nix::store_path::StorePath;
use crate::store::{Error, Result};
use futures::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;
use tokio::sync::{Notify, Semaphore};

/// What the filler prefetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing: each blob is fetched when a guest reads it.
    None,
    /// A store path's tree and blobs, then its references', once it is
    /// first looked up on this host.
    Closure,
    /// As `closure`, and a tenant's closure is prefetched first in the
    /// order the last VM of that closure opened its blobs
    /// ([`super::order`]).
    Recorded,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Mode::None),
            "closure" => Ok(Mode::Closure),
            "recorded" => Ok(Mode::Recorded),
            _ => Err(format!(
                "unknown prefetch mode {s:?} (none, closure, recorded)"
            )),
        }
    }
}

/// A VM's interest in what it prefetches: held for as long as the VM is
/// connected; once it is dropped, walks for it stop at their next blob
/// and its queued paths are skipped.
#[derive(Default)]
pub struct Session {
    /// Where its VM's opens are recorded (`--prefetch recorded`).
    recorder: Option<super::order::Recorder>,
}

impl Session {
    /// The VM opened a blob (its scoped connection asked for it).
    pub fn opened(&self, digest: B3Digest, size: u64) {
        if let Some(r) = &self.recorder {
            r.opened(digest, size);
        }
    }
}

/// On whose behalf a path is prefetched: a VM's session, or the host's
/// (`None`: a lookup by a VM without a session; such walks are bounded by
/// the path's size and the unread bound).
pub type Interest = Option<Weak<Session>>;

pub(super) fn alive(i: &Interest) -> bool {
    i.as_ref().is_none_or(|w| w.strong_count() > 0)
}

/// Whether two interests are the same VM's (or both the host's).
fn same(a: &Interest, b: &Interest) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Weak::ptr_eq(a, b),
        _ => false,
    }
}

/// Store paths waiting to be prefetched; more are not queued (the guest's
/// own reads fetch them).
const MAX_QUEUED: usize = 4096;
/// Store paths prefetched at once (their trees and references are one
/// round trip each).
const PATHS_AT_ONCE: usize = 4;
/// Blob fills prefetch keeps in flight, of the flights' 160: over a
/// bucket or a 10 ms link a fill takes tens of ms (24 left a stock Garage
/// idle between them; 48 kept ~30 in flight over a 10 ms round trip).
const FILLS_AT_ONCE: usize = 96;
/// Prefetched blobs remembered until a VM reads them (for the hit and
/// waste counters and the unread bound): 48 bytes each.
const MAX_UNREAD: usize = 65_536;
/// How long a prefetched blob counts against the unread bound if no VM
/// is seen reading it.
const UNREAD_TTL: std::time::Duration = std::time::Duration::from_secs(600);
/// Deepest directory a prefetch walks into.
const MAX_DEPTH: usize = 256;

/// Prefetched blobs no VM has read yet.
#[derive(Default)]
struct Unread {
    sizes: HashMap<B3Digest, u64>,
    /// Oldest first, with when noted: forgotten when full or old (a read
    /// no reader reported, an eviction, must not hold the bound forever).
    order: VecDeque<(B3Digest, Instant)>,
    bytes: u64,
}

impl Unread {
    /// Drops the oldest noted blob; false when there is none.
    fn drop_oldest(&mut self) -> bool {
        while let Some((old, _)) = self.order.pop_front() {
            if let Some(s) = self.sizes.remove(&old) {
                self.bytes = self.bytes.saturating_sub(s);
                return true;
            }
        }
        false
    }

    /// Forgets what was noted longer than [`UNREAD_TTL`] ago.
    fn age(&mut self) {
        while self
            .order
            .front()
            .is_some_and(|(_, t)| t.elapsed() > UNREAD_TTL)
        {
            if !self.drop_oldest() {
                break;
            }
        }
    }
}

/// What is queued: a store path to walk, or a recorded order of blobs
/// and then the closure's store paths.
enum Job {
    Path([u8; 20]),
    /// The order file, and the closure's paths.
    Order(std::path::PathBuf, Vec<[u8; 20]>),
}

/// Recorded orders queued at once; more tenants' closures are walked.
const MAX_ORDERS_QUEUED: usize = 16;

/// Store paths to prefetch, in order, each once.
#[derive(Default)]
struct Queue {
    order: VecDeque<(Job, Interest)>,
    /// Queued or being walked, and for whom (one entry per VM that asked,
    /// the host's `None` once): a walk that stops because its VM went is
    /// taken up for another that still wants the path.
    queued: HashMap<[u8; 20], Vec<Interest>>,
    /// Recorded orders queued (each up to [`super::order::MAX_ORDER`]
    /// blobs).
    orders: usize,
}

/// The filler's prefetch queue and its bounds.
pub(super) struct Prefetcher {
    pub(super) on: AtomicBool,
    /// Where recorded orders are kept (`--prefetch recorded`).
    orders: Mutex<Option<std::path::PathBuf>>,
    queue: Mutex<Queue>,
    wake: Arc<Notify>,
    pub(super) fills: Arc<Semaphore>,
    unread: Mutex<Unread>,
    /// Most bytes prefetched and not yet read.
    pub(super) budget: AtomicU64,
    /// The budget was met since it last had room (said once).
    full: AtomicBool,
}

impl Prefetcher {
    pub(super) fn new() -> Self {
        Self {
            on: AtomicBool::new(false),
            orders: Mutex::default(),
            queue: Mutex::default(),
            wake: Arc::new(Notify::new()),
            fills: Arc::new(Semaphore::new(FILLS_AT_ONCE)),
            unread: Mutex::default(),
            budget: AtomicU64::new(0),
            full: AtomicBool::new(false),
        }
    }

    /// Queues a store path (its path info was just fetched).
    pub(super) fn enqueue(&self, hash: [u8; 20], interest: Interest) {
        if !self.on.load(Relaxed) {
            return;
        }
        let mut q = lock(&self.queue);
        if let Some(list) = q.queued.get_mut(&hash) {
            // Queued or walked already: this VM's interest keeps it going.
            list.retain(alive);
            if !list.iter().any(|i| same(i, &interest)) {
                list.push(interest);
            }
            return;
        }
        if q.queued.len() >= MAX_QUEUED {
            return;
        }
        q.queued.insert(hash, vec![interest.clone()]);
        q.order.push_back((Job::Path(hash), interest));
        drop(q);
        self.wake.notify_one();
    }

    /// The next job whose VM is still there; a path stays marked as
    /// queued until [`Prefetcher::done`], so it is not walked twice at once.
    fn next(&self) -> Option<(Job, Interest)> {
        let mut q = lock(&self.queue);
        loop {
            let (job, i) = q.order.pop_front()?;
            match &job {
                Job::Order(..) => {
                    q.orders -= 1;
                    if alive(&i) {
                        return Some((job, i));
                    }
                }
                Job::Path(h) => {
                    // Walked for whoever still wants it.
                    let h = *h;
                    let wanted = q.queued.get_mut(&h).and_then(|list| {
                        list.retain(alive);
                        list.first().cloned()
                    });
                    match wanted {
                        Some(w) => return Some((job, w)),
                        None => {
                            q.queued.remove(&h);
                        }
                    }
                }
            }
        }
    }

    /// A walk stops at the bound of unread bytes (said once until there
    /// is room again).
    pub(super) fn at_bound(&self, stats: &super::stats::CacheStats) {
        if !self.full.swap(true, Relaxed) {
            tracing::info!(
                "prefetch: {} MiB prefetched and not read yet, half the cache: \
                 the rest is fetched as VMs read it",
                self.budget.load(Relaxed) >> 20
            );
        }
        stats.prefetch_stopped.fetch_add(1, Relaxed);
    }

    /// A walk of `hash` for `walked_for` ended: done, or stopped because
    /// its VM went, in which case another VM that wants the path (if any)
    /// has it walked again (what the first walk fetched is skipped).
    fn done(&self, hash: &[u8; 20], walked_for: &Interest) {
        let mut q = lock(&self.queue);
        let Some(mut list) = q.queued.remove(hash) else {
            return;
        };
        if alive(walked_for) {
            return;
        }
        list.retain(|i| alive(i) && !same(i, walked_for));
        if let Some(next) = list.first().cloned() {
            q.queued.insert(*hash, list);
            q.order.push_back((Job::Path(*hash), next));
            drop(q);
            self.wake.notify_one();
        }
    }

    pub(super) fn unread_bytes(&self) -> u64 {
        let mut u = lock(&self.unread);
        u.age();
        u.bytes
    }

    /// Notes a blob prefetch is fetching (before it lands, so a guest
    /// joining the fetch counts as a hit).
    pub(super) fn note(&self, digest: B3Digest, size: u64) {
        let mut u = lock(&self.unread);
        if u.sizes.contains_key(&digest) {
            return;
        }
        if u.sizes.len() >= MAX_UNREAD {
            u.drop_oldest();
        }
        u.sizes.insert(digest, size);
        u.order.push_back((digest, Instant::now()));
        u.bytes = u.bytes.saturating_add(size);
    }

    /// The blob turned out to be `actual` bytes (a recorded size is only
    /// a hint).
    fn resize(&self, digest: &B3Digest, actual: u64) {
        let mut u = lock(&self.unread);
        if let Some(s) = u.sizes.get_mut(digest) {
            let old = std::mem::replace(s, actual);
            u.bytes = u.bytes.saturating_sub(old).saturating_add(actual);
        }
    }

    /// Forgets a blob whose prefetch failed.
    pub(super) fn forget(&self, digest: &B3Digest) -> Option<u64> {
        let mut u = lock(&self.unread);
        let s = u.sizes.remove(digest)?;
        u.bytes = u.bytes.saturating_sub(s);
        if u.order.len() > 2 * u.sizes.len() + 64 {
            let Unread { sizes, order, .. } = &mut *u;
            order.retain(|(d, _)| sizes.contains_key(d));
        }
        Some(s)
    }
}

impl Cache {
    /// Turns prefetch on or off (filler only; off by default). Starts the
    /// task that works the queue, on the cache's runtime.
    /// `orders`: where recorded orders are kept (`recorded`; default
    /// `DIR/orders`), created (mode 0700) if missing.
    pub fn set_prefetch(
        self: &Arc<Self>,
        mode: Mode,
        orders: Option<std::path::PathBuf>,
    ) -> Result<()> {
        let f = self.filler()?;
        let p = &f.prefetch;
        p.budget.store(f.space.max() / 2, Relaxed);
        if mode == Mode::Recorded {
            let dir = orders.unwrap_or_else(|| self.root.join("orders"));
            super::create_dir(&dir)?;
            *lock(&p.orders) = Some(dir);
        } else {
            *lock(&p.orders) = None;
        }
        let on = mode != Mode::None;
        let was = p.on.swap(on, Relaxed);
        if on && !was {
            let rt = self
                .rt
                .as_ref()
                .ok_or_else(|| Error::InvalidRequest("prefetch needs a runtime".into()))?;
            rt.spawn(dispatch(Arc::downgrade(self)));
        }
        Ok(())
    }

    /// A prefetch session for a tenant's VM whose closure has `roots`:
    /// with `--prefetch recorded`, what it opens is recorded for the next.
    pub fn prefetch_session(&self, roots: &[StorePath]) -> Arc<Session> {
        let recorder = self.filler().ok().and_then(|f| {
            lock(&f.prefetch.orders)
                .as_ref()
                .map(|dir| super::order::Recorder::new(super::order::path_of(dir, roots)))
        });
        Arc::new(Session { recorder })
    }

    /// Queues a VM's closure for prefetch (the paths a lookup already
    /// queued stay as they are), on behalf of `session`: first the order
    /// recorded for these `roots` if there is one, then its store paths.
    pub fn prefetch_closure(
        &self,
        session: &Arc<Session>,
        roots: &[StorePath],
        paths: impl Iterator<Item = [u8; 20]>,
    ) {
        let Ok(f) = self.filler() else { return };
        let p = &f.prefetch;
        if !p.on.load(Relaxed) {
            return;
        }
        let interest = Some(Arc::downgrade(session));
        let dir = lock(&p.orders).clone();
        if let Some(dir) = dir {
            let mut q = lock(&p.queue);
            if q.orders < MAX_ORDERS_QUEUED {
                q.orders += 1;
                let file = super::order::path_of(&dir, roots);
                q.order
                    .push_back((Job::Order(file, paths.collect()), interest));
                drop(q);
                p.wake.notify_one();
                return;
            }
        }
        for h in paths {
            p.enqueue(h, interest.clone());
        }
    }

    /// Prefetches a recorded order's blobs in their order (the file read
    /// off the runtime's threads), then queues the closure's paths.
    async fn prefetch_order(
        self: Arc<Self>,
        file: std::path::PathBuf,
        then: Vec<[u8; 20]>,
        interest: Interest,
    ) {
        let order = tokio::task::spawn_blocking(move || super::order::load(&file))
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        if !order.is_empty() {
            tracing::debug!("prefetch: a recorded order of {} blobs", order.len());
        }
        for (digest, size) in order {
            if !alive(&interest) {
                return;
            }
            // The recorded size is the tenant's word: a hint for the
            // bound, never what the blob is checked against.
            if !self
                .prefetch_blob(digest, Size::Hint(size), &interest)
                .await
            {
                return;
            }
        }
        if !alive(&interest) {
            return;
        }
        if let Ok(f) = self.filler() {
            for h in then {
                f.prefetch.enqueue(h, interest.clone());
            }
        }
    }

    /// A VM read a blob (asked for its fill, or reported a hit on it while
    /// fresh): a prefetch hit if prefetch fetched it; wasted if prefetch
    /// fetched it and it is gone already (evicted before anyone read it).
    pub(super) fn prefetch_read(&self, digest: &B3Digest, present: bool) {
        let Ok(f) = self.filler() else { return };
        let Some(size) = f.prefetch.forget(digest) else {
            return;
        };
        if present || f.flights.is_flying(&Key::Blob(*digest)) {
            self.stats.prefetch_hits.fetch_add(1, Relaxed);
            self.stats.prefetch_hit_bytes.fetch_add(size, Relaxed);
        } else {
            self.stats.prefetch_wasted_bytes.fetch_add(size, Relaxed);
        }
    }

    /// Prefetches one store path: its tree and blobs, then queues its
    /// references (their path infos fetched now, so each is queued in
    /// turn when it was not cached yet).
    async fn prefetch_path(self: Arc<Self>, hash: [u8; 20], interest: Interest) -> Result<()> {
        let Some(info) = self.clone().blocking_info(hash, false).await?? else {
            return Ok(());
        };
        self.stats.prefetch_paths.fetch_add(1, Relaxed);
        match info.node {
            Node::Directory { digest, .. } => self.prefetch_tree(digest, &interest).await?,
            Node::File { digest, size, .. } => {
                self.prefetch_blob(digest, Size::Exact(size), &interest)
                    .await;
            }
            Node::Symlink { .. } => {}
        }
        let refs: Vec<[u8; 20]> = info
            .references
            .iter()
            .map(|r| *r.digest())
            .filter(|r| *r != hash)
            .collect();
        if !alive(&interest) {
            return Ok(());
        }
        futures::stream::iter(refs)
            .for_each_concurrent(PATHS_AT_ONCE, |r| {
                let (me, interest) = (self.clone(), interest.clone());
                async move {
                    if let Err(e) = me.get_info(&r, Some(interest)).await {
                        tracing::debug!(
                            "prefetch: reference {}: {e}",
                            crate::nix::nixbase32::encode(&r)
                        );
                    }
                }
            })
            .await;
        Ok(())
    }

    /// Walks a tree depth first in name order (as `find` does), fetching
    /// the tree first if it is not cached, and prefetches each missing
    /// blob as the walk meets it.
    async fn prefetch_tree(self: &Arc<Self>, root: B3Digest, interest: &Interest) -> Result<()> {
        let mut fetched = false;
        let mut stack: Vec<std::vec::IntoIter<Item>> = Vec::new();
        let mut next = Some(root);
        // Small blobs go in batches to a remote of ours.
        let mut batch = super::batch::Batch::default();
        loop {
            if let Some(d) = next.take() {
                let items = match self
                    .clone()
                    .blocking(move |c| c.prefetch_items(&d))
                    .await??
                {
                    Some(items) => items,
                    None if !fetched => {
                        fetched = true;
                        self.ensure_tree(root).await?;
                        match self
                            .clone()
                            .blocking(move |c| c.prefetch_items(&d))
                            .await??
                        {
                            Some(items) => items,
                            None => return Ok(()),
                        }
                    }
                    None => return Ok(()),
                };
                if stack.len() < MAX_DEPTH {
                    stack.push(items.into_iter());
                }
            }
            let Some(top) = stack.last_mut() else {
                self.prefetch_batch(batch.take(), Some(root), interest)
                    .await;
                return Ok(());
            };
            match top.next() {
                None => {
                    stack.pop();
                }
                Some(Item::Dir(d)) => next = Some(d),
                Some(Item::Blob(d, size)) if self.batches() && batch.fits(size) => {
                    if batch.add(d, size)
                        && !self
                            .prefetch_batch(batch.take(), Some(root), interest)
                            .await
                    {
                        return Ok(());
                    }
                }
                Some(Item::Blob(d, size)) => {
                    if !self.prefetch_blob(d, Size::Exact(size), interest).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// A cached directory's entries as the walk needs them: blobs not in
    /// the cache, and subdirectories; `None` when the directory is not
    /// cached.
    fn prefetch_items(&self, digest: &B3Digest) -> Result<Option<Vec<Item>>> {
        let Some(dir) = self.local_dir(digest, false)? else {
            return Ok(None);
        };
        let mut items = Vec::new();
        for (_, node) in dir.entries() {
            match node {
                Node::Directory { digest, .. } => items.push(Item::Dir(*digest)),
                Node::File { digest, size, .. } => {
                    if !self.local.blobs.path_of(digest).exists() {
                        items.push(Item::Blob(*digest, *size));
                    }
                }
                Node::Symlink { .. } => {}
            }
        }
        Ok(Some(items))
    }

    /// Makes a whole tree present (joining a fetch of it under way).
    async fn ensure_tree(self: &Arc<Self>, root: B3Digest) -> Result<()> {
        let f = self.filler()?;
        let this = self.clone();
        let rx = f.flights.join(Key::Tree(root), move |rep| async move {
            match this.fetch_tree(root, &rep).await {
                Ok(true) => Outcome::Stored,
                Ok(false) => Outcome::Absent,
                Err(e) => Outcome::failed(&e),
            }
        });
        flights::wait(rx, self.idle).await.into_result().map(|_| ())
    }

    /// Starts the prefetch of one blob once a fill slot is free; false
    /// when the walk stops: the budget of unread bytes is met, or the VM
    /// it is for went.
    async fn prefetch_blob(
        self: &Arc<Self>,
        digest: B3Digest,
        size: Size,
        interest: &Interest,
    ) -> bool {
        let Ok(f) = self.filler() else { return false };
        if !alive(interest) {
            self.stats.prefetch_cancelled.fetch_add(1, Relaxed);
            return false;
        }
        let p = &f.prefetch;
        let budget = p.budget.load(Relaxed);
        let bytes = size.bytes();
        if cost(bytes) > budget || !p.on.load(Relaxed) {
            return true;
        }
        if p.unread_bytes().saturating_add(bytes) > budget {
            p.at_bound(&self.stats);
            return false;
        }
        p.full.store(false, Relaxed);
        let Ok(permit) = p.fills.clone().acquire_owned().await else {
            return false;
        };
        if !alive(interest) {
            self.stats.prefetch_cancelled.fetch_add(1, Relaxed);
            return false;
        }
        let path = self.local.blobs.path_of(&digest);
        if tokio::fs::try_exists(path).await.unwrap_or(false) {
            return true;
        }
        // Noted now, not when the fetch task starts: the walk checks the
        // bound before its next blob. A fetch a guest started is its own.
        if !f.flights.is_flying(&Key::Blob(digest)) {
            p.note(digest, bytes);
        }
        let this = self.clone();
        let exact = match size {
            Size::Exact(n) => Some(n),
            Size::Hint(_) => None,
        };
        let rx = f.flights.join(Key::Blob(digest), move |rep| async move {
            let got = super::blob::fetch(&this, digest, exact, &rep).await;
            let actual = rep.borrow().bytes;
            this.prefetched(&digest, actual, got)
        });
        // The fill slot is held until the fetch ends, however long it
        // waits for one of the flights' slots: waiting only the idle
        // limit would let prefetch queue past its bound ahead of guests.
        tokio::spawn(async move {
            let _permit = permit;
            let mut rx = rx;
            loop {
                if let Some(o) = rx.borrow_and_update().outcome.clone() {
                    if let Outcome::Failed { message, .. } = o {
                        tracing::debug!("prefetch of blob {digest}: {message}");
                    }
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        true
    }
}

/// A blob's size as prefetch knows it.
#[derive(Clone, Copy)]
enum Size {
    /// From a directory entry: the blob is checked against it.
    Exact(u64),
    /// Recorded by a tenant: only counted against the bound (at most
    /// 1 GiB of it); the blob is checked against its digest.
    Hint(u64),
}

impl Size {
    fn bytes(self) -> u64 {
        match self {
            Size::Exact(n) => n,
            Size::Hint(n) => n.min(1 << 30),
        }
    }
}

impl Cache {
    /// How a prefetch fill of `digest` (`bytes` long) ended, counted and
    /// kept against the unread bound, or forgotten when it failed.
    pub(super) fn prefetched(&self, digest: &B3Digest, bytes: u64, got: Result<bool>) -> Outcome {
        let Ok(f) = self.filler() else {
            return Outcome::failed(&Error::InvalidRequest("not a filler".into()));
        };
        match got {
            Ok(true) => {
                f.prefetch.resize(digest, bytes);
                self.stats.prefetched_blobs.fetch_add(1, Relaxed);
                self.stats.prefetched_bytes.fetch_add(bytes, Relaxed);
                Outcome::Stored
            }
            Ok(false) => {
                f.prefetch.forget(digest);
                Outcome::Absent
            }
            Err(e) => {
                f.prefetch.forget(digest);
                Outcome::failed(&e)
            }
        }
    }
}

/// One step of a prefetch walk.
enum Item {
    Dir(B3Digest),
    Blob(B3Digest, u64),
}

/// Works the queue for as long as the cache lives: a few store paths at
/// a time, each on its own task.
async fn dispatch(cache: Weak<Cache>) {
    let paths = Arc::new(Semaphore::new(PATHS_AT_ONCE));
    loop {
        let wake = {
            let Some(c) = cache.upgrade() else { return };
            let Ok(f) = c.filler() else { return };
            match f.prefetch.next() {
                Some((Job::Order(file, then), interest)) => {
                    tokio::spawn(c.prefetch_order(file, then, interest));
                    continue;
                }
                Some((Job::Path(hash), interest)) => {
                    let Ok(permit) = paths.clone().acquire_owned().await else {
                        return;
                    };
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(e) = c.clone().prefetch_path(hash, interest.clone()).await {
                            tracing::debug!(
                                "prefetch of {}: {e}",
                                crate::nix::nixbase32::encode(&hash)
                            );
                        }
                        if let Ok(f) = c.filler() {
                            f.prefetch.done(&hash, &interest);
                        }
                    });
                    continue;
                }
                None => f.prefetch.wake.clone(),
            }
        };
        // Holding no reference to the cache; an enqueue since `next` left
        // a permit, so this returns at once.
        wake.notified().await;
    }
}
