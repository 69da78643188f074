//! The store's one write policy: which path infos may become visible,
//! whatever way they came in (a gRPC Put, a binary cache upload, a command
//! talking to a daemon). It wraps the store's path info service, so no
//! transport can forget it.
//!
//! Open (no trusted keys), it admits what a listener lets in. With trusted
//! keys, a path info needs a valid signature by one of them, and its tree
//! must render to the NAR hash and size that signature covers: Nix signs a
//! NAR, not a castore tree, so without the render a signature copied from
//! a genuine narinfo would carry any contents under a real package's name.
use crate::castore::Node;
use crate::nix::path_info::{PathInfo, Signature};
use crate::nix::signing::{fingerprint, PublicKey, SecretKey};
use crate::nix::store_path::StorePath;
use crate::store::{Error, PathInfoService, Result, Store};
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// NARs hashed in this process as they were ingested, remembered so that
/// admitting their path info does not render them again: as many as the
/// binary cache keeps uploads waiting for their narinfo.
const MAX_VOUCHED: usize = 1024;
/// Trees rendered at once to check a Put: each reads every blob of its
/// path, so a client cannot make the daemon hash many at a time.
const RENDERS_AT_ONCE: usize = 2;
/// Signatures looked at per path info (Nix's carry one or two): more only
/// cost Ed25519 checks.
pub(crate) const MAX_SIGNATURES: usize = 16;

/// See the module header.
pub struct WritePolicy {
    trusted: Vec<PublicKey>,
    /// (tree, NAR size, NAR SHA-256) this process computed itself.
    vouched: Mutex<VecDeque<(Node, u64, [u8; 32])>>,
    renders: tokio::sync::Semaphore,
}

impl WritePolicy {
    /// Admits a path info only when one of `trusted` signed it; none: admits
    /// whatever reaches the store.
    pub fn new(trusted: Vec<PublicKey>) -> Arc<Self> {
        Arc::new(Self {
            trusted,
            vouched: Mutex::new(VecDeque::new()),
            renders: tokio::sync::Semaphore::new(RENDERS_AT_ONCE),
        })
    }

    /// Whether anything that reaches the store is admitted.
    pub fn is_open(&self) -> bool {
        self.trusted.is_empty()
    }

    /// `store` with this policy in front of its path infos; reads are
    /// unchanged.
    pub fn guard(self: &Arc<Self>, store: Store) -> Store {
        Store {
            blob: store.blob.clone(),
            directory: store.directory.clone(),
            path_info: Arc::new(Guarded {
                inner: store.path_info.clone(),
                contents: store,
                policy: self.clone(),
            }),
        }
    }

    /// Records that this process just hashed the NAR of `node` from the
    /// bytes it ingested, so that its path info is admitted without a
    /// second render. Only code that computed the triple itself calls it.
    pub fn vouch(&self, node: &Node, nar_size: u64, nar_sha256: [u8; 32]) {
        if self.is_open() {
            return;
        }
        let mut v = self.vouched.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() >= MAX_VOUCHED {
            v.pop_front();
        }
        v.push_back((node.clone(), nar_size, nar_sha256));
    }

    /// The trusted key that signed `info`, if any.
    pub fn signer(&self, info: &PathInfo) -> Option<&PublicKey> {
        self.signer_of(
            &info.store_path,
            &info.nar_sha256,
            info.nar_size,
            &info.references,
            &mut info
                .signatures
                .iter()
                .map(|s| (s.name.as_str(), &s.data[..])),
        )
    }

    /// The trusted key among `sigs` (key name, signature bytes) that signed
    /// Nix's fingerprint of the rest, if any.
    pub fn signer_of(
        &self,
        path: &StorePath,
        nar_sha256: &[u8; 32],
        nar_size: u64,
        references: &[StorePath],
        sigs: &mut dyn Iterator<Item = (&str, &[u8])>,
    ) -> Option<&PublicKey> {
        let fp = fingerprint(path, nar_sha256, nar_size, references);
        let sigs: Vec<_> = sigs.take(MAX_SIGNATURES).collect();
        self.trusted.iter().find(|k| {
            sigs.iter()
                .any(|(name, data)| k.verifies_raw(&fp, name, data))
        })
    }

