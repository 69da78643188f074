//! Path infos in an S3-compatible bucket, one object each under the store
//! path's hash (see [`crate::store::bucket`]). A store path never changes
//! once it exists: a Put asks the bucket to create the object only if it is
//! absent (`If-None-Match: *`), and where another writer got there first,
//! the same contents again succeed and other contents are a conflict. A
//! server that ignores the condition is caught only where the object was
//! already there when looked at first: the README says what can race.
//! What is read, by a get or a listing, is held to the key it is under.
use super::PathInfoService;
use crate::nix::nixbase32;
use crate::nix::path_info::PathInfo;
use crate::store::bucket::Bucket;
use crate::store::{Error, Result};
use crate::wire::store as pb;
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use prost::Message;

/// Most bytes a path info object may have (what a gRPC Put may carry).
const MAX_PATH_INFO: usize = 4 << 20;
/// Path infos read at once while listing.
const LIST_GETS_IN_FLIGHT: usize = 16;

#[derive(Clone)]
pub struct S3PathInfoService {
    bucket: Bucket,
}

impl S3PathInfoService {
    pub fn new(bucket: Bucket) -> Self {
        Self { bucket }
    }

    /// The object at `key`, decoded and checked to be the path info of
    /// `expected` (when given).
    async fn read(
        &self,
        key: &object_store::path::Path,
        expected: Option<&[u8; 20]>,
    ) -> Result<Option<PathInfo>> {
        let b = &self.bucket;
        let what = format!("path info {key}");
        let Some(got) = b.within(&what, b.store.get(key)).await? else {
            return Ok(None);
        };
        if got.meta.size > MAX_PATH_INFO as u64 {
            return Err(Error::ResourceExhausted(format!(
                "{what}: {} bytes, more than {MAX_PATH_INFO}",
                got.meta.size
            )));
        }
        let bytes = b.bounded_bytes(&what, got).await?;
        let info = pb::PathInfo::decode(bytes)
            .map_err(|e| Error::Protocol(format!("{what} in the bucket does not decode: {e}")))
            .and_then(|p| Ok(PathInfo::try_from(p)?))
            .inspect_err(|e| tracing::error!("{e}"))?;
        if let Some(d) = expected {
            if info.store_path.digest() != d {
                let e = format!("{what} holds {}", info.store_path);
                tracing::error!("{e}");
                return Err(Error::Protocol(e));
            }
        }
        Ok(Some(info))
    }
}

#[async_trait]
impl PathInfoService for S3PathInfoService {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>> {
        self.read(&self.bucket.path_info_key(digest), Some(digest))
            .await
    }

    /// Published without replacing (see the module header).
    async fn put(&self, info: PathInfo) -> Result<PathInfo> {
        let digest = *info.store_path.digest();
        let key = self.bucket.path_info_key(&digest);
        let settled = |old: PathInfo| {
            if old.same_contents(&info) {
                Ok(old)
            } else {
                Err(Error::conflict(&info, &old))
            }
        };
        if let Some(old) = self.read(&key, Some(&digest)).await? {
            return settled(old);
        }
        let b = &self.bucket;
        let body = PutPayload::from(Bytes::from(info.to_proto().encode_to_vec()));
        let opts = PutOptions::from(PutMode::Create);
        let what = format!("publishing {}", info.store_path);
        match tokio::time::timeout(b.idle, b.store.put_opts(&key, body, opts)).await {
            Err(_) => Err(Error::Timeout(format!(
                "{what}: no answer for {:?}",
                b.idle
            ))),
            Ok(Ok(_)) => Ok(info),
            Ok(Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            )) => match self.read(&key, Some(&digest)).await? {
                Some(old) => settled(old),
                None => Err(Error::Bucket(format!(
                    "{what}: the bucket says it exists, then that it does not"
                ))),
            },
            Ok(Err(e)) => Err(b.error(&what, e)),
        }
    }

    /// Every path info in the area, each held to the key it is under (its
    /// store path's hash) as a get is. An object under a key that is no
    /// hash, whose contents are another path's, that does not decode or is
    /// too large is left out with a log line: one bad object costs its own
    /// entry, not the listing. Each page is waited for at most the idle
    /// limit.
    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        let b = &self.bucket;
        let area = b.path_info_area();
        let mut pages = b.store.list(Some(&area));
        let listed = async_stream::try_stream! {
            loop {
                match tokio::time::timeout(b.idle, pages.next()).await {
                    Err(_) => Err(Error::Timeout(format!(
                        "listing path infos: no answer from the bucket for {:?}",
                        b.idle
                    )))?,
                    Ok(None) => break,
                    Ok(Some(meta)) => yield meta.map_err(|e| b.error("listing path infos", e))?,
                }
            }
        };
        Box::pin(
            listed
                .map(move |meta: Result<ObjectMeta>| {
                    let area = area.clone();
                    async move {
                        let key = meta?.location;
                        let Some(hash) = key
                            .as_ref()
                            .strip_prefix(area.as_ref())
                            .and_then(|k| k.strip_prefix('/'))
                            .and_then(|k| nixbase32::decode_fixed::<20>(k.as_bytes()).ok())
                        else {
                            tracing::warn!("listing path infos: {key} is no path info's key");
                            return Ok(None);
                        };
                        match self.read(&key, Some(&hash)).await {
                            Err(
                                e @ (Error::Protocol(_)
                                | Error::PathInfo(_)
                                | Error::ResourceExhausted(_)),
                            ) => {
                                tracing::error!("listing path infos: {e}; left out");
                                Ok(None)
                            }
                            r => r,
                        }
                    }
                })
                .buffered(LIST_GETS_IN_FLIGHT)
                .filter_map(|r| async move { r.transpose() }),
        )
    }
}
