//! The per-VM daemon's side of a closure-scoped connection (see
//! [`super::scope`]): opened and scoped before the sandbox, then the only
//! way the serving process reaches the store. Directories and path infos
//! are asked on it as from any gRPC store (and checked as such); a blob is
//! asked to be filled and arrives as the cache's file, opened read-only by
//! the host daemon and passed over the socket, which the view checks
//! against the blob's digest before serving a byte, as any blob.
use super::fill_batch::{Answer, FillBatches};
use super::scope::{HANDSHAKE_TIMEOUT, MAGIC, MAX_REPLY_BYTES, MAX_ROOTS_BYTES};
use crate::castore::B3Digest;
use crate::host::fd_pass::{FdStream, Inbox};
use crate::lock;
use crate::nix::store_path::StorePath;
use crate::store::blob::grpc::GrpcBlobService;
use crate::store::blob::{BlobReader, BlobService, BlobWriter, ChunkStream, FileReader};
use crate::store::channel::{WireChannel, MAX_MESSAGE_SIZE};
use crate::store::directory::grpc::GrpcDirectoryService;
use crate::store::pathinfo::grpc::GrpcPathInfoService;
use crate::store::{Error, Result, Store, Wire};
use crate::wire::cache as pb;
use crate::wire::cache::cache_service_client::CacheServiceClient;
use async_trait::async_trait;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("connecting to the host daemon at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("scoping the connection to the host daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the closure's roots take {0} bytes, more than the {MAX_ROOTS_BYTES} a scope may name"
    )]
    TooManyRoots(usize),
    #[error("the host daemon refused to scope the connection: {0}")]
    Refused(String),
    #[error("the host daemon answered the scope handshake with status {0}: is it a `daemon --cache-dir` of this version?")]
    BadReply(u8),
}

/// Connects to the host daemon's unix socket at `socket` and scopes the
/// connection to the closure of `roots`; blocking, for before the sandbox
/// (no thread may exist yet). `timeout` bounds each step, the host's
/// resolution of the closure included.
pub fn connect(
    socket: &Path,
    roots: &[StorePath],
    timeout: Duration,
) -> std::result::Result<UnixStream, TenantError> {
    let mut s = UnixStream::connect(socket).map_err(|source| TenantError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    s.set_read_timeout(Some(timeout.max(HANDSHAKE_TIMEOUT)))?;
    let text: String = roots
        .iter()
        .map(|r| format!("{}\n", r.to_absolute_path()))
        .collect();
    let len = u32::try_from(text.len())
        .ok()
        .filter(|&l| l <= MAX_ROOTS_BYTES)
        .ok_or(TenantError::TooManyRoots(text.len()))?;
    let mut out = Vec::with_capacity(12 + text.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    s.write_all(&out)?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let n = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    if n > MAX_REPLY_BYTES {
        return Err(TenantError::BadReply(head[0]));
    }
    let mut msg = vec![0u8; n as usize];
    s.read_exact(&mut msg)?;
    match head[0] {
        0 => {}
        1 => {
            return Err(TenantError::Refused(
                String::from_utf8_lossy(&msg).into_owned(),
            ))
        }
        other => return Err(TenantError::BadReply(other)),
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(s)
}

/// The gRPC channel over a scoped connection, and where the descriptors
/// passed on it arrive; needs a runtime. The connection is used once: if
/// it breaks, calls fail (with a message saying so) rather than open
/// another, which the sandbox could not anyway.
pub fn channel(conn: UnixStream) -> Result<(WireChannel, Arc<Inbox>)> {
    let stream = FdStream::from_std(conn)?;
    let inbox = stream.inbox();
    let slot = Arc::new(Mutex::new(Some(stream)));
    let ep = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(10))
        .http2_adaptive_window(true);
    let ch = ep.connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
        let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        async move {
            taken.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                std::io::Error::other(
                    "the scoped connection to the host daemon broke; a tenant's daemon opens no \
                     other: restart it",
                )
            })
        }
    }));
    Ok((WireChannel::new(ch, Wire::Tvix), inbox))
}

/// The soft limit on open files (1,024 when unknown); asked before
/// seccomp, which does not allow getrlimit.
pub fn descriptor_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills in the struct it is given.
    match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } {
        0 => usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX),
        _ => 1024,
    }
}

