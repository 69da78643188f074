//! `impl FileSystem for StoreFs`: the FUSE requests, each answered from
//! the state the sibling modules own (directory cache, handles, checked
//! blobs); everything that would change the store is refused. Apart so the
//! protocol surface reads as one list.
use super::attr::{stat, TTL};
use super::blobs::OpenBlob;
use super::errno::err;
use super::handles::OpenFile;
use super::inodes::InodeKind;
use super::{inline, StoreFs};
use crate::castore::Node;
use crate::lock;
use bytes::Bytes;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

const XATTR_BLOB: &[u8] = b"user.tvix.castore.blob.digest";
const XATTR_DIR: &[u8] = b"user.tvix.castore.directory.digest";
/// The same, as snix names them.
const XATTR_BLOB_SNIX: &[u8] = b"user.snix.castore.blob.digest";
const XATTR_DIR_SNIX: &[u8] = b"user.snix.castore.directory.digest";

/// The xattr size protocol: size 0 asks for the length (`Err(len)`), a
/// buffer too small is ERANGE, otherwise the bytes (`Ok`).
fn xattr_reply(size: u32, bytes: Vec<u8>) -> io::Result<Result<Vec<u8>, u32>> {
    if size == 0 {
        Ok(Err(bytes.len() as u32))
    } else if (size as usize) < bytes.len() {
        Err(err(libc::ERANGE))
    } else {
        Ok(Ok(bytes))
    }
}

fn erofs<T>() -> io::Result<T> {
    Err(err(libc::EROFS))
}

