//! Tenants: connections to the host daemon scoped to one closure.
//!
//! A per-VM daemon given `--closure` and `--cache-dir` serves one tenant.
//! Were it taken over by its guest, an unscoped connection and the cache
//! directory would give it every tenant's files. So, before its sandbox
//! closes (while it is still the operator's process), it connects to the
//! host daemon's unix socket and opens the connection with a handshake
//! naming its closure's roots; the host resolves them (path infos and
//! their references) into a [`Scope`] and from then on answers on that
//! connection only for objects in it: the closure's path infos, the
//! directories and blobs reachable from their root nodes. Reachability is
//! learnt as the tree is served: a directory served on the connection
//! admits its children, so a digest is only ever asked for after the
//! directory naming it was. A scope never widens otherwise, and the
//! connection is read-only. The serving process keeps only this connected
//! socket (no socket path, no cache directory in its root), and gets hits
//! as read-only descriptors of the cache's files ([`crate::fd_pass`]).
//!
//! Handshake (client first, before any HTTP/2 byte): [`MAGIC`], a u32
//! (little endian) length, that many bytes of roots (one store path a
//! line, as `--closure-file`). The host answers a status byte (0: scoped,
//! 1: refused), a u32 length and a UTF-8 message; HTTP/2 follows. An
//! ordinary connection starts with HTTP/2's preface, whose first byte
//! ("P") the magic's is not: the listener tells the two apart by one
//! peeked byte and hands ordinary connections on untouched.
use super::Cache;
use crate::castore::{B3Digest, Directory, Node, ValidatedGraph};
use crate::fd_pass::{FdStream, Outbox};
use crate::pathinfo::PathInfo;
use crate::services::blob::{BlobReader, BlobService, BlobWriter, ChunkStream};
use crate::services::directory::DirectoryService;
use crate::services::pathinfo::PathInfoService;
use crate::services::{Error, Result, Store};
use crate::wire::cache as cpb;
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

/// Opens a scoped connection (8 bytes; not "P", HTTP/2's first byte).
pub const MAGIC: &[u8; 8] = b"tvx-scp1";
/// Most bytes of roots a handshake may carry (1 MiB: some 12,000 store
/// paths written out absolute).
pub const MAX_ROOTS_BYTES: u32 = 1 << 20;
/// Longest handshake answer (a message); longer ones are refused.
pub const MAX_REPLY_BYTES: u32 = 64 << 10;
/// Most objects (path infos, directories, blobs) one scope admits: 2^21,
/// at most about 100 MiB of digests in the host daemon per tenant. A
/// whole NixOS system closure has a few hundred thousand; past the bound
/// further children are not admitted (refused: fail closed) and it is
/// logged.
pub const MAX_SCOPE_OBJECTS: usize = 1 << 21;
/// How long a client may take to send its handshake (or, for an ordinary
/// connection, its first byte) before the host hangs up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (EMFILE: retrying at once would spin).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Connections whose first bytes are awaited at once; the listener waits
/// for one of them to finish before accepting more.
const MAX_PENDING_HANDSHAKES: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn outside(what: impl std::fmt::Display) -> Error {
    Error::Denied(format!("{what} is outside this connection's closure"))
}

#[derive(Default)]
struct Sets {
    paths: HashSet<[u8; 20]>,
    dirs: HashSet<B3Digest>,
    blobs: HashSet<B3Digest>,
    /// Warned once that the bound was reached.
    full: bool,
}

impl Sets {
    fn len(&self) -> usize {
        self.paths.len() + self.dirs.len() + self.blobs.len()
    }

    fn admit(&mut self, node: &Node) {
        if self.len() >= MAX_SCOPE_OBJECTS {
            if !self.full {
                self.full = true;
                tracing::warn!(
                    "a tenant's scope reached {MAX_SCOPE_OBJECTS} objects: further ones are refused"
                );
            }
            return;
        }
        match node {
            Node::Directory { digest, .. } => {
                self.dirs.insert(*digest);
            }
            Node::File { digest, .. } => {
                self.blobs.insert(*digest);
            }
            Node::Symlink { .. } => {}
        }
    }
}

/// What one connection may read.
#[derive(Default)]
pub struct Scope {
    sets: Mutex<Sets>,
}

impl Scope {
    /// The scope of a closure: its path infos and their root nodes.
    pub fn of_closure(closure: &crate::fs::closure::Closure) -> Scope {
        let mut sets = Sets::default();
        for (sp, node) in closure.members() {
            sets.paths.insert(*sp.digest());
            sets.admit(node);
        }
        Scope {
            sets: Mutex::new(sets),
        }
    }

