//! The files of a Nix binary cache, wherever it keeps them: over HTTP(S)
//! (reqwest, the client `object_store` builds on: its own HTTP store wants
//! a Content-Length, which a cache rendering NARs on the fly cannot send),
//! in a directory or in an S3 bucket (`object_store`, the bucket tier's
//! client). Every request is bounded in time by the store timeout, as long
//! as bytes keep coming; every name asked for is one the cache's own files
//! gave, checked to stay inside it; redirects are followed only to https
//! or to the cache's own host, five at most.
use crate::store::bucket::Bucket;
use crate::store::nix_cache_addr::NixCacheLocation;
use crate::store::{Error, Result};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;
use std::time::Duration;

/// Where a cache's files are read from.
pub struct Source {
    backend: Backend,
    idle: Duration,
    /// The cache, for messages.
    what: String,
}

enum Backend {
    /// The client and the cache's URL, without a trailing slash.
    Http(reqwest::Client, String),
    /// A directory or a bucket; the bucket knows its key prefix.
    Objects(Arc<dyn ObjectStore>, Option<Bucket>),
}

type Body = BoxStream<'static, std::io::Result<Bytes>>;

/// A name a narinfo may give for its NAR: relative, inside the cache, in
/// the characters Nix uses (`nar/<hash>.nar.xz`); anything else (`..`, an
/// absolute URL, a query) is refused.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 512
        && !name.starts_with('/')
        && name.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._+".contains(&b))
        })
}

impl Source {
    pub fn open(loc: &NixCacheLocation, idle: Duration) -> Result<Self> {
        let bad = |e: String| Error::InvalidAddress(format!("{loc:?}"), e);
        let (backend, what) = match loc {
            NixCacheLocation::Http(url) => {
                let host = reqwest::Url::parse(url)
                    .map_err(|e| bad(e.to_string()))?
                    .host_str()
                    .map(str::to_string);
                let redirects = reqwest::redirect::Policy::custom(move |a| {
                    let ok = a.url().scheme() == "https"
                        || a.url().host_str().map(str::to_string) == host;
                    if a.previous().len() >= 5 {
                        a.error("more than 5 redirects")
                    } else if ok {
                        a.follow()
                    } else {
                        a.error("a redirect to plain http on another host")
                    }
                });
                let client = reqwest::Client::builder()
                    .connect_timeout(idle)
                    .pool_idle_timeout(Duration::from_secs(30))
                    .redirect(redirects)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                (Backend::Http(client, url.clone()), url.clone())
            }
            NixCacheLocation::File(dir) => (
                Backend::Objects(
                    Arc::new(
                        object_store::local::LocalFileSystem::new_with_prefix(dir)
                            .map_err(|e| bad(e.to_string()))?,
                    ),
                    None,
                ),
                format!("file://{}", dir.display()),
            ),
            NixCacheLocation::S3(b) => {
                let bucket = Bucket::open(b, idle)?;
                (
                    Backend::Objects(bucket.store.clone(), Some(bucket)),
                    b.to_string(),
                )
            }
        };
        Ok(Self {
            backend,
            idle,
            what,
        })
    }

    fn error(&self, name: &str, e: object_store::Error) -> Error {
        Error::Fetch(format!("{}/{name}: {e}", self.what))
    }

    fn timeout(&self, name: &str) -> Error {
        Error::Timeout(format!(
            "{}/{name}: no answer for {:?}",
            self.what, self.idle
        ))
    }

    /// Opens `name`; `None` when the cache has no such file.
    async fn get(&self, name: &str) -> Result<Option<Body>> {
        if !valid_name(name) {
            return Err(Error::Protocol(format!(
                "{}: {name:?} is not a file name inside the cache",
                self.what
            )));
        }
        let opened = async {
            match &self.backend {
                Backend::Http(client, url) => {
                    let resp = client
                        .get(format!("{url}/{name}"))
                        .send()
                        .await
                        .map_err(|e| Error::Fetch(format!("{}/{name}: {e}", self.what)))?;
                    let status = resp.status();
                    if status == reqwest::StatusCode::NOT_FOUND
                        || status == reqwest::StatusCode::GONE
                        || status == reqwest::StatusCode::FORBIDDEN
                    {
                        // (S3 answers 403 for a missing key without ListBucket)
                        return Ok(None);
                    }
                    if !status.is_success() {
                        return Err(Error::Fetch(format!("{}/{name}: HTTP {status}", self.what)));
                    }
                    let body: Body = Box::pin(
                        resp.bytes_stream()
                            .map(|r| r.map_err(std::io::Error::other)),
                    );
                    Ok(Some(body))
                }
                Backend::Objects(store, bucket) => {
                    let key = match bucket {
                        Some(b) => b.key_at(name),
                        None => Key::from(name),
                    };
                    match store.get(&key).await {
                        Ok(g) => {
                            let body: Body =
                                Box::pin(g.into_stream().map(|r| r.map_err(std::io::Error::other)));
                            Ok(Some(body))
                        }
                        Err(object_store::Error::NotFound { .. }) => Ok(None),
                        Err(e) => Err(self.error(name, e)),
                    }
                }
            }
        };
        tokio::time::timeout(self.idle, opened)
            .await
            .map_err(|_| self.timeout(name))?
    }

    /// A small file whole (a narinfo), within the store timeout in all:
    /// refused past `max` bytes, however much the server declared; `None`
    /// when absent.
    pub async fn small(&self, name: &str, max: usize) -> Result<Option<Bytes>> {
        let whole = async {
            let Some(mut body) = self.stream(name).await? else {
                return Ok(None);
            };
            let mut out = bytes::BytesMut::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                if out.len() + chunk.len() > max {
                    return Err(Error::ResourceExhausted(format!(
                        "{}/{name} is larger than {max} bytes",
                        self.what
                    )));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(Some(out.freeze()))
        };
        tokio::time::timeout(self.idle, whole)
            .await
            .map_err(|_| self.timeout(name))?
    }

    /// A file's bytes as they come, each chunk waited for at most the
    /// store timeout; `None` when absent.
    pub async fn stream(&self, name: &str) -> Result<Option<Body>> {
        let Some(got) = self.get(name).await? else {
            return Ok(None);
        };
        let (idle, what) = (self.idle, format!("{}/{name}", self.what));
        let body = got;
        // Only bytes count as progress: a server (or a file that shrank)
        // handing out empty chunks is as stalled as a silent one.
        Ok(Some(Box::pin(futures::stream::unfold(
            Some(body),
            move |body| {
                let what = what.clone();
                async move {
                    let mut body = body?;
                    let next = async {
                        loop {
                            match body.next().await {
                                Some(Ok(c)) if c.is_empty() => continue,
                                other => return other,
                            }
                        }
                    };
                    match tokio::time::timeout(idle, next).await {
                        Err(_) => Some((
                            Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("{what}: no data for {idle:?}"),
                            )),
                            None,
                        )),
                        Ok(None) => None,
                        Ok(Some(Ok(c))) => Some((Ok(c), Some(body))),
                        Ok(Some(Err(e))) => {
                            Some((Err(std::io::Error::other(format!("{what}: {e}"))), None))
                        }
                    }
                }
            },
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names_stay_inside_the_cache() {
        for ok in [
            "nar/0abc.nar.xz",
            "abc.narinfo",
            "nar/x.nar",
            "a/b/c+d.nar.zst",
        ] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "nar/../../x",
            "nar//x",
            "http://evil/x",
            "nar/x?y",
            "nar/./x",
            "nar/x y",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
