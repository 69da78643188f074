//! The host daemon's side of tenant connections (the scope itself, and
//! what it admits, is [`crate::store::cache::scope`]): the unix listener
//! tells a scoped connection from an ordinary one by its first byte, reads
//! the handshake, resolves the closure, and serves the connection on its
//! own with the store's services and the cache service, both scoped.
use crate::castore::B3Digest;
use crate::host::fd_pass::{FdStream, Outbox};
use crate::store::cache::prefetch::Session;
use crate::store::cache::scope::{
    outside, scoped_store, Scope, HANDSHAKE_TIMEOUT, MAGIC, MAX_REPLY_BYTES, MAX_ROOTS_BYTES,
};
use crate::store::cache::Cache;
use crate::store::Store;
use crate::wire::cache as cpb;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

/// Pause after a failed accept (EMFILE: retrying at once would spin).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Connections whose first bytes are awaited at once; the listener waits
/// for one of them to finish before accepting more.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// The cache service on a scoped connection: fills of the scope's blobs
/// only, answered with the blob's file as a passed descriptor.
#[derive(Clone)]
pub struct ScopedCacheServer {
    cache: Arc<Cache>,
    scope: Arc<Scope>,
    outbox: Arc<Outbox>,
    /// The tenant's prefetch: held as long as its connection is served.
    prefetch: Arc<Session>,
}

#[tonic::async_trait]
impl cpb::cache_service_server::CacheService for ScopedCacheServer {
    type FillBlobStream = BoxStream<'static, Result<cpb::FillProgress, Status>>;
    type ReadBlobsStream = super::read_blobs::PieceStream;
    type FillBlobsStream = super::fill_blobs::DoneStream;

    /// As FillBlob, for many: the whole call is refused if one blob is
    /// outside the scope; each blob filled is answered with its file.
    async fn fill_blobs(
        &self,
        req: Request<cpb::FillBlobsRequest>,
    ) -> Result<Response<Self::FillBlobsStream>, Status> {
        let blobs = super::fill_blobs::blobs_of(req.get_ref())?;
        if let Some((d, _)) = blobs.iter().find(|(d, _)| !self.scope.allows_blob(d)) {
            return Err(outside(format_args!("blob {d}")).into());
        }
        for &(d, size) in &blobs {
            self.prefetch.opened(d, size.unwrap_or(0));
        }
        let answers = super::fill_blobs::serve(&self.cache, &blobs)?;
        let (cache, outbox) = (self.cache.clone(), self.outbox.clone());
        Ok(Response::new(Box::pin(answers.map(move |a| {
            let mut a = a?;
            let Some(&(digest, _)) = blobs.get(a.index as usize).filter(|_| a.done) else {
                return Ok(a);
            };
            // Opened after the fill: an eviction in between is a
            // NOT_FOUND the reader asks again for.
            let passed = match cache.open_blob_file(&digest) {
                Ok(file) => outbox
                    .push(file.into())
                    .map_err(|e| Status::resource_exhausted(e.to_string())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Status::not_found(
                    format!("blob {digest} was evicted at once"),
                )),
                Err(e) => Err(Status::internal(format!("opening blob {digest}: {e}"))),
            };
            match passed {
                Ok(seq) => a.fd_seq = seq,
                Err(s) => {
                    a.done = false;
                    a.code = s.code() as i32;
                    a.message = s.message().to_owned();
                }
            }
            Ok(a)
        }))))
    }

    /// Not on a tenant's connection: its blobs come as files.
    async fn read_blobs(
        &self,
        _req: Request<cpb::ReadBlobsRequest>,
    ) -> Result<Response<Self::ReadBlobsStream>, Status> {
        Err(Status::unimplemented("not on a tenant's connection"))
    }

