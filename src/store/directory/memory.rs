//! Directories in a hash map, for tests and throwaway stores.
use super::DirectoryService;
use crate::castore::{B3Digest, Directory, ValidatedGraph};
use crate::store::{Error, Result};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Default, Clone)]
pub struct MemoryDirectoryService {
    dirs: Arc<RwLock<HashMap<B3Digest, Directory>>>,
}

fn poisoned() -> Error {
    std::io::Error::other("memory store lock poisoned").into()
}

#[async_trait]
impl DirectoryService for MemoryDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        Ok(self
            .dirs
            .read()
            .map_err(|_| poisoned())?
            .get(digest)
            .cloned())
    }

    async fn put_graph(&self, graph: ValidatedGraph) -> Result<B3Digest> {
        let root = graph
            .root()
            .ok_or_else(|| Error::InvalidRequest("empty directory graph".into()))?;
        let mut map = self.dirs.write().map_err(|_| poisoned())?;
        for (digest, dir) in graph.dirs {
            map.entry(digest).or_insert(dir);
        }
        Ok(root)
    }
}
