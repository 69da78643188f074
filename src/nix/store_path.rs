//! Store paths (`/nix/store/<digest>-<name>`): validation, formatting, and
//! the computation Nix uses for paths added with `nix-store --add`.

use std::fmt;

use data_encoding::HEXLOWER;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::nixbase32::{self, Nixbase32Error};
use super::STORE_DIR;

/// Length of the nixbase32 digest part of a basename.
const DIGEST_CHARS: usize = 32;
/// Nix's name limit; it keeps basenames (plus suffixes such as `.lock`) short
/// enough for common file systems.
const MAX_NAME_LEN: usize = 211;

/// What is wrong with a store path or store path name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorePathError {
    #[error("store path {0:?} is not directly inside {STORE_DIR}/")]
    NotInStoreDir(String),
    #[error("store path {0:?} has components after the basename")]
    HasSubPath(String),
    #[error("basename has no '-' between digest and name")]
    MissingDash,
    #[error("digest part is {0} characters long, expected {DIGEST_CHARS}")]
    InvalidHashLength(usize),
    #[error("invalid digest: {0}")]
    InvalidHash(Nixbase32Error),
    #[error("store path name is empty")]
    EmptyName,
    #[error("store path name is {0} bytes long, at most {MAX_NAME_LEN} allowed")]
    NameTooLong(usize),
    #[error("store path name must not start with '.'")]
    NameStartsWithDot,
    #[error("invalid character {char:?} at byte {position} of store path name")]
    InvalidNameChar { char: char, position: usize },
    #[error("store path is not valid UTF-8")]
    InvalidUtf8,
    #[error("store path digest is {0} bytes, expected 20")]
    DigestLength(usize),
}

/// A validated store path; the store directory is always [`STORE_DIR`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    digest: [u8; 20],
    name: String,
}

/// Checks a name against the rules Nix enforces when creating store paths.
fn validate_name(name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(name.len()));
    }
    if name.starts_with('.') {
        return Err(StorePathError::NameStartsWithDot);
    }
    for (position, c) in name.char_indices() {
        if !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)) {
            return Err(StorePathError::InvalidNameChar { char: c, position });
        }
    }
    Ok(())
}

impl StorePath {
    /// Builds a store path from its parts, validating the name.
    pub fn new(digest: [u8; 20], name: impl Into<String>) -> Result<Self, StorePathError> {
        let name = name.into();
        validate_name(&name)?;
        Ok(Self { digest, name })
    }

    /// The 20-byte digest (decoded from the 32 nixbase32 characters).
    pub fn digest(&self) -> &[u8; 20] {
        &self.digest
    }

    /// The part after the dash, e.g. `hello-2.12.1`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Parses `<32 nixbase32 chars>-<name>`.
    pub fn from_basename(s: &str) -> Result<Self, StorePathError> {
        let (hash, name) = s.split_once('-').ok_or(StorePathError::MissingDash)?;
        if hash.len() != DIGEST_CHARS {
            return Err(StorePathError::InvalidHashLength(hash.len()));
        }
        let digest =
            nixbase32::decode_fixed::<20>(hash.as_bytes()).map_err(StorePathError::InvalidHash)?;
        Self::new(digest, name)
    }

    /// Parses `/nix/store/<basename>`; paths below a store path are rejected.
    pub fn from_absolute_path(s: &str) -> Result<Self, StorePathError> {
        let basename = s
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStoreDir(s.to_owned()))?;
        if basename.contains('/') {
            return Err(StorePathError::HasSubPath(s.to_owned()));
        }
        Self::from_basename(basename)
    }

    /// `<32 nixbase32 chars>-<name>`.
    pub fn to_basename(&self) -> String {
        format!("{}-{}", nixbase32::encode(&self.digest), self.name)
    }

    /// `/nix/store/<basename>`.
    pub fn to_absolute_path(&self) -> String {
        format!("{STORE_DIR}/{}", self.to_basename())
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_absolute_path())
    }
}

/// XOR-folds `input` into `N` bytes, as Nix truncates sha256 to 160 bits.
pub fn compress_hash<const N: usize>(input: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    if N == 0 {
        return out;
    }
    for (i, b) in input.iter().enumerate() {
        out[i % N] ^= b;
    }
    out
}

