//! An S3-compatible bucket as the store's object space (`s3://BUCKET[/PREFIX]
//! ?endpoint=URL&region=R`): the client, the credentials, and the keys the
//! three services keep their objects under, readable by anyone who lists
//! the bucket:
//!
//! - `PREFIX/blobs/<blake3 hex>`: a blob's bytes;
//! - `PREFIX/directories/<blake3 hex>`: a directory's canonical encoding;
//! - `PREFIX/pathinfo/<nixbase32 hash>`: a path info (tvix's protobuf);
//! - `PREFIX/packs/<blake3 hex>`: the pack index of the tree whose root
//!   directory has that digest, and `PREFIX/packs/parts/<blake3 hex>` its
//!   parts (see [`crate::castore::pack`]): copies of the tree's small
//!   blobs, so a reader of many pays a request per run of them; and
//!   `PREFIX/packs/trees/<blake3 hex>` every directory of the tree whose
//!   root has that digest, so a first lookup of it is one GET;
//! - `PREFIX/tmp/...`: large blobs while they are uploaded in parts
//!   (their name is only known once hashed).
//!
//! Every object is written whole (a PUT, or a multipart upload completed at
//! once), so a reader never sees half of one; what is read is checked
//! against the name it is read under, as from any other remote, and held to
//! the length the server declared for it (a server may send more). The
//! distributed part (replicas, failures of nodes) is the object store's.
use crate::castore::B3Digest;
use crate::store::error::{Error, Result};
use object_store::path::Path as Key;
use object_store::ObjectStore;
use std::sync::Arc;
use std::time::Duration;

/// Where a bucket is and how to reach it, as the address gives it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BucketAddr {
    pub bucket: String,
    /// Key prefix ("" for the bucket's root), without slashes at its ends.
    pub prefix: String,
    /// `http(s)://HOST[:PORT]` of an S3-compatible endpoint; `None`: AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

impl BucketAddr {
    /// From what follows `s3://` (`BUCKET[/PREFIX][?endpoint=URL&region=R]`).
    pub fn parse(rest: &str) -> std::result::Result<Self, String> {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = path.trim_end_matches('/');
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(format!(
                "{bucket:?} is not a bucket name (3-63 of a-z, 0-9, '-', '.')"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|s| s == "." || s == "..")
            || prefix.contains("//")
            || prefix.bytes().any(|b| b.is_ascii_control())
        {
            return Err(format!("{prefix:?} is not a key prefix"));
        }
        let mut out = BucketAddr {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint: None,
            region: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("endpoint", v)) if v.starts_with("http://") || v.starts_with("https://") => {
                    out.endpoint = Some(v.trim_end_matches('/').into())
                }
                Some(("endpoint", v)) => {
                    return Err(format!("endpoint {v:?} is not an http:// or https:// URL"))
                }
                Some(("region", v)) if !v.is_empty() => out.region = Some(v.into()),
                _ => {
                    return Err(format!(
                        "unknown parameter {pair:?} (endpoint=URL, region=R; credentials come \
                         from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a credentials file, \
                         never the address)"
                    ))
                }
            }
        }
        Ok(out)
    }

    /// `host:port` of the endpoint, for the sandbox (which must let the
    /// process reach it, resolved before it closes).
    pub fn endpoint_host(&self) -> Option<String> {
        let ep = self.endpoint.as_deref()?;
        let (scheme, rest) = ep.split_once("://")?;
        let hostport = rest.split('/').next()?;
        if hostport
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !hostport.ends_with(']')
        {
            Some(hostport.into())
        } else {
            Some(format!(
                "{hostport}:{}",
                if scheme == "https" { 443 } else { 80 }
            ))
        }
    }

    /// The same bucket through `host:port` (a resolved address).
    pub fn with_endpoint_host(&self, hostport: &str) -> Self {
        let mut out = self.clone();
        if let Some((scheme, _)) = self.endpoint.as_deref().and_then(|e| e.split_once("://")) {
            out.endpoint = Some(format!("{scheme}://{hostport}"));
        }
        out
    }
}

impl std::fmt::Display for BucketAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        let mut sep = '?';
        if let Some(e) = &self.endpoint {
            write!(f, "{sep}endpoint={e}")?;
            sep = '&';
        }
        if let Some(r) = &self.region {
            write!(f, "{sep}region={r}")?;
        }
        Ok(())
    }
}

