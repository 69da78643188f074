//! The three tvix-store services (blob, directory, path info) over any
//! backend, so that any store can be served to other daemons and to tvix's
//! and snix's clients. This is where a client's request becomes store
//! calls, so the bounds on what one client may make a writable daemon hold
//! or write ([`Limits`]) are checked here, before the store sees it.
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

pub(super) fn digest_arg(b: &[u8]) -> Result<B3Digest, Status> {
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

/// Serves the three services of `store`; `read_only` refuses every Put.
#[derive(Clone)]
pub struct StoreServer {
    store: Store,
    read_only: bool,
    limits: Limits,
}

/// The three tonic services of one [`StoreServer`], each taking requests
/// up to the message size our clients send.
pub type StoreServices = (
    cpb::blob_service_server::BlobServiceServer<StoreServer>,
    cpb::directory_service_server::DirectoryServiceServer<StoreServer>,
    spb::path_info_service_server::PathInfoServiceServer<StoreServer>,
);

impl StoreServer {
    /// The services a router adds (the daemon's, a tenant connection's).
    pub fn services(self) -> StoreServices {
        let max = crate::store::channel::MAX_MESSAGE_SIZE;
        (
            cpb::blob_service_server::BlobServiceServer::new(self.clone())
                .max_decoding_message_size(max),
            cpb::directory_service_server::DirectoryServiceServer::new(self.clone())
                .max_decoding_message_size(max),
            spb::path_info_service_server::PathInfoServiceServer::new(self)
                .max_decoding_message_size(max),
        )
    }

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
