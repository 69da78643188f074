//! Reads a NAR into the store: file contents become blobs, directories are
//! uploaded as one graph at the end, and the NAR's size and SHA-256 are
//! computed on the way. Anything Nix would not have produced (unsorted or
//! duplicate entries, `..`, `/` in names, bad padding, trailing bytes) is
//! refused before any directory or path info becomes visible. What one NAR
//! may make the reader hold is bounded ([`Limits`]): its size, the
//! directory listings kept until the graph is stored, and the files held
//! for blob uploads in flight. Files up to 8 MiB are read whole, hashed and
//! uploaded in the background while the NAR is read on
//! ([`crate::ingest::uploads`]); larger ones are streamed into the store;
//! the graph is stored once every blob is.
use crate::castore::node::{validate_name, validate_target};
use crate::castore::{B3Digest, Directory, LeavesFirst, Node};
use crate::ingest::packs::Packing;
use crate::ingest::uploads::{UploadBudget, Uploads};
use crate::nar::decode::TooLarge;
use crate::nar::metered::{Check, Metered};
use crate::nar::writer::{padding, MAGIC};
use crate::store::{Error, Result, Store};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

/// Deepest directory nesting accepted (Linux paths cannot be deeper anyway).
pub(crate) const MAX_DEPTH: usize = 2048;

/// Estimated bytes of directory listings one NAR may make the reader hold
/// (they are kept until the whole graph is stored, so that none of it is
/// visible before all of it is checked): about half a million entries with
/// short names. A listing costs about twice the estimate at its peak (its
/// encoding for the digest), so one NAR holds at most ~150 MiB; three
/// million empty directories in one NAR once took 1.4 GiB.
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

/// What one NAR may make the reader hold or write.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes of NAR (uncompressed) read before it is refused.
    pub nar_size: u64,
    /// Estimated bytes of directory listings held (see [`MAX_DIRECTORY_BYTES`]).
    pub directory_bytes: u64,
    /// Blob uploads in flight and the bytes they hold (shared by the NARs
    /// given clones of one budget).
    pub uploads: UploadBudget,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            nar_size: u64::MAX,
            directory_bytes: MAX_DIRECTORY_BYTES,
            uploads: UploadBudget::default(),
        }
    }
}

/// The estimate one directory entry is counted with: its name and target,
/// and what the listing's map spends on each entry (as
/// `Directory::heap_size` counts it).
fn entry_cost(name: &[u8], node: &Node) -> u64 {
    let target = match node {
        Node::Symlink { target } => target.len(),
        _ => 0,
    };
    (name.len() + target + std::mem::size_of::<(Bytes, Node)>() + 32) as u64
}

/// What ingesting a NAR produced.
#[derive(Debug, Clone)]
pub struct Ingested {
    pub node: Node,
    pub nar_size: u64,
    pub nar_sha256: [u8; 32],
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Nar(msg.into())
}

fn too_large(msg: impl Into<String>) -> Error {
    Error::ResourceExhausted(msg.into())
}

/// A read that ran out of NAR is a truncated NAR; a limit is a refusal
/// ([`Error::ResourceExhausted`]); any other failure (a decompressor's,
/// the disk's) is reported as itself.
fn read_err(e: std::io::Error) -> Error {
    if let Some(TooLarge(msg)) = TooLarge::of(&e) {
        too_large(msg.clone())
    } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
        bad("truncated")
    } else {
        Error::Io(e)
    }
}

/// The NAR's SHA-256 and size, taken as it is read, and refused once past
/// `max` bytes.
struct NarHash {
    sha: sha2::Sha256,
    len: u64,
    max: u64,
}

impl Check for NarHash {
    fn saw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use sha2::Digest;
        self.len += bytes.len() as u64;
        if self.len > self.max {
            return Err(TooLarge::io(format!(
                "the NAR is larger than {} bytes",
                self.max
            )));
        }
        self.sha.update(bytes);
        Ok(())
    }
}

/// A directory being read: its entries so far, the last name (entries
/// come sorted), the name of the entry whose node is being read, and what
/// its entries were counted with.
#[derive(Default)]
struct OpenDir {
    dir: Directory,
    prev: Option<Vec<u8>>,
    name: Vec<u8>,
    cost: u64,
}

struct Parser<'a, R> {
    r: BufReader<Metered<R, NarHash>>,
    store: &'a Store,
    graph: LeavesFirst,
    uploads: Uploads,
    /// The tree's small blobs in NAR order, when the store keeps packs.
    packing: Packing,
    /// Estimated bytes of listings held: the open directories' entries
    /// and the distinct directories in `graph`.
    held: u64,
    max_held: u64,
    max_nar: u64,
}