/// The credentials: the environment's (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), else the shared
/// credentials file (`AWS_SHARED_CREDENTIALS_FILE` or
/// `~/.aws/credentials`, profile `AWS_PROFILE` or `default`).
fn credentials() -> Option<(String, String, Option<String>)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Some((id, secret, env("AWS_SESSION_TOKEN")));
    }
    let file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| env("HOME").map(|h| std::path::Path::new(&h).join(".aws/credentials")))?;
    let text = std::fs::read_to_string(file).ok()?;
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let (mut id, mut secret, mut token, mut inside) = (None, None, None, false);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == profile;
        } else if let (true, Some((k, v))) = (inside, line.split_once('=')) {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some((id?, secret?, token))
}

/// An open bucket: the client and the prefix every key is under.
#[derive(Clone)]
pub struct Bucket {
    pub(crate) store: Arc<dyn ObjectStore>,
    prefix: String,
    /// Longest wait for a request's answer or its body's next bytes.
    pub(crate) idle: Duration,
    addr: BucketAddr,
}

impl Bucket {
    /// The client for `addr`, `idle` the longest a transfer may make no
    /// progress. Connects lazily: nothing is asked of the bucket here.
    pub fn open(addr: &BucketAddr, idle: Duration) -> Result<Self> {
        use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
        let bad = |why: String| Error::InvalidAddress(addr.to_string(), why);
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&addr.bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_connect_timeout(idle)
                    // a whole request may take as long as it keeps moving:
                    // the body's progress is watched by the services
                    .with_timeout_disabled()
                    .with_pool_idle_timeout(Duration::from_secs(30)),
            )
            .with_retry(object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: idle,
                ..Default::default()
            });
        match credentials() {
            Some((id, secret, token)) => {
                b = b.with_access_key_id(id).with_secret_access_key(secret);
                if let Some(t) = token {
                    b = b.with_token(t);
                }
            }
            None => {
                return Err(bad(
                    "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
                     write them to ~/.aws/credentials (AWS_SHARED_CREDENTIALS_FILE)"
                        .into(),
                ))
            }
        }
        if let Some(ep) = &addr.endpoint {
            // S3-compatible servers (Garage, MinIO, Ceph) answer on one
            // host: the bucket goes in the path.
            b = b
                .with_endpoint(ep)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(ep.starts_with("http://"));
        }
        let region = addr
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        b = b.with_region(region);
        let store = b.build().map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: addr.prefix.clone(),
            idle,
            addr: addr.clone(),
        })
    }

    fn key(&self, area: &str, name: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(format!("{area}/{name}"))
        } else {
            Key::from(format!("{}/{area}/{name}", self.prefix))
        }
    }

    /// `name` under the bucket's prefix, as it is.
    pub(crate) fn key_at(&self, name: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(name)
        } else {
            Key::from(format!("{}/{name}", self.prefix))
        }
    }

    pub(crate) fn blob_key(&self, digest: &B3Digest) -> Key {
        self.key("blobs", &digest.to_hex())
    }

    /// A large blob's leaf list (see [`crate::castore::leaves`]).
    pub(crate) fn leaves_key(&self, digest: &B3Digest) -> Key {
        self.key("leaves", &digest.to_hex())
    }

    /// The pack index of a tree, by its root directory's digest.
    pub(crate) fn pack_key(&self, tree: &B3Digest) -> Key {
        self.key("packs", &tree.to_hex())
    }

    pub(crate) fn pack_part_key(&self, digest: &B3Digest) -> Key {
        self.key("packs/parts", &digest.to_hex())
    }

    /// Every directory of a tree in one object, by its root's digest.
    pub(crate) fn tree_pack_key(&self, root: &B3Digest) -> Key {
        self.key("packs/trees", &root.to_hex())
    }

    pub(crate) fn directory_key(&self, digest: &B3Digest) -> Key {
        self.key("directories", &digest.to_hex())
    }

    pub(crate) fn path_info_key(&self, hash: &[u8; 20]) -> Key {
        self.key("pathinfo", &crate::nix::nixbase32::encode(hash))
    }

    /// Where path infos are listed from.
    pub(crate) fn path_info_area(&self) -> Key {
        self.key("pathinfo", "")
    }

    /// A fresh key for a blob being uploaded before its digest is known.
    pub(crate) fn temp_key(&self) -> Key {
        let mut name = [0u8; 16];
        for (i, b) in name.iter_mut().enumerate() {
            *b = (rand_u64() >> (i % 8 * 8)) as u8;
        }
        let hex: String = name.iter().map(|b| format!("{b:02x}")).collect();
        self.key("tmp", &hex)
    }

    /// A failed request as the store reports it: what the bucket said and
    /// where, never the credentials.
    pub(crate) fn error(&self, what: impl std::fmt::Display, e: object_store::Error) -> Error {
        Error::Bucket(format!("{what} in {}: {e}", self.addr))
    }

    /// Runs `fut` within the idle limit (for calls whose answer is small
    /// and comes at once: a HEAD, a PUT's acknowledgement).
    pub(crate) async fn within<T>(
        &self,
        what: impl std::fmt::Display,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<Option<T>> {
        match tokio::time::timeout(self.idle, fut).await {
            Err(_) => Err(Error::Timeout(format!(
                "{what} in {}: no answer for {:?}",
                self.addr, self.idle
            ))),
            Ok(Ok(v)) => Ok(Some(v)),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(self.error(what, e)),
        }
    }

    /// The body of `got`, whole, within the idle limit: at most the bytes
    /// its headers declare. A server may send more than it declared (a
    /// chunked or unframed body is not held to its Content-Length), so the
    /// body is counted as it comes and refused past that, not collected
    /// first: what a caller checked the declared size against is what it
    /// may be made to hold.
    pub(crate) async fn bounded_bytes(
        &self,
        what: impl std::fmt::Display,
        got: object_store::GetResult,
    ) -> Result<bytes::Bytes> {
        use futures::StreamExt;
        let declared = got.range.end.saturating_sub(got.range.start);
        let mut body = got.into_stream();
        let collect = async {
            let mut out = bytes::BytesMut::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| self.error(&what, e))?;
                if (out.len() + chunk.len()) as u64 > declared {
                    return Err(self.longer(&what, declared));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out.freeze())
        };
        match tokio::time::timeout(self.idle, collect).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(format!(
                "{what} in {}: no whole answer for {:?}",
                self.addr, self.idle
            ))),
        }
    }

    /// A body that goes on past the `declared` bytes, as the store reports
    /// it (and the log, once).
    pub(crate) fn longer(&self, what: impl std::fmt::Display, declared: u64) -> Error {
        let e = format!(
            "{what} in {}: the server sends more than the {declared} bytes it declared",
            self.addr
        );
        tracing::error!("{e}");
        Error::Bucket(e)
    }
}