    pub fn allows_path(&self, hash: &[u8; 20]) -> bool {
        lock(&self.sets).paths.contains(hash)
    }

    pub fn allows_directory(&self, digest: &B3Digest) -> bool {
        lock(&self.sets).dirs.contains(digest)
    }

    pub fn allows_blob(&self, digest: &B3Digest) -> bool {
        lock(&self.sets).blobs.contains(digest)
    }

    /// A directory served on the connection: its entries become readable.
    pub fn served(&self, dir: &Directory) {
        let mut sets = lock(&self.sets);
        for (_, node) in dir.entries() {
            sets.admit(node);
        }
    }

    /// Objects admitted so far.
    pub fn len(&self) -> usize {
        lock(&self.sets).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Blobs of the scope only; nothing is written.
struct ScopedBlobs {
    inner: Arc<dyn BlobService>,
    scope: Arc<Scope>,
}

impl ScopedBlobs {
    fn check(&self, digest: &B3Digest) -> Result<()> {
        if self.scope.allows_blob(digest) {
            Ok(())
        } else {
            Err(outside(format_args!("blob {digest}")))
        }
    }
}

#[async_trait]
impl BlobService for ScopedBlobs {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        self.check(digest)?;
        self.inner.has(digest).await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        self.check(digest)?;
        self.inner.open_read(digest).await
    }

    async fn open_read_sized(
        &self,
        digest: &B3Digest,
        size: u64,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        self.check(digest)?;
        self.inner.open_read_sized(digest, size).await
    }

    async fn read_stream(&self, digest: &B3Digest) -> Result<Option<ChunkStream>> {
        self.check(digest)?;
        self.inner.read_stream(digest).await
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        Err(Error::ReadOnly)
    }
}

/// Directories of the scope; each one served admits its children.
struct ScopedDirs {
    inner: Arc<dyn DirectoryService>,
    scope: Arc<Scope>,
}

#[async_trait]
impl DirectoryService for ScopedDirs {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        if !self.scope.allows_directory(digest) {
            return Err(outside(format_args!("directory {digest}")));
        }
        let got = self.inner.get(digest).await?;
        if let Some(d) = &got {
            self.scope.served(d);
        }
        Ok(got)
    }

    fn get_recursive(&self, root: B3Digest) -> BoxStream<'_, Result<Directory>> {
        if !self.scope.allows_directory(&root) {
            let e = outside(format_args!("directory {root}"));
            return Box::pin(futures::stream::once(async move { Err(e) }));
        }
        // The tree below an admitted directory is the scope's: each
        // directory of the stream is a child of one before it.
        Box::pin(self.inner.get_recursive(root).map(|d| {
            if let Ok(d) = &d {
                self.scope.served(d);
            }
            d
        }))
    }

    async fn put_graph(&self, _: ValidatedGraph) -> Result<B3Digest> {
        Err(Error::ReadOnly)
    }
}

/// Path infos of the closure; any other is absent, decided from the scope
/// alone (so the answer tells nothing of what else the store holds).
struct ScopedInfos {
    inner: Arc<dyn PathInfoService>,
    scope: Arc<Scope>,
}

#[async_trait]
impl PathInfoService for ScopedInfos {
    async fn get(&self, hash: &[u8; 20]) -> Result<Option<PathInfo>> {
        if !self.scope.allows_path(hash) {
            return Ok(None);
        }
        self.inner.get(hash).await
    }

    async fn put(&self, _: PathInfo) -> Result<PathInfo> {
        Err(Error::ReadOnly)
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        Box::pin(futures::stream::once(async {
            Err(Error::Denied(
                "a connection scoped to a closure lists nothing".into(),
            ))
        }))
    }
}

/// The store as one scoped connection sees it.
pub fn scoped_store(store: &Store, scope: &Arc<Scope>) -> Store {
    Store {
        blob: Arc::new(ScopedBlobs {
            inner: store.blob.clone(),
            scope: scope.clone(),
        }),
        directory: Arc::new(ScopedDirs {
            inner: store.directory.clone(),
            scope: scope.clone(),
        }),
        path_info: Arc::new(ScopedInfos {
            inner: store.path_info.clone(),
            scope: scope.clone(),
        }),
    }
}

