//! Trust in a local store's directory as found on disk (the embedded
//! store, the host cache). Whoever else can write it can plant objects (a
//! path info is what names a store path: it is not signed) and links that
//! turn the start-up tidy into deleting files elsewhere. So a directory is
//! refused when anyone but its owner may write it, and one that is written
//! to (created, tidied, filled) must also belong to this process's user or
//! to root. Its areas (`blobs`, `directories`, `pathinfo`, `tmp`, the
//! cache's shards) are reached from the opened descriptor of their parent,
//! never through a symbolic link, and files are removed relative to it.
use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxFlags};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// What the process does with the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Creates, tidies or fills it: ours or root's, writable by no one else.
    Write,
    /// Only reads it (a sandboxed view, a cache reader; its owner may be
    /// another user, whose store it is): writable by no one but its owner.
    Read,
}

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{} can be written by others than its owner (mode {mode:04o}): they could plant \
         objects in it, or links that lead its tidying elsewhere; run `chmod go-w {}` (and check \
         what is in it), or give a directory of its own",
        path.display(),
        path.display()
    )]
    OthersWrite { path: PathBuf, mode: u32 },
    #[error(
        "{} belongs to uid {owner}, neither to this process's uid {uid} nor to root: its owner \
         could plant objects in it, or links that lead its tidying elsewhere; give a directory \
         of this user's own",
        path.display()
    )]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "{} is a symbolic link or not a directory: a store's areas are not followed out of it \
         (remove it, and check what else was put there)",
        path.display()
    )]
    NotDirectory { path: PathBuf },
}

impl From<DirError> for io::Error {
    fn from(e: DirError) -> io::Error {
        let kind = match &e {
            DirError::Io { source, .. } => source.kind(),
            DirError::NotDirectory { .. } => io::ErrorKind::NotADirectory,
            _ => io::ErrorKind::PermissionDenied,
        };
        io::Error::new(kind, e)
    }
}

/// An opened, checked directory of a store.
#[derive(Debug)]
pub struct StoreDir {
    fd: OwnedFd,
    path: PathBuf,
    access: Access,
}

impl StoreDir {
    /// Opens the store directory `root` (created with `create` as its mode
    /// when given and missing) and checks it for `access`. `root` itself
    /// may be a symbolic link: the operator named it.
    pub fn open(root: &Path, access: Access, create: Option<u32>) -> Result<Self, DirError> {
        let io = |source: io::Error| DirError::Io {
            path: root.to_path_buf(),
            source,
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(rustix::fs::CWD, root, flags, Mode::empty()) {
            Err(rustix::io::Errno::NOENT) if create.is_some() => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(create.unwrap_or(0o700))
                    .create(root)
                    .map_err(io)?;
                rustix::fs::openat(rustix::fs::CWD, root, flags, Mode::empty())
                    .map_err(|e| io(e.into()))?
            }
            Err(rustix::io::Errno::NOTDIR) => {
                return Err(DirError::NotDirectory {
                    path: root.to_path_buf(),
                })
            }
            r => r.map_err(|e| io(e.into()))?,
        };
        let dir = Self {
            fd,
            path: root.to_path_buf(),
            access,
        };
        dir.check()?;
        Ok(dir)
    }

