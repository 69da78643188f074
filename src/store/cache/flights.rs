//! One fetch per object: concurrent misses for the same object, from one
//! client or many, join the fetch under way instead of starting their own.
//! A fetch runs on its own task, so a waiter that gives up (a guest's
//! timeout, a client gone) does not cancel it for the others.
use super::stats::CacheStats;
use crate::castore::B3Digest;
use crate::lock;
use crate::store::{Error, Result};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// What is being fetched.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    Blob(B3Digest),
    Directory(B3Digest),
    /// A directory and everything below it.
    Tree(B3Digest),
    PathInfo([u8; 20]),
}

/// As logs name them: digests as elsewhere, store paths by their hash.
impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Blob(d) => write!(f, "blob {d}"),
            Key::Directory(d) => write!(f, "directory {d}"),
            Key::Tree(d) => write!(f, "directory tree {d}"),
            Key::PathInfo(h) => write!(f, "path info {}", crate::nix::nixbase32::encode(h)),
        }
    }
}

/// How a fetch ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The object is in the cache directory.
    Stored,
    /// The remote does not have it.
    Absent,
    Failed {
        timeout: bool,
        /// The object does not fit in the cache.
        exhausted: bool,
        message: Arc<str>,
    },
}

impl Outcome {
    pub fn failed(e: &Error) -> Self {
        Outcome::Failed {
            timeout: e.is_timeout(),
            exhausted: matches!(e, Error::ResourceExhausted(_)),
            message: e.to_string().into(),
        }
    }

    /// `Ok(true)` stored, `Ok(false)` absent.
    pub fn into_result(self) -> Result<bool> {
        match self {
            Outcome::Stored => Ok(true),
            Outcome::Absent => Ok(false),
            Outcome::Failed {
                timeout: true,
                message,
                ..
            } => Err(Error::Timeout(message.to_string())),
            Outcome::Failed {
                exhausted: true,
                message,
                ..
            } => Err(Error::ResourceExhausted(message.to_string())),
            Outcome::Failed { message, .. } => Err(Error::Fetch(message.to_string())),
        }
    }
}

/// Where a fetch stands: bytes so far, and how it ended.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub bytes: u64,
    pub outcome: Option<Outcome>,
}

pub type Reporter = Arc<watch::Sender<Progress>>;

/// Fetches under way, by key.
pub struct Flights {
    map: Mutex<HashMap<Key, watch::Receiver<Progress>>>,
    stats: Arc<CacheStats>,
    /// Bounds the fetches running at once (each holds a connection slot
    /// and a reservation of disk space).
    running: Arc<Semaphore>,
}

/// Most fetches from the remote at once.
const MAX_RUNNING: usize = 160;

/// Takes a finished (or panicked) fetch out of the map, so the next miss
/// starts afresh.
struct Landing {
    flights: Arc<Flights>,
    key: Key,
}

impl Drop for Landing {
    fn drop(&mut self) {
        lock(&self.flights.map).remove(&self.key);
        self.flights.stats.fills_in_flight.fetch_sub(1, Relaxed);
    }
}

impl Flights {
    pub fn new(stats: Arc<CacheStats>) -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::new(HashMap::new()),
            stats,
            running: Arc::new(Semaphore::new(MAX_RUNNING)),
        })
    }

    /// Whether a fetch of `key` is under way.
    pub fn is_flying(&self, key: &Key) -> bool {
        lock(&self.map).contains_key(key)
    }

    /// Joins the fetch of `key`, starting `fetch` on a task of its own if
    /// none is under way. Must be called inside the runtime.
    pub fn join<F, Fut>(self: &Arc<Self>, key: Key, fetch: F) -> watch::Receiver<Progress>
    where
        F: FnOnce(Reporter) -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        self.join_within(key, fetch, true)
    }

    /// As [`Flights::join`], for a fetch bounded elsewhere: a blob of a
    /// prefetch batch, which is one remote call however many blobs it
    /// holds, and whose batch holds prefetch's fill slots. Taking a
    /// running slot each, a batch's blobs left guests' misses and other
    /// batches waiting for slots no request was using.
    pub fn join_batched<F, Fut>(self: &Arc<Self>, key: Key, fetch: F) -> watch::Receiver<Progress>
    where
        F: FnOnce(Reporter) -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        self.join_within(key, fetch, false)
    }

    fn join_within<F, Fut>(
        self: &Arc<Self>,
        key: Key,
        fetch: F,
        bounded: bool,
    ) -> watch::Receiver<Progress>
    where
        F: FnOnce(Reporter) -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let mut map = lock(&self.map);
        if let Some(rx) = map.get(&key) {
            self.stats.dedup_waits.fetch_add(1, Relaxed);
            return rx.clone();
        }
        let (tx, rx) = watch::channel(Progress::default());
        map.insert(key, rx.clone());
        drop(map);
        self.stats.fills_in_flight.fetch_add(1, Relaxed);
        self.stats.fills.fetch_add(1, Relaxed);
        let tx = Arc::new(tx);
        let fut = fetch(tx.clone());
        let landing = Landing {
            flights: self.clone(),
            key,
        };
        let running = self.running.clone();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let outcome = if !bounded {
                fut.await
            } else {
                match running.acquire_owned().await {
                    Ok(_permit) => fut.await,
                    Err(_) => Outcome::Failed {
                        timeout: false,
                        exhausted: false,
                        message: "cache is shutting down".into(),
                    },
                }
            };
            if let Outcome::Failed { message, .. } = &outcome {
                stats.fill_errors.fetch_add(1, Relaxed);
                tracing::warn!("cache fill of {key:?}: {message}");
            }
            // Out of the map first: a miss from now on starts a new fetch.
            drop(landing);
            tx.send_modify(|p| p.outcome = Some(outcome));
        });
        rx
    }
}

/// Waits for a fetch to end; gives up when it makes no progress for `idle`.
pub async fn wait(mut rx: watch::Receiver<Progress>, idle: Duration) -> Outcome {
    loop {
        if let Some(o) = rx.borrow_and_update().outcome.clone() {
            return o;
        }
        match tokio::time::timeout(idle, rx.changed()).await {
            Err(_) => {
                return Outcome::Failed {
                    timeout: true,
                    exhausted: false,
                    message: format!("no progress from the remote store for {idle:?}").into(),
                }
            }
            Ok(Err(_)) => {
                return Outcome::Failed {
                    timeout: false,
                    exhausted: false,
                    message: "the fetch ended without an outcome".into(),
                }
            }
            Ok(Ok(())) => {}
        }
    }
}
