//! Blobs in a hash map, for tests and throwaway stores.
use super::{BlobReader, BlobService, BlobWriter};
use crate::castore::B3Digest;
use crate::store::Result;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

#[derive(Default, Clone)]
pub struct MemoryBlobService {
    blobs: Arc<RwLock<HashMap<B3Digest, Bytes>>>,
}

fn poisoned() -> crate::store::Error {
    std::io::Error::other("memory store lock poisoned").into()
}

#[async_trait]
impl BlobService for MemoryBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        Ok(self
            .blobs
            .read()
            .map_err(|_| poisoned())?
            .contains_key(digest))
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        let b = self
            .blobs
            .read()
            .map_err(|_| poisoned())?
            .get(digest)
            .cloned();
        Ok(b.map(|b| Box::new(std::io::Cursor::new(b)) as Box<dyn BlobReader>))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(MemoryWriter {
            blobs: self.blobs.clone(),
            buf: Vec::new(),
        }))
    }
}

struct MemoryWriter {
    blobs: Arc<RwLock<HashMap<B3Digest, Bytes>>>,
    buf: Vec<u8>,
}

#[async_trait]
impl BlobWriter for MemoryWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(data);
        Ok(())
    }

    async fn close(self: Box<Self>) -> Result<B3Digest> {
        let MemoryWriter { blobs, buf } = *self;
        let digest = B3Digest::of(&buf);
        blobs
            .write()
            .map_err(|_| poisoned())?
            .entry(digest)
            .or_insert_with(|| Bytes::from(buf));
        Ok(digest)
    }
}