    /// The directory `name` in this one, created with `mode` when missing;
    /// a symbolic link there is refused, not followed.
    pub fn area(&self, name: &str, mode: u32) -> Result<Self, DirError> {
        let path = self.path.join(name);
        let io = |source: io::Error| DirError::Io {
            path: path.clone(),
            source,
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let open = || rustix::fs::openat(&self.fd, name, flags, Mode::empty());
        let fd = match open() {
            Err(rustix::io::Errno::NOENT) if self.access == Access::Write => {
                match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io(e.into())),
                }
                open()
            }
            r => r,
        };
        let fd = match fd {
            Ok(fd) => fd,
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                return Err(DirError::NotDirectory { path })
            }
            Err(e) => return Err(io(e.into())),
        };
        let dir = Self {
            fd,
            path,
            access: self.access,
        };
        dir.check()?;
        Ok(dir)
    }

    /// Refuses a directory others may write, or (to write it) one that is
    /// neither ours nor root's.
    fn check(&self) -> Result<(), DirError> {
        // openat and statx only (no open, fstat, geteuid): the sandboxed
        // readers' seccomp policy allows no others.
        let st = rustix::fs::statx(
            &self.fd,
            c"",
            AtFlags::EMPTY_PATH,
            StatxFlags::TYPE | StatxFlags::MODE | StatxFlags::UID,
        )
        .map_err(|e| DirError::Io {
            path: self.path.clone(),
            source: e.into(),
        })?;
        let raw = u32::from(st.stx_mode);
        if FileType::from_raw_mode(raw) != FileType::Directory {
            return Err(DirError::NotDirectory {
                path: self.path.clone(),
            });
        }
        let mode = raw & 0o7777;
        if mode & 0o022 != 0 {
            return Err(DirError::OthersWrite {
                path: self.path.clone(),
                mode,
            });
        }
        if self.access == Access::Write {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let uid = unsafe { libc::geteuid() };
            if st.stx_uid != uid && st.stx_uid != 0 {
                return Err(DirError::NotOwned {
                    path: self.path.clone(),
                    owner: st.stx_uid,
                    uid,
                });
            }
        }
        Ok(())
    }

    /// Removes the entries of this directory that are not directories and
    /// that `remove` selects, given their modification time (seconds since
    /// the epoch). Nothing is followed: a link is removed, not its target.
    /// Best effort: what cannot be removed is logged. Answers how many went.
    pub fn remove_files(&self, mut remove: impl FnMut(i64) -> bool) -> usize {
        let entries = match rustix::fs::Dir::read_from(&self.fd) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("listing {}: {e}", self.path.display());
                return 0;
            }
        };
        let mut removed = 0;
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("listing {}: {e}", self.path.display());
                    break;
                }
            };
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let Ok(st) = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory || !remove(st.st_mtime) {
                continue;
            }
            match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
                Ok(()) => removed += 1,
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => tracing::warn!(
                    "cannot remove {}: {e}",
                    self.path.join(name.to_string_lossy().as_ref()).display()
                ),
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("store");
        std::fs::create_dir(&d).unwrap();
        for (m, ok) in [(0o700, true), (0o755, true), (0o775, false), (0o777, false)] {
            mode(&d, m);
            for access in [Access::Read, Access::Write] {
                let r = StoreDir::open(&d, access, None);
                assert_eq!(r.is_ok(), ok, "mode {m:o}, {access:?}: {r:?}");
                if let Err(e) = r {
                    assert!(e.to_string().contains("chmod go-w"), "{e}");
                }
            }
        }
        mode(&d, 0o700);
        let root = StoreDir::open(&d, Access::Write, None).unwrap();
        std::fs::create_dir(d.join("tmp")).unwrap();
        mode(&d.join("tmp"), 0o1777);
        let e = root.area("tmp", 0o755).unwrap_err();
        assert!(matches!(e, DirError::OthersWrite { .. }), "{e}");
    }

    #[test]
    fn an_area_that_is_a_link_is_refused_and_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("store");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("precious"), b"x").unwrap();
        let root = StoreDir::open(&d, Access::Write, Some(0o700)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, d.join("tmp")).unwrap();
        let e = root.area("tmp", 0o755).unwrap_err();
        assert!(matches!(e, DirError::NotDirectory { .. }), "{e}");
        assert!(elsewhere.join("precious").exists());
        // a reader does not create areas
        let reader = StoreDir::open(&d, Access::Read, None).unwrap();
        assert!(reader.area("blobs", 0o755).is_err());
        assert!(!d.join("blobs").exists());
    }

    #[test]
    fn removing_files_removes_links_not_their_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("store");
        let root = StoreDir::open(&d, Access::Write, Some(0o700)).unwrap();
        let t = root.area("tmp", 0o755).unwrap();
        let target = tmp.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, d.join("tmp/link")).unwrap();
        std::fs::write(d.join("tmp/file"), b"x").unwrap();
        std::fs::create_dir(d.join("tmp/sub")).unwrap();
        assert_eq!(t.remove_files(|_| true), 2);
        assert!(target.exists(), "the link's target stays");
        assert!(d.join("tmp/sub").is_dir(), "directories stay");
        assert!(!d.join("tmp/file").exists());
    }
}
