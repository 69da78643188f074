//! A validated store path's metadata: root node, references and NAR facts.
use crate::castore::{Node, NodeError};
use crate::nix::store_path::{StorePath, StorePathError};
use crate::wire::castore as cpb;
use crate::wire::store as pb;
use bytes::Bytes;
use pb::nar_info::ca::Hash as CaKind;

/// Why a PathInfo from outside was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathInfoError {
    #[error("root node missing")]
    MissingNode,
    #[error("root node: {0}")]
    Node(#[from] NodeError),
    #[error("root node name {0:?} is not a store path basename: {1}")]
    RootName(Bytes, StorePathError),
    #[error("narinfo missing")]
    MissingNarInfo,
    #[error("nar_sha256 is {0} bytes, expected 32")]
    NarSha256Len(usize),
    #[error("reference {0} is {1} bytes, expected 20")]
    ReferenceLen(usize, usize),
    #[error("{0} references but {1} reference names")]
    ReferenceCount(usize, usize),
    #[error("reference name {0:?}: {1}")]
    ReferenceName(String, StorePathError),
    #[error("reference name {0:?} does not match reference digest {1}")]
    ReferenceMismatch(String, usize),
    #[error("deriver: {0}")]
    Deriver(StorePathError),
    #[error("content address: unknown hash type {0}")]
    CaKind(i32),
    #[error("content address: {0:?} digest is {1} bytes, expected {2}")]
    CaLen(CaKind, usize, usize),
}

/// A narinfo signature (`name:base64` in Nix's text form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub name: String,
    pub data: Bytes,
}

/// A content address: the hashing kind and its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentAddress {
    pub kind: CaKind,
    pub digest: Bytes,
}

/// Everything known about one store path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub store_path: StorePath,
    pub node: Node,
    pub references: Vec<StorePath>,
    pub nar_size: u64,
    pub nar_sha256: [u8; 32],
    pub signatures: Vec<Signature>,
    pub deriver: Option<StorePath>,
    pub ca: Option<ContentAddress>,
}

fn ca_len(kind: CaKind) -> usize {
    match kind {
        CaKind::NarMd5 | CaKind::FlatMd5 => 16,
        CaKind::NarSha1 | CaKind::FlatSha1 => 20,
        CaKind::NarSha512 | CaKind::FlatSha512 => 64,
        CaKind::NarSha256 | CaKind::TextSha256 | CaKind::FlatSha256 => 32,
    }
}

impl PathInfo {
    /// A path info of `node` and nothing else (no references, signatures
    /// or deriver; NAR size and hash zero): for fixtures and tests that
    /// need a store path to exist, not a checked one.
    pub fn bare(store_path: StorePath, node: Node) -> Self {
        Self {
            store_path,
            node,
            references: vec![],
            nar_size: 0,
            nar_sha256: [0; 32],
            signatures: vec![],
            deriver: None,
            ca: None,
        }
    }

    /// Whether `other` describes the same store path contents: a store path
    /// never changes once it exists, so a second Put must agree on what it
    /// is (tree, NAR, references); signatures and the deriver may differ.
    pub fn same_contents(&self, other: &PathInfo) -> bool {
        self.store_path == other.store_path
            && self.node == other.node
            && self.nar_sha256 == other.nar_sha256
            && self.nar_size == other.nar_size
            && self.references == other.references
    }

    pub fn to_proto(&self) -> pb::PathInfo {
        let name = Bytes::from(self.store_path.to_basename());
        pb::PathInfo {
            node: Some(self.node.to_proto(name)),
            references: self
                .references
                .iter()
                .map(|r| Bytes::copy_from_slice(r.digest()))
                .collect(),
            narinfo: Some(pb::NarInfo {
                nar_size: self.nar_size,
                nar_sha256: Bytes::copy_from_slice(&self.nar_sha256),
                signatures: self
                    .signatures
                    .iter()
                    .map(|s| pb::nar_info::Signature {
                        name: s.name.clone(),
                        data: s.data.clone(),
                    })
                    .collect(),
                reference_names: self.references.iter().map(|r| r.to_basename()).collect(),
                // the wire form leaves out the ".drv" suffix
                deriver: self.deriver.as_ref().map(|d| pb::StorePath {
                    name: d
                        .name()
                        .strip_suffix(".drv")
                        .unwrap_or(d.name())
                        .to_string(),
                    digest: Bytes::copy_from_slice(d.digest()),
                }),
                ca: self.ca.as_ref().map(|c| pb::nar_info::Ca {
                    r#type: c.kind as i32,
                    digest: c.digest.clone(),
                }),
            }),
        }
    }
}

