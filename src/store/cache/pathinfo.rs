//! Path infos through the cache. A store path never changes once it
//! exists, so a cached path info is served for as long as it is cached,
//! remote or no remote; that the remote lacks a path is remembered only
//! for a moment, since paths can be added at any time.
use super::flights::{self, Key, Outcome};
use super::prefetch::Interest;
use super::space::cost;
use super::stats::Kind;
use super::{lock, Cache, RoleState, ABSENT_TTL, MAX_ABSENT};
use crate::nix::path_info::PathInfo;
use crate::store::pathinfo::PathInfoService;
use crate::store::{Error, Result};
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;

/// The cached path infos; lookups that fetch queue their store path for
/// prefetch on behalf of `.1` (`Some(None)`: the host's), or not at all
/// (`None`: a tenant's, whose closure is queued whole).
pub struct CachedPathInfoService(pub(super) Arc<Cache>, pub(super) Option<Interest>);

impl Cache {
    /// A cached path info, counted as a hit when `hit`; damaged ones
    /// count as absent, other errors are the caller's.
    fn local_info(&self, hash: &[u8; 20], hit: bool) -> Result<Option<PathInfo>> {
        self.found(
            self.local.infos.get_blocking(hash),
            Kind::PathInfo,
            Key::PathInfo(*hash),
            || self.local.infos.path_of(hash),
            hit,
        )
    }

    async fn store_info(&self, info: &PathInfo) -> Result<()> {
        let f = self.filler()?;
        // Room for what will be written: a path info with many references
        // takes several blocks.
        let len = prost::Message::encoded_len(&info.to_proto()) as u64;
        let room = f.space.reserve(cost(len), self.idle).await?;
        // A path info put again replaces its file: give back the old one's room.
        let replaced =
            std::fs::symlink_metadata(self.local.infos.path_of(info.store_path.digest()))
                .map(|m| cost(m.len()))
                .ok();
        let written = self.local.infos.write_cached(info)?;
        room.commit(cost(written));
        if let Some(old) = replaced {
            f.space.removed(old);
        }
        Ok(())
    }

    async fn fetch_info(
        &self,
        hash: [u8; 20],
        interest: Option<Interest>,
        rep: &flights::Reporter,
    ) -> Result<bool> {
        let got = self
            .remote
            .path_info
            .get_watched(&hash, self.idle, &|n| rep.send_modify(|p| p.bytes = n))
            .await?;
        let Some(info) = got else { return Ok(false) };
        self.store_info(&info).await?;
        if let (Ok(f), Some(interest)) = (self.filler(), interest) {
            f.prefetch.enqueue(hash, interest);
        }
        Ok(true)
    }

    pub(super) async fn get_info(
        self: &Arc<Self>,
        hash: &[u8; 20],
        interest: Option<Interest>,
    ) -> Result<Option<PathInfo>> {
        let h = *hash;
        let local = self.clone().blocking_info(h, true).await??;
        if local.is_some() {
            return Ok(local);
        }
        self.stats.miss(Kind::PathInfo);
        let f = match &self.role {
            RoleState::Reader(_) => return self.remote.path_info.get(hash).await,
            RoleState::Filler(f) => f,
        };
        if lock(&f.absent)
            .get(hash)
            .is_some_and(|t| t.elapsed() < ABSENT_TTL)
        {
            return Ok(None);
        }
        let this = self.clone();
        let rx = f.flights.join(Key::PathInfo(h), move |rep| async move {
            match this.fetch_info(h, interest, &rep).await {
                Ok(true) => Outcome::Stored,
                Ok(false) => Outcome::Absent,
                Err(e) => Outcome::failed(&e),
            }
        });
        if !flights::wait(rx, self.idle).await.into_result()? {
            let mut absent = lock(&f.absent);
            if absent.len() >= MAX_ABSENT {
                absent.retain(|_, t| t.elapsed() < ABSENT_TTL);
                if absent.len() >= MAX_ABSENT {
                    absent.clear();
                }
            }
            absent.insert(h, Instant::now());
            return Ok(None);
        }
        let again = self.clone().blocking_info(h, false).await??;
        again.map(Some).ok_or_else(|| {
            Error::Fetch(format!(
                "path info {} was evicted as soon as it was fetched: the cache is too small",
                crate::nix::nixbase32::encode(&h)
            ))
        })
    }

    pub(super) async fn blocking_info(
        self: Arc<Self>,
        hash: [u8; 20],
        hit: bool,
    ) -> Result<Result<Option<PathInfo>>> {
        tokio::task::spawn_blocking(move || self.local_info(&hash, hit))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))
    }
}

#[async_trait]
impl PathInfoService for CachedPathInfoService {
    async fn get(&self, hash: &[u8; 20]) -> Result<Option<PathInfo>> {
        self.0.get_info(hash, self.1.clone()).await
    }

    /// Hits only: a miss goes the async way, which fetches.
    fn get_blocking(&self, hash: &[u8; 20]) -> Option<Result<Option<PathInfo>>> {
        self.0
            .local_info(hash, true)
            .transpose()
            .map(|r| r.map(Some))
    }

    async fn put(&self, info: PathInfo) -> Result<PathInfo> {
        let back = self.0.remote.path_info.put(info).await?;
        if matches!(self.0.role, RoleState::Filler(_)) {
            self.0.store_info(&back).await?;
        }
        Ok(back)
    }

    /// The remote's list; the cached path infos when the remote cannot
    /// answer, so a host whose remote is down still lists what it serves.
    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        let cache = &self.0;
        Box::pin(async_stream::try_stream! {
            let mut remote = cache.remote.path_info.list();
            match remote.next().await {
                Some(Err(e)) => {
                    tracing::warn!("listing store paths: {e}; listing the cached ones");
                    let mut local = cache.local.infos.list();
                    while let Some(i) = local.next().await {
                        yield i?;
                    }
                }
                Some(Ok(first)) => {
                    yield first;
                    while let Some(i) = remote.next().await {
                        yield i?;
                    }
                }
                None => {}
            }
        })
    }
}