/// The store over a scoped connection (see [`channel`]); `fd_limit` is
/// the process's [`descriptor_limit`], a quarter of which passed files
/// may keep open.
pub fn open_store(conn: UnixStream, idle: Duration, fd_limit: usize) -> Result<Store> {
    let (ch, inbox) = channel(conn)?;
    let blobs = GrpcBlobService::new(ch.clone())
        .with_idle_timeout(idle)
        .with_memfd_spool();
    let client = CacheServiceClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_SIZE);
    Ok(Store {
        blob: Arc::new(TenantBlobs {
            asker: Asker {
                batches: FillBatches::new(client.clone(), idle, Some(inbox.clone())),
                client,
                inbox,
                idle,
            },
            through_memory: blobs,
            held: Arc::new(Mutex::new(Held::new(fd_limit))),
            ahead: Arc::new(tokio::sync::Semaphore::new(FILLS_AHEAD)),
            rt: tokio::runtime::Handle::try_current().ok(),
        }),
        directory: Arc::new(GrpcDirectoryService::new(ch.clone())),
        path_info: Arc::new(GrpcPathInfoService::new(ch)),
    })
}

/// Blobs as the host cache's files, passed over the scoped connection.
struct TenantBlobs {
    asker: Asker,
    /// For blobs the cache cannot hold (larger than it): read through the
    /// connection, checked, into memory files.
    through_memory: GrpcBlobService,
    /// Small files passed before, kept open so that opening them again
    /// (a guest's second walk) is served on the queue's thread with no
    /// round trip, as a hit in a cache directory is.
    held: Arc<Mutex<Held>>,
    /// Fills asked ahead of the guest and not yet answered.
    ahead: Arc<tokio::sync::Semaphore>,
    /// The runtime the store was opened in: fills ahead run there.
    rt: Option<tokio::runtime::Handle>,
}

/// Asks the host daemon for blobs' files.
#[derive(Clone)]
struct Asker {
    client: CacheServiceClient<WireChannel>,
    /// Small blobs' fills, many in one call.
    batches: Arc<FillBatches>,
    inbox: Arc<Inbox>,
    idle: Duration,
}

/// Fills asked ahead of a guest reading a directory in order, at once (as
/// a reader of the cache directory asks its own).
const FILLS_AHEAD: usize = super::FILLS_AHEAD;

/// Most passed files kept open (and at most a quarter of the descriptor
/// limit, so the guest's own opens keep room): enough for the files a VM
/// rereads most, and what a walk of a 4,821-file tree needed to make its
/// second pass a hit in full (BENCHMARKS.md).
const MAX_HELD_FILES: usize = 16_384;
/// Only files up to this size are kept (the round trip matters for small
/// ones; a large one's reads dwarf it).
const MAX_HELD_FILE: u64 = 1 << 20;
/// Most bytes the kept files may hold: a kept file evicted from the cache
/// keeps its disk blocks until dropped, outside `--cache-size`.
const MAX_HELD_BYTES: u64 = 256 << 20;

/// Kept files. When full, new ones are not kept: a guest walking more
/// files than fit, over and over, then still finds the first ones kept
/// (dropping the oldest would leave it none by the time it comes back).
#[derive(Default)]
struct Held {
    files: std::collections::HashMap<B3Digest, std::fs::File>,
    bytes: u64,
    /// The bound on files (from the descriptor limit), set when opened.
    max_files: usize,
}

impl Held {
    fn new(fd_limit: usize) -> Self {
        Self {
            max_files: MAX_HELD_FILES.min(fd_limit / 4),
            ..Default::default()
        }
    }

    fn keep(&mut self, digest: B3Digest, f: &std::fs::File) {
        if self.files.len() >= self.max_files || self.files.contains_key(&digest) {
            return;
        }
        let Ok(len) = f.metadata().map(|m| m.len()) else {
            return;
        };
        if len > MAX_HELD_FILE || self.bytes + len > MAX_HELD_BYTES {
            return;
        }
        let Ok(dup) = f.try_clone() else { return };
        self.files.insert(digest, dup);
        self.bytes += len;
    }

    fn get(&self, digest: &B3Digest) -> Option<std::io::Result<std::fs::File>> {
        self.files.get(digest).map(|f| f.try_clone())
    }
}

fn stalled(digest: &B3Digest, idle: Duration) -> Error {
    Error::Timeout(format!(
        "blob {digest}: no progress from the host daemon for {idle:?}"
    ))
}