impl TryFrom<pb::PathInfo> for PathInfo {
    type Error = PathInfoError;

    fn try_from(p: pb::PathInfo) -> Result<Self, Self::Error> {
        let root: &cpb::Node = p.node.as_ref().ok_or(PathInfoError::MissingNode)?;
        let (name, node) = Node::from_proto_root(root)?;
        let store_path = std::str::from_utf8(&name)
            .map_err(|_| StorePathError::InvalidUtf8)
            .and_then(StorePath::from_basename)
            .map_err(|e| PathInfoError::RootName(name.clone(), e))?;
        let ni = p.narinfo.ok_or(PathInfoError::MissingNarInfo)?;
        let nar_sha256 = <[u8; 32]>::try_from(&ni.nar_sha256[..])
            .map_err(|_| PathInfoError::NarSha256Len(ni.nar_sha256.len()))?;
        if p.references.len() != ni.reference_names.len() {
            return Err(PathInfoError::ReferenceCount(
                p.references.len(),
                ni.reference_names.len(),
            ));
        }
        let mut references = Vec::with_capacity(p.references.len());
        for (i, (digest, rname)) in p.references.iter().zip(&ni.reference_names).enumerate() {
            if digest.len() != 20 {
                return Err(PathInfoError::ReferenceLen(i, digest.len()));
            }
            let sp = StorePath::from_basename(rname)
                .map_err(|e| PathInfoError::ReferenceName(rname.clone(), e))?;
            if sp.digest()[..] != digest[..] {
                return Err(PathInfoError::ReferenceMismatch(rname.clone(), i));
            }
            references.push(sp);
        }
        let deriver = match ni.deriver {
            None => None,
            Some(d) => {
                let digest = <[u8; 20]>::try_from(&d.digest[..]).map_err(|_| {
                    PathInfoError::Deriver(StorePathError::DigestLength(d.digest.len()))
                })?;
                Some(
                    StorePath::new(digest, format!("{}.drv", d.name))
                        .map_err(PathInfoError::Deriver)?,
                )
            }
        };
        let ca = match ni.ca {
            None => None,
            Some(c) => {
                let kind =
                    CaKind::try_from(c.r#type).map_err(|_| PathInfoError::CaKind(c.r#type))?;
                if c.digest.len() != ca_len(kind) {
                    return Err(PathInfoError::CaLen(kind, c.digest.len(), ca_len(kind)));
                }
                Some(ContentAddress {
                    kind,
                    digest: c.digest,
                })
            }
        };
        Ok(PathInfo {
            store_path,
            node,
            references,
            nar_size: ni.nar_size,
            nar_sha256,
            signatures: ni
                .signatures
                .into_iter()
                .map(|s| Signature {
                    name: s.name,
                    data: s.data,
                })
                .collect(),
            deriver,
            ca,
        })
    }
}

impl ContentAddress {
    /// From Nix's content address (`fixed:r:sha256:…` and friends).
    pub fn from_nix(ca: &crate::nix::hash::ContentAddress) -> Self {
        use crate::nix::hash::{CaMethod, HashAlgo};
        let kind = match (ca.method(), ca.hash().algo()) {
            (CaMethod::NarRecursive, HashAlgo::Sha256) => CaKind::NarSha256,
            (CaMethod::NarRecursive, HashAlgo::Sha1) => CaKind::NarSha1,
            (CaMethod::NarRecursive, HashAlgo::Sha512) => CaKind::NarSha512,
            (CaMethod::NarRecursive, HashAlgo::Md5) => CaKind::NarMd5,
            (CaMethod::Text, _) => CaKind::TextSha256,
            (CaMethod::Flat, HashAlgo::Sha256) => CaKind::FlatSha256,
            (CaMethod::Flat, HashAlgo::Sha1) => CaKind::FlatSha1,
            (CaMethod::Flat, HashAlgo::Sha512) => CaKind::FlatSha512,
            (CaMethod::Flat, HashAlgo::Md5) => CaKind::FlatMd5,
        };
        Self {
            kind,
            digest: Bytes::copy_from_slice(ca.hash().digest()),
        }
    }

