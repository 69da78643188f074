//! Blob opening and checking: a blob is checked against its digest and
//! size before its first byte is served (on this thread for a local file or
//! bytes, through the store otherwise), remembered as checked, and shared
//! between handles; and the read-ahead hooks that tell the store which
//! blobs are likely read next. Apart because this is where the view's
//! integrity promise is kept.
use super::blobs::OpenBlob;
use super::dircache::Listing;
use super::errno::err;
use super::handles::OpenFile;
use super::inodes::InodeKind;
use super::{inline, StoreFs};
use crate::castore::{B3Digest, Node};
use crate::store::blob::{BlobReader, Direct};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

impl StoreFs {
    /// Opens a blob and checks it against its digest and size (once, while
    /// it is remembered as checked and, for a file, while it is the file
    /// that was checked), so no byte of a blob is served before the blob
    /// was checked.
    pub(super) fn open_blob(
        &self,
        digest: &B3Digest,
        size: u64,
    ) -> io::Result<Box<dyn BlobReader>> {
        let known = self.verified.contains(digest, size);
        if !known && size > INLINE_CHECK_MAX && inline::defer() {
            return Err(err(libc::EAGAIN));
        }
        // A local blob opens, and is checked, right here: no runtime hop.
        if let Some(opened) = self.store.blob.open_read_blocking(digest) {
            let mut r = match opened.and_then(|r| r.ok_or_else(|| not_found(digest))) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("blob {digest}: {e}");
                    return Err(err(libc::EIO));
                }
            };
            let (trusted, stamp) = self.already_checked(&mut *r, digest, size, known);
            if trusted {
                return Ok(r);
            }
            // Remembered, but its file changed since: a large one is
            // checked again off the queue thread.
            if known && size > INLINE_CHECK_MAX && inline::defer() {
                return Err(err(libc::EAGAIN));
            }
            match check_direct(&mut *r, digest, size) {
                Ok(true) => {
                    self.verified.insert(digest, size, stamp);
                    return Ok(r);
                }
                Ok(false) => {} // no direct access: check it the async way
                Err(e) => {
                    tracing::error!("blob {digest}: {e}");
                    return Err(err(libc::EIO));
                }
            }
        }
        // Fetches take as long as they keep moving: the services time out
        // a stalled transfer, not a long one.
        let (r, trusted, stamp) =
            self.block_within(None, format_args!("blob {digest}"), async {
                let mut r = self
                    .store
                    .blob
                    .open_read_sized(digest, size)
                    .await?
                    .ok_or_else(|| not_found(digest))?;
                let (trusted, stamp) = self.already_checked(&mut *r, digest, size, known);
                if !trusted && !check_direct(&mut *r, digest, size)? {
                    let mut h = blake3::Hasher::new();
                    let mut buf = vec![0u8; 1 << 17];
                    let mut n_total = 0u64;
                    loop {
                        let n = r.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                        n_total += n as u64;
                    }
                    check(digest, size, h, n_total)?;
                    r.rewind().await?;
                }
                Ok((r, trusted, stamp))
            })?;
        if !trusted {
            self.verified.insert(digest, size, stamp);
        }
        Ok(r)
    }

    /// Whether an opened blob was checked already, and the stamp of its
    /// file to remember once it is: a file is trusted only while it is the
    /// file that was checked, bytes in memory are hashed again (cheaply:
    /// they are at hand), a stream (a remote's, which checks what it
    /// sends) is trusted once checked, and one that checks each piece it
    /// hands out (a large blob read by leaves) when its length is `size`:
    /// reading it whole first would cost the whole blob for one page.
    pub(super) fn already_checked(
        &self,
        r: &mut dyn BlobReader,
        digest: &B3Digest,
        size: u64,
        known: bool,
    ) -> (bool, Option<u64>) {
        match r.direct() {
            Some(Direct::File(f)) => {
                let stamp = self.verified.stamp(f);
                let trusted =
                    known && stamp.is_some_and(|s| self.verified.contains_file(digest, size, s));
                (trusted, stamp)
            }
            Some(Direct::Bytes(_)) => (false, None),
            None => match r.checks_itself() {
                Some(len) => (len == size, None),
                None => (known, None),
            },
        }
    }

    /// The blob an open file reads from: its own, another handle's on the
    /// same blob, or newly opened and checked.
    pub(super) fn blob_of(&self, f: &mut OpenFile) -> io::Result<Arc<OpenBlob>> {
        if let Some(b) = &f.blob {
            return Ok(b.clone());
        }
        let key = (f.digest, f.size);
        let b = match self.blobs.get(&key) {
            Some(b) => b,
            None => {
                let r = self.open_blob(&f.digest, f.size)?;
                self.blobs.share(key, r.into_shared().into())
            }
        };
        f.blob = Some(b.clone());
        Ok(b)
    }

    /// The guest is listing a directory: the files in it not yet checked
    /// (their blobs not yet opened) are likely read next. Only the first
    /// entries are looked at, so opening a huge directory again and again
    /// costs no scan of it each time.
    pub(super) fn read_soon(&self, listing: &Listing) {
        const SCAN: usize = 32_768;
        // A directory walked before has its files checked: after this many
        // in a row, stop looking (a warm walk's OPENDIRs would otherwise
        // look up every file of every large directory).
        const CHECKED_RUN: usize = 512;
        let mut run = 0;
        let mut files = listing
            .iter()
            .take(SCAN)
            .filter_map(|(_, node)| match node {
                Node::File { digest, size, .. } => Some((digest, *size)),
                _ => None,
            })
            .map_while(|(digest, size)| {
                if !self.verified.contains(digest, size) {
                    run = 0;
                    return Some(Some(*digest));
                }
                run += 1;
                (run < CHECKED_RUN).then_some(None)
            })
            .flatten();
        self.store.blob.read_soon(&mut files);
    }

    /// The guest opens file `inode` not yet read: when it reads its
    /// directory's files in order, the next ones are read ahead. Only from
    /// what the view holds in memory: no store call, no wait.
    pub(super) fn opening_unread(&self, inode: u64) {
        let Some((parent, name)) = self.inodes.place(inode) else {
            return;
        };
        let Some(InodeKind::Node(Node::Directory { digest, .. })) = self.inodes.get(parent) else {
            return;
        };
        let Some(dir) = self.dircache.remembered(&digest) else {
            return;
        };
        let Some(pos) = dir.position(&name) else {
            return;
        };
        let ahead = self.sequential.opened(parent, pos);
        let Some(next) = dir
            .entries
            .get(ahead.start..ahead.end.min(dir.entries.len()))
        else {
            return;
        };
        let mut files = next.iter().filter_map(|(_, node)| match node {
            Node::File { digest, size, .. } if !self.verified.contains(digest, *size) => {
                Some((*digest, *size))
            }
            _ => None,
        });
        self.store.blob.read_ahead(&mut files);
    }
}

