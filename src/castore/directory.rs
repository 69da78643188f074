//! A validated directory listing and its content address.
use super::digest::B3Digest;
use super::node::{validate_name, Node, NodeError};
use crate::wire::castore as pb;
use bytes::Bytes;
use prost::Message;
use std::collections::BTreeMap;

/// Why a directory from outside was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("duplicate entry name {0:?}")]
    DuplicateName(Bytes),
    #[error("{0} entries are not sorted: {1:?} after {2:?}")]
    Unsorted(&'static str, Bytes, Bytes),
    #[error("directory size overflows")]
    SizeOverflow,
    #[error("malformed Directory message: {0}")]
    Decode(String),
}

/// A directory: names (sorted as raw bytes) to nodes. Every instance is valid.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    entries: BTreeMap<Bytes, Node>,
    // Σ sizes of child directories, kept to make `size()` O(1) and overflow-checked.
    child_sizes: u64,
}

impl Directory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry, refusing invalid or duplicate names.
    pub fn add(&mut self, name: Bytes, node: Node) -> Result<(), DirectoryError> {
        validate_name(&name).map_err(|e| NodeError::InvalidName(name.clone(), e))?;
        if let Node::Symlink { target } = &node {
            super::node::validate_target(target)
                .map_err(|e| NodeError::InvalidTarget(name.clone(), e))?;
        }
        if self.entries.contains_key(&name) {
            return Err(DirectoryError::DuplicateName(name));
        }
        let child = match &node {
            Node::Directory { size, .. } => *size,
            _ => 0,
        };
        let child_sizes = self
            .child_sizes
            .checked_add(child)
            .ok_or(DirectoryError::SizeOverflow)?;
        // keep 2 * len + child_sizes representable
        let len2 = (self.entries.len() as u64 + 1) * 2;
        child_sizes
            .checked_add(len2)
            .ok_or(DirectoryError::SizeOverflow)?;
        self.child_sizes = child_sizes;
        self.entries.insert(name, node);
        Ok(())
    }

    pub fn entries(&self) -> impl ExactSizeIterator<Item = (&Bytes, &Node)> {
        self.entries.iter()
    }

    /// The entries as their map, for walks that keep an iterator.
    pub fn entries_map(&self) -> &BTreeMap<Bytes, Node> {
        &self.entries
    }

    pub fn get(&self, name: &[u8]) -> Option<&Node> {
        self.entries.get(name)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `DirectoryNode.size` tvix-store writes and checks:
    /// every entry counts 2, plus the sizes of child directories.
    pub fn size(&self) -> u64 {
        self.entries.len() as u64 * 2 + self.child_sizes
    }

    /// The size the protocol's documentation defines: entries plus child sizes.
    /// Any declared size at least this large is accepted on receipt.
    pub fn documented_size(&self) -> u64 {
        self.entries.len() as u64 + self.child_sizes
    }

    /// Roughly what this directory takes in memory, for caches that bound
    /// their bytes.
    pub fn heap_size(&self) -> u64 {
        // per entry: the name, the node and the tree's bookkeeping
        let per_entry = (std::mem::size_of::<(Bytes, Node)>() + 32) as u64;
        self.entries
            .iter()
            .map(|(n, node)| {
                let target = match node {
                    Node::Symlink { target } => target.len() as u64,
                    _ => 0,
                };
                n.len() as u64 + target + per_entry
            })
            .sum::<u64>()
            + std::mem::size_of::<Self>() as u64
    }

    /// Child directories, as (name, digest, declared size).
    pub fn child_directories(&self) -> impl Iterator<Item = (&Bytes, B3Digest, u64)> {
        self.entries.iter().filter_map(|(n, node)| match node {
            Node::Directory { digest, size } => Some((n, *digest, *size)),
            _ => None,
        })
    }

    /// The canonical wire form (each list sorted, defaults omitted).
    pub fn to_proto(&self) -> pb::Directory {
        let mut out = pb::Directory::default();
        for (name, node) in &self.entries {
            match node {
                Node::Directory { digest, size } => out.directories.push(pb::DirectoryNode {
                    name: name.clone(),
                    digest: (*digest).into(),
                    size: *size,
                }),
                Node::File {
                    digest,
                    size,
                    executable,
                } => out.files.push(pb::FileNode {
                    name: name.clone(),
                    digest: (*digest).into(),
                    size: *size,
                    executable: *executable,
                }),
                Node::Symlink { target } => out.symlinks.push(pb::SymlinkNode {
                    name: name.clone(),
                    target: target.clone(),
                }),
            }
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// The content address: BLAKE3 of the canonical encoding.
    pub fn digest(&self) -> B3Digest {
        B3Digest::of(&self.encode())
    }

    /// Decodes and validates a stored or received encoding. From a
    /// `Bytes`, names and targets are slices of it: one allocation per
    /// directory, not one per entry.
    pub fn decode(bytes: impl bytes::Buf) -> Result<Self, DirectoryError> {
        let pb = pb::Directory::decode(bytes).map_err(|e| DirectoryError::Decode(e.to_string()))?;
        Self::try_from(pb)
    }
}

fn check_sorted<'a>(
    kind: &'static str,
    names: impl Iterator<Item = &'a Bytes>,
) -> Result<(), DirectoryError> {
    let mut prev: Option<&Bytes> = None;
    for n in names {
        if let Some(p) = prev {
            if n == p {
                return Err(DirectoryError::DuplicateName(n.clone()));
            }
            if n < p {
                return Err(DirectoryError::Unsorted(kind, n.clone(), p.clone()));
            }
        }
        prev = Some(n);
    }
    Ok(())
}

impl TryFrom<pb::Directory> for Directory {
    type Error = DirectoryError;

    /// Accepts only canonical listings: each list sorted, names unique across lists.
    fn try_from(d: pb::Directory) -> Result<Self, Self::Error> {
        check_sorted("directory", d.directories.iter().map(|e| &e.name))?;
        check_sorted("file", d.files.iter().map(|e| &e.name))?;
        check_sorted("symlink", d.symlinks.iter().map(|e| &e.name))?;
        let mut out = Directory::new();
        for e in &d.directories {
            out.add(e.name.clone(), Node::from_dir_node(e)?)?;
        }
        for e in &d.files {
            out.add(e.name.clone(), Node::from_file_node(e)?)?;
        }
        for e in &d.symlinks {
            out.add(e.name.clone(), Node::from_symlink_node(e)?)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(d: u8) -> Node {
        Node::File {
            digest: [d; 32].into(),
            size: 1,
            executable: false,
        }
    }

    #[test]
    fn empty_directory_digest_matches_tvix() {
        assert!(Directory::new().digest().to_hex().starts_with("af1349b9"));
    }

    #[test]
    fn sizes_follow_tvix_and_documented_rules() {
        let mut sub = Directory::new();
        sub.add("a".into(), file(1)).unwrap();
        sub.add("b".into(), file(2)).unwrap();
        assert_eq!(sub.size(), 4);
        let mut root = Directory::new();
        root.add(
            "sub".into(),
            Node::Directory {
                digest: sub.digest(),
                size: sub.size(),
            },
        )
        .unwrap();
        root.add("z".into(), file(3)).unwrap();
        assert_eq!(root.size(), 2 * 2 + 4);
        assert_eq!(root.documented_size(), 2 + 4);
    }

    #[test]
    fn roundtrip_and_digest_stable() {
        let mut d = Directory::new();
        d.add("x".into(), file(1)).unwrap();
        d.add("l".into(), Node::Symlink { target: "x".into() })
            .unwrap();
        let back = Directory::decode(&d.encode()[..]).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.digest(), d.digest());
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 256][..]] {
            let mut d = Directory::new();
            assert!(
                d.add(Bytes::copy_from_slice(bad), file(1)).is_err(),
                "{bad:?}"
            );
        }
        let mut d = Directory::new();
        assert!(d.add(Bytes::from(vec![b'x'; 255]), file(1)).is_ok());
    }

    fn fnode(name: &str) -> pb::FileNode {
        pb::FileNode {
            name: Bytes::copy_from_slice(name.as_bytes()),
            digest: Bytes::from(vec![0u8; 32]),
            size: 0,
            executable: false,
        }
    }

    #[test]
    fn rejects_unsorted_duplicate_and_cross_list_names() {
        let unsorted = pb::Directory {
            files: vec![fnode("b"), fnode("a")],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(unsorted),
            Err(DirectoryError::Unsorted(..))
        ));
        let dup = pb::Directory {
            files: vec![fnode("a"), fnode("a")],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(dup),
            Err(DirectoryError::DuplicateName(_))
        ));
        let cross = pb::Directory {
            files: vec![fnode("a")],
            symlinks: vec![pb::SymlinkNode {
                name: "a".into(),
                target: "t".into(),
            }],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(cross),
            Err(DirectoryError::DuplicateName(_))
        ));
    }

    #[test]
    fn rejects_bad_digests_and_targets() {
        let mut f = fnode("a");
        f.digest = Bytes::from(vec![0u8; 31]);
        let d = pb::Directory {
            files: vec![f],
            ..Default::default()
        };
        assert!(Directory::try_from(d).is_err());
        // a size no file can have (it would be a negative st_size)
        for (size, ok) in [(i64::MAX as u64, true), (1 << 63, false), (u64::MAX, false)] {
            let mut f = fnode("big");
            f.size = size;
            let d = pb::Directory {
                files: vec![f],
                ..Default::default()
            };
            assert_eq!(Directory::try_from(d).is_ok(), ok, "{size}");
        }
        for t in [&b""[..], b"a\0", &[b'a'; 4096][..]] {
            let d = pb::Directory {
                symlinks: vec![pb::SymlinkNode {
                    name: "l".into(),
                    target: Bytes::copy_from_slice(t),
                }],
                ..Default::default()
            };
            assert!(Directory::try_from(d).is_err());
        }
        assert!(Directory::decode(&b"\xff\xff\xff"[..]).is_err());
    }
}