    /// Nix's text form, as `nix path-info` prints it.
    pub fn to_nix_string(&self) -> String {
        use crate::nix::nixbase32::encode;
        let d = encode(&self.digest);
        match self.kind {
            CaKind::NarSha256 => format!("fixed:r:sha256:{d}"),
            CaKind::NarSha1 => format!("fixed:r:sha1:{d}"),
            CaKind::NarSha512 => format!("fixed:r:sha512:{d}"),
            CaKind::NarMd5 => format!("fixed:r:md5:{d}"),
            CaKind::TextSha256 => format!("text:sha256:{d}"),
            CaKind::FlatSha256 => format!("fixed:sha256:{d}"),
            CaKind::FlatSha1 => format!("fixed:sha1:{d}"),
            CaKind::FlatSha512 => format!("fixed:sha512:{d}"),
            CaKind::FlatMd5 => format!("fixed:md5:{d}"),
        }
    }
}

/// The first bytes of a hash, enough to tell two apart in a message.
pub fn hex_short(h: &[u8]) -> String {
    h.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PathInfo {
        let r = StorePath::from_basename("00000000000000000000000000000000-dep").unwrap();
        PathInfo {
            store_path: StorePath::from_basename("11111111111111111111111111111111-foo").unwrap(),
            node: Node::Symlink {
                target: "/x".into(),
            },
            references: vec![r.clone()],
            nar_size: 120,
            nar_sha256: [7; 32],
            signatures: vec![Signature {
                name: "k-1".into(),
                data: Bytes::from_static(&[1, 2]),
            }],
            deriver: Some(StorePath::new([3; 20], "foo.drv").unwrap()),
            ca: Some(ContentAddress {
                kind: CaKind::NarSha256,
                digest: Bytes::from(vec![7; 32]),
            }),
        }
    }

    #[test]
    fn roundtrip() {
        let p = sample();
        assert_eq!(PathInfo::try_from(p.to_proto()).unwrap(), p);
    }

    #[test]
    fn rejects_invalid() {
        let mut pb = sample().to_proto();
        pb.narinfo.as_mut().unwrap().reference_names[0] =
            "22222222222222222222222222222222-dep".into();
        assert!(matches!(
            PathInfo::try_from(pb),
            Err(PathInfoError::ReferenceMismatch(..))
        ));
        let mut pb = sample().to_proto();
        pb.narinfo.as_mut().unwrap().nar_sha256 = Bytes::from_static(&[1; 31]);
        assert!(PathInfo::try_from(pb).is_err());
        let mut pb = sample().to_proto();
        pb.references[0] = Bytes::from_static(&[1; 19]);
        assert!(PathInfo::try_from(pb).is_err());
        let mut pb = sample().to_proto();
        pb.node = Some(
            Node::Symlink {
                target: "/x".into(),
            }
            .to_proto("not-a-store-path".into()),
        );
        assert!(matches!(
            PathInfo::try_from(pb),
            Err(PathInfoError::RootName(..))
        ));
        let mut pb = sample().to_proto();
        pb.narinfo.as_mut().unwrap().reference_names.clear();
        assert!(PathInfo::try_from(pb).is_err());
        let mut pb = sample().to_proto();
        pb.narinfo.as_mut().unwrap().ca.as_mut().unwrap().digest = Bytes::from_static(&[1; 20]);
        assert!(PathInfo::try_from(pb).is_err());
    }
}