pub(super) fn not_found(digest: &B3Digest) -> crate::store::Error {
    crate::store::Error::NotFound(format!("blob {digest}"))
}

/// Compares what was hashed with what the directory promised.
pub(super) fn check(
    digest: &B3Digest,
    size: u64,
    h: blake3::Hasher,
    n_total: u64,
) -> crate::store::Result<()> {
    let actual = B3Digest::from(h.finalize());
    if actual != *digest {
        return Err(crate::store::Error::DigestMismatch {
            expected: *digest,
            actual,
        });
    }
    if n_total != size {
        return Err(crate::store::Error::SizeMismatch {
            digest: *digest,
            expected: size,
            actual: n_total,
        });
    }
    Ok(())
}

/// Bytes hashed per read while checking a blob file: one such buffer per
/// thread that checks (up to `--thread-pool-size` workers and the queue's
/// thread), so small; a syscall per 32 KiB is noise next to hashing.
pub(super) const CHECK_CHUNK: usize = 32 << 10;
/// Larger blobs are not checked on the virtio queue's own thread: the
/// request is deferred to a worker, so one big first read does not hold up
/// every other request.
pub(super) const INLINE_CHECK_MAX: u64 = 1 << 20;

/// Checks a blob on this thread through its direct bytes or file; false
/// when the reader offers neither.
pub(super) fn check_direct(
    r: &mut dyn BlobReader,
    digest: &B3Digest,
    size: u64,
) -> crate::store::Result<bool> {
    let mut h = blake3::Hasher::new();
    let n_total = match r.direct() {
        Some(Direct::Bytes(b)) => {
            h.update(b);
            b.len() as u64
        }
        Some(Direct::File(f)) => {
            use std::os::unix::fs::FileExt;
            thread_local! {
                static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            BUF.with_borrow_mut(|buf| -> io::Result<u64> {
                buf.resize(CHECK_CHUNK, 0);
                let mut off = 0u64;
                loop {
                    let n = f.read_at(buf, off)?;
                    h.update(&buf[..n]);
                    off += n as u64;
                    // A blob file reads short only at its end: most blobs
                    // are smaller than a chunk and take one read, not two.
                    // (Were a read short elsewhere, the digest would not
                    // match and nothing would be served.)
                    if n < buf.len() {
                        return Ok(off);
                    }
                }
            })?
        }
        None => return Ok(false),
    };
    check(digest, size, h, n_total)?;
    Ok(true)
}
