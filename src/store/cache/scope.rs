//! Tenants: connections to the host daemon scoped to one closure. This
//! file is the scope and the scoped services; the listener and the
//! handshake's host side are [`crate::serve::grpc::tenants`] (the
//! transport), the VM side is [`super::tenant`].
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
//! as read-only descriptors of the cache's files ([`crate::host::fd_pass`]).
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
use crate::lock;
use crate::nix::path_info::PathInfo;
use crate::store::blob::{BlobReader, BlobService, BlobWriter, ChunkStream};
use crate::store::directory::DirectoryService;
use crate::store::pathinfo::PathInfoService;
use crate::store::{Error, Result, Store};
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The refusal of an object outside a connection's closure.
pub fn outside(what: impl std::fmt::Display) -> Error {
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
    pub fn of_closure(closure: &crate::store::closure::Closure) -> Scope {
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

impl Cache {
    /// The cached blob's file, opened read-only, not following links, for
    /// a tenant's reader.
    pub fn open_blob_file(&self, digest: &B3Digest) -> std::io::Result<std::fs::File> {
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
