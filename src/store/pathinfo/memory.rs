//! Path infos in a hash map, for tests and throwaway stores.
use super::PathInfoService;
use crate::nix::path_info::PathInfo;
use crate::store::{Error, Result};
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

#[derive(Default, Clone)]
pub struct MemoryPathInfoService {
    infos: Arc<RwLock<BTreeMap<[u8; 20], PathInfo>>>,
}

fn poisoned() -> Error {
    std::io::Error::other("memory store lock poisoned").into()
}

#[async_trait]
impl PathInfoService for MemoryPathInfoService {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>> {
        Ok(self
            .infos
            .read()
            .map_err(|_| poisoned())?
            .get(digest)
            .cloned())
    }

    async fn put(&self, info: PathInfo) -> Result<PathInfo> {
        let mut infos = self.infos.write().map_err(|_| poisoned())?;
        match infos.entry(*info.store_path.digest()) {
            std::collections::btree_map::Entry::Occupied(e) => {
                if e.get().same_contents(&info) {
                    Ok(e.get().clone())
                } else {
                    Err(Error::conflict(&info, e.get()))
                }
            }
            std::collections::btree_map::Entry::Vacant(e) => Ok(e.insert(info).clone()),
        }
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        let all: Result<Vec<PathInfo>> = self
            .infos
            .read()
            .map_err(|_| poisoned())
            .map(|m| m.values().cloned().collect());
        match all {
            Ok(v) => Box::pin(futures::stream::iter(v.into_iter().map(Ok))),
            Err(e) => Box::pin(futures::stream::once(async { Err(e) })),
        }
    }
}