/// Reads one NAR from `r` into `store`, within the default [`Limits`].
pub async fn ingest_nar<R: AsyncRead + Unpin + Send>(r: R, store: &Store) -> Result<Ingested> {
    ingest_nar_within(r, store, &Limits::default()).await
}

/// Reads one NAR from `r` into `store`; a NAR past `limits` is refused
/// with [`Error::ResourceExhausted`].
pub async fn ingest_nar_within<R: AsyncRead + Unpin + Send>(
    r: R,
    store: &Store,
    limits: &Limits,
) -> Result<Ingested> {
    let hash = NarHash {
        sha: Default::default(),
        len: 0,
        max: limits.nar_size,
    };
    let mut p = Parser {
        r: BufReader::with_capacity(1 << 17, Metered::new(r, hash)),
        store,
        graph: LeavesFirst::new(),
        uploads: Uploads::new(store.blob.clone(), &limits.uploads),
        packing: Packing::new(store),
        held: 0,
        max_held: limits.directory_bytes,
        max_nar: limits.nar_size,
    };
    let parsed = p.parse().await;
    let Parser {
        r,
        graph,
        uploads,
        packing,
        ..
    } = p;
    let node = match parsed {
        Ok(node) => node,
        Err(e) => {
            uploads.abort().await;
            return Err(e);
        }
    };
    uploads.finish().await?;
    if let Node::Directory { digest, .. } = node {
        store.directory.put_graph(graph.finish()?).await?;
        packing.finish(store, &digest).await;
    }
    let inner = r.into_inner().into_check();
    use sha2::Digest;
    Ok(Ingested {
        node,
        nar_size: inner.len,
        nar_sha256: inner.sha.finalize().into(),
    })
}

