//! Imports a local file tree into the store the way `nix-store --add` sees
//! it: one walk in NAR order that hashes the NAR, hashes each file's blob
//! and builds directories at the same time, so each byte is read once.
//! Blob uploads overlap ([`crate::ingest::uploads`]): a file up to 8 MiB
//! is read whole and handed to a background upload while the walk goes
//! on, within a bound on uploads in flight and bytes held; a larger one is
//! streamed into the store by the walk. The directories are stored only
//! once every blob is, and the first failed upload fails the import.
//! Where the store keeps packs (a bucket), the tree's small blobs also go
//! into them as the walk meets them, so a reader of many pays a request
//! per run of them; packs that fail to store cost speed, not the import.
use crate::castore::{B3Digest, Directory, LeavesFirst, Node};
use crate::ingest::packs::Packing;
use crate::ingest::uploads::{UploadBudget, Uploads};
use crate::ingest::Ingested;
use crate::nar::{NarHasher, NarWriter};
use crate::store::{Error, Result, Store};
use bytes::Bytes;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::io::AsyncReadExt;

/// Bytes read at a time from a file that is streamed.
const READ_BUF: usize = 1 << 20;

struct Walker<'a> {
    nar: NarWriter<NarHasher>,
    store: &'a Store,
    graph: LeavesFirst,
    uploads: Uploads,
    /// Called with the number of content bytes read, for progress bars.
    progress: &'a (dyn Fn(u64) + Send + Sync),
    /// The tree's small blobs in walk order, when the store keeps packs.
    packing: Packing,
}

/// Imports `path` (file, directory or symlink) and returns its root node
/// and NAR facts, within the default [`UploadBudget`]. Directories become
/// visible only after the whole tree has been read and every blob stored;
/// blobs are content-addressed and stored as they are read.
pub async fn ingest_path(
    path: &Path,
    store: &Store,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Ingested> {
    ingest_path_within(path, store, progress, &UploadBudget::default()).await
}

/// As [`ingest_path`], its blob uploads within `budget` (which imports
/// running side by side may share).
pub async fn ingest_path_within(
    path: &Path,
    store: &Store,
    progress: &(dyn Fn(u64) + Send + Sync),
    budget: &UploadBudget,
) -> Result<Ingested> {
    let mut w = Walker {
        nar: NarWriter::new(NarHasher::default()).await?,
        store,
        graph: LeavesFirst::new(),
        uploads: Uploads::new(store.blob.clone(), budget),
        progress,
        packing: Packing::new(store),
    };
    let walked = w.node(path).await;
    let Walker {
        nar,
        graph,
        uploads,
        packing,
        ..
    } = w;
    let node = match walked {
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
    let (nar_size, nar_sha256) = nar.finish().await?.finish();
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

fn changed(path: &Path) -> Error {
    Error::InvalidRequest(format!(
        "{}: file changed while it was imported",
        path.display()
    ))
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
        let digest = if self.uploads.buffers(size) {
            self.buffered_file(path, size).await?
        } else {
            self.streamed_file(path, size).await?
        };
        self.nar.file_end(size).await?;
        Ok(Node::File {
            digest,
            size,
            executable,
        })
    }

    /// Reads a file whole, hashes it and hands its upload to the
    /// background; answers its digest.
    async fn buffered_file(&mut self, path: &Path, size: u64) -> Result<B3Digest> {
        let room = self.uploads.reserve(size).await?;
        let f = tokio::fs::File::open(path).await.map_err(io_at(path))?;
        // one byte more than expected tells a file that grew
        let mut data = Vec::with_capacity(size as usize);
        f.take(size + 1)
            .read_to_end(&mut data)
            .await
            .map_err(io_at(path))?;
        if data.len() as u64 != size {
            return Err(changed(path));
        }
        self.nar.file_data(&data).await?;
        (self.progress)(size);
        let digest = B3Digest::of(&data);
        let data = Bytes::from(data);
        self.uploads.spawn(room, data.clone(), digest);
        self.packing.add(self.store, digest, &data).await;
        Ok(digest)
    }

    /// Streams a large file into the store as it reads it (one of the
    /// uploads in flight meanwhile); answers its digest.
    async fn streamed_file(&mut self, path: &Path, size: u64) -> Result<B3Digest> {
        let _room = self.uploads.reserve_stream().await?;
        let mut w = self.store.blob.open_write().await?;
        let mut f = tokio::fs::File::open(path).await.map_err(io_at(path))?;
        let mut buf = vec![0u8; READ_BUF];
        let mut seen = 0u64;
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
        if seen != size {
            return Err(changed(path));
        }
        w.close().await
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