    async fn fill_blob(
        &self,
        req: Request<cpb::FillBlobRequest>,
    ) -> Result<Response<Self::FillBlobStream>, Status> {
        let digest = B3Digest::try_from(&req.get_ref().digest[..])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !self.scope.allows_blob(&digest) {
            return Err(outside(format_args!("blob {digest}")).into());
        }
        self.prefetch.opened(digest, req.get_ref().size);
        let inner = super::CacheServer::new(self.cache.clone());
        let progress =
            <super::CacheServer as cpb::cache_service_server::CacheService>::fill_blob(&inner, req)
                .await?
                .into_inner();
        let (cache, outbox) = (self.cache.clone(), self.outbox.clone());
        Ok(Response::new(Box::pin(progress.map(move |p| {
            let mut p = p?;
            if p.done {
                // Opened after the fill: an eviction in between is a
                // NOT_FOUND the reader asks again for.
                let file = cache.open_blob_file(&digest).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        Status::not_found(format!("blob {digest} was evicted at once"))
                    }
                    _ => Status::internal(format!("opening blob {digest}: {e}")),
                })?;
                p.fd_seq = outbox
                    .push(file.into())
                    .map_err(|e| Status::resource_exhausted(e.to_string()))?;
            }
            Ok(p)
        }))))
    }

    async fn touch(
        &self,
        req: Request<cpb::TouchRequest>,
    ) -> Result<Response<cpb::TouchResponse>, Status> {
        let mut req = req.into_inner();
        let scope = &self.scope;
        let digest_in = |b: &bytes::Bytes, f: &dyn Fn(&B3Digest) -> bool| {
            B3Digest::try_from(&b[..]).is_ok_and(|d| f(&d))
        };
        req.blobs
            .retain(|b| digest_in(b, &|d| scope.allows_blob(d)));
        req.fresh_blobs
            .retain(|b| digest_in(b, &|d| scope.allows_blob(d)));
        req.directories
            .retain(|b| digest_in(b, &|d| scope.allows_directory(d)));
        req.path_infos
            .retain(|h| <[u8; 20]>::try_from(&h[..]).is_ok_and(|h| scope.allows_path(&h)));
        let inner = super::CacheServer::new(self.cache.clone());
        <super::CacheServer as cpb::cache_service_server::CacheService>::touch(
            &inner,
            Request::new(req),
        )
        .await
    }
}

/// What a host daemon with a cache directory needs to serve tenants.
pub struct Tenants {
    /// The cached store (the filler's view of it).
    pub store: Store,
    pub cache: Arc<Cache>,
    /// The listener's bounds, which a tenant's connection is held to as
    /// any other (streams, windows, request bodies).
    pub bounds: super::bounds::GrpcBounds,
}

/// Why a handshake failed, told to the client.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("this daemon has no --cache-dir: it serves no closure-scoped connections")]
    NoCache,
    #[error("not a scoped-connection handshake")]
    BadMagic,
    #[error("{0} bytes of roots, more than {MAX_ROOTS_BYTES}")]
    TooLong(u32),
    #[error("the roots are not UTF-8")]
    NotUtf8,
    #[error("roots, line {0}: {1:?} is not a store path")]
    BadLine(usize, String),
    #[error("no roots given")]
    Empty,
    #[error("resolving the closure: {0}")]
    Resolve(String),
    #[error("no handshake within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads the client's handshake and resolves its closure.
async fn read_handshake(
    s: &mut tokio::net::UnixStream,
    tenants: Option<&Tenants>,
) -> Result<(Arc<Scope>, Arc<Session>), HandshakeError> {
    let mut head = [0u8; 12];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, s.read_exact(&mut head))
        .await
        .map_err(|_| HandshakeError::Timeout)??;
    if &head[..8] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if len > MAX_ROOTS_BYTES {
        return Err(HandshakeError::TooLong(len));
    }
    let mut body = vec![0u8; len as usize];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, s.read_exact(&mut body))
        .await
        .map_err(|_| HandshakeError::Timeout)??;
    let tenants = tenants.ok_or(HandshakeError::NoCache)?;
    let text = String::from_utf8(body).map_err(|_| HandshakeError::NotUtf8)?;
    let roots = crate::store::closure::parse_roots(&text)
        .map_err(|(line, t)| HandshakeError::BadLine(line, t))?;
    if roots.is_empty() {
        return Err(HandshakeError::Empty);
    }
    // The whole closure is prefetched for this tenant for as long as its
    // connection lasts (its lookups queue nothing of their own).
    let session = tenants.cache.prefetch_session(&roots);
    let closure = crate::store::closure::Closure::resolve(&tenants.cache.store_quiet(), &roots)
        .await
        .map_err(|e| HandshakeError::Resolve(e.to_string()))?;
    tenants.cache.prefetch_closure(
        &session,
        &roots,
        closure.members().map(|(sp, _)| *sp.digest()),
    );
    let scope = Scope::of_closure(&closure);
    tracing::info!(
        "a tenant's connection is scoped to {} store paths ({} roots)",
        closure.len(),
        roots.len()
    );
    Ok((Arc::new(scope), session))
}