impl<R: AsyncRead + Unpin + Send> Parser<'_, R> {
    /// The whole NAR: magic, root node, nothing after it.
    async fn parse(&mut self) -> Result<Node> {
        let magic = self.read_str(MAGIC.len()).await?;
        if magic != MAGIC {
            return Err(bad("not a NAR (bad magic)"));
        }
        let node = self.root().await?;
        if self.r.read(&mut [0u8; 1]).await.map_err(read_err)? != 0 {
            return Err(bad("trailing bytes after the root node"));
        }
        Ok(node)
    }

    async fn read_u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).await.map_err(read_err)?;
        Ok(u64::from_le_bytes(b))
    }

    async fn read_padding(&mut self, len: u64) -> Result<()> {
        let mut pad = [0u8; 8];
        let n = padding(len);
        self.r.read_exact(&mut pad[..n]).await.map_err(read_err)?;
        if pad[..n].iter().any(|&b| b != 0) {
            return Err(bad("non-zero padding"));
        }
        Ok(())
    }

    async fn read_str(&mut self, max: usize) -> Result<Vec<u8>> {
        let len = self.read_u64().await?;
        if len > max as u64 {
            return Err(bad(format!(
                "string of {len} bytes where at most {max} fit"
            )));
        }
        let mut s = vec![0u8; len as usize];
        self.r.read_exact(&mut s).await.map_err(read_err)?;
        self.read_padding(len).await?;
        Ok(s)
    }

    async fn token(&mut self, token: &[u8]) -> Result<()> {
        let got = self.read_str(16).await?;
        if got != token {
            return Err(bad(format!(
                "expected {:?}, found {:?}",
                String::from_utf8_lossy(token),
                String::from_utf8_lossy(&got)
            )));
        }
        Ok(())
    }

    /// Reads the root node and everything below it. Directories are
    /// walked with an explicit stack, not by recursion: polling a chain of
    /// 2048 nested futures overflowed a runtime thread's stack (an upload
    /// then killed the daemon).
    async fn root(&mut self) -> Result<Node> {
        let mut open: Vec<OpenDir> = Vec::new();
        loop {
            // at the start of a node, `open.len()` directories deep
            if open.len() > MAX_DEPTH {
                return Err(bad("directories nested too deeply"));
            }
            self.token(b"(").await?;
            self.token(b"type").await?;
            let kind = self.read_str(16).await?;
            let mut done = match &kind[..] {
                b"regular" => Some(self.regular().await?),
                b"symlink" => {
                    self.token(b"target").await?;
                    let target = self.read_str(4095).await?;
                    validate_target(&target).map_err(|e| bad(format!("symlink target {e}")))?;
                    self.token(b")").await?;
                    Some(Node::Symlink {
                        target: target.into(),
                    })
                }
                b"directory" => {
                    open.push(OpenDir::default());
                    None
                }
                other => {
                    return Err(bad(format!(
                        "unknown node type {:?}",
                        String::from_utf8_lossy(other)
                    )))
                }
            };
            // finish nodes and directories until a new entry starts
            loop {
                if let Some(node) = done.take() {
                    let Some(parent) = open.last_mut() else {
                        return Ok(node);
                    };
                    self.token(b")").await?;
                    let name = std::mem::take(&mut parent.name);
                    let cost = entry_cost(&name, &node);
                    parent.cost += cost;
                    self.held += cost;
                    if self.held > self.max_held {
                        return Err(too_large(format!(
                            "the NAR's directory listings take more than {} MiB to check",
                            self.max_held >> 20
                        )));
                    }
                    parent.dir.add(Bytes::from(name.clone()), node)?;
                    parent.prev = Some(name);
                }
                let tok = self.read_str(16).await?;
                match &tok[..] {
                    b")" => {
                        let Some(d) = open.pop() else {
                            return Err(bad("unbalanced directory"));
                        };
                        let size = d.dir.size();
                        let known = self.graph.len();
                        let digest = self.graph.add(d.dir)?;
                        if self.graph.len() == known {
                            // a repeat of a directory held already: this
                            // copy is dropped
                            self.held -= d.cost;
                        }
                        done = Some(Node::Directory { digest, size });
                    }
                    b"entry" => {
                        self.token(b"(").await?;
                        self.token(b"name").await?;
                        let name = self.read_str(255).await?;
                        validate_name(&name).map_err(|e| {
                            bad(format!(
                                "entry name {:?}: {e}",
                                String::from_utf8_lossy(&name)
                            ))
                        })?;
                        let Some(d) = open.last_mut() else {
                            return Err(bad("entry outside a directory"));
                        };
                        if d.prev.as_ref().is_some_and(|p| *p >= name) {
                            return Err(bad(format!(
                                "entry {:?} is duplicate or out of order",
                                String::from_utf8_lossy(&name)
                            )));
                        }
                        d.name = name;
                        self.token(b"node").await?;
                        break;
                    }
                    _ => return Err(bad("expected \"entry\" or \")\" in directory")),
                }
            }
        }
    }

    async fn regular(&mut self) -> Result<Node> {
        let mut tok = self.read_str(16).await?;
        let executable = tok == b"executable";
        if executable {
            self.token(b"").await?;
            tok = self.read_str(16).await?;
        }
        if tok != b"contents" {
            return Err(bad("expected \"contents\""));
        }
        let size = self.read_u64().await?;
        if size > self.max_nar {
            // refused on its word, before any of it is stored
            return Err(too_large(format!(
                "a file of {size} bytes, in a NAR limited to {} bytes",
                self.max_nar
            )));
        }
        let digest = if self.uploads.buffers(size) {
            self.buffered_contents(size).await?
        } else {
            self.streamed_contents(size).await?
        };
        self.read_padding(size).await?;
        self.token(b")").await?;
        Ok(Node::File {
            digest,
            size,
            executable,
        })
    }

    /// Reads `size` bytes of file contents whole, hashes them and hands
    /// their upload to the background; answers their digest.
    async fn buffered_contents(&mut self, size: u64) -> Result<B3Digest> {
        let room = self.uploads.reserve(size).await?;
        let mut data = vec![0u8; size as usize];
        let mut got = 0;
        while got < data.len() {
            let n = self.r.read(&mut data[got..]).await.map_err(read_err)?;
            if n == 0 {
                return Err(bad("truncated file contents"));
            }
            got += n;
        }
        let digest = B3Digest::of(&data);
        let data = Bytes::from(data);
        self.uploads.spawn(room, data.clone(), digest);
        self.packing.add(self.store, digest, &data).await;
        Ok(digest)
    }

    /// Streams `size` bytes of file contents into the store as they are
    /// read (one of the uploads in flight meanwhile); answers their digest.
    async fn streamed_contents(&mut self, size: u64) -> Result<B3Digest> {
        let _room = self.uploads.reserve_stream().await?;
        let mut w = self.store.blob.open_write().await?;
        let mut left = size;
        let mut buf = vec![0u8; size.min(1 << 17) as usize];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = self.r.read(&mut buf[..want]).await.map_err(read_err)?;
            if n == 0 {
                return Err(bad("truncated file contents"));
            }
            w.write(&buf[..n]).await?;
            left -= n as u64;
        }
        w.close().await
    }
}
