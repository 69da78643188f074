//! Nix's narinfo signatures: Ed25519 over the fingerprint
//! `1;<store path>;<nar hash>;<nar size>;<references>`, keys written
//! `name:base64` (a secret key is the 64-byte seed-and-public-key form).
use super::hash::{HashAlgo, NixHash};
use super::store_path::StorePath;
use data_encoding::BASE64;
use ed25519_dalek::{Signer, Verifier};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a key is written NAME:BASE64")]
    Shape,
    #[error("key {0:?}: not base64")]
    Base64(String),
    #[error("key {name:?}: {len} bytes, expected {want}")]
    Length {
        name: String,
        len: usize,
        want: usize,
    },
    #[error("key {0:?}: the public half does not match the secret")]
    Mismatch(String),
    #[error("key {0:?}: not an Ed25519 public key")]
    NotAKey(String),
}

fn split(s: &str) -> Result<(String, Vec<u8>), KeyError> {
    let (name, b64) = s.trim().split_once(':').ok_or(KeyError::Shape)?;
    if name.is_empty() {
        return Err(KeyError::Shape);
    }
    let bytes = BASE64
        .decode(b64.as_bytes())
        .map_err(|_| KeyError::Base64(name.into()))?;
    Ok((name.into(), bytes))
}

pub struct SecretKey {
    pub name: String,
    key: ed25519_dalek::SigningKey,
}

impl SecretKey {
    /// Nix's secret key format (`nix-store --generate-binary-cache-key`).
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split(s)?;
        let pair: [u8; 64] = bytes.as_slice().try_into().map_err(|_| KeyError::Length {
            name: name.clone(),
            len: bytes.len(),
            want: 64,
        })?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&pair)
            .map_err(|_| KeyError::Mismatch(name.clone()))?;
        Ok(Self { name, key })
    }

    /// `name:base64` of the public key, as `trusted-public-keys` takes it.
    pub fn public(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.verifying_key().as_bytes())
        )
    }

    /// The signature of `fingerprint`, as a narinfo's `Sig:` holds it.
    pub fn sign(&self, fingerprint: &str) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(&self.signature(fingerprint))
        )
    }

    /// The signature's bytes, as a path info holds them.
    pub fn signature(&self, fingerprint: &str) -> [u8; 64] {
        self.key.sign(fingerprint.as_bytes()).to_bytes()
    }
}

#[derive(Clone, Debug)]
pub struct PublicKey {
    pub name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split(s)?;
        let raw: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length {
            name: name.clone(),
            len: bytes.len(),
            want: 32,
        })?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| KeyError::NotAKey(name.clone()))?;
        Ok(Self { name, key })
    }

    /// Whether `sig` (`name:base64`) is this key's signature of `fingerprint`.
    pub fn verifies(&self, fingerprint: &str, sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        let Ok(bytes) = BASE64.decode(b64.as_bytes()) else {
            return false;
        };
        self.verifies_raw(fingerprint, name, &bytes)
    }

    /// As `verifies`, for a signature already split into its key name and
    /// bytes (as a path info holds it).
    pub fn verifies_raw(&self, fingerprint: &str, name: &str, sig: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
            return false;
        };
        name == self.name && self.key.verify(fingerprint.as_bytes(), &sig).is_ok()
    }
}

/// What Nix signs for a store path.
pub fn fingerprint(
    path: &StorePath,
    nar_sha256: &[u8; 32],
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let hash = NixHash::new(HashAlgo::Sha256, nar_sha256.to_vec())
        .map(|h| h.to_nix32())
        .unwrap_or_default();
    let mut refs: Vec<String> = references.iter().map(|r| r.to_absolute_path()).collect();
    refs.sort();
    format!(
        "1;{};{hash};{nar_size};{}",
        path.to_absolute_path(),
        refs.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_its_public_key_only() {
        let seed = [7u8; 32];
        let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
        let text = format!("test-1:{}", BASE64.encode(&sk.to_keypair_bytes()));
        let key = SecretKey::parse(&text).unwrap();
        let public = PublicKey::parse(&key.public()).unwrap();
        let p = StorePath::from_basename(&format!("{}-x", "0".repeat(32))).unwrap();
        let fp = fingerprint(&p, &[1; 32], 42, &[]);
        assert!(
            fp.starts_with("1;/nix/store/") && fp.ends_with(";42;"),
            "{fp}"
        );
        let sig = key.sign(&fp);
        assert!(public.verifies(&fp, &sig));
        assert!(!public.verifies(&fingerprint(&p, &[1; 32], 43, &[]), &sig));
        assert!(!public.verifies(&fp, &sig.replacen("test-1", "other", 1)));
        assert!(SecretKey::parse("nocolon").is_err());
        assert!(PublicKey::parse("k:AAAA").is_err());
    }
}