    /// Whether `info` may become visible; `contents` holds its tree.
    pub async fn admit(&self, info: &PathInfo, contents: &Store) -> Result<()> {
        if self.is_open() {
            return Ok(());
        }
        let Some(key) = self.signer(info) else {
            return Err(Error::Untrusted(format!(
                "{}: no valid signature by a trusted key (--trusted-public-keys) over its \
                 NAR hash, size and references",
                info.store_path
            )));
        };
        // A signed path is admitted only with its closure: what it
        // references must be there already (the binary cache asked this
        // of uploads before; now every way in does).
        for r in info.references.iter().filter(|r| **r != info.store_path) {
            let there = contents.path_info.get(r.digest()).await?;
            if there.is_none_or(|i| i.store_path != *r) {
                return Err(Error::Untrusted(format!(
                    "{}: its reference {r} is not in the store (add it first)",
                    info.store_path
                )));
            }
        }
        if self.take_vouched(info) {
            return Ok(());
        }
        let _permit = self
            .renders
            .acquire()
            .await
            .map_err(|_| Error::Untrusted("the daemon is shutting down".into()))?;
        let (size, sha) = crate::ingest::calculate_nar(&info.node, contents).await?;
        if size != info.nar_size || sha != info.nar_sha256 {
            return Err(Error::Untrusted(format!(
                "{}: signed by {} for a NAR of {} bytes, but its tree renders to another NAR \
                 ({size} bytes)",
                info.store_path, key.name, info.nar_size
            )));
        }
        Ok(())
    }

    fn take_vouched(&self, info: &PathInfo) -> bool {
        let mut v = self.vouched.lock().unwrap_or_else(|e| e.into_inner());
        let found = v.iter().position(|(node, size, sha)| {
            *node == info.node && *size == info.nar_size && *sha == info.nar_sha256
        });
        found.and_then(|i| v.remove(i)).is_some()
    }
}

/// The path info service behind a [`WritePolicy`].
struct Guarded {
    inner: Arc<dyn PathInfoService>,
    /// The unguarded store, whose trees the policy renders.
    contents: Store,
    policy: Arc<WritePolicy>,
}

#[async_trait]
impl PathInfoService for Guarded {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>> {
        self.inner.get(digest).await
    }

    fn get_blocking(&self, digest: &[u8; 20]) -> Option<Result<Option<PathInfo>>> {
        self.inner.get_blocking(digest)
    }

    async fn put(&self, info: PathInfo) -> Result<PathInfo> {
        self.policy.admit(&info, &self.contents).await?;
        self.inner.put(info).await
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        self.inner.list()
    }
}

/// A store whose path info Puts are signed with `key` on their way out:
/// how a local command (`import`, `copy`, `import-nar`) adds paths through a
/// daemon that admits only signed ones.
pub fn signing(store: Store, key: SecretKey) -> Store {
    Store {
        path_info: Arc::new(Signing {
            inner: store.path_info.clone(),
            key,
        }),
        ..store
    }
}

struct Signing {
    inner: Arc<dyn PathInfoService>,
    key: SecretKey,
}

#[async_trait]
impl PathInfoService for Signing {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>> {
        self.inner.get(digest).await
    }

    fn get_blocking(&self, digest: &[u8; 20]) -> Option<Result<Option<PathInfo>>> {
        self.inner.get_blocking(digest)
    }

    async fn put(&self, mut info: PathInfo) -> Result<PathInfo> {
        let fp = fingerprint(
            &info.store_path,
            &info.nar_sha256,
            info.nar_size,
            &info.references,
        );
        info.signatures.retain(|s| s.name != self.key.name);
        info.signatures.push(Signature {
            name: self.key.name.clone(),
            data: bytes::Bytes::copy_from_slice(&self.key.signature(&fp)),
        });
        self.inner.put(info).await
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        self.inner.list()
    }
}