async fn reply(s: &mut tokio::net::UnixStream, status: u8, msg: &str) -> std::io::Result<()> {
    let msg = &msg.as_bytes()[..msg.len().min(MAX_REPLY_BYTES as usize)];
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(status);
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

/// Serves one scoped connection on its own: the store's three services
/// (read-only, scoped) and the cache service (scoped, passing blob files).
fn serve_scoped(
    s: tokio::net::UnixStream,
    (scope, session): (Arc<Scope>, Arc<Session>),
    tenants: &Tenants,
) {
    let conn = FdStream::new(s);
    let store = scoped_store(&tenants.cache.store_quiet(), &scope);
    let server = super::StoreServer::new(store, true);
    let cache = ScopedCacheServer {
        cache: tenants.cache.clone(),
        scope,
        outbox: conn.outbox(),
        prefetch: session,
    };
    let (blobs, directories, path_infos) = server.services();
    let router = tenants
        .bounds
        .builder()
        .layer(tower::util::MapRequestLayer::new(
            tenants.bounds.cap_bodies(),
        ))
        .add_service(blobs)
        .add_service(directories)
        .add_service(path_infos)
        .add_service(cpb::cache_service_server::CacheServiceServer::new(cache));
    // One connection: the server returns once it is accepted, and the
    // connection is served until the client goes.
    tokio::spawn(async move {
        let once = futures::stream::once(async move { Ok::<_, std::io::Error>(conn) });
        if let Err(e) = router.serve_with_incoming(once).await {
            tracing::warn!("serving a tenant's connection: {e}");
        }
    });
}

/// The first byte waiting on `s`, not taken from it; None at its end.
async fn peek_first(s: &tokio::net::UnixStream) -> std::io::Result<Option<u8>> {
    loop {
        s.readable().await?;
        let mut b = 0u8;
        let got = s.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: one byte into a valid buffer.
            let n = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    (&mut b as *mut u8).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n)
            }
        });
        match got {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The connections of a unix listener for the daemon's gRPC server:
/// ordinary ones are passed on untouched; scoped ones (see the module
/// header) are served here, each by a server of its own, and never
/// reach the stream.
pub fn incoming(
    l: tokio::net::UnixListener,
    tenants: Option<Arc<Tenants>>,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(MAX_PENDING_HANDSHAKES);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = pending.clone().acquire_owned().await else {
                return;
            };
            let mut s = match l.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    // out of descriptors, say: give the holders time to
                    // close some instead of spinning on accept
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let (tx, tenants) = (tx.clone(), tenants.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, peek_first(&s)).await;
                match first {
                    Ok(Ok(Some(b))) if b == MAGIC[0] => {}
                    // HTTP/2 (or anything else): the ordinary server's
                    Ok(Ok(Some(_))) => {
                        let _ = tx.send(Ok(s)).await;
                        return;
                    }
                    _ => return,
                }
                match read_handshake(&mut s, tenants.as_deref()).await {
                    Ok(scope) => {
                        if let Err(e) = reply(&mut s, 0, "scoped").await {
                            tracing::debug!("a tenant left during its handshake: {e}");
                            return;
                        }
                        if let Some(t) = &tenants {
                            serve_scoped(s, scope, t);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("refused a scoped connection: {e}");
                        let _ = reply(&mut s, 1, &e.to_string()).await;
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
