//! Path info storage: store path metadata, looked up by the 20-byte hash part.
use crate::nix::path_info::PathInfo;
use crate::store::Result;
use async_trait::async_trait;
use futures::stream::BoxStream;

pub mod failover;
pub mod grpc;
pub mod local;
pub mod memory;
pub mod s3;

#[async_trait]
pub trait PathInfoService: Send + Sync + 'static {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>>;

    /// As `get`, for a caller that waits only while the answer makes
    /// progress: a backend that must fetch a whole NAR to answer (a Nix
    /// binary cache) fails when nothing arrives for `idle` and tells
    /// `progress` the bytes received so far. Others limit the whole call
    /// to `idle`.
    async fn get_watched(
        &self,
        digest: &[u8; 20],
        idle: std::time::Duration,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Option<PathInfo>> {
        let _ = progress;
        tokio::time::timeout(idle, self.get(digest))
            .await
            .map_err(|_| {
                crate::store::Error::Timeout(format!(
                    "path info {}: no answer from the remote store for {idle:?}",
                    crate::nix::nixbase32::encode(digest)
                ))
            })?
    }

    /// As `get`, on the calling thread and without the async runtime,
    /// where the backend has the answer on a local disk; `None` where it
    /// would have to ask elsewhere.
    fn get_blocking(&self, _digest: &[u8; 20]) -> Option<Result<Option<PathInfo>>> {
        None
    }
    /// Stores `info`, replacing an earlier entry for the same store path.
    async fn put(&self, info: PathInfo) -> Result<PathInfo>;
    fn list(&self) -> BoxStream<'_, Result<PathInfo>>;
}
