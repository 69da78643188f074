//! Path infos as files under `ROOT/pathinfo/<nixbase32 hash part>`, holding
//! the PathInfo encoding. A path info is what makes a store path visible, so
//! `put` first flushes the whole store filesystem (the blobs and directories
//! it points to) and then renames the new entry into place: after a crash a
//! store path is either absent or complete.
use super::PathInfoService;
use crate::nix::nixbase32;
use crate::nix::path_info::PathInfo;
use crate::store::{Error, Result};
use crate::wire::store as pb;
use async_trait::async_trait;
use futures::stream::BoxStream;
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct LocalPathInfoService {
    root: PathBuf,
}

impl LocalPathInfoService {
    /// Opens an existing store for reading only: nothing is created.
    pub fn open_existing(root: &Path) -> Result<Self> {
        crate::store::disk::staging::check_exists(root)?;
        Ok(Self { root: root.into() })
    }

    pub fn open(root: &Path) -> Result<Self> {
        crate::store::disk::staging::prepare(root)?;
        Ok(Self { root: root.into() })
    }

    pub(crate) fn path_of(&self, digest: &[u8; 20]) -> PathBuf {
        self.root.join("pathinfo").join(nixbase32::encode(digest))
    }

    /// Writes a path info fetched from elsewhere, without flushing the
    /// store first (the cache holds no closure promise); answers the bytes
    /// written.
    pub(crate) fn write_cached(&self, info: &PathInfo) -> std::io::Result<u64> {
        let bytes = info.to_proto().encode_to_vec();
        let dest = self.path_of(info.store_path.digest());
        let mut tmp = crate::store::disk::temp_beside(&dest)?;
        tmp.write_all(&bytes)?;
        tmp.persist(&dest).map_err(|e| e.error)?;
        Ok(bytes.len() as u64)
    }

    fn read(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>> {
        let file = self.path_of(digest);
        match std::fs::read(&file) {
            Ok(b) => decode(&b, Some(digest), &file).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl LocalPathInfoService {
    fn publish(&self, info: PathInfo) -> Result<PathInfo> {
        let digest = *info.store_path.digest();
        let dest = self.path_of(&digest);
        let existing = |this: &Self| match this.read(&digest) {
            Ok(Some(old)) if old.same_contents(&info) => Ok(Some(old)),
            Ok(Some(old)) => Err(Error::conflict(&info, &old)),
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!("replacing the unreadable path info {}: {e}", dest.display());
                Ok(None)
            }
        };
        // Checked first so that a repeated Put does not flush the store.
        if let Some(old) = existing(self)? {
            return Ok(old);
        }
        syncfs(&self.root)?;
        let mut tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        tmp.write_all(&info.to_proto().encode_to_vec())?;
        tmp.as_file().sync_all()?;
        match tmp.persist_noclobber(&dest) {
            Ok(_) => Ok(info),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
                // Another writer got there first, or the file there is
                // unreadable (then replaced).
                match existing(self)? {
                    Some(old) => Ok(old),
                    None => {
                        e.file.persist(&dest).map_err(|e| e.error)?;
                        Ok(info)
                    }
                }
            }
            Err(e) => Err(e.error.into()),
        }
    }
}

fn decode(bytes: &[u8], expected: Option<&[u8; 20]>, file: &Path) -> Result<PathInfo> {
    let pb = pb::PathInfo::decode(bytes).map_err(|e| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("corrupt path info {}: {e}", file.display()),
        ))
    })?;
    let info = PathInfo::try_from(pb)?;
    if let Some(d) = expected {
        if info.store_path.digest() != d {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("path info {} holds {}", file.display(), info.store_path),
            )));
        }
    }
    Ok(info)
}

/// Flushes the filesystem holding `dir` (one syscall instead of an fsync per object).
fn syncfs(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir)?;
    // SAFETY: `f` is an open file descriptor for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[async_trait]
impl PathInfoService for LocalPathInfoService {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>> {
        let file = self.path_of(digest);
        match tokio::fs::read(&file).await {
            Ok(b) => decode(&b, Some(digest), &file).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn get_blocking(&self, digest: &[u8; 20]) -> Option<Result<Option<PathInfo>>> {
        Some(self.read(digest))
    }

    /// Published without replacing: a store path that exists keeps its
    /// contents (the same contents again succeed; other contents are a
    /// conflict). Only an unreadable file there is replaced.
    async fn put(&self, info: PathInfo) -> Result<PathInfo> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.publish(info))
            .await
            .map_err(std::io::Error::other)?
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        let dir = self.root.join("pathinfo");
        Box::pin(async_stream::try_stream! {
            let mut rd = tokio::fs::read_dir(&dir).await?;
            while let Some(e) = rd.next_entry().await? {
                let path = e.path();
                let bytes = tokio::fs::read(&path).await?;
                yield decode(&bytes, None, &path)?;
            }
        })
    }
}
