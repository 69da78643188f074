//! File attributes as Nix has them in /nix/store: root-owned, read-only,
//! mtime 1.
use super::inodes::InodeKind;
use crate::castore::Node;
use std::time::Duration;

/// Attribute and entry lifetime for anything below a store path: the
/// content is immutable. (Not `Duration::MAX`: the kernel keeps seconds in
/// a signed 64-bit field.)
pub const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the kernel may remember that a store path does not exist: new
/// paths can appear at any time.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// `nlink` is the directory's own count when known (2 + subdirectories).
pub fn stat(ino: u64, kind: &InodeKind, dir_nlink: u64) -> libc::stat64 {
    // SAFETY: stat64 is plain data; all-zero is a valid value.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    st.st_ino = ino;
    st.st_blksize = 4096;
    st.st_mtime = 1;
    st.st_atime = 1;
    st.st_ctime = 1;
    let (mode, size, nlink) = match kind {
        InodeKind::Root => (libc::S_IFDIR | 0o555, 0, dir_nlink),
        InodeKind::Node(Node::Directory { .. }) => (libc::S_IFDIR | 0o555, 0, dir_nlink),
        InodeKind::Node(Node::File {
            size, executable, ..
        }) => (
            libc::S_IFREG | if *executable { 0o555 } else { 0o444 },
            *size,
            1,
        ),
        InodeKind::Node(Node::Symlink { target }) => {
            (libc::S_IFLNK | 0o777, target.len() as u64, 1)
        }
    };
    st.st_mode = mode;
    st.st_size = size as i64;
    st.st_blocks = size.div_ceil(512) as i64;
    st.st_nlink = nlink;
    st
}

/// `d_type` for readdir.
pub fn dtype(node: &Node) -> u32 {
    (match node {
        Node::Directory { .. } => libc::DT_DIR,
        Node::File { .. } => libc::DT_REG,
        Node::Symlink { .. } => libc::DT_LNK,
    }) as u32
}