/// The store path `nix-store --add` (recursive sha256) gives a tree whose NAR
/// has sha256 `nar_sha256` and which refers to `references`.
pub fn make_source_path(
    name: &str,
    nar_sha256: &[u8; 32],
    references: &[StorePath],
) -> Result<StorePath, StorePathError> {
    validate_name(name)?;
    // Nix keeps references in a set ordered by their printed path.
    let mut refs: Vec<String> = references.iter().map(StorePath::to_absolute_path).collect();
    refs.sort();
    refs.dedup();
    let mut fingerprint = String::from("source");
    for r in &refs {
        fingerprint.push(':');
        fingerprint.push_str(r);
    }
    fingerprint.push_str(&format!(
        ":sha256:{}:{STORE_DIR}:{name}",
        HEXLOWER.encode(nar_sha256)
    ));
    let digest = compress_hash::<20>(&Sha256::digest(fingerprint.as_bytes()));
    StorePath::new(digest, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASENAME: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432";

    #[test]
    fn basename_roundtrip() {
        let p = StorePath::from_basename(BASENAME).unwrap();
        assert_eq!(p.name(), "net-tools-1.60_p20170221182432");
        assert_eq!(p.to_basename(), BASENAME);
        assert_eq!(p.to_absolute_path(), format!("/nix/store/{BASENAME}"));
        assert_eq!(p.to_string(), p.to_absolute_path());
        assert_eq!(StorePath::from_absolute_path(&p.to_string()).unwrap(), p);
        let q = StorePath::new(*p.digest(), "x+y=z?._-").unwrap();
        assert_eq!(StorePath::from_basename(&q.to_basename()).unwrap(), q);
    }

    #[test]
    fn rejects_bad_basenames() {
        use StorePathError::*;
        let bad_char = "00bgd045z0d4icpbc2yyz4gx48ak44le-foo";
        assert!(matches!(
            StorePath::from_basename(bad_char),
            Err(InvalidHash(Nixbase32Error::InvalidChar { byte: b'e', .. }))
        ));
        let h = &BASENAME[..32];
        let cases = [
            (format!("{h}-.hidden"), NameStartsWithDot),
            (
                format!("{h}-a/b"),
                InvalidNameChar {
                    char: '/',
                    position: 1,
                },
            ),
            (format!("{h}-{}", "a".repeat(212)), NameTooLong(212)),
            (format!("{h}-"), EmptyName),
            (format!("{h}foo"), MissingDash),
            (format!("{}-foo", &h[..31]), InvalidHashLength(31)),
            (format!("{h}x-foo"), InvalidHashLength(33)),
            (
                format!("{h}-caf\u{e9}"),
                InvalidNameChar {
                    char: '\u{e9}',
                    position: 3,
                },
            ),
        ];
        for (input, err) in cases {
            assert_eq!(StorePath::from_basename(&input), Err(err), "{input}");
        }
        assert!(StorePath::from_basename(&format!("{h}-{}", "a".repeat(211))).is_ok());
    }

    #[test]
    fn absolute_path_rules() {
        let ok = format!("/nix/store/{BASENAME}");
        assert!(StorePath::from_absolute_path(&ok).is_ok());
        for bad in [
            format!("{ok}/bin/sh"),
            format!("{ok}/"),
            format!("/nix/store2/{BASENAME}"),
            format!("/nix/storex{BASENAME}"),
            BASENAME.to_owned(),
            String::new(),
        ] {
            assert!(StorePath::from_absolute_path(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn compress_hash_xor_folds() {
        assert_eq!(compress_hash::<2>(&[1, 2, 4, 8, 16]), [1 ^ 4 ^ 16, 2 ^ 8]);
        assert_eq!(compress_hash::<4>(&[7]), [7, 0, 0, 0]);
        assert_eq!(compress_hash::<0>(&[7]), [0u8; 0]);
    }

    /// NAR serialisation of a single non-executable regular file.
    fn nar_of_file(contents: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"regular",
            b"contents",
            contents,
            b")",
        ] {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out
    }

    #[test]
    fn source_path_matches_nix() {
        // The Nix Pills example: a file `myfile` containing "mycontent\n".
        let nar_sha256: [u8; 32] = Sha256::digest(nar_of_file(b"mycontent\n")).into();
        assert_eq!(
            HEXLOWER.encode(&nar_sha256),
            "2bfef67de873c54551d884fdab3055d84d573e654efa79db3c0d7b98883f9ee3"
        );
        let p = make_source_path("myfile", &nar_sha256, &[]).unwrap();
        assert_eq!(p.to_basename(), "xv2iccirbrvklck36f1g7vldn5v58vck-myfile");
    }

    #[test]
    fn source_path_is_deterministic_and_uses_references() {
        let a = make_source_path("foo", &[0u8; 32], &[]).unwrap();
        assert_eq!(a, make_source_path("foo", &[0u8; 32], &[]).unwrap());
        assert_eq!(a.name(), "foo");
        let r1 = StorePath::from_basename(BASENAME).unwrap();
        let r2 = make_source_path("bar", &[1u8; 32], &[]).unwrap();
        let with = make_source_path("foo", &[0u8; 32], &[r1.clone(), r2.clone()]).unwrap();
        assert_ne!(with, a);
        let swapped = make_source_path("foo", &[0u8; 32], &[r2, r1]).unwrap();
        assert_eq!(with, swapped);
        assert_eq!(
            make_source_path(".foo", &[0u8; 32], &[]),
            Err(StorePathError::NameStartsWithDot)
        );
    }
}
