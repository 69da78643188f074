//! Packs written as an import walks a tree (see [`crate::castore::pack`]):
//! where the store keeps them (a bucket), each small blob also goes into
//! the tree's packs in walk order, a part stored as soon as it fills (one
//! in memory), the index once the tree's directories are stored. Packs
//! only speed reads up: one that fails to store costs a warning and the
//! tree's packs, never the import.
use crate::castore::pack::Packer;
use crate::castore::B3Digest;
use crate::store::Store;
use bytes::Bytes;

pub(crate) struct Packing {
    packer: Option<Packer>,
}

impl Packing {
    pub(crate) fn new(store: &Store) -> Self {
        Self {
            packer: store.blob.keeps_packs().then(Packer::default),
        }
    }

    /// Adds a blob the walk met (in walk order).
    pub(crate) async fn add(&mut self, store: &Store, digest: B3Digest, data: &[u8]) {
        let Some(p) = self.packer.as_mut() else {
            return;
        };
        if let Some((d, part)) = p.add(digest, data) {
            if let Err(e) = store.blob.put_pack_part(&d, Bytes::from(part)).await {
                tracing::warn!("a pack part was not stored ({e}): this tree gets no packs");
                self.packer = None;
            }
        }
    }

    /// Stores the last part and the index of the tree rooted at `tree`,
    /// once its directories are stored.
    pub(crate) async fn finish(self, store: &Store, tree: &B3Digest) {
        let Some(mut p) = self.packer else { return };
        let stored = async {
            if let Some((d, part)) = p.flush() {
                store.blob.put_pack_part(&d, Bytes::from(part)).await?;
            }
            match p.finish() {
                Some(index) => store.blob.put_pack_index(tree, &index).await,
                None => Ok(()),
            }
        };
        if let Err(e) = stored.await {
            tracing::warn!(
                "the packs of tree {tree} were not stored ({e}): its small blobs are read one by one"
            );
        }
    }
}
