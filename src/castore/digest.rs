//! BLAKE3 digests, the addresses of blobs and directories.
use data_encoding::BASE64;
use std::fmt;

/// Length of a BLAKE3 digest in bytes.
pub const DIGEST_LEN: usize = 32;

/// A BLAKE3 digest. Displayed as `b3:<base64>`, like tvix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct B3Digest([u8; DIGEST_LEN]);

/// A byte string that is not 32 bytes long was offered as a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest length: {0} bytes, expected 32")]
pub struct InvalidDigestLen(pub usize);

impl B3Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; DIGEST_LEN] {
        &self.0
    }

    /// Lowercase hex, used for file names in the local store.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

impl From<[u8; DIGEST_LEN]> for B3Digest {
    fn from(b: [u8; DIGEST_LEN]) -> Self {
        Self(b)
    }
}

impl From<blake3::Hash> for B3Digest {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl TryFrom<&[u8]> for B3Digest {
    type Error = InvalidDigestLen;
    fn try_from(b: &[u8]) -> Result<Self, Self::Error> {
        <[u8; DIGEST_LEN]>::try_from(b)
            .map(Self)
            .map_err(|_| InvalidDigestLen(b.len()))
    }
}

impl From<B3Digest> for bytes::Bytes {
    fn from(d: B3Digest) -> Self {
        bytes::Bytes::copy_from_slice(&d.0)
    }
}

impl fmt::Display for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b3:{}", BASE64.encode(&self.0))
    }
}

impl fmt::Debug for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
