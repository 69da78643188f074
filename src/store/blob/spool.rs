//! Where a remote blob waits while it is checked: a blob is handed out
//! only once all of it has been hashed against its digest, so its bytes
//! are kept until then, in memory while small and in an unnamed file
//! (or a memory file, inside the sandbox) when large. Shared by every
//! backend that fetches blobs (gRPC, object storage).
use super::{BlobReader, FileReader};
use crate::castore::B3Digest;
use crate::store::{Error, Result};
use bytes::Bytes;
use std::io::{Seek, Write};

/// Blobs up to this size are verified in memory; larger ones in a file.
const SPOOL_IN_MEMORY: usize = 4 << 20;

pub(crate) enum Spool {
    Memory(Vec<u8>, bool),
    File(std::io::BufWriter<std::fs::File>),
}

/// An unnamed file for a large blob: in the temporary directory, or in
/// memory (memfd).
fn spool_file(memfd: bool) -> std::io::Result<std::fs::File> {
    if !memfd {
        return tempfile::tempfile();
    }
    // SAFETY: the name is a valid C string; the new fd is owned below.
    let fd = unsafe { libc::memfd_create(c"tvix-blob".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and belongs to nobody else.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

impl Spool {
    /// An empty spool; `memfd`: large blobs go to memory files (the
    /// sandbox has no writable directory).
    pub(crate) fn new(memfd: bool) -> Self {
        Spool::Memory(Vec::new(), memfd)
    }

    pub(crate) fn push(&mut self, data: &[u8]) -> std::io::Result<()> {
        if let Spool::Memory(buf, memfd) = self {
            if buf.len() + data.len() <= SPOOL_IN_MEMORY {
                buf.extend_from_slice(data);
                return Ok(());
            }
            let mut f = std::io::BufWriter::with_capacity(1 << 20, spool_file(*memfd)?);
            f.write_all(buf)?;
            *self = Spool::File(f);
        }
        if let Spool::File(f) = self {
            f.write_all(data)?;
        }
        Ok(())
    }

    pub(crate) fn into_reader(self) -> std::io::Result<Box<dyn BlobReader>> {
        Ok(match self {
            Spool::Memory(buf, _) => Box::new(std::io::Cursor::new(Bytes::from(buf))),
            Spool::File(f) => {
                let mut f = f.into_inner().map_err(|e| e.into_error())?;
                f.rewind()?;
                Box::new(FileReader::new(f)?)
            }
        })
    }
}

/// A fetched blob on its way in: hashed and spooled as its chunks come,
/// refused past the size asked for, handed out only if its digest is the
/// one it was asked by. Every backend that fetches blobs checks through
/// it, so they refuse alike.
pub(crate) struct Checking {
    digest: B3Digest,
    limit: Option<u64>,
    hasher: blake3::Hasher,
    spool: Spool,
    n: u64,
}

impl Checking {
    pub(crate) fn new(digest: B3Digest, limit: Option<u64>, memfd: bool) -> Self {
        Self {
            digest,
            limit,
            hasher: blake3::Hasher::new(),
            spool: Spool::new(memfd),
            n: 0,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<()> {
        self.n += chunk.len() as u64;
        if let Some(limit) = self.limit.filter(|&l| self.n > l) {
            return Err(Error::SizeMismatch {
                digest: self.digest,
                expected: limit,
                actual: self.n,
            });
        }
        self.hasher.update(chunk);
        self.spool.push(chunk)?;
        Ok(())
    }

    /// The blob, if it is what it was asked by; `from` names the source in
    /// the log line of a mismatch.
    pub(crate) fn finish(self, from: &str) -> Result<Box<dyn BlobReader>> {
        let actual = B3Digest::from(self.hasher.finalize());
        if actual != self.digest {
            tracing::error!(
                expected = %self.digest, %actual,
                "{from} holds other bytes under blob {} ({} bytes read)", self.digest, self.n
            );
            return Err(Error::DigestMismatch {
                expected: self.digest,
                actual,
            });
        }
        Ok(self.spool.into_reader()?)
    }
}
