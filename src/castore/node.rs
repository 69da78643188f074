//! Entries of a directory tree, validated on the way in from the wire.
use super::digest::{B3Digest, InvalidDigestLen};
use crate::wire::castore as pb;
use bytes::Bytes;

/// Longest name a directory entry may have (Linux NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target (Linux PATH_MAX minus the NUL).
pub const MAX_TARGET_LEN: usize = 4095;

/// Why a node or name from outside was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("invalid entry name {0:?}: {1}")]
    InvalidName(Bytes, &'static str),
    #[error("entry {0:?}: {1}")]
    InvalidDigest(Bytes, InvalidDigestLen),
    #[error("symlink {0:?}: invalid target: {1}")]
    InvalidTarget(Bytes, &'static str),
    #[error("node has no kind set")]
    Empty,
    #[error("file {0:?}: size {1} is beyond what a file can hold (2^63 - 1 bytes)")]
    TooLarge(Bytes, u64),
}

/// One filesystem object: what a name in a directory (or a store path) points to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Directory {
        digest: B3Digest,
        size: u64,
    },
    File {
        digest: B3Digest,
        size: u64,
        executable: bool,
    },
    Symlink {
        target: Bytes,
    },
}

/// Checks the rules every entry name obeys, so it can be used as a path component.
pub fn validate_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty")
    } else if name.len() > MAX_NAME_LEN {
        Err("longer than 255 bytes")
    } else if name == b"." || name == b".." {
        Err("is . or ..")
    } else if name.contains(&b'/') {
        Err("contains '/'")
    } else if name.contains(&0) {
        Err("contains NUL")
    } else {
        Ok(())
    }
}

/// Checks a symlink target: 1 to 4095 bytes, no NUL.
pub fn validate_target(target: &[u8]) -> Result<(), &'static str> {
    if target.is_empty() {
        Err("empty")
    } else if target.len() > MAX_TARGET_LEN {
        Err("longer than 4095 bytes")
    } else if target.contains(&0) {
        Err("contains NUL")
    } else {
        Ok(())
    }
}

impl Node {
    /// Encodes this node under `name` (not validated: callers hold valid names).
    pub fn to_proto(&self, name: Bytes) -> pb::Node {
        use pb::node::Node as N;
        let inner = match self {
            Node::Directory { digest, size } => N::Directory(pb::DirectoryNode {
                name,
                digest: (*digest).into(),
                size: *size,
            }),
            Node::File {
                digest,
                size,
                executable,
            } => N::File(pb::FileNode {
                name,
                digest: (*digest).into(),
                size: *size,
                executable: *executable,
            }),
            Node::Symlink { target } => N::Symlink(pb::SymlinkNode {
                name,
                target: target.clone(),
            }),
        };
        pb::Node { node: Some(inner) }
    }

    /// Decodes a root node (as in a PathInfo or CalculateNAR), returning its name
    /// unvalidated: roots carry store path basenames or nothing.
    pub fn from_proto_root(node: &pb::Node) -> Result<(Bytes, Node), NodeError> {
        use pb::node::Node as N;
        match &node.node {
            None => Err(NodeError::Empty),
            Some(N::Directory(d)) => Ok((d.name.clone(), Self::from_dir_node(d)?)),
            Some(N::File(f)) => Ok((f.name.clone(), Self::from_file_node(f)?)),
            Some(N::Symlink(s)) => Ok((s.name.clone(), Self::from_symlink_node(s)?)),
        }
    }

    pub(crate) fn from_dir_node(d: &pb::DirectoryNode) -> Result<Node, NodeError> {
        Ok(Node::Directory {
            digest: B3Digest::try_from(&d.digest[..])
                .map_err(|e| NodeError::InvalidDigest(d.name.clone(), e))?,
            size: d.size,
        })
    }

    pub(crate) fn from_file_node(f: &pb::FileNode) -> Result<Node, NodeError> {
        // st_size and file offsets are signed 64-bit.
        if i64::try_from(f.size).is_err() {
            return Err(NodeError::TooLarge(f.name.clone(), f.size));
        }
        Ok(Node::File {
            digest: B3Digest::try_from(&f.digest[..])
                .map_err(|e| NodeError::InvalidDigest(f.name.clone(), e))?,
            size: f.size,
            executable: f.executable,
        })
    }

    pub(crate) fn from_symlink_node(s: &pb::SymlinkNode) -> Result<Node, NodeError> {
        validate_target(&s.target).map_err(|e| NodeError::InvalidTarget(s.name.clone(), e))?;
        Ok(Node::Symlink {
            target: s.target.clone(),
        })
    }
}
