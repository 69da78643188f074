//! Blobs as files named by their digest under `ROOT/blobs/`. Writes go to an
//! unnamed temporary file and are linked into place only once complete, so a
//! killed import never leaves a partial blob visible, and any number of
//! processes can read and add blobs at once.
use super::{BlobReader, BlobService, BlobWriter};
use crate::castore::B3Digest;
use crate::store::Result;
use async_trait::async_trait;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Blobs up to this size are read into memory when opened.
const SMALL_BLOB: u64 = 256 << 10;

/// Opens a blob file: small ones are read into memory at once.
fn open_file(path: &Path) -> std::io::Result<Option<Box<dyn BlobReader>>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() <= SMALL_BLOB {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut buf)?;
        return Ok(Some(Box::new(std::io::Cursor::new(bytes::Bytes::from(
            buf,
        )))));
    }
    Ok(Some(Box::new(super::FileReader::new(f)?)))
}

#[derive(Clone)]
pub struct LocalBlobService {
    root: PathBuf,
    lookahead: std::sync::Arc<super::warm::Warmer>,
}

impl LocalBlobService {
    /// Opens (creating if needed) the blob area of a local store at `root`.
    /// Opens an existing store for reading only: nothing is created.
    pub fn open_existing(root: &Path) -> Result<Self> {
        crate::store::disk::staging::check_exists(root)?;
        Ok(Self::at(root))
    }

    pub fn open(root: &Path) -> Result<Self> {
        crate::store::disk::staging::prepare(root)?;
        Ok(Self::at(root))
    }

    fn at(root: &Path) -> Self {
        Self {
            root: root.into(),
            lookahead: super::warm::Warmer::new(root.join("blobs")),
        }
    }

    /// The blob's file, opened on the calling thread (no copy of its
    /// bytes: read it at offsets).
    pub(crate) fn open_file_here(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        let opened = match std::fs::File::open(self.path_of(digest)) {
            Ok(f) => super::FileReader::new(f).map(|r| Some(Box::new(r) as Box<dyn BlobReader>)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        Ok(opened?)
    }

    /// What the read-ahead does with a blob the directory lacks (see
    /// [`super::warm::Warmer::on_missing`]).
    pub(crate) fn on_missing(&self, f: super::warm::Missing) {
        self.lookahead.on_missing(f);
    }

    pub(crate) fn path_of(&self, digest: &B3Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }
}

#[async_trait]
impl BlobService for LocalBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        Ok(tokio::fs::try_exists(self.path_of(digest)).await?)
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        let path = self.path_of(digest);
        // Small blobs (most files in a store) are read whole in the same
        // blocking call that opens them: one thread hop instead of three.
        Ok(tokio::task::spawn_blocking(move || open_file(&path))
            .await
            .map_err(std::io::Error::other)??)
    }

    fn open_read_blocking(&self, digest: &B3Digest) -> Option<Result<Option<Box<dyn BlobReader>>>> {
        Some(self.open_file_here(digest))
    }

    fn read_soon(&self, digests: &mut dyn Iterator<Item = B3Digest>) {
        self.lookahead.hint(digests);
    }

    fn read_ahead(&self, blobs: &mut dyn Iterator<Item = (B3Digest, u64)>) {
        self.lookahead.read_ahead(blobs);
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        let tmp_dir = self.root.join("tmp");
        let file = tokio::task::spawn_blocking(move || tempfile::NamedTempFile::new_in(tmp_dir))
            .await
            .map_err(std::io::Error::other)??;
        Ok(Box::new(LocalWriter {
            svc: self.clone(),
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            hasher: blake3::Hasher::new(),
        }))
    }
}

struct LocalWriter {
    svc: LocalBlobService,
    file: Option<std::io::BufWriter<tempfile::NamedTempFile>>,
    hasher: blake3::Hasher,
}

impl LocalWriter {
    fn file(&mut self) -> std::io::Result<&mut std::io::BufWriter<tempfile::NamedTempFile>> {
        self.file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("blob writer used after failure"))
    }
}

#[async_trait]
impl BlobWriter for LocalWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.hasher.update(data);
        // Writes go to the page cache through a 1 MiB buffer: cheap enough to
        // do inline rather than paying a thread hop per chunk.
        self.file()?.write_all(data)?;
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<B3Digest> {
        let digest = B3Digest::from(self.hasher.finalize());
        let dest = self.svc.path_of(&digest);
        let file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("blob writer used after failure"))?;
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let tmp = file.into_inner().map_err(|e| e.into_error())?;
            if dest.exists() {
                return Ok(()); // already stored; the temporary file is removed on drop
            }
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            tmp.persist(&dest).map_err(|e| e.error)?;
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(digest)
    }
}
