//! The inode table: what each inode number the kernel holds stands for.
//! Every entry below a store path gets its own inode, keyed by (parent,
//! name), so content-identical files keep their own modes. Numbers live as
//! long as the kernel holds a lookup reference; `forget` releases them.
use crate::castore::Node;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

pub const ROOT_INO: u64 = 1;

/// What an inode is: the mount root, or a castore node.
#[derive(Debug, Clone)]
pub enum InodeKind {
    Root,
    Node(Node),
}

#[derive(Debug)]
struct Slot {
    kind: Arc<InodeKind>,
    key: (u64, Bytes),
    nlookup: u64,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    slots: HashMap<u64, Slot>,
    by_key: HashMap<(u64, Bytes), u64>,
}

#[derive(Debug)]
pub struct Inodes {
    table: Mutex<Table>,
}

impl Default for Inodes {
    fn default() -> Self {
        Self {
            table: Mutex::new(Table {
                next: ROOT_INO + 1,
                ..Default::default()
            }),
        }
    }
}

impl Inodes {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panicking holder cannot leave the table half-updated: every
        // mutation below is a single map operation.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, ino: u64) -> Option<Arc<InodeKind>> {
        if ino == ROOT_INO {
            return Some(Arc::new(InodeKind::Root));
        }
        self.lock().slots.get(&ino).map(|s| s.kind.clone())
    }

    /// The inode for `name` in `parent`, allocated on first use; counts one
    /// kernel lookup reference.
    pub fn lookup(&self, parent: u64, name: &Bytes, node: &Node) -> u64 {
        let mut t = self.lock();
        let key = (parent, name.clone());
        if let Some(&ino) = t.by_key.get(&key) {
            if let Some(s) = t.slots.get_mut(&ino) {
                s.nlookup += 1;
                return ino;
            }
        }
        let ino = t.next;
        t.next += 1;
        t.by_key.insert(key.clone(), ino);
        t.slots.insert(
            ino,
            Slot {
                kind: Arc::new(InodeKind::Node(node.clone())),
                key,
                nlookup: 1,
            },
        );
        ino
    }

    /// Drops `count` kernel references; the inode is released at zero.
    pub fn forget(&self, ino: u64, count: u64) {
        let mut t = self.lock();
        let Some(s) = t.slots.get_mut(&ino) else {
            return;
        };
        s.nlookup = s.nlookup.saturating_sub(count);
        if s.nlookup == 0 {
            if let Some(s) = t.slots.remove(&ino) {
                t.by_key.remove(&s.key);
            }
        }
    }

    /// Number of live inodes (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_is_stable_and_forget_releases() {
        let t = Inodes::default();
        let n = Node::Symlink { target: "x".into() };
        let a = t.lookup(ROOT_INO, &"a".into(), &n);
        assert_eq!(t.lookup(ROOT_INO, &"a".into(), &n), a);
        let b = t.lookup(ROOT_INO, &"b".into(), &n);
        assert_ne!(a, b);
        t.forget(a, 1);
        assert!(t.get(a).is_some());
        t.forget(a, 1);
        assert!(t.get(a).is_none());
        t.forget(a, 5); // unknown: ignored
        t.forget(999, 1);
        assert_eq!(t.len(), 1);
    }
}