impl Asker {
    /// The blob's file from the host daemon; `None` when the store lacks
    /// it (or it was evicted as soon as filled).
    async fn ask(&self, digest: &B3Digest, size: Option<u64>) -> Result<Option<std::fs::File>> {
        if self.batches.takes(size) {
            match self.batches.ask(*digest, size.unwrap_or(0)).await {
                Answer::Done { fd_seq } => return self.passed(digest, fd_seq).map(Some),
                Answer::Missing => return Ok(None),
                Answer::Failed(Error::Remote(s)) if s.code() == tonic::Code::NotFound => {
                    return Ok(None)
                }
                Answer::Failed(e) => return Err(e),
                Answer::Alone => {}
            }
        }
        let req = pb::FillBlobRequest {
            digest: (*digest).into(),
            size: size.unwrap_or(0),
        };
        let not_found = |s: tonic::Status| {
            if s.code() == tonic::Code::NotFound {
                Ok(None)
            } else {
                Err(Error::from(s))
            }
        };
        let mut stream =
            match tokio::time::timeout(self.idle, self.client.clone().fill_blob(req)).await {
                Err(_) => return Err(stalled(digest, self.idle)),
                Ok(Err(s)) => return not_found(s),
                Ok(Ok(r)) => r.into_inner(),
            };
        loop {
            match tokio::time::timeout(self.idle, stream.message()).await {
                Err(_) => return Err(stalled(digest, self.idle)),
                Ok(Ok(Some(p))) if p.done => {
                    let f = self.passed(digest, p.fd_seq)?;
                    // the end of the stream too: a dropped stream is reset
                    let _ = tokio::time::timeout(self.idle, stream.message()).await;
                    return Ok(Some(f));
                }
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => {
                    return Err(Error::Protocol(format!(
                        "the host daemon's fill of blob {digest} ended without completing"
                    )))
                }
                Ok(Err(s)) => return not_found(s),
            }
        }
    }

    /// The file the host daemon passed as its `fd_seq`-th descriptor.
    fn passed(&self, digest: &B3Digest, fd_seq: u64) -> Result<std::fs::File> {
        let fd = self
            .inbox
            .take(fd_seq)
            .map_err(|e| Error::Protocol(format!("blob {digest}: {e}")))?;
        let f = std::fs::File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(Error::Protocol(format!(
                "blob {digest}: the host daemon passed something not a file"
            )));
        }
        Ok(f)
    }
}

impl TenantBlobs {
    async fn open(
        &self,
        digest: &B3Digest,
        size: Option<u64>,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        // Evicted between fill and open: asked once more.
        for _ in 0..2 {
            match self.asker.ask(digest, size).await {
                Ok(Some(f)) => {
                    lock(&self.held).keep(*digest, &f);
                    return Ok(Some(Box::new(FileReader::new(f)?)));
                }
                Ok(None) => continue,
                Err(Error::Remote(s)) if s.code() == tonic::Code::ResourceExhausted => break,
                Err(e) => return Err(e),
            }
        }
        // Larger than the cache, or gone twice: through the connection.
        match size {
            Some(s) => self.through_memory.open_read_sized(digest, s).await,
            None => self.through_memory.open_read(digest).await,
        }
    }
}

#[async_trait]
impl BlobService for TenantBlobs {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        self.through_memory.has(digest).await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        self.open(digest, None).await
    }

    async fn open_read_sized(
        &self,
        digest: &B3Digest,
        size: u64,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        self.open(digest, Some(size)).await
    }

    async fn read_stream(&self, digest: &B3Digest) -> Result<Option<ChunkStream>> {
        self.through_memory.read_stream(digest).await
    }

    /// The guest reads a directory's files in order: the next ones are
    /// filled ahead (at most [`FILLS_AHEAD`] at a time, the rest left to
    /// the guest's own opens), and the small ones' files kept, so that
    /// their opens need no round trip. Must not block: spawned.
    fn read_ahead(&self, blobs: &mut dyn Iterator<Item = (B3Digest, u64)>) {
        let Some(rt) = &self.rt else { return };
        for (digest, size) in blobs {
            if lock(&self.held).files.contains_key(&digest) {
                continue;
            }
            let Ok(permit) = self.ahead.clone().try_acquire_owned() else {
                return;
            };
            let (asker, held) = (self.asker.clone(), self.held.clone());
            rt.spawn(async move {
                let _permit = permit;
                match asker.ask(&digest, Some(size)).await {
                    Ok(Some(f)) => lock(&held).keep(digest, &f),
                    Ok(None) => {}
                    Err(e) => tracing::debug!("blob {digest}: asked ahead: {e}"),
                }
            });
        }
    }

    /// A kept file, on the calling thread; `None` (ask the host) otherwise.
    fn open_read_blocking(&self, digest: &B3Digest) -> Option<Result<Option<Box<dyn BlobReader>>>> {
        let f = lock(&self.held).get(digest)?;
        Some(
            f.and_then(FileReader::new)
                .map(|r| Some(Box::new(r) as Box<dyn BlobReader>))
                .map_err(Error::from),
        )
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        Err(Error::ReadOnly)
    }
}
