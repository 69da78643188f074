//! Directory listings as the guest reads them: the root's (every store
//! path, or the closure's, shared while fresh), an open handle's snapshot,
//! and readdir's walk with offsets that stay stable across calls.
use super::attr::dtype;
use super::dircache::Listing;
use super::errno::err;
use super::inodes::{InodeKind, ROOT_INO};
use super::StoreFs;
use crate::castore::Node;
use bytes::Bytes;
use fuse_backend_rs::api::filesystem::DirEntry;
use futures::TryStreamExt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

impl StoreFs {
    /// Every store path, sorted: the shared snapshot when it is under a
    /// second old or unchanged, else a new one.
    pub(super) fn root_listing(&self) -> io::Result<Listing> {
        if let Some(l) = self.handles.root_if_fresh(Duration::from_secs(1)) {
            return Ok(l);
        }
        let mut all = match self.closure() {
            Some(c) => c
                .entries()
                .map(|(name, node)| (Bytes::from(name), node.clone()))
                .collect(),
            None => self.block("listing store paths", async {
                let mut s = self.store.path_info.list();
                let mut out = Vec::new();
                while let Some(info) = s.try_next().await? {
                    out.push((Bytes::from(info.store_path.to_basename()), info.node));
                }
                Ok(out)
            })?,
        };
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.dedup_by(|a, b| a.0 == b.0);
        Ok(self.handles.share_root(all))
    }

    /// The listing of a directory inode: (name, node) in order; the open
    /// handle's snapshot when there is one.
    pub(super) fn listing(&self, ino: u64, handle: u64) -> io::Result<Listing> {
        if let Some(l) = self.handles.dir(handle) {
            return Ok(l);
        }
        match &self.kind(ino)? {
            InodeKind::Root => Ok(Arc::from([])),
            InodeKind::Node(Node::Directory { digest, size }) => {
                Ok(self.directory(digest, *size)?.entries.clone())
            }
            InodeKind::Node(_) => Err(err(libc::ENOTDIR)),
        }
    }

    /// Shared by readdir and readdirplus: `.`, `..`, then the entries, with
    /// offsets that are positions in that list (stable across calls).
    pub(super) fn walk_dir(
        &self,
        ino: u64,
        handle: u64,
        offset: u64,
        mut emit: impl FnMut(DirEntry, Option<(&Bytes, &Node)>) -> io::Result<usize>,
    ) -> io::Result<()> {
        let entries = self.listing(ino, handle)?;
        let dots: [&[u8]; 2] = [b".", b".."];
        let total = entries.len() as u64 + 2;
        for pos in offset..total {
            let next = pos + 1;
            let written = if pos < 2 {
                emit(
                    DirEntry {
                        ino: if pos == 0 { ino } else { ROOT_INO },
                        offset: next,
                        type_: libc::DT_DIR as u32,
                        name: dots[pos as usize],
                    },
                    None,
                )?
            } else {
                let (name, node) = &entries[(pos - 2) as usize];
                emit(
                    DirEntry {
                        // d_ino only; the real number comes with lookup
                        ino: u64::MAX - pos,
                        offset: next,
                        type_: dtype(node),
                        name,
                    },
                    Some((name, node)),
                )?
            };
            if written == 0 {
                break;
            }
        }
        Ok(())
    }
}
