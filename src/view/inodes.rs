//! The inode table: what each inode number the kernel holds stands for.
//! Every entry below a store path gets its own inode, keyed by (parent,
//! name), so content-identical files keep their own modes. Numbers live as
//! long as the kernel holds a lookup reference; `forget` releases them.
use crate::castore::Node;
use bytes::Bytes;
use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

pub const ROOT_INO: u64 = 1;
/// Inode numbers above the root are slab indices plus this.
const FIRST_INO: u64 = ROOT_INO + 1;

/// What an inode is: the mount root, or a castore node.
#[derive(Debug, Clone)]
pub enum InodeKind {
    Root,
    Node(Node),
}

/// One inode. A guest that walks a store holds one per entry it has seen,
/// so slots are dense (a vector, not a map of boxed values) and the name
/// is inline when short: a hash map of fat values, resized past a power of
/// two, held twice the memory its entries need.
#[derive(Debug)]
struct Slot {
    parent: u64,
    nlookup: u64,
    name: Name,
    node: Node,
}

/// An entry name, inline when short (most are).
#[derive(Debug)]
enum Name {
    Inline { len: u8, bytes: [u8; INLINE_NAME] },
    Heap(Box<[u8]>),
}

const INLINE_NAME: usize = 22;

impl Name {
    fn new(name: &[u8]) -> Self {
        match u8::try_from(name.len()) {
            Ok(len) if name.len() <= INLINE_NAME => {
                let mut bytes = [0u8; INLINE_NAME];
                bytes[..name.len()].copy_from_slice(name);
                Name::Inline { len, bytes }
            }
            _ => Name::Heap(name.into()),
        }
    }
}

impl std::ops::Deref for Name {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Name::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Name::Heap(b) => b,
        }
    }
}

#[derive(Default)]
struct Table {
    /// Slot `i` is inode `FIRST_INO + i`; `None` is free.
    slots: Vec<Option<Slot>>,
    /// How often each slot was handed out: an inode number used again is
    /// told apart by its generation.
    generations: Vec<u32>,
    free: Vec<u32>,
    live: usize,
    /// Slot indices by (parent, name), hashed without storing the key
    /// twice; 4 bytes a bucket rather than an inode number's 8 (a 53,000
    /// entry walk holds 65,536 buckets).
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl Table {
    /// Every hash of a key goes through here, so lookups and removals agree.
    fn hash(&self, parent: u64, name: &[u8]) -> u64 {
        self.hasher.hash_one((parent, name))
    }

    fn slot(&self, ino: u64) -> Option<&Slot> {
        let i = usize::try_from(ino.checked_sub(FIRST_INO)?).ok()?;
        self.slots.get(i)?.as_ref()
    }

    fn slot_mut(&mut self, ino: u64) -> Option<&mut Slot> {
        let i = usize::try_from(ino.checked_sub(FIRST_INO)?).ok()?;
        self.slots.get_mut(i)?.as_mut()
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
            table: Mutex::new(Table::default()),
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

    /// Forgets every inode but the root (a new guest kernel: it knows none
    /// of them and will never FORGET them); answers how many there were.
    pub fn reset(&self) -> usize {
        let mut t = self.lock();
        let n = t.live;
        *t = Table::default();
        n
    }

    pub fn get(&self, ino: u64) -> Option<InodeKind> {
        if ino == ROOT_INO {
            return Some(InodeKind::Root);
        }
        self.lock()
            .slot(ino)
            .map(|s| InodeKind::Node(s.node.clone()))
    }

    /// The directory inode `ino` was looked up in, and its name there.
    pub fn place(&self, ino: u64) -> Option<(u64, Vec<u8>)> {
        self.lock().slot(ino).map(|s| (s.parent, s.name.to_vec()))
    }

    /// The generation of a live inode (0 for the root).
    pub fn generation(&self, ino: u64) -> u64 {
        let t = self.lock();
        ino.checked_sub(FIRST_INO)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| t.generations.get(i).copied())
            .map_or(0, u64::from)
    }

    /// The inode for `name` in `parent`, allocated on first use; counts one
    /// kernel lookup reference.
    pub fn lookup(&self, parent: u64, name: &[u8], node: &Node) -> u64 {
        let mut t = self.lock();
        let t = &mut *t;
        let hash = t.hash(parent, name);
        let found = {
            let tt: &Table = t;
            tt.index
                .find(hash, |&i| {
                    tt.slots
                        .get(i as usize)
                        .and_then(Option::as_ref)
                        .is_some_and(|s| s.parent == parent && *s.name == *name)
                })
                .map(|&i| FIRST_INO + u64::from(i))
        };
        if let Some(ino) = found {
            if let Some(s) = t.slot_mut(ino) {
                s.nlookup += 1;
                return ino;
            }
        }
        let slot = Slot {
            parent,
            nlookup: 1,
            name: Name::new(name),
            node: detached(node),
        };
        let i = match t.free.pop() {
            Some(i) => {
                let i = i as usize;
                t.slots[i] = Some(slot);
                t.generations[i] = t.generations[i].wrapping_add(1);
                i
            }
            None => {
                t.slots.push(Some(slot));
                t.generations.push(0);
                t.slots.len() - 1
            }
        };
        t.live += 1;
        let ino = FIRST_INO + i as u64;
        // Slot indices fit u32 (more live inodes would be hundreds of GiB
        // of table); one that does not is simply not found by name again.
        if let Ok(i) = u32::try_from(i) {
            let (slots, hasher) = (&t.slots, &t.hasher);
            t.index.insert_unique(hash, i, |&other| {
                slots
                    .get(other as usize)
                    .and_then(Option::as_ref)
                    .map(|s| hasher.hash_one((s.parent, &*s.name)))
                    .unwrap_or_default()
            });
        }
        ino
    }

    /// Drops `count` kernel references; the inode is released at zero.
    pub fn forget(&self, ino: u64, count: u64) {
        let mut t = self.lock();
        let t = &mut *t;
        let Some(i) = ino
            .checked_sub(FIRST_INO)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        let Some(s) = t.slots.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        s.nlookup = s.nlookup.saturating_sub(count);
        if s.nlookup > 0 {
            return;
        }
        let hash = t.hasher.hash_one((s.parent, &*s.name));
        if let Ok(e) = t.index.find_entry(hash, |&x| x as usize == i) {
            e.remove();
        }
        t.slots[i] = None;
        // Slot indices fit u32: more live inodes than that would be
        // hundreds of GiB of table; such a slot is simply not reused.
        if let Ok(i) = u32::try_from(i) {
            t.free.push(i);
        }
        t.live -= 1;
    }

    /// Number of live inodes (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().live
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
        t.forget(0, 1);
        assert_eq!(t.len(), 1);
        // a released number is handed out again, with a new generation
        let c = t.lookup(ROOT_INO, b"c", &n);
        assert_eq!(c, a);
        assert_eq!(t.generation(c), 1);
        assert_eq!(t.generation(b), 0);
        assert_eq!(t.lookup(ROOT_INO, b"c", &n), c);
        assert!(t.get(c).is_some());
    }
}
