//! The host cache's own service, served by the daemon that owns a cache
//! directory: that daemon is the only writer, so the per-VM daemons that
//! read the same directory ask it to fill their misses (one fetch serves
//! them all) and report the hits they served (so eviction sees them).
use super::store::digest_arg;
use futures::stream::BoxStream;
use tonic::{Request, Response, Status};

/// Most time between a cache fill's progress messages while its bytes
/// move: well under any reader's idle limit (whole seconds).
pub(super) const FILL_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The host cache's own service (`tvix_virtiofsd.cache.v1`), served by a
/// `daemon --cache-dir`: per-VM daemons reading the same cache directory
/// ask it to fill blobs there, and report the hits they served.
#[derive(Clone)]
pub struct CacheServer {
    cache: std::sync::Arc<crate::store::cache::Cache>,
}

impl CacheServer {
    pub fn new(cache: std::sync::Arc<crate::store::cache::Cache>) -> Self {
        Self { cache }
    }
}

#[tonic::async_trait]
impl crate::wire::cache::cache_service_server::CacheService for CacheServer {
    type FillBlobStream = BoxStream<'static, Result<crate::wire::cache::FillProgress, Status>>;
    type ReadBlobsStream = super::read_blobs::PieceStream;
    type FillBlobsStream = super::fill_blobs::DoneStream;

    async fn fill_blobs(
        &self,
        req: Request<crate::wire::cache::FillBlobsRequest>,
    ) -> Result<Response<Self::FillBlobsStream>, Status> {
        let blobs = super::fill_blobs::blobs_of(req.get_ref())?;
        super::fill_blobs::serve(&self.cache, &blobs).map(Response::new)
    }

    /// From the cache (its misses fetched into it), for a host cache in
    /// front of this one.
    async fn read_blobs(
        &self,
        req: Request<crate::wire::cache::ReadBlobsRequest>,
    ) -> Result<Response<Self::ReadBlobsStream>, Status> {
        let blobs = self.cache.store().blob;
        super::read_blobs::serve(blobs, req.into_inner()).map(Response::new)
    }

    async fn fill_blob(
        &self,
        req: Request<crate::wire::cache::FillBlobRequest>,
    ) -> Result<Response<Self::FillBlobStream>, Status> {
        use crate::store::cache::flights::Outcome;
        use crate::wire::cache::FillProgress;
        let req = req.into_inner();
        let digest = digest_arg(&req.digest)?;
        let size = (req.size > 0).then_some(req.size);
        let mut rx = self.cache.fill_blob(digest, size)?;
        let s = async_stream::try_stream! {
            // Progress only proves a long fill alive to the reader's idle
            // limit: a fill that ends within FILL_PROGRESS_EVERY sends one
            // message, its end (each message woke a waiting reader thread).
            let mut said = std::time::Instant::now();
            loop {
                let p = rx.borrow_and_update().clone();
                match p.outcome {
                    None => {
                        if said.elapsed() >= FILL_PROGRESS_EVERY {
                            said = std::time::Instant::now();
                            yield FillProgress { bytes: p.bytes, done: false, fd_seq: 0 };
                        }
                    }
                    Some(Outcome::Stored) => {
                        yield FillProgress { bytes: p.bytes, done: true, fd_seq: 0 };
                        return;
                    }
                    Some(o) => {
                        o.into_result().map_err(Status::from)?;
                        Err(Status::not_found(format!("blob {digest}")))?;
                    }
                }
                if rx.changed().await.is_err() {
                    Err(Status::internal("the fill ended without an outcome"))?;
                }
            }
        };
        Ok(Response::new(Box::pin(s)))
    }

    async fn touch(
        &self,
        req: Request<crate::wire::cache::TouchRequest>,
    ) -> Result<Response<crate::wire::cache::TouchResponse>, Status> {
        use crate::store::cache::stats::Kind;
        let req = req.into_inner();
        let cache = self.cache.clone();
        // utimensat per object: off the async threads.
        tokio::task::spawn_blocking(move || {
            cache.touch(Kind::Blob, req.blobs.into_iter().map(|b| b.to_vec()));
            cache.touch(
                Kind::Directory,
                req.directories.into_iter().map(|b| b.to_vec()),
            );
            cache.touch(
                Kind::PathInfo,
                req.path_infos.into_iter().map(|b| b.to_vec()),
            );
            cache.fresh_reads(req.fresh_blobs.into_iter().map(|b| b.to_vec()));
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(crate::wire::cache::TouchResponse {}))
    }
}

/// The cache service of a daemon without a cache directory: only
/// ReadBlobs, from its store (a host cache filling ahead of VMs asks it);
/// FillBlob(s) and Touch are UNIMPLEMENTED, as readers expect of a store that
/// does not fill.
#[derive(Clone)]
pub struct BlobsOnlyServer {
    blobs: std::sync::Arc<dyn crate::store::blob::BlobService>,
}

impl BlobsOnlyServer {
    pub fn new(blobs: std::sync::Arc<dyn crate::store::blob::BlobService>) -> Self {
        Self { blobs }
    }
}

#[tonic::async_trait]
impl crate::wire::cache::cache_service_server::CacheService for BlobsOnlyServer {
    type FillBlobStream = BoxStream<'static, Result<crate::wire::cache::FillProgress, Status>>;
    type ReadBlobsStream = super::read_blobs::PieceStream;
    type FillBlobsStream = super::fill_blobs::DoneStream;

    async fn fill_blob(
        &self,
        _req: Request<crate::wire::cache::FillBlobRequest>,
    ) -> Result<Response<Self::FillBlobStream>, Status> {
        Err(Status::unimplemented("this daemon has no --cache-dir"))
    }

    async fn fill_blobs(
        &self,
        _req: Request<crate::wire::cache::FillBlobsRequest>,
    ) -> Result<Response<Self::FillBlobsStream>, Status> {
        Err(Status::unimplemented("this daemon has no --cache-dir"))
    }

    async fn touch(
        &self,
        _req: Request<crate::wire::cache::TouchRequest>,
    ) -> Result<Response<crate::wire::cache::TouchResponse>, Status> {
        Err(Status::unimplemented("this daemon has no --cache-dir"))
    }

    async fn read_blobs(
        &self,
        req: Request<crate::wire::cache::ReadBlobsRequest>,
    ) -> Result<Response<Self::ReadBlobsStream>, Status> {
        super::read_blobs::serve(self.blobs.clone(), req.into_inner()).map(Response::new)
    }
}