/// The cache service on a scoped connection: fills of the scope's blobs
/// only, answered with the blob's file as a passed descriptor.
#[derive(Clone)]
pub struct ScopedCacheServer {
    cache: Arc<Cache>,
    scope: Arc<Scope>,
    outbox: Arc<Outbox>,
}

impl Cache {
    /// The cached blob's file, opened read-only, not following links, for
    /// a tenant's reader.
    fn open_blob_file(&self, digest: &B3Digest) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.local.blobs.path_of(digest))?;
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::other(format!(
                "cache entry of blob {digest} is not a regular file"
            )));
        }
        Ok(f)
    }
}

#[tonic::async_trait]
impl cpb::cache_service_server::CacheService for ScopedCacheServer {
    type FillBlobStream = BoxStream<'static, Result<cpb::FillProgress, Status>>;

    async fn fill_blob(
        &self,
        req: Request<cpb::FillBlobRequest>,
    ) -> Result<Response<Self::FillBlobStream>, Status> {
        let digest = B3Digest::try_from(&req.get_ref().digest[..])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !self.scope.allows_blob(&digest) {
            return Err(outside(format_args!("blob {digest}")).into());
        }
        let inner = crate::grpc_server::CacheServer::new(self.cache.clone());
        let progress =
            <crate::grpc_server::CacheServer as cpb::cache_service_server::CacheService>::fill_blob(
                &inner, req,
            )
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
        req.directories
            .retain(|b| digest_in(b, &|d| scope.allows_directory(d)));
        req.path_infos
            .retain(|h| <[u8; 20]>::try_from(&h[..]).is_ok_and(|h| scope.allows_path(&h)));
        let inner = crate::grpc_server::CacheServer::new(self.cache.clone());
        <crate::grpc_server::CacheServer as cpb::cache_service_server::CacheService>::touch(
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
) -> Result<Arc<Scope>, HandshakeError> {
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
    let roots = crate::fs::closure::parse_roots(&text)
        .map_err(|(line, t)| HandshakeError::BadLine(line, t))?;
    if roots.is_empty() {
        return Err(HandshakeError::Empty);
    }
    let closure = crate::fs::closure::Closure::resolve(&tenants.store, &roots)
        .await
        .map_err(|e| HandshakeError::Resolve(e.to_string()))?;
    let scope = Scope::of_closure(&closure);
    tracing::info!(
        "a tenant's connection is scoped to {} store paths ({} roots)",
        closure.len(),
        roots.len()
    );
    Ok(Arc::new(scope))
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
fn serve_scoped(s: tokio::net::UnixStream, scope: Arc<Scope>, tenants: &Tenants) {
    use crate::wire::{castore, store};
    let conn = FdStream::new(s);
    let store = scoped_store(&tenants.store, &scope);
    let server = crate::grpc_server::StoreServer::new(store, true);
    let cache = ScopedCacheServer {
        cache: tenants.cache.clone(),
        scope,
        outbox: conn.outbox(),
    };
    let max = crate::services::channel::MAX_MESSAGE_SIZE;
    let router = tonic::transport::Server::builder()
        .add_service(
            castore::blob_service_server::BlobServiceServer::new(server.clone())
                .max_decoding_message_size(max),
        )
        .add_service(
            castore::directory_service_server::DirectoryServiceServer::new(server.clone())
                .max_decoding_message_size(max),
        )
        .add_service(
            store::path_info_service_server::PathInfoServiceServer::new(server)
                .max_decoding_message_size(max),
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn digest(i: u8) -> B3Digest {
        B3Digest::from(blake3::hash(&[i]))
    }

    #[test]
    fn a_directory_served_admits_its_children_only() {
        let scope = Scope::default();
        lock(&scope.sets).dirs.insert(digest(1));
        let mut d = Directory::new();
        d.add(
            Bytes::from_static(b"f"),
            Node::File {
                digest: digest(2),
                size: 1,
                executable: false,
            },
        )
        .unwrap();
        d.add(
            Bytes::from_static(b"sub"),
            Node::Directory {
                digest: digest(3),
                size: 0,
            },
        )
        .unwrap();
        assert!(!scope.allows_blob(&digest(2)));
        scope.served(&d);
        assert!(scope.allows_blob(&digest(2)));
        assert!(scope.allows_directory(&digest(3)));
        assert!(!scope.allows_blob(&digest(3)), "kinds are kept apart");
        assert!(!scope.allows_directory(&digest(4)));
        assert_eq!(scope.len(), 3);
    }
}
