//! The files of a Nix binary cache, wherever it keeps them: over HTTP(S),
//! in a directory, or in an S3 bucket, through one object-store client
//! (`object_store`, already the bucket tier's). Every request is bounded
//! in time by the store timeout, as long as bytes keep coming; every name
//! asked for is one the cache's own files gave, checked to stay inside it.
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
    store: Arc<dyn ObjectStore>,
    /// The key of a name: the bucket's prefix, or none.
    prefix: Option<Bucket>,
    idle: Duration,
    /// The cache, for messages.
    what: String,
}

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
        let bad = |e: object_store::Error| Error::InvalidAddress(format!("{loc:?}"), e.to_string());
        let options = || {
            object_store::ClientOptions::new()
                .with_connect_timeout(idle)
                // a NAR takes as long as it keeps coming: watched below
                .with_timeout_disabled()
                .with_allow_http(true)
                .with_pool_idle_timeout(Duration::from_secs(30))
        };
        let retry = || object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: idle,
            ..Default::default()
        };
        let (store, prefix, what): (Arc<dyn ObjectStore>, _, _) = match loc {
            NixCacheLocation::Http(url) => (
                Arc::new(
                    object_store::http::HttpBuilder::new()
                        .with_url(url.as_str())
                        .with_client_options(options())
                        .with_retry(retry())
                        .build()
                        .map_err(bad)?,
                ),
                None,
                url.clone(),
            ),
            NixCacheLocation::File(dir) => (
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(bad)?),
                None,
                format!("file://{}", dir.display()),
            ),
            NixCacheLocation::S3(b) => {
                let bucket = Bucket::open(b, idle)?;
                (bucket.store.clone(), Some(bucket), b.to_string())
            }
        };
        Ok(Self {
            store,
            prefix,
            idle,
            what,
        })
    }

    fn key(&self, name: &str) -> Key {
        match &self.prefix {
            Some(b) => b.key_at(name),
            None => Key::from(name),
        }
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
    async fn get(&self, name: &str) -> Result<Option<object_store::GetResult>> {
        if !valid_name(name) {
            return Err(Error::Protocol(format!(
                "{}: {name:?} is not a file name inside the cache",
                self.what
            )));
        }
        match tokio::time::timeout(self.idle, self.store.get(&self.key(name))).await {
            Err(_) => Err(self.timeout(name)),
            Ok(Ok(g)) => Ok(Some(g)),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(self.error(name, e)),
        }
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
    pub async fn stream(
        &self,
        name: &str,
    ) -> Result<Option<BoxStream<'static, std::io::Result<Bytes>>>> {
        let Some(got) = self.get(name).await? else {
            return Ok(None);
        };
        let (idle, what) = (self.idle, format!("{}/{name}", self.what));
        let body = got.into_stream();
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
