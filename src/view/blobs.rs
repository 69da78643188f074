//! One open, verified reader per blob, shared by every handle on it: a
//! guest that opens one file a thousand times holds one copy of it (a
//! remote blob's spooled memory file, a local file's descriptor), not a
//! thousand. The table holds weak references, so a blob is let go with
//! its last handle, and it never has more entries than open handles.
use crate::castore::B3Digest;
use crate::store::blob::{BlobReader, Shared};
use bytes::Bytes;
use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex, Weak};

/// A blob's digest and the size its node declares: a node of the same
/// digest with another size is another (failing) check, not a prefix.
pub(super) type Key = (B3Digest, u64);

pub(super) enum OpenBlob {
    Bytes(Bytes),
    /// Read at offsets only (pread): no position is shared.
    File(File),
    /// No positional access: handles take turns, seeking as needed.
    Stream(Mutex<Stream>),
}

pub(super) struct Stream {
    pub reader: Box<dyn BlobReader>,
    pub pos: u64,
}

impl From<Shared> for OpenBlob {
    fn from(s: Shared) -> Self {
        match s {
            Shared::Bytes(b) => OpenBlob::Bytes(b),
            Shared::File(f) => OpenBlob::File(f),
            Shared::Stream(reader) => OpenBlob::Stream(Mutex::new(Stream { reader, pos: 0 })),
        }
    }
}

#[derive(Default)]
pub(super) struct OpenBlobs(Mutex<HashMap<Key, Weak<OpenBlob>>>);

impl OpenBlobs {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Weak<OpenBlob>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The blob some handle already holds open.
    pub fn get(&self, key: &Key) -> Option<Arc<OpenBlob>> {
        self.table().get(key).and_then(Weak::upgrade)
    }

    /// Shares a newly opened blob; when another handle opened the same one
    /// meanwhile, that one is answered and `blob` dropped.
    pub fn share(&self, key: Key, blob: OpenBlob) -> Arc<OpenBlob> {
        let mut t = self.table();
        if let Some(b) = t.get(&key).and_then(Weak::upgrade) {
            return b;
        }
        let b = Arc::new(blob);
        t.insert(key, Arc::downgrade(&b));
        b
    }

    /// A handle lets go of its blob; the entry goes with the last one.
    pub fn put_back(&self, key: &Key, blob: Arc<OpenBlob>) {
        let mut t = self.table();
        drop(blob);
        if t.get(key).is_some_and(|w| w.strong_count() == 0) {
            t.remove(key);
        }
    }

    /// Forgets every entry (the handles holding them are gone).
    pub fn clear(&self) {
        self.table().clear();
    }

    /// Blobs open now, for tests.
    pub fn len(&self) -> usize {
        self.table()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_blob_per_key_until_the_last_handle_lets_go() {
        let t = OpenBlobs::default();
        let key = (B3Digest::from(blake3::hash(b"x")), 1);
        let a = t.share(key, OpenBlob::Bytes(Bytes::from_static(b"x")));
        let b = t.share(key, OpenBlob::Bytes(Bytes::from_static(b"y")));
        assert!(Arc::ptr_eq(&a, &b), "the second open shares the first");
        assert!(t.get(&(key.0, 2)).is_none(), "another size is another key");
        t.put_back(&key, a);
        assert_eq!(t.len(), 1);
        assert!(t.get(&key).is_some());
        t.put_back(&key, b);
        assert_eq!(t.len(), 0);
        assert!(t.table().is_empty(), "the entry went with the last handle");
    }
}
