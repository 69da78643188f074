//! The path info of a NAR read into the store, from the metadata Nix
//! gives with it (`nix path-info --json`, a narinfo): refused unless the
//! NAR is the one that metadata describes.
use crate::ingest::Ingested;
use crate::nix::path_info::{ContentAddress, PathInfo, Signature};
use crate::nix::store_path::StorePath;
use bytes::Bytes;

/// A NAR that is not the one its path info describes.
#[derive(Debug, thiserror::Error)]
pub enum NarMismatch {
    #[error("{0}: NAR hash is not SHA-256")]
    NotSha256(StorePath),
    #[error("{path}: NAR mismatch: NarHash {expected} and NarSize {expected_size} were expected, the NAR is {actual} and {actual_size} bytes")]
    Differs {
        path: StorePath,
        expected: String,
        expected_size: u64,
        actual: String,
        actual_size: u64,
    },
}

impl PathInfo {
    /// The path info for an ingested NAR that Nix's metadata `n` describes:
    /// refused unless the NAR's hash and size are what `n` says.
    pub fn from_nix(
        n: &crate::nix::path_info_json::NixPathInfo,
        ing: Ingested,
    ) -> Result<PathInfo, NarMismatch> {
        use crate::nix::hash::{HashAlgo, NixHash};
        if n.nar_hash.algo() != HashAlgo::Sha256 {
            return Err(NarMismatch::NotSha256(n.path.clone()));
        }
        if ing.nar_sha256[..] != *n.nar_hash.digest() || ing.nar_size != n.nar_size {
            return Err(NarMismatch::Differs {
                path: n.path.clone(),
                expected: n.nar_hash.to_sri(),
                expected_size: n.nar_size,
                actual: NixHash::new(HashAlgo::Sha256, ing.nar_sha256.to_vec())
                    .map(|h| h.to_sri())
                    .unwrap_or_default(),
                actual_size: ing.nar_size,
            });
        }
        let mut references = n.references.clone();
        references.sort();
        Ok(PathInfo {
            store_path: n.path.clone(),
            node: ing.node,
            references,
            nar_size: ing.nar_size,
            nar_sha256: ing.nar_sha256,
            signatures: n
                .signatures
                .iter()
                .map(|(name, data)| Signature {
                    name: name.clone(),
                    data: Bytes::copy_from_slice(data),
                })
                .collect(),
            deriver: n.deriver.clone(),
            ca: n.ca.as_ref().map(ContentAddress::from_nix),
        })
    }
}
