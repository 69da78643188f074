//! `--closure-file` for the sandboxed `virtiofs`: the serving process
//! reaches no host path for it. Exposing the file's directory would show
//! all of it to a process that runs as root (`--closure-file
//! /etc/x.closure` made `/etc/shadow` readable inside the sandbox).
//! Instead the supervisor, outside the sandbox, opens the file by the path
//! the operator gave, at the start and again on each SIGHUP (so a file
//! replaced by rename, or a symbolic link switched to another target, is
//! followed), and hands the opened descriptor to the serving process over
//! a socket pair; the serving process reads the roots from the latest one.
use crate::nix::store_path::StorePath;
use crate::store::closure::{self, ClosureError};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

#[derive(Debug, thiserror::Error)]
pub enum ClosureFileError {
    #[error("closure file {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("closure file {}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("handing closure file {} to the serving process: {source}", path.display())]
    Send { path: PathBuf, source: io::Error },
}

/// The supervisor's end: opens the file and sends its descriptor.
#[derive(Debug)]
pub struct Sender {
    path: PathBuf,
    sock: UnixDatagram,
}

/// The serving process's end: the latest descriptor received.
#[derive(Debug)]
pub struct Receiver {
    path: PathBuf,
    sock: UnixDatagram,
    current: Mutex<Option<File>>,
}

/// A connected pair for the closure file at `path` (as given: it is opened
/// by that path each time). Neither end blocks: a supervisor whose serving
/// process has not taken the previous descriptors yet (the queue is the
/// kernel's, bounded by `net.unix.max_dgram_qlen` messages) reports an
/// error instead of waiting, and the serving process takes what is there.
pub fn channel(path: &Path) -> io::Result<(Sender, Receiver)> {
    let (tx, rx) = UnixDatagram::pair()?;
    tx.set_nonblocking(true)?;
    rx.set_nonblocking(true)?;
    Ok((
        Sender {
            path: path.to_path_buf(),
            sock: tx,
        },
        Receiver {
            path: path.to_path_buf(),
            sock: rx,
            current: Mutex::new(None),
        },
    ))
}

impl Sender {
    /// Opens the file (a regular file only: a FIFO would hang the reader)
    /// and hands it over.
    pub fn send(&self) -> Result<(), ClosureFileError> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(&self.path)
            .map_err(|source| ClosureFileError::Open {
                path: self.path.clone(),
                source,
            })?;
        let regular = f.metadata().is_ok_and(|m| m.file_type().is_file());
        if !regular {
            return Err(ClosureFileError::NotAFile {
                path: self.path.clone(),
            });
        }
        self.sock
            .send_with_fd(&[0u8][..], f.as_raw_fd())
            .map_err(|e| ClosureFileError::Send {
                path: self.path.clone(),
                source: io::Error::from_raw_os_error(e.errno()),
            })?;
        Ok(())
    }
}

impl Receiver {
    /// The socket's descriptor, kept open across the sandbox's set-up.
    pub fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The roots in the latest file handed over.
    pub fn read_roots(&self) -> Result<Vec<StorePath>, ClosureError> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut byte = [0u8; 1];
            match self.sock.recv_with_fd(&mut byte) {
                Ok((_, Some(f))) => *current = Some(f),
                Ok((_, None)) => break,
                Err(e) if e.errno() == libc::EAGAIN => break,
                Err(e) => {
                    tracing::warn!("receiving the closure file: {e}");
                    break;
                }
            }
        }
        let shown = self.path.display().to_string();
        let Some(f) = current.as_ref() else {
            return Err(ClosureError::File {
                path: shown,
                source: io::Error::other("not handed over by the supervisor"),
            });
        };
        // From the start each time: the same file may be read again.
        let reader = PositionalReader { file: f, offset: 0 };
        closure::read_roots_from(reader, &shown)
    }
}

/// Reads a shared file from an offset of its own (pread), leaving the
/// descriptor's position alone.
struct PositionalReader<'a> {
    file: &'a File,
    offset: u64,
}

impl io::Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "00000000000000000000000000000000-a";
    const OTHER: &str = "11111111111111111111111111111111-b";

    #[test]
    fn the_latest_file_handed_over_is_read_and_a_rename_is_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.closure");
        std::fs::write(&path, format!("{ROOT}\n")).unwrap();
        let (tx, rx) = channel(&path).unwrap();
        tx.send().unwrap();
        assert_eq!(rx.read_roots().unwrap()[0].to_basename(), ROOT);
        // read again from the start, with nothing new handed over
        assert_eq!(rx.read_roots().unwrap().len(), 1);
        // replaced by rename: the next descriptor is the new file
        let new = tmp.path().join("x.new");
        std::fs::write(&new, format!("{ROOT}\n{OTHER}\n")).unwrap();
        std::fs::rename(&new, &path).unwrap();
        tx.send().unwrap();
        assert_eq!(rx.read_roots().unwrap().len(), 2);
        // gone: the sender says so, and the last one handed over stays
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(tx.send(), Err(ClosureFileError::Open { .. })));
        assert_eq!(rx.read_roots().unwrap().len(), 2);
        // not a regular file
        let dir_path = tmp.path().to_path_buf();
        let (tx, _rx) = channel(&dir_path).unwrap();
        assert!(matches!(tx.send(), Err(ClosureFileError::NotAFile { .. })));
    }
}
