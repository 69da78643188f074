//! Hash strings as Nix prints them (SRI, `algo:nix32`, `algo:hex`,
//! `algo:base64`) and content-address strings (`fixed:r:sha256:...`).

use std::fmt;

use data_encoding::{DecodeError, BASE64, HEXLOWER_PERMISSIVE};
use thiserror::Error;

use super::nixbase32::{self, Nixbase32Error};

/// Hash algorithms Nix knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// Digest size in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// The lowercase name used in hash strings.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Inverse of [`HashAlgo::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        [Self::Md5, Self::Sha1, Self::Sha256, Self::Sha512]
            .into_iter()
            .find(|a| a.name() == s)
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a hash or content-address string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashError {
    #[error("hash {0:?} has no algorithm prefix")]
    MissingAlgo(String),
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgo(String),
    #[error("{algo} hash of {len} characters matches no known encoding")]
    InvalidEncodedLength { algo: HashAlgo, len: usize },
    #[error("{algo} digest is {actual} bytes, expected {expected}")]
    WrongDigestLength {
        algo: HashAlgo,
        expected: usize,
        actual: usize,
    },
    #[error("invalid nixbase32 hash: {0}")]
    Nix32(Nixbase32Error),
    #[error("invalid hex hash: {0}")]
    Hex(DecodeError),
    #[error("invalid base64 hash: {0}")]
    Base64(DecodeError),
    #[error("content address {0:?} does not start with fixed: or text:")]
    UnknownCaMethod(String),
    #[error("text content addresses must use sha256, not {0}")]
    TextNotSha256(HashAlgo),
}

/// A digest together with its algorithm; the length always matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NixHash {
    algo: HashAlgo,
    digest: Vec<u8>,
}

fn parse_algo(s: &str) -> Result<HashAlgo, HashError> {
    HashAlgo::from_name(s).ok_or_else(|| HashError::UnknownAlgo(s.to_owned()))
}

impl NixHash {
    /// Wraps a raw digest, checking its length against `algo`.
    pub fn new(algo: HashAlgo, digest: Vec<u8>) -> Result<Self, HashError> {
        if digest.len() != algo.digest_len() {
            return Err(HashError::WrongDigestLength {
                algo,
                expected: algo.digest_len(),
                actual: digest.len(),
            });
        }
        Ok(Self { algo, digest })
    }

    /// Parses `algo-<base64>` (SRI) or `algo:<nix32|hex|base64>`; the
    /// encoding of the colon form is told apart by its length, as Nix does.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        if s.contains(':') {
            return Self::parse_colon_form(s);
        }
        let (algo, b64) = s
            .split_once('-')
            .ok_or_else(|| HashError::MissingAlgo(s.to_owned()))?;
        let algo = parse_algo(algo)?;
        let digest = BASE64.decode(b64.as_bytes()).map_err(HashError::Base64)?;
        Self::new(algo, digest)
    }

    /// Parses only `algo:<nix32|hex|base64>`, the form used inside `ca`.
    fn parse_colon_form(s: &str) -> Result<Self, HashError> {
        let (algo, enc) = s
            .split_once(':')
            .ok_or_else(|| HashError::MissingAlgo(s.to_owned()))?;
        let algo = parse_algo(algo)?;
        let n = algo.digest_len();
        let bytes = enc.as_bytes();
        let digest = if bytes.len() == 2 * n {
            HEXLOWER_PERMISSIVE.decode(bytes).map_err(HashError::Hex)?
        } else if bytes.len() == nixbase32::encoded_len(n) {
            nixbase32::decode(bytes).map_err(HashError::Nix32)?
        } else if bytes.len() == BASE64.encode_len(n) {
            BASE64.decode(bytes).map_err(HashError::Base64)?
        } else {
            return Err(HashError::InvalidEncodedLength {
                algo,
                len: bytes.len(),
            });
        };
        Self::new(algo, digest)
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn digest(&self) -> &[u8] {
        &self.digest
    }

    /// `sha256-<base64>`, the form newer Nix prints.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, BASE64.encode(&self.digest))
    }

    /// `sha256:<nixbase32>`, the form older Nix prints.
    pub fn to_nix32(&self) -> String {
        format!("{}:{}", self.algo, nixbase32::encode(&self.digest))
    }
}

/// How the content of a content-addressed path was hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaMethod {
    /// `fixed:r:` – hash of the NAR serialisation.
    NarRecursive,
    /// `fixed:` – hash of the plain file contents.
    Flat,
    /// `text:` – hash of a text file (derivations, `builtins.toFile`).
    Text,
}

/// A `ca` field of path info, e.g. `fixed:r:sha256:<nix32>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContentAddress {
    method: CaMethod,
    hash: NixHash,
}

impl ContentAddress {
    /// Combines method and hash; text addresses must use sha256.
    pub fn new(method: CaMethod, hash: NixHash) -> Result<Self, HashError> {
        if method == CaMethod::Text && hash.algo() != HashAlgo::Sha256 {
            return Err(HashError::TextNotSha256(hash.algo()));
        }
        Ok(Self { method, hash })
    }

