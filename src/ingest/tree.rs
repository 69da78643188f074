//! Imports a local file tree into the store the way `nix-store --add` sees
//! it: one walk in NAR order that uploads blobs, builds directories and
//! hashes the NAR at the same time, so each byte is read once.
use crate::castore::{Directory, LeavesFirst, Node};
use crate::ingest::Ingested;
use crate::nar::{NarHasher, NarWriter};
use crate::store::{Error, Result, Store};
use bytes::Bytes;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::io::AsyncReadExt;

/// Files up to this size are read with one call.
const SMALL_FILE: u64 = 1 << 17;

struct Walker<'a> {
    nar: NarWriter<NarHasher>,
    store: &'a Store,
    graph: LeavesFirst,
    /// Called with the number of content bytes read, for progress bars.
    progress: &'a (dyn Fn(u64) + Send + Sync),
}

/// Imports `path` (file, directory or symlink) and returns its root node
/// and NAR facts. Directories become visible only after the whole tree has
/// been read; blobs are content-addressed and stored as they are read.
pub async fn ingest_path(
    path: &Path,
    store: &Store,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Ingested> {
    let mut w = Walker {
        nar: NarWriter::new(NarHasher::default()).await?,
        store,
        graph: LeavesFirst::new(),
        progress,
    };
    let node = w.node(path).await?;
    if matches!(node, Node::Directory { .. }) {
        store.directory.put_graph(w.graph.finish()?).await?;
    }
    let (nar_size, nar_sha256) = w.nar.finish().await?.finish();
    Ok(Ingested {
        node,
        nar_size,
        nar_sha256,
    })
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    }
}

impl Walker<'_> {
    fn node<'b>(&'b mut self, path: &'b Path) -> futures::future::BoxFuture<'b, Result<Node>> {
        Box::pin(async move {
            let meta = tokio::fs::symlink_metadata(path)
                .await
                .map_err(io_at(path))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                let target = tokio::fs::read_link(path).await.map_err(io_at(path))?;
                let target = Bytes::copy_from_slice(target.as_os_str().as_bytes());
                self.nar.symlink(&target).await?;
                Ok(Node::Symlink { target })
            } else if ft.is_file() {
                let executable = meta.permissions().mode() & 0o100 != 0;
                self.file(path, meta.len(), executable).await
            } else if ft.is_dir() {
                self.directory(path).await
            } else {
                Err(Error::InvalidRequest(format!(
                    "{}: not a regular file, directory or symlink",
                    path.display()
                )))
            }
        })
    }

    async fn file(&mut self, path: &Path, size: u64, executable: bool) -> Result<Node> {
        self.nar.file_start(executable, size).await?;
        let mut w = self.store.blob.open_write().await?;
        let mut seen = 0u64;
        if size <= SMALL_FILE {
            let data = tokio::fs::read(path).await.map_err(io_at(path))?;
            seen = data.len() as u64;
            if seen == size {
                self.nar.file_data(&data).await?;
                w.write(&data).await?;
                (self.progress)(seen);
            }
        } else {
            let mut f = tokio::fs::File::open(path).await.map_err(io_at(path))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).await.map_err(io_at(path))?;
                if n == 0 {
                    break;
                }
                seen += n as u64;
                if seen > size {
                    break;
                }
                self.nar.file_data(&buf[..n]).await?;
                w.write(&buf[..n]).await?;
                (self.progress)(n as u64);
            }
        }
        if seen != size {
            return Err(Error::InvalidRequest(format!(
                "{}: file changed while it was imported",
                path.display()
            )));
        }
        let digest = w.close().await?;
        self.nar.file_end(size).await?;
        Ok(Node::File {
            digest,
            size,
            executable,
        })
    }

    async fn directory(&mut self, path: &Path) -> Result<Node> {
        let mut names = Vec::new();
        let mut rd = tokio::fs::read_dir(path).await.map_err(io_at(path))?;
        while let Some(e) = rd.next_entry().await.map_err(io_at(path))? {
            names.push(e.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        self.nar.dir_start().await?;
        let mut dir = Directory::new();
        for name in names {
            let child_path = path.join(&name);
            self.nar.entry_start(name.as_bytes()).await?;
            let child = self.node(&child_path).await?;
            self.nar.entry_end().await?;
            dir.add(Bytes::copy_from_slice(name.as_bytes()), child)?;
        }
        self.nar.dir_end().await?;
        let size = dir.size();
        let digest = self.graph.add(dir)?;
        Ok(Node::Directory { digest, size })
    }
}
