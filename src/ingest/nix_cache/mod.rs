//! A Nix binary cache as the host cache's upstream (`nix+http://`,
//! `nix+https://`, `nix+file://`, `nix+s3://`): the first lookup of a
//! store path fetches its narinfo, checks its signature against the
//! trusted keys, fetches its NAR (none, xz, zstd or bzip2), reads it into
//! a stage of the cache directory while hashing it, and moves the blobs
//! and directories into the cache only once NarHash and NarSize match
//! (see `crate::store::cache::sink`). From then on the path is served as
//! every cached path is, each blob checked by its BLAKE3 digest.
//!
//! The cache's flights make it one fetch per path however many VMs ask;
//! that the cache lacks a path is believed for `negative-ttl`.
//!
//! What a Nix cache cannot give is an object by its castore digest: a blob
//! or directory the host cache evicted (while the path info naming its
//! tree stayed) is found again through the store path it came with
//! ([`origins`]), whose NAR is then fetched again, once however many ask.
mod fetch;
pub mod origins;
mod source;

use crate::castore::{B3Digest, Directory, ValidatedGraph};
use crate::ingest::uploads::UploadBudget;
use crate::nix::path_info::PathInfo;
use crate::nix::signing::PublicKey;
use crate::store::blob::{BlobReader, BlobService, BlobWriter};
use crate::store::cache::Cache;
use crate::store::directory::DirectoryService;
use crate::store::nix_cache_addr::NixCacheAddr;
use crate::store::pathinfo::PathInfoService;
use crate::store::{Error, Result, Store, StoreOptions};
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

pub use source::valid_name;

/// Most store paths remembered as absent (and as refused).
const MAX_ABSENT: usize = 65_536;
/// How long a refused path stays refused without being fetched again:
/// a guest retrying in a loop must not fetch (and stage) its NAR each time.
const REFUSED_TTL: Duration = Duration::from_secs(60);
/// NARs read in at once: each may hold a decoder's memory (up to 128 MiB
/// for xz) and its directory listings (up to 64 MiB estimated).
const NAR_INGESTS: usize = 4;

/// A Nix binary cache read into a host cache.
pub struct NixCache {
    source: source::Source,
    trusted: Vec<PublicKey>,
    check_signatures: bool,
    negative_ttl: Duration,
    absent: Mutex<HashMap<[u8; 20], Instant>>,
    /// The host cache this one fills (set once it is open; weak, as that
    /// cache holds this store as its remote).
    cache: OnceLock<Weak<Cache>>,
    idle: Duration,
    uploads: UploadBudget,
    /// The address, for messages.
    what: String,
    origins: OnceLock<Arc<origins::Origins>>,
    /// Store paths being fetched again for an evicted object: one fetch,
    /// on a task of its own; its outcome (whether it was read in).
    refetching: Mutex<HashMap<[u8; 20], tokio::sync::watch::Receiver<Option<bool>>>>,
    /// Store paths refused lately, and why.
    refused: Mutex<HashMap<[u8; 20], (Instant, String)>>,
    ingests: tokio::sync::Semaphore,
    me: OnceLock<Weak<NixCache>>,
}

