//! Reads a NAR into the store: file contents become blobs, directories are
//! uploaded as one graph at the end, and the NAR's size and SHA-256 are
//! computed on the way. Anything Nix would not have produced (unsorted or
//! duplicate entries, `..`, `/` in names, bad padding, trailing bytes) is
//! refused before any directory or path info becomes visible.
use super::metered::{Check, Metered};
use super::writer::{padding, MAGIC};
use crate::castore::node::{validate_name, validate_target};
use crate::castore::{Directory, LeavesFirst, Node};
use crate::services::{Error, Result, Store};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

/// Deepest directory nesting accepted (Linux paths cannot be deeper anyway).
pub(crate) const MAX_DEPTH: usize = 2048;

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

/// A read that ran out of NAR is a truncated NAR; any other failure (a
/// decompressor's, the disk's, a size limit's) is reported as itself.
fn read_err(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        bad("truncated")
    } else {
        Error::Io(e)
    }
}

/// The NAR's SHA-256 and size, taken as it is read.
#[derive(Default)]
struct NarHash {
    sha: sha2::Sha256,
    len: u64,
}

impl Check for NarHash {
    fn saw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use sha2::Digest;
        self.len += bytes.len() as u64;
        self.sha.update(bytes);
        Ok(())
    }
}

struct Parser<'a, R> {
    r: BufReader<Metered<R, NarHash>>,
    store: &'a Store,
    graph: LeavesFirst,
}

/// Reads one NAR from `r` into `store`.
pub async fn ingest_nar<R: AsyncRead + Unpin + Send>(r: R, store: &Store) -> Result<Ingested> {
    let mut p = Parser {
        r: BufReader::with_capacity(1 << 17, Metered::new(r, NarHash::default())),
        store,
        graph: LeavesFirst::new(),
    };
    let magic = p.read_str(MAGIC.len()).await?;
    if magic != MAGIC {
        return Err(bad("not a NAR (bad magic)"));
    }
    let node = p.node(0).await?;
    if p.r.read(&mut [0u8; 1]).await? != 0 {
        return Err(bad("trailing bytes after the root node"));
    }
    if matches!(node, Node::Directory { .. }) {
        p.store.directory.put_graph(p.graph.finish()?).await?;
    }
    let inner = p.r.into_inner().into_check();
    use sha2::Digest;
    Ok(Ingested {
        node,
        nar_size: inner.len,
        nar_sha256: inner.sha.finalize().into(),
    })
}

impl<R: AsyncRead + Unpin + Send> Parser<'_, R> {
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

    fn node(&mut self, depth: usize) -> futures::future::BoxFuture<'_, Result<Node>> {
        Box::pin(async move {
            if depth > MAX_DEPTH {
                return Err(bad("directories nested too deeply"));
            }
            self.token(b"(").await?;
            self.token(b"type").await?;
            let kind = self.read_str(16).await?;
            let node = match &kind[..] {
                b"regular" => self.regular().await?,
                b"symlink" => {
                    self.token(b"target").await?;
                    let target = self.read_str(4095).await?;
                    validate_target(&target).map_err(|e| bad(format!("symlink target {e}")))?;
                    self.token(b")").await?;
                    Node::Symlink {
                        target: target.into(),
                    }
                }
                b"directory" => self.directory(depth).await?,
                other => {
                    return Err(bad(format!(
                        "unknown node type {:?}",
                        String::from_utf8_lossy(other)
                    )))
                }
            };
            Ok(node)
        })
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
        let mut w = self.store.blob.open_write().await?;
        let mut left = size;
        let mut buf = vec![0u8; size.min(1 << 17) as usize];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = self.r.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(bad("truncated file contents"));
            }
            w.write(&buf[..n]).await?;
            left -= n as u64;
        }
        let digest = w.close().await?;
        self.read_padding(size).await?;
        self.token(b")").await?;
        Ok(Node::File {
            digest,
            size,
            executable,
        })
    }

    async fn directory(&mut self, depth: usize) -> Result<Node> {
        let mut dir = Directory::new();
        let mut prev: Option<Vec<u8>> = None;
        loop {
            let tok = self.read_str(16).await?;
            match &tok[..] {
                b")" => break,
                b"entry" => {}
                _ => return Err(bad("expected \"entry\" or \")\" in directory")),
            }
            self.token(b"(").await?;
            self.token(b"name").await?;
            let name = self.read_str(255).await?;
            validate_name(&name).map_err(|e| {
                bad(format!(
                    "entry name {:?}: {e}",
                    String::from_utf8_lossy(&name)
                ))
            })?;
            if prev.as_ref().is_some_and(|p| *p >= name) {
                return Err(bad(format!(
                    "entry {:?} is duplicate or out of order",
                    String::from_utf8_lossy(&name)
                )));
            }
            self.token(b"node").await?;
            let child = self.node(depth + 1).await?;
            self.token(b")").await?;
            dir.add(Bytes::from(name.clone()), child)?;
            prev = Some(name);
        }
        let size = dir.size();
        let digest = self.graph.add(dir)?;
        Ok(Node::Directory { digest, size })
    }
}
