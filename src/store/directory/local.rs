//! Directories as files named by their digest under `ROOT/directories/`,
//! holding the canonical encoding. Written leaves first through temporary
//! files, so whatever a crash leaves visible is complete; re-checked against
//! the digest on every read, so on-disk corruption is an error, not a wrong tree.
use super::DirectoryService;
use crate::castore::{B3Digest, Directory, ValidatedGraph};
use crate::store::{Error, Result};
use async_trait::async_trait;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct LocalDirectoryService {
    root: PathBuf,
}

impl LocalDirectoryService {
    /// Opens an existing store for reading only: nothing is created.
    pub fn open_existing(root: &Path) -> Result<Self> {
        crate::store::disk::staging::check_exists(root)?;
        Ok(Self { root: root.into() })
    }

    pub fn open(root: &Path) -> Result<Self> {
        crate::store::disk::staging::prepare(root)?;
        Ok(Self { root: root.into() })
    }

    pub(crate) fn path_of(&self, digest: &B3Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join("directories").join(&hex[..2]).join(hex)
    }

    /// Writes one directory's canonical encoding for the host cache (its
    /// children may be absent: the cache holds parts of trees); answers the
    /// bytes written, 0 when it was there.
    pub(crate) fn write_one(&self, digest: &B3Digest, bytes: &[u8]) -> std::io::Result<u64> {
        let dest = self.path_of(digest);
        if dest.exists() {
            return Ok(0);
        }
        let mut tmp = crate::store::disk::temp_beside(&dest)?;
        tmp.write_all(bytes)?;
        tmp.persist(&dest).map_err(|e| e.error)?;
        Ok(bytes.len() as u64)
    }
}

/// Checks a directory file's bytes against the digest that names it.
fn decode_checked(bytes: Vec<u8>, digest: &B3Digest) -> Result<Directory> {
    let actual = B3Digest::of(&bytes);
    if actual != *digest {
        return Err(Error::DigestMismatch {
            expected: *digest,
            actual,
        });
    }
    Ok(Directory::decode(bytes::Bytes::from(bytes))?)
}

fn not_found_is_none(r: std::io::Result<Vec<u8>>) -> Result<Option<Vec<u8>>> {
    match r {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[async_trait]
impl DirectoryService for LocalDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        not_found_is_none(tokio::fs::read(self.path_of(digest)).await)?
            .map(|b| decode_checked(b, digest))
            .transpose()
    }

    fn get_blocking(&self, digest: &B3Digest) -> Option<Result<Option<Directory>>> {
        Some(
            not_found_is_none(std::fs::read(self.path_of(digest)))
                .and_then(|b| b.map(|b| decode_checked(b, digest)).transpose()),
        )
    }

    async fn put_graph(&self, graph: ValidatedGraph) -> Result<B3Digest> {
        let root = graph
            .root()
            .ok_or_else(|| Error::InvalidRequest("empty directory graph".into()))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for (digest, dir) in &graph.dirs {
                let dest = this.path_of(digest);
                if dest.exists() {
                    continue;
                }
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let mut tmp = tempfile::NamedTempFile::new_in(this.root.join("tmp"))?;
                tmp.write_all(&dir.encode())?;
                tmp.persist(&dest).map_err(|e| e.error)?;
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(root)
    }
}