/// Opens the host cache (`opts.cache`, a filler's) in front of the Nix
/// binary cache at `addr`; `extra_keys` are trusted besides the address's
/// own (the daemon's `--trusted-public-keys`).
pub fn open(
    addr: &NixCacheAddr,
    extra_keys: &[PublicKey],
    opts: &StoreOptions,
) -> Result<(Store, Arc<Cache>)> {
    let Some(c) = &opts.cache else {
        return Err(Error::InvalidAddress(
            addr.to_string(),
            "a Nix binary cache is read through a host cache: add --cache-dir DIR".into(),
        ));
    };
    if c.role != crate::store::cache::Role::Filler {
        return Err(Error::InvalidAddress(
            addr.to_string(),
            "a Nix binary cache is read by the `daemon --cache-dir` that fills the cache; \
             per-VM daemons read that daemon (grpc+unix://)"
                .into(),
        ));
    }
    let mut trusted = Vec::new();
    for k in &addr.trusted_public_keys {
        trusted.push(PublicKey::parse(k).map_err(|e| {
            Error::InvalidAddress(addr.to_string(), format!("trusted-public-keys {k:?}: {e}"))
        })?);
    }
    trusted.extend(extra_keys.iter().cloned());
    if addr.check_signatures && trusted.is_empty() {
        return Err(Error::InvalidAddress(
            addr.shown(),
            "no trusted key: every narinfo must be signed by one (give the cache's public key \
             as ?trusted-public-keys=NAME:KEY or --trusted-public-keys, or \
             ?check-signatures=false to trust the cache unsigned)"
                .into(),
        ));
    }
    let nix = Arc::new(NixCache {
        source: source::Source::open(&addr.location, opts.idle_timeout)?,
        trusted,
        check_signatures: addr.check_signatures,
        negative_ttl: addr.negative_ttl,
        absent: Mutex::new(HashMap::new()),
        cache: OnceLock::new(),
        idle: opts.idle_timeout,
        uploads: UploadBudget::default(),
        // the cache's place, without its keys
        what: addr.shown(),
        origins: OnceLock::new(),
        refetching: Mutex::new(HashMap::new()),
        refused: Mutex::new(HashMap::new()),
        ingests: tokio::sync::Semaphore::new(NAR_INGESTS),
        me: OnceLock::new(),
    });
    let _ = nix.me.set(Arc::downgrade(&nix));
    if !nix.check_signatures {
        tracing::warn!(
            "{}: check-signatures=false: every narinfo the cache answers is trusted",
            nix.what
        );
    }
    let remote = Store {
        blob: nix.clone(),
        directory: nix.clone(),
        path_info: nix.clone(),
    };
    let cache = Cache::open(c, remote, None, opts.idle_timeout)?;
    let _ = nix.cache.set(Arc::downgrade(&cache));
    let origins = origins::Origins::open(cache.dir())?;
    if tokio::runtime::Handle::try_current().is_ok() {
        origins.take_stock(cache.clone());
    }
    let _ = nix.origins.set(origins);
    Ok((cache.store(), cache))
}

impl NixCache {
    fn cache(&self) -> Result<Arc<Cache>> {
        self.cache
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::Fetch("the host cache is closed".into()))
    }

    /// Whether the cache said it lacks `hash` recently.
    fn known_absent(&self, hash: &[u8; 20]) -> bool {
        crate::lock(&self.absent)
            .get(hash)
            .is_some_and(|t| t.elapsed() < self.negative_ttl)
    }

    /// Notes where the objects a fetch moved into the cache came from.
    async fn record_origins(&self, hash: [u8; 20], moved: crate::store::cache::sink::Committed) {
        let (Some(o), Ok(cache)) = (self.origins.get().cloned(), self.cache()) else {
            return;
        };
        let _ = tokio::task::spawn_blocking(move || {
            o.record(&cache, &hash, &moved.blobs, &moved.directories)
        })
        .await;
    }

    /// Fetches the store path an evicted object came with again, unless
    /// `back` says it is back already. The fetch runs on its own task, one
    /// however many ask: a caller that stops waiting (its own timeout, for
    /// a large NAR) does not stop it, and the next read finds the object.
    async fn fetch_again(
        &self,
        digest: &B3Digest,
        directory: bool,
        back: impl Fn() -> bool,
    ) -> Result<bool> {
        let Some(o) = self.origins.get() else {
            return Ok(false);
        };
        let Some(hash) = o.of(digest, directory) else {
            tracing::debug!(
                "{} {digest} is not in the host cache, and no store path it came with is \
                 recorded: it cannot be fetched from {} again",
                if directory { "directory" } else { "blob" },
                self.what
            );
            return Ok(false);
        };
        if back() {
            return Ok(true);
        }
        let mut rx = {
            let mut map = crate::lock(&self.refetching);
            match map.get(&hash) {
                Some(rx) => rx.clone(),
                None => {
                    let Some(me) = self.me.get().and_then(Weak::upgrade) else {
                        return Ok(false);
                    };
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    map.insert(hash, rx.clone());
                    if let Ok(c) = self.cache() {
                        c.stats()
                            .upstream_refetches
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::info!(
                        "{}: fetching {} again: its {} {digest} was evicted",
                        self.what,
                        crate::nix::nixbase32::encode(&hash),
                        if directory { "directory" } else { "blob" },
                    );
                    tokio::spawn(async move {
                        let got = me.fetch(&hash, &|_| {}).await;
                        crate::lock(&me.refetching).remove(&hash);
                        let _ = tx.send(Some(matches!(got, Ok(Some(_)))));
                    });
                    rx
                }
            }
        };
        loop {
            if let Some(fetched) = *rx.borrow_and_update() {
                return Ok(fetched && back());
            }
            if rx.changed().await.is_err() {
                return Ok(back());
            }
        }
    }

    /// Whether `hash` was refused moments ago (the same bytes would be
    /// fetched and refused again): its refusal.
    fn refused_lately(&self, hash: &[u8; 20]) -> Option<Error> {
        let refused = crate::lock(&self.refused);
        let (at, why) = refused.get(hash)?;
        // the reason without its kind's prefix ("not trusted: ...")
        let why = why.split_once(": ").map_or(why.as_str(), |(_, w)| w);
        (at.elapsed() < REFUSED_TTL)
            .then(|| Error::Protocol(format!("refused {:.1?} ago: {why}", at.elapsed())))
    }

    fn remember_refused(&self, hash: [u8; 20], why: String) {
        let mut refused = crate::lock(&self.refused);
        if refused.len() >= MAX_ABSENT {
            refused.retain(|_, (t, _)| t.elapsed() < REFUSED_TTL);
            if refused.len() >= MAX_ABSENT {
                refused.clear();
            }
        }
        refused.insert(hash, (Instant::now(), why));
    }

    fn remember_absent(&self, hash: [u8; 20]) {
        if self.negative_ttl.is_zero() {
            return;
        }
        let mut absent = crate::lock(&self.absent);
        if absent.len() >= MAX_ABSENT {
            let ttl = self.negative_ttl;
            absent.retain(|_, t| t.elapsed() < ttl);
            if absent.len() >= MAX_ABSENT {
                absent.clear();
            }
        }
        absent.insert(hash, Instant::now());
    }
}

