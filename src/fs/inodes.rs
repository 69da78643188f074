//! The inode table: what each inode number the kernel holds stands for.
//! Every entry below a store path gets its own inode, keyed by (parent,
//! name), so content-identical files keep their own modes. Numbers live as
//! long as the kernel holds a lookup reference; `forget` releases them.
use crate::castore::Node;
use bytes::Bytes;
use hashbrown::{DefaultHashBuilder, HashTable};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

pub const ROOT_INO: u64 = 1;

/// What an inode is: the mount root, or a castore node.
#[derive(Debug, Clone)]
pub enum InodeKind {
    Root,
    Node(Node),
}

/// One inode. Compact, since a guest that walks a store holds one per
/// entry it has seen: the name and a symlink's target are copies, so no
/// slot keeps a whole directory's buffer alive.
#[derive(Debug)]
struct Slot {
    parent: u64,
    name: Box<[u8]>,
    node: Node,
    nlookup: u64,
}

#[derive(Default)]
struct Table {
    next: u64,
    slots: HashMap<u64, Slot>,
    /// Inode numbers by (parent, name), hashed without storing the key twice.
    index: HashTable<u64>,
    hasher: DefaultHashBuilder,
}

impl Table {
    /// Every hash of a key goes through here (or the same expression on
    /// a slot's fields), so lookups and removals agree.
    fn hash(&self, parent: u64, name: &[u8]) -> u64 {
        self.hasher.hash_one((parent, name))
    }
}

pub struct Inodes {
    table: Mutex<Table>,
}

impl std::fmt::Debug for Inodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inodes").field("len", &self.len()).finish()
    }
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

/// A node that owns its bytes (a symlink target decoded from a directory
/// may share that directory's buffer).
fn detached(node: &Node) -> Node {
    match node {
        Node::Symlink { target } => Node::Symlink {
            target: Bytes::copy_from_slice(target),
        },
        n => n.clone(),
    }
}

impl Inodes {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panicking holder cannot leave the table half-updated: slots and
        // index change together under the lock, each change a single step.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, ino: u64) -> Option<InodeKind> {
        if ino == ROOT_INO {
            return Some(InodeKind::Root);
        }
        self.lock()
            .slots
            .get(&ino)
            .map(|s| InodeKind::Node(s.node.clone()))
    }

    /// The inode for `name` in `parent`, allocated on first use; counts one
    /// kernel lookup reference.
    pub fn lookup(&self, parent: u64, name: &[u8], node: &Node) -> u64 {
        let mut t = self.lock();
        let t = &mut *t;
        let hash = t.hash(parent, name);
        let slots = &t.slots;
        let found = t.index.find(hash, |ino| {
            slots
                .get(ino)
                .is_some_and(|s| s.parent == parent && *s.name == *name)
        });
        if let Some(&ino) = found {
            if let Some(s) = t.slots.get_mut(&ino) {
                s.nlookup += 1;
                return ino;
            }
        }
        let ino = t.next;
        t.next += 1;
        t.slots.insert(
            ino,
            Slot {
                parent,
                name: name.into(),
                node: detached(node),
                nlookup: 1,
            },
        );
        let (slots, hasher) = (&t.slots, &t.hasher);
        t.index.insert_unique(hash, ino, |i| {
            slots
                .get(i)
                .map(|s| hasher.hash_one((s.parent, &*s.name)))
                .unwrap_or_default()
        });
        ino
    }

    /// Drops `count` kernel references; the inode is released at zero.
    pub fn forget(&self, ino: u64, count: u64) {
        let mut t = self.lock();
        let t = &mut *t;
        let Some(s) = t.slots.get_mut(&ino) else {
            return;
        };
        s.nlookup = s.nlookup.saturating_sub(count);
        if s.nlookup > 0 {
            return;
        }
        let hash = t.hasher.hash_one((s.parent, &*s.name));
        if let Ok(e) = t.index.find_entry(hash, |&i| i == ino) {
            e.remove();
        }
        t.slots.remove(&ino);
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
        let a = t.lookup(ROOT_INO, b"a", &n);
        assert_eq!(t.lookup(ROOT_INO, b"a", &n), a);
        let b = t.lookup(ROOT_INO, b"b", &n);
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
