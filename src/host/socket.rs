//! Listening unix sockets for the VMM: created safely (mode from the
//! start, stale sockets replaced, other files left alone), inherited with
//! `--fd`, or passed by systemd socket activation.
use std::fs;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    // Causes are part of the message (not `source`), so `{:#}` does not
    // print them twice.
    #[error("socket {}: {err}", path.display())]
    Socket { path: PathBuf, err: io::Error },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("file descriptor {fd}: {reason}")]
    BadFd { fd: RawFd, reason: String },
    #[error("group {0:?}: {1}")]
    Group(String, String),
}

/// A socket file this process created; removed on drop, unless something
/// else has replaced it meanwhile.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }
}

/// Creates the listening socket at `path`: a stale socket there is
/// replaced, any other file is left alone. The socket is 0600, or 0660
/// owned by `group`, from the moment it appears at `path`: it is bound in a
/// private (0700) directory next to `path`, given its mode and group there,
/// then renamed into place, rather than by changing the process-wide umask.
pub fn bind_socket(
    path: &Path,
    group: Option<libc::gid_t>,
) -> Result<(UnixListener, SocketFile), SocketError> {
    let err = |err| SocketError::Socket {
        path: path.to_owned(),
        err,
    };
    let stale = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => true,
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(err(e)),
    };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // A short name: unix socket paths are limited to 107 bytes.
    let tmp = tempfile::Builder::new()
        .prefix(".v")
        .rand_bytes(6)
        .tempdir_in(parent)
        .map_err(err)?;
    let tmp_path = tmp.path().join("s");
    let listener = UnixListener::bind(&tmp_path).map_err(err)?;
    // chown before widening the mode, so only the right group ever gets in.
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(&tmp_path, None, Some(gid)).map_err(err)?;
            0o660
        }
        None => 0o600,
    };
    fs::set_permissions(&tmp_path, fs::Permissions::from_mode(mode)).map_err(err)?;
    fs::rename(&tmp_path, path).map_err(err)?;
    if stale {
        tracing::info!("replaced the stale socket {}", path.display());
    }
    let meta = fs::symlink_metadata(path).map_err(err)?;
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, file))
}

/// An inherited listening socket: the VMM's is a unix socket; the gRPC
/// daemon's may also be TCP.
#[derive(Debug)]
pub enum Inherited {
    Unix(UnixListener),
    Tcp(std::net::TcpListener),
}

/// Takes ownership of an inherited listening unix socket (`--fd`, systemd).
pub fn listener_from_fd(fd: RawFd) -> Result<UnixListener, SocketError> {
    match inherited_from_fd(fd)? {
        Inherited::Unix(l) => Ok(l),
        Inherited::Tcp(_) => Err(SocketError::BadFd {
            fd,
            reason: "not a unix socket".into(),
        }),
    }
}

/// Takes ownership of an inherited listening stream socket, unix or TCP:
/// anything else (a file, a socket that is not listening) is refused.
pub fn inherited_from_fd(fd: RawFd) -> Result<Inherited, SocketError> {
    let bad = |reason: String| SocketError::BadFd { fd, reason };
    if fd < 0 {
        return Err(bad("not a file descriptor".into()));
    }
    // SAFETY: fstat writes only into the stat buffer we own; an fd that is
    // not open is reported as EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket".into()));
    }
    let sockopt = |opt: libc::c_int| -> Result<libc::c_int, SocketError> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: v and len are live locals of the sizes given; the kernel
        // writes at most len bytes into v.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(bad(io::Error::last_os_error().to_string()));
        }
        Ok(v)
    };
    let domain = sockopt(libc::SO_DOMAIN)?;
    if ![libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].contains(&domain) {
        return Err(bad("not a unix or TCP socket".into()));
    }
    if sockopt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(bad("not a stream socket".into()));
    }
    if sockopt(libc::SO_ACCEPTCONN)? == 0 {
        return Err(bad("not listening".into()));
    }
    // Not inherited by anything we might start.
    // SAFETY: fcntl on an open fd with an integer argument touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    // SAFETY: fd is open and a listening stream socket (checked above), and
    // whoever passed it to us (--fd, systemd) hands over its ownership;
    // nothing else in this process uses it.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    Ok(if domain == libc::AF_UNIX {
        Inherited::Unix(owned.into())
    } else {
        Inherited::Tcp(owned.into())
    })
}

/// The fd systemd passed (socket activation), if it passed one to us:
/// LISTEN_PID is our pid and LISTEN_FDS ≥ 1; the first is fd 3.
pub fn systemd_fd() -> Option<RawFd> {
    const SD_LISTEN_FDS_START: RawFd = 3;
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    if !ours {
        return None;
    }
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    if n == 0 {
        return None;
    }
    if n > 1 {
        tracing::warn!("LISTEN_FDS={n}: serving the first socket (fd 3) only");
    }
    Some(SD_LISTEN_FDS_START)
}

/// The unix socket systemd passed, if it passed one to us.
pub fn systemd_listener() -> Result<Option<UnixListener>, SocketError> {
    systemd_fd().map(listener_from_fd).transpose()
}

/// Resolves `--socket-group`: a group name or a numeric gid.
pub fn group_id(group: &str) -> Result<libc::gid_t, SocketError> {
    if let Ok(gid) = group.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group)
        .map_err(|_| SocketError::Group(group.to_owned(), "contains a NUL byte".into()))?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: group is plain old data; all-zero is a valid value.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local or buffer of the
        // stated length; getgrnam_r writes only into them.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(SocketError::Group(
                group.to_owned(),
                io::Error::from_raw_os_error(rc).to_string(),
            ));
        }
        if result.is_null() {
            return Err(SocketError::Group(group.to_owned(), "no such group".into()));
        }
        return Ok(grp.gr_gid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn socket_file_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            bind_socket(&path, None),
            Err(SocketError::NotASocket(_))
        ));
        fs::remove_file(&path).unwrap();
        let (l, f) = bind_socket(&path, None).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(l);
        // the stale socket left by a dead daemon is replaced
        let (l2, f2) = bind_socket(&path, None).unwrap();
        drop(f); // a different socket now: left alone
        assert!(path.exists());
        drop((l2, f2));
        assert!(!path.exists());
        let l3 = UnixListener::bind(dir.path().join("t.sock")).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(l3);
        assert!(listener_from_fd(fd).is_ok());
        let file = fs::File::open(dir.path()).unwrap();
        assert!(listener_from_fd(file.as_raw_fd()).is_err());
    }
}
