//! gRPC servers that expose any backend as the tvix-store protocol.
pub mod bounds;
pub mod tenants;

use crate::castore::{B3Digest, Directory, LeavesFirst, Node};
use crate::host::free_space::{free_bytes, FREE_CHECK_EVERY};
use crate::nix::path_info::PathInfo;
use crate::store::{Error, Store};
use crate::wire::castore as cpb;
use crate::wire::store as spb;
use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// Chunk size of blob reads we serve.
const READ_CHUNK: usize = 256 << 10;

fn digest_arg(b: &[u8]) -> Result<B3Digest, Status> {
    B3Digest::try_from(b).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn read_only() -> Status {
    Status::from(Error::ReadOnly)
}

/// What one client may make a writable daemon hold or write.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Directories in one Put (the whole graph is checked in memory before
    /// any of it is stored).
    pub put_directories: usize,
    /// Bytes those directories may take in memory.
    pub put_directory_bytes: u64,
    /// Blob Puts are refused while the store's file system has less room
    /// than this (checked before and every few MiB during a Put); None
    /// for stores not on a local disk.
    pub min_free: Option<(std::path::PathBuf, u64)>,
    /// Turns for CalculateNAR (shared with the binary cache's GET /nar):
    /// each walk may hold a tree of up to 512 MiB and visit 2^26 nodes.
    pub nar_renders: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            put_directories: crate::store::directory::MAX_TREE_DIRECTORIES,
            put_directory_bytes: crate::store::directory::MAX_TREE_BYTES,
            min_free: None,
            nar_renders: std::sync::Arc::new(tokio::sync::Semaphore::new(
                crate::serve::binary_cache::DEFAULT_NAR_RENDERS,
            )),
        }
    }
}

/// Longest a CalculateNAR waits for a turn before RESOURCE_EXHAUSTED.
const RENDER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most time between a cache fill's progress messages while its bytes
/// move: well under any reader's idle limit (whole seconds).
const FILL_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Serves the three services of `store`; `read_only` refuses every Put.
#[derive(Clone)]
pub struct StoreServer {
    store: Store,
    read_only: bool,
    limits: Limits,
}