    /// Parses `fixed:r:<algo>:<hash>`, `fixed:<algo>:<hash>` or
    /// `text:sha256:<hash>`.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let (method, rest) = if let Some(rest) = s.strip_prefix("text:") {
            (CaMethod::Text, rest)
        } else if let Some(rest) = s.strip_prefix("fixed:r:") {
            (CaMethod::NarRecursive, rest)
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            (CaMethod::Flat, rest)
        } else {
            return Err(HashError::UnknownCaMethod(s.to_owned()));
        };
        Self::new(method, NixHash::parse_colon_form(rest)?)
    }

    pub fn method(&self) -> CaMethod {
        self.method
    }

    pub fn hash(&self) -> &NixHash {
        &self.hash
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.method {
            CaMethod::NarRecursive => "fixed:r:",
            CaMethod::Flat => "fixed:",
            CaMethod::Text => "text:",
        };
        write!(f, "{prefix}{}", self.hash.to_nix32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const NIX32: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const B64: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn parses_all_forms_of_empty_sha256() {
        let forms = [
            format!("sha256-{B64}"),
            format!("sha256:{NIX32}"),
            format!("sha256:{HEX}"),
            format!("sha256:{}", HEX.to_uppercase()),
            format!("sha256:{B64}"),
        ];
        for f in &forms {
            let h = NixHash::parse(f).unwrap();
            assert_eq!(h.algo(), HashAlgo::Sha256);
            assert_eq!(h.digest().len(), 32);
            assert_eq!(h.to_sri(), format!("sha256-{B64}"), "{f}");
            assert_eq!(h.to_nix32(), format!("sha256:{NIX32}"), "{f}");
        }
    }

    #[test]
    fn other_algos() {
        // sha1("Hello World"), as printed by nix-hash --base32.
        let h = NixHash::parse("sha1:s23c9fs0v32pf6bhmcph5rbqsyl5ak8a").unwrap();
        assert_eq!(h.algo(), HashAlgo::Sha1);
        let again = NixHash::parse(&h.to_sri()).unwrap();
        assert_eq!(again, h);
        let md5 = NixHash::new(HashAlgo::Md5, vec![7; 16]).unwrap();
        assert_eq!(NixHash::parse(&md5.to_nix32()).unwrap(), md5);
        let sha512 = NixHash::new(HashAlgo::Sha512, vec![9; 64]).unwrap();
        assert_eq!(NixHash::parse(&sha512.to_sri()).unwrap(), sha512);
        assert_eq!(NixHash::parse(&sha512.to_nix32()).unwrap(), sha512);
    }

    #[test]
    fn rejects_bad_hashes() {
        use HashError::*;
        assert_eq!(NixHash::parse(NIX32), Err(MissingAlgo(NIX32.into())));
        assert_eq!(
            NixHash::parse(&format!("blake3:{NIX32}")),
            Err(UnknownAlgo("blake3".into()))
        );
        assert_eq!(
            NixHash::parse("sha256:abc"),
            Err(InvalidEncodedLength {
                algo: HashAlgo::Sha256,
                len: 3
            })
        );
        assert!(matches!(
            NixHash::parse(&format!("sha1-{B64}")),
            Err(WrongDigestLength { actual: 32, .. })
        ));
        assert!(matches!(NixHash::parse("sha256-!!!"), Err(Base64(_))));
        assert!(matches!(
            NixHash::parse(&format!("sha256:{}", "g".repeat(64))),
            Err(Hex(_))
        ));
        assert!(matches!(
            NixHash::parse(&format!("sha256:{}", "e".repeat(52))),
            Err(Nix32(_))
        ));
        assert!(NixHash::parse("").is_err());
        assert!(NixHash::parse("sha256é:x").is_err());
    }

    #[test]
    fn content_addresses() {
        for (s, method) in [
            (format!("fixed:r:sha256:{NIX32}"), CaMethod::NarRecursive),
            (format!("fixed:sha256:{NIX32}"), CaMethod::Flat),
            (format!("text:sha256:{NIX32}"), CaMethod::Text),
        ] {
            let ca = ContentAddress::parse(&s).unwrap();
            assert_eq!(ca.method(), method);
            assert_eq!(ca.hash().to_sri(), format!("sha256-{B64}"));
            assert_eq!(ca.to_string(), s);
        }
        let sha1 = ContentAddress::parse("fixed:r:sha1:s23c9fs0v32pf6bhmcph5rbqsyl5ak8a").unwrap();
        assert_eq!(sha1.hash().algo(), HashAlgo::Sha1);
        // A hex hash is accepted but printed back as nix32.
        let hex = ContentAddress::parse(&format!("fixed:r:sha256:{HEX}")).unwrap();
        assert_eq!(hex.to_string(), format!("fixed:r:sha256:{NIX32}"));
    }

    #[test]
    fn rejects_bad_content_addresses() {
        assert_eq!(
            ContentAddress::parse("text:sha1:s23c9fs0v32pf6bhmcph5rbqsyl5ak8a"),
            Err(HashError::TextNotSha256(HashAlgo::Sha1))
        );
        assert!(matches!(
            ContentAddress::parse(&format!("sha256:{NIX32}")),
            Err(HashError::UnknownCaMethod(_))
        ));
        assert!(ContentAddress::parse(&format!("fixed:r:sha256-{B64}")).is_err());
        assert!(ContentAddress::parse("fixed:r:").is_err());
        assert!(ContentAddress::parse("").is_err());
    }
}