impl FileSystem for StoreFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.reset("FUSE INIT");
        let want = FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::MAX_PAGES
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO;
        Ok(capable & want)
    }

    fn lookup(&self, _: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let name = name.to_bytes();
        match &self.kind(parent)? {
            InodeKind::Root => self.lookup_store_path(name),
            InodeKind::Node(Node::Directory { digest, size }) => {
                let dir = self.directory(digest, *size)?;
                let Some(node) = dir.get(name) else {
                    return Ok(Self::negative(TTL));
                };
                let e = self.child_entry(parent, &Bytes::copy_from_slice(name), node)?;
                inline::took(e.inode);
                Ok(e)
            }
            InodeKind::Node(_) => Err(err(libc::ENOTDIR)),
        }
    }

    fn destroy(&self) {
        self.reset("FUSE DESTROY");
    }

    fn forget(&self, _: &Context, inode: u64, count: u64) {
        self.inodes.forget(inode, count);
    }

    fn batch_forget(&self, _: &Context, requests: Vec<(u64, u64)>) {
        for (ino, count) in requests {
            self.inodes.forget(ino, count);
        }
    }

    fn getattr(
        &self,
        _: &Context,
        inode: u64,
        _: Option<u64>,
    ) -> io::Result<(libc::stat64, Duration)> {
        let kind = self.kind(inode)?;
        Ok((stat(inode, &kind, self.dir_nlink(&kind)?), TTL))
    }

    fn readlink(&self, _: &Context, inode: u64) -> io::Result<Vec<u8>> {
        match &self.kind(inode)? {
            InodeKind::Node(Node::Symlink { target }) => Ok(target.to_vec()),
            _ => Err(err(libc::EINVAL)),
        }
    }

    fn open(
        &self,
        _: &Context,
        inode: u64,
        flags: u32,
        _: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let flags = flags as i32;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return erofs();
        }
        let (digest, size) = match &self.kind(inode)? {
            InodeKind::Node(Node::File { digest, size, .. }) => (*digest, *size),
            InodeKind::Node(Node::Symlink { .. }) => return Err(err(libc::ELOOP)),
            _ => return Err(err(libc::EISDIR)),
        };
        // A guest with more requests queued keeps the disk busy itself:
        // reading ahead for it only costs CPU (measured at depth 64).
        if self.cfg.read_ahead_files > 0
            && !inline::others_waiting()
            && !self.verified.contains(&digest, size)
        {
            self.opening_unread(inode);
        }
        let h = self.handles.open_file(OpenFile {
            digest,
            size,
            blob: None,
        })?;
        Ok((Some(h), self.cfg.cache.file(), None))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _: &Context,
        _: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _: Option<u64>,
        _: u32,
    ) -> io::Result<usize> {
        let file = self.handles.file(handle).ok_or_else(|| err(libc::EBADF))?;
        let (blob, file_size) = {
            let mut f = lock(&file);
            if offset >= f.size {
                return Ok(0);
            }
            (self.blob_of(&mut f)?, f.size)
        };
        let n = (size as u64)
            .min(file_size - offset)
            .min(w.available_bytes() as u64) as usize;
        match &*blob {
            OpenBlob::Bytes(b) => {
                let start = usize::try_from(offset).map_err(|_| err(libc::EINVAL))?;
                let chunk = b.get(start..start + n).ok_or_else(|| err(libc::EIO))?;
                w.write_all(chunk).map(|()| n)
            }
            OpenBlob::File(file) => {
                // SAFETY: the descriptor belongs to `file`, which `blob`
                // keeps open for the whole borrow; ManuallyDrop never closes
                // it. pread (at an offset) leaves its position alone, so
                // handles on other threads may read it at the same time.
                let mut alias = std::mem::ManuallyDrop::new(unsafe {
                    std::fs::File::from_raw_fd(file.as_raw_fd())
                });
                w.write_all_from(&mut *alias, n, offset)?;
                Ok(n)
            }
            OpenBlob::Stream(stream) => {
                let mut buf = vec![0u8; n];
                let mut s = lock(stream);
                let s = &mut *s;
                self.block("reading a blob", async {
                    if s.pos != offset {
                        s.reader.seek(std::io::SeekFrom::Start(offset)).await?;
                    }
                    s.reader.read_exact(&mut buf).await?;
                    Ok(())
                })?;
                s.pos = offset + n as u64;
                w.write_all(&buf)?;
                Ok(n)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        _: &Context,
        _: u64,
        _: u32,
        handle: u64,
        _: bool,
        _: bool,
        _: Option<u64>,
    ) -> io::Result<()> {
        let removed = self.handles.close_file(handle);
        if let Some(file) = &removed {
            let mut f = lock(file);
            if let Some(blob) = f.blob.take() {
                self.blobs.put_back(&(f.digest, f.size), blob);
            }
        }
        Ok(())
    }

    fn statfs(&self, _: &Context, _: u64) -> io::Result<libc::statvfs64> {
        // SAFETY: statvfs64 is plain data; all-zero is a valid value.
        let mut st: libc::statvfs64 = unsafe { std::mem::zeroed() };
        st.f_bsize = 4096;
        st.f_frsize = 4096;
        st.f_namemax = 255;
        st.f_files = self.inodes.len() as u64;
        Ok(st)
    }

    fn getxattr(
        &self,
        _: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let value = match (&self.kind(inode)?, name.to_bytes()) {
            (InodeKind::Node(Node::File { digest, .. }), XATTR_BLOB | XATTR_BLOB_SNIX)
            | (InodeKind::Node(Node::Directory { digest, .. }), XATTR_DIR | XATTR_DIR_SNIX) => {
                digest.to_string().into_bytes()
            }
            _ => return Err(err(libc::ENODATA)),
        };
        Ok(match xattr_reply(size, value)? {
            Ok(v) => GetxattrReply::Value(v),
            Err(n) => GetxattrReply::Count(n),
        })
    }

    fn listxattr(&self, _: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let both: &[&[u8]] = match &self.kind(inode)? {
            InodeKind::Node(Node::File { .. }) => &[XATTR_BLOB, XATTR_BLOB_SNIX],
            InodeKind::Node(Node::Directory { .. }) => &[XATTR_DIR, XATTR_DIR_SNIX],
            _ => &[],
        };
        let mut names = Vec::new();
        for n in both {
            names.extend_from_slice(n);
            names.push(0);
        }
        Ok(match xattr_reply(size, names)? {
            Ok(v) => ListxattrReply::Names(v),
            Err(n) => ListxattrReply::Count(n),
        })
    }

    fn opendir(&self, _: &Context, inode: u64, _: u32) -> io::Result<(Option<u64>, OpenOptions)> {
        match &self.kind(inode)? {
            InodeKind::Root => {
                if !self.cfg.list_root {
                    return Ok((None, OpenOptions::empty()));
                }
                // A snapshot per handle keeps offsets stable while the store changes.
                let h = self.handles.open_dir(self.root_listing()?)?;
                Ok((Some(h), OpenOptions::empty()))
            }
            InodeKind::Node(Node::Directory { digest, size }) => {
                let listing = self.directory(digest, *size)?.entries.clone();
                self.read_soon(&listing);
                let h = self.handles.open_dir(listing)?;
                Ok((Some(h), self.cfg.cache.dir()))
            }
            InodeKind::Node(_) => Err(err(libc::ENOTDIR)),
        }
    }

    fn readdir(
        &self,
        _: &Context,
        inode: u64,
        handle: u64,
        _: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.walk_dir(inode, handle, offset, |d, _| add_entry(d))
    }

    fn readdirplus(
        &self,
        _: &Context,
        inode: u64,
        handle: u64,
        _: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.walk_dir(inode, handle, offset, |mut d, child| {
            let Some((name, node)) = child else {
                return add_entry(d, Entry::default());
            };
            let e = self.child_entry(inode, name, node)?;
            d.ino = e.inode;
            let written = add_entry(d, e);
            // The kernel counts a lookup only for entries it received.
            if matches!(written, Ok(n) if n > 0) {
                inline::took(e.inode);
            } else {
                self.inodes.forget(e.inode, 1);
            }
            written
        })
    }

    fn releasedir(&self, _: &Context, _: u64, _: u32, handle: u64) -> io::Result<()> {
        self.handles.close_dir(handle);
        Ok(())
    }

    // Everything that would change the store is refused.

    fn setattr(
        &self,
        _: &Context,
        _: u64,
        _: libc::stat64,
        _: Option<u64>,
        _: SetattrValid,
    ) -> io::Result<(libc::stat64, Duration)> {
        erofs()
    }

    fn symlink(&self, _: &Context, _: &CStr, _: u64, _: &CStr) -> io::Result<Entry> {
        erofs()
    }

    fn mknod(&self, _: &Context, _: u64, _: &CStr, _: u32, _: u32, _: u32) -> io::Result<Entry> {
        erofs()
    }

    fn mkdir(&self, _: &Context, _: u64, _: &CStr, _: u32, _: u32) -> io::Result<Entry> {
        erofs()
    }

    fn unlink(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        erofs()
    }

    fn rmdir(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        erofs()
    }

    fn rename(&self, _: &Context, _: u64, _: &CStr, _: u64, _: &CStr, _: u32) -> io::Result<()> {
        erofs()
    }

    fn link(&self, _: &Context, _: u64, _: u64, _: &CStr) -> io::Result<Entry> {
        erofs()
    }

    fn create(
        &self,
        _: &Context,
        _: u64,
        _: &CStr,
        _: fuse_backend_rs::abi::fuse_abi::CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        erofs()
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _: &Context,
        _: u64,
        _: u64,
        _: &mut dyn ZeroCopyReader,
        _: u32,
        _: u64,
        _: Option<u64>,
        _: bool,
        _: u32,
        _: u32,
    ) -> io::Result<usize> {
        erofs()
    }

    fn setxattr(&self, _: &Context, _: u64, _: &CStr, _: &[u8], _: u32) -> io::Result<()> {
        erofs()
    }

    fn removexattr(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        erofs()
    }

    fn fallocate(&self, _: &Context, _: u64, _: u64, _: u32, _: u64, _: u64) -> io::Result<()> {
        erofs()
    }
}