impl StoreServer {
    pub fn new(store: Store, read_only: bool) -> Self {
        Self {
            store,
            read_only,
            limits: Limits::default(),
        }
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Refuses a write while the store's disk is short of room.
    fn check_room(&self) -> Result<(), Status> {
        let Some((dir, min)) = &self.limits.min_free else {
            return Ok(());
        };
        let free = free_bytes(dir).map_err(|e| {
            Status::internal(format!("checking free space of {}: {e}", dir.display()))
        })?;
        if free < *min {
            return Err(Status::resource_exhausted(format!(
                "the store's disk has {} MiB free, below the {} MiB kept free (--min-free-space)",
                free >> 20,
                min >> 20
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl cpb::blob_service_server::BlobService for StoreServer {
    type ReadStream = BoxStream<'static, Result<cpb::BlobChunk, Status>>;

    async fn stat(
        &self,
        req: Request<cpb::StatBlobRequest>,
    ) -> Result<Response<cpb::StatBlobResponse>, Status> {
        let digest = digest_arg(&req.get_ref().digest)?;
        if self.store.blob.has(&digest).await? {
            Ok(Response::new(cpb::StatBlobResponse::default()))
        } else {
            Err(Status::not_found(format!("blob {digest}")))
        }
    }

    async fn read(
        &self,
        req: Request<cpb::ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let digest = digest_arg(&req.get_ref().digest)?;
        let reader = self
            .store
            .blob
            .open_read(&digest)
            .await?
            .ok_or_else(|| Status::not_found(format!("blob {digest}")))?;
        let s = tokio_util::io::ReaderStream::with_capacity(reader, READ_CHUNK).map(|r| {
            r.map(|data| cpb::BlobChunk { data })
                .map_err(|e| Status::internal(e.to_string()))
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn put(
        &self,
        req: Request<Streaming<cpb::BlobChunk>>,
    ) -> Result<Response<cpb::PutBlobResponse>, Status> {
        if self.read_only {
            return Err(read_only());
        }
        self.check_room()?;
        let mut stream = req.into_inner();
        let mut w = self.store.blob.open_write().await?;
        let mut since_check = 0u64;
        while let Some(chunk) = stream.message().await? {
            since_check += chunk.data.len() as u64;
            if since_check >= FREE_CHECK_EVERY {
                since_check = 0;
                // dropping the writer discards what was written
                self.check_room()?;
            }
            w.write(&chunk.data).await?;
        }
        let digest = w.close().await?;
        Ok(Response::new(cpb::PutBlobResponse {
            digest: digest.into(),
        }))
    }
}

#[tonic::async_trait]
impl cpb::directory_service_server::DirectoryService for StoreServer {
    type GetStream = BoxStream<'static, Result<cpb::Directory, Status>>;

    async fn get(
        &self,
        req: Request<cpb::GetDirectoryRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let req = req.into_inner();
        let Some(cpb::get_directory_request::ByWhat::Digest(d)) = req.by_what else {
            return Err(Status::invalid_argument("by_what missing"));
        };
        let root = digest_arg(&d)?;
        let svc = self.store.directory.clone();
        if req.recursive {
            return Ok(Response::new(batched(svc, root)));
        }
        let s = async_stream::try_stream! {
            if let Some(d) = svc.get(&root).await? {
                yield d.to_proto();
            }
        };
        Ok(Response::new(Box::pin(s)))
    }

    async fn put(
        &self,
        req: Request<Streaming<cpb::Directory>>,
    ) -> Result<Response<cpb::PutDirectoryResponse>, Status> {
        if self.read_only {
            return Err(read_only());
        }
        self.check_room()?;
        let mut stream = req.into_inner();
        let mut graph = LeavesFirst::new();
        let (mut count, mut bytes) = (0usize, 0u64);
        while let Some(msg) = stream.message().await? {
            let dir = Directory::try_from(msg).map_err(Error::from)?;
            count += 1;
            bytes += dir.heap_size();
            if count > self.limits.put_directories || bytes > self.limits.put_directory_bytes {
                return Err(Status::resource_exhausted(format!(
                    "a directory Put may carry at most {} directories and {} MiB",
                    self.limits.put_directories,
                    self.limits.put_directory_bytes >> 20
                )));
            }
            graph.add(dir).map_err(Error::from)?;
        }
        let graph = graph.finish().map_err(Error::from)?;
        let root = self.store.directory.put_graph(graph).await?;
        Ok(Response::new(cpb::PutDirectoryResponse {
            root_digest: root.into(),
        }))
    }
}

#[tonic::async_trait]
impl spb::path_info_service_server::PathInfoService for StoreServer {
    type ListStream = BoxStream<'static, Result<spb::PathInfo, Status>>;

    async fn get(
        &self,
        req: Request<spb::GetPathInfoRequest>,
    ) -> Result<Response<spb::PathInfo>, Status> {
        let Some(spb::get_path_info_request::ByWhat::ByOutputHash(h)) = req.into_inner().by_what
        else {
            return Err(Status::invalid_argument("by_what missing"));
        };
        let digest = <[u8; 20]>::try_from(&h[..]).map_err(|_| {
            Status::invalid_argument(format!("output hash is {} bytes, expected 20", h.len()))
        })?;
        match self.store.path_info.get(&digest).await? {
            Some(info) => Ok(Response::new(info.to_proto())),
            None => Err(Status::not_found("path info not found")),
        }
    }

    async fn put(&self, req: Request<spb::PathInfo>) -> Result<Response<spb::PathInfo>, Status> {
        if self.read_only {
            return Err(read_only());
        }
        let info = PathInfo::try_from(req.into_inner()).map_err(Error::from)?;
        // Nothing dangling is published: the tree must have been uploaded first.
        let present = match &info.node {
            Node::Directory { digest, .. } => self.store.directory.get(digest).await?.is_some(),
            Node::File { digest, .. } => self.store.blob.has(digest).await?,
            Node::Symlink { .. } => true,
        };
        if !present {
            return Err(Status::failed_precondition(format!(
                "contents of {} were not uploaded before its path info",
                info.store_path
            )));
        }
        let info = self.store.path_info.put(info).await?;
        Ok(Response::new(info.to_proto()))
    }

    async fn calculate_nar(
        &self,
        req: Request<cpb::Node>,
    ) -> Result<Response<spb::CalculateNarResponse>, Status> {
        let (_, node) = Node::from_proto_root(req.get_ref()).map_err(Error::from)?;
        let turns = self.limits.nar_renders.acquire();
        let Ok(Ok(_turn)) = tokio::time::timeout(RENDER_WAIT, turns).await else {
            return Err(Status::resource_exhausted(format!(
                "every turn to render a NAR is taken and none came free within {} s \
                 (--max-nar-renders): retry later",
                RENDER_WAIT.as_secs()
            )));
        };
        let (nar_size, sha) = crate::ingest::calculate_nar(&node, &self.store).await?;
        Ok(Response::new(spb::CalculateNarResponse {
            nar_size,
            nar_sha256: bytes::Bytes::copy_from_slice(&sha),
        }))
    }

    async fn list(
        &self,
        _: Request<spb::ListPathInfoRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let svc = self.store.path_info.clone();
        let s = async_stream::try_stream! {
            let mut s = svc.list();
            while let Some(info) = s.next().await {
                yield info?.to_proto();
            }
        };
        Ok(Response::new(Box::pin(s)))
    }
}

/// Request bodies whose errors keep no HTTP/2 reset reason. tonic hands a
/// handler a client's RST_STREAM(CANCEL) as a clean end of the request
/// stream, so without this an abandoned upload would be stored truncated.
pub struct ResetIsError(tonic::body::Body);

impl http_body::Body for ResetIsError {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        match std::task::ready!(std::pin::Pin::new(&mut self.0).poll_frame(cx)) {
            Some(Err(e)) => std::task::Poll::Ready(Some(Err(Status::aborted(format!(
                "request stream broken off: {}",
                e.message()
            ))))),
            other => std::task::Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// For `Server::builder().layer(tower::util::MapRequestLayer::new(reset_is_error))`.
pub fn reset_is_error(
    req: tonic::codegen::http::Request<tonic::body::Body>,
) -> tonic::codegen::http::Request<tonic::body::Body> {
    req.map(|b| tonic::body::Body::new(ResetIsError(b)))
}

/// Which wire families a daemon answers (both by default): a snix name is
/// served by the same service as its tvix name.
#[derive(Clone, Copy, Debug)]
pub struct Families {
    pub tvix: bool,
    pub snix: bool,
}

impl Default for Families {
    fn default() -> Self {
        Self {
            tvix: true,
            snix: true,
        }
    }
}

/// For `Server::builder().layer(tower::util::MapRequestLayer::new(..))`:
/// routes snix's request paths to the tvix services, and a family that is
/// off to no service at all (UNIMPLEMENTED, as from a server without it).
pub fn wire_names(
    families: Families,
) -> impl Fn(
    tonic::codegen::http::Request<tonic::body::Body>,
) -> tonic::codegen::http::Request<tonic::body::Body>
       + Clone {
    use crate::store::channel::{snix_path, tvix_path};
    move |mut req| {
        let path = req.uri().path();
        let new = if let Some(t) = tvix_path(path) {
            families.snix.then_some(t).or(Some(format!("/off{path}")))
        } else if snix_path(path).is_some() && !families.tvix {
            Some(format!("/off{path}"))
        } else {
            None
        };
        if let Some(p) = new {
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = p.parse().ok();
            if let Ok(uri) = tonic::codegen::http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        req
    }
}

/// gRPC calls served, by method, and how long each took to its answer's
/// headers (a stream's first message), for `daemon --metrics-listen`.
#[derive(Default)]
pub struct CallMetrics {
    calls: [crate::wire::prometheus::Histogram; METHODS.len() + 1],
}

/// The methods counted by name (tvix's; snix's count as the same); the
/// slot after them holds every other path.
const METHODS: [&str; 11] = [
    "/tvix.castore.v1.BlobService/Stat",
    "/tvix.castore.v1.BlobService/Read",
    "/tvix.castore.v1.BlobService/Put",
    "/tvix.castore.v1.DirectoryService/Get",
    "/tvix.castore.v1.DirectoryService/Put",
    "/tvix.store.v1.PathInfoService/Get",
    "/tvix.store.v1.PathInfoService/Put",
    "/tvix.store.v1.PathInfoService/CalculateNAR",
    "/tvix.store.v1.PathInfoService/List",
    "/tvix_virtiofsd.cache.v1.CacheService/Fill",
    "/tvix_virtiofsd.cache.v1.CacheService/Touch",
];

impl CallMetrics {
    fn slot(path: &str) -> usize {
        let tvix = crate::store::channel::tvix_path(path);
        let path = tvix.as_deref().unwrap_or(path);
        METHODS
            .iter()
            .position(|m| *m == path)
            .unwrap_or(METHODS.len())
    }

    pub fn render(&self, out: &mut String) {
        let name = "tvix_virtiofsd_grpc_call_seconds";
        crate::wire::prometheus::family(
            out,
            name,
            "histogram",
            "gRPC calls served, by method, until their answer began.",
        );
        for (i, h) in self.calls.iter().enumerate() {
            if h.count() > 0 {
                let method = METHODS
                    .get(i)
                    .map_or("other", |m| m.trim_start_matches('/'));
                h.render(out, name, &format!("method=\"{method}\","));
            }
        }
    }

    /// A tower layer counting every call into these metrics.
    pub fn layer(self: &std::sync::Arc<Self>) -> CountLayer {
        CountLayer(self.clone())
    }
}

/// See [`CallMetrics::layer`].
#[derive(Clone)]
pub struct CountLayer(std::sync::Arc<CallMetrics>);

impl<S> tower::Layer<S> for CountLayer {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: std::sync::Arc<CallMetrics>,
}

impl<S, B> tower::Service<tonic::codegen::http::Request<B>> for Counted<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let slot = CallMetrics::slot(req.uri().path());
        let t0 = std::time::Instant::now();
        let fut = self.inner.call(req);
        let m = self.metrics.clone();
        Box::pin(async move {
            let r = fut.await;
            m.calls[slot].observe(t0.elapsed());
            r
        })
    }
}

/// Directories of a large recursive Get go out many to an HTTP/2 DATA
/// frame. tonic fills a frame while its source is ready and sends it when
/// the source is pending; a store yielding one directory per read would
/// send thousands of tiny frames, and a client that reads them slower than
/// they come (hyper's h2 counts the small frames it buffers) gives up with
/// GOAWAY ENHANCE_YOUR_CALM ("too many small DATA frames"), as a
/// 100,000-deep chain showed. So past the first directories, a reader task
/// runs ahead into a bounded queue and each batch waits a millisecond for
/// the queue to fill; small trees are sent as they come. The queue is
/// bounded in bytes too (`AHEAD_BYTES`): a client that reads a tree of
/// large directories slowly would otherwise have 512 of them held here.
fn batched(
    svc: std::sync::Arc<dyn crate::store::DirectoryService>,
    root: B3Digest,
) -> BoxStream<'static, Result<cpb::Directory, Status>> {
    const EAGER: usize = 64;
    const BATCH: usize = 512;
    /// Bytes of directories (as `heap_size` counts them) the reader task
    /// runs ahead by; one larger directory goes alone.
    const AHEAD_BYTES: u32 = 8 << 20;
    let (tx, mut rx) = tokio::sync::mpsc::channel(BATCH);
    let ahead = std::sync::Arc::new(tokio::sync::Semaphore::new(AHEAD_BYTES as usize));
    tokio::spawn(async move {
        let mut dirs = svc.get_recursive(root);
        while let Some(d) = dirs.next().await {
            let failed = d.is_err();
            let weight = d.as_ref().map_or(1, |d| {
                u32::try_from(d.heap_size()).map_or(AHEAD_BYTES, |n| n.clamp(1, AHEAD_BYTES))
            });
            let Ok(permit) = ahead.clone().acquire_many_owned(weight).await else {
                break;
            };
            if tx.send((d, permit)).await.is_err() || failed {
                break;
            }
        }
    });
    Box::pin(async_stream::stream! {
        let mut sent = 0usize;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            if sent >= EAGER {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(d) => batch.push(d),
                    Err(_) => break,
                }
            }
            sent += batch.len();
            for (d, _permit) in batch {
                let failed = d.is_err();
                yield d.map(|d| d.to_proto()).map_err(Status::from);
                if failed {
                    return;
                }
            }
        }
    })
}

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
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(crate::wire::cache::TouchResponse {}))
    }
}