/// Randomness for temporary names: the clock and the process, mixed, is
/// enough to keep two uploads of one daemon (and of two) apart.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_addresses_parse_and_print_back() {
        let a =
            BucketAddr::parse("tvix/fleet/a?endpoint=http://127.0.0.1:3900&region=garage").unwrap();
        assert_eq!(a.bucket, "tvix");
        assert_eq!(a.prefix, "fleet/a");
        assert_eq!(a.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(a.region.as_deref(), Some("garage"));
        assert_eq!(
            a.to_string(),
            "s3://tvix/fleet/a?endpoint=http://127.0.0.1:3900&region=garage"
        );
        assert_eq!(a.endpoint_host().as_deref(), Some("127.0.0.1:3900"));
        let b = BucketAddr::parse("my-bucket").unwrap();
        assert_eq!((b.prefix.as_str(), b.endpoint.as_ref()), ("", None));
        assert_eq!(b.to_string(), "s3://my-bucket");
        for bad in [
            "",
            "Up",
            "ab",
            "b/../x",
            "bucket?endpoint=ftp://x",
            "bucket?secret=x",
            "bucket?key=AKIA",
        ] {
            assert!(BucketAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_readable_and_under_the_prefix() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "id");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "secret");
        let a = BucketAddr::parse("tvix/p?endpoint=http://127.0.0.1:1").unwrap();
        let b = Bucket::open(&a, Duration::from_secs(1)).unwrap();
        let d = B3Digest::from(blake3::hash(b"x"));
        assert_eq!(b.blob_key(&d).as_ref(), format!("p/blobs/{}", d.to_hex()));
        assert_eq!(
            b.directory_key(&d).as_ref(),
            format!("p/directories/{}", d.to_hex())
        );
        assert!(b
            .path_info_key(&[0; 20])
            .as_ref()
            .starts_with("p/pathinfo/"));
        assert_ne!(b.temp_key(), b.temp_key());
    }
}