#[async_trait]
impl PathInfoService for NixCache {
    async fn get(&self, hash: &[u8; 20]) -> Result<Option<PathInfo>> {
        PathInfoService::get_watched(self, hash, self.idle, &|_| {}).await
    }

    async fn get_watched(
        &self,
        hash: &[u8; 20],
        idle: Duration,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Option<PathInfo>> {
        let _ = idle; // the source's own limit is the store timeout
        if self.known_absent(hash) {
            return Ok(None);
        }
        if let Some(e) = self.refused_lately(hash) {
            return Err(e);
        }
        let got = self.fetch(hash, progress).await;
        if let Ok(None) = got {
            self.remember_absent(*hash);
        }
        got
    }

    async fn put(&self, info: PathInfo) -> Result<PathInfo> {
        Err(Error::InvalidRequest(format!(
            "{}: {}: a Nix binary cache upstream is read-only",
            self.what, info.store_path
        )))
    }

    /// A binary cache has no listing of its store paths.
    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        Box::pin(futures::stream::empty())
    }
}

/// By digest: what the host cache holds, and what it evicted fetched again
/// through its store path (see the module's notes).
#[async_trait]
impl BlobService for NixCache {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        let cache = self.cache()?;
        Ok(cache.holds(digest, false)
            || self
                .origins
                .get()
                .is_some_and(|o| o.of(digest, false).is_some()))
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        let cache = self.cache()?;
        if let Some(r) = cache.held_blob(digest).await? {
            return Ok(Some(r));
        }
        if !self
            .fetch_again(digest, false, || cache.holds(digest, false))
            .await?
        {
            return Ok(None);
        }
        cache.held_blob(digest).await
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        Err(Error::InvalidRequest(format!(
            "{}: a Nix binary cache upstream is read-only",
            self.what
        )))
    }
}

#[async_trait]
impl DirectoryService for NixCache {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        let cache = self.cache()?;
        if let Some(d) = cache.held_directory(digest).await? {
            return Ok(Some(d));
        }
        if !self
            .fetch_again(digest, true, || cache.holds(digest, true))
            .await?
        {
            return Ok(None);
        }
        cache.held_directory(digest).await
    }

    async fn put_graph(&self, _graph: ValidatedGraph) -> Result<B3Digest> {
        Err(Error::InvalidRequest(format!(
            "{}: a Nix binary cache upstream is read-only",
            self.what
        )))
    }
}
