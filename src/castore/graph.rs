//! Ordering and connectivity rules for streams of directories: uploads come
//! leaves first as one connected graph, recursive downloads come root first.
//! Both check every edge's declared size against the child it names.
use super::digest::B3Digest;
use super::directory::Directory;
use std::collections::{HashMap, HashSet};

/// Why a stream of directories was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("directory {parent} refers to {child}, which was not sent before it")]
    MissingChild { parent: B3Digest, child: B3Digest },
    #[error("directory {child} is declared with size {declared}, below its entry count {actual}")]
    SizeTooSmall {
        child: B3Digest,
        declared: u64,
        actual: u64,
    },
    #[error("no directories were sent")]
    Empty,
    #[error("directory {0} is not reachable from the root (graph not connected)")]
    Disconnected(B3Digest),
    #[error("expected root directory {expected}, received {actual}")]
    WrongRoot {
        expected: B3Digest,
        actual: B3Digest,
    },
    #[error("received directory {0}, which no earlier directory refers to (or sent twice)")]
    Unexpected(B3Digest),
    #[error("stream ended before directory {0} was received")]
    Incomplete(B3Digest),
}

fn check_size(child: B3Digest, declared: u64, dir: &Directory) -> Result<(), GraphError> {
    let actual = dir.documented_size();
    if declared < actual {
        return Err(GraphError::SizeTooSmall {
            child,
            declared,
            actual,
        });
    }
    Ok(())
}

/// A graph that passed validation, leaves first, root last.
#[derive(Debug, Clone)]
pub struct ValidatedGraph {
    pub dirs: Vec<(B3Digest, Directory)>,
}

impl ValidatedGraph {
    pub fn root(&self) -> Option<B3Digest> {
        self.dirs.last().map(|(d, _)| *d)
    }
}

/// Validates an upload: each directory may only refer to ones sent before it.
#[derive(Default)]
pub struct LeavesFirst {
    seen: HashMap<B3Digest, usize>,
    dirs: Vec<(B3Digest, Directory)>,
}

impl LeavesFirst {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next directory; a repeat of an earlier one is ignored.
    pub fn add(&mut self, dir: Directory) -> Result<B3Digest, GraphError> {
        let digest = dir.digest();
        if self.seen.contains_key(&digest) {
            return Ok(digest);
        }
        for (_, child, declared) in dir.child_directories() {
            let idx = *self.seen.get(&child).ok_or(GraphError::MissingChild {
                parent: digest,
                child,
            })?;
            check_size(child, declared, &self.dirs[idx].1)?;
        }
        self.seen.insert(digest, self.dirs.len());
        self.dirs.push((digest, dir));
        Ok(digest)
    }

    /// Distinct directories added so far.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Checks that every directory is reachable from the last one (the root).
    pub fn finish(self) -> Result<ValidatedGraph, GraphError> {
        let (root, _) = self.dirs.last().ok_or(GraphError::Empty)?;
        let mut reached = HashSet::from([*root]);
        let mut todo = vec![self.dirs.len() - 1];
        while let Some(i) = todo.pop() {
            for (_, child, _) in self.dirs[i].1.child_directories() {
                if reached.insert(child) {
                    todo.push(self.seen[&child]);
                }
            }
        }
        if let Some((d, _)) = self.dirs.iter().find(|(d, _)| !reached.contains(d)) {
            return Err(GraphError::Disconnected(*d));
        }
        Ok(ValidatedGraph { dirs: self.dirs })
    }
}

/// Validates a recursive download: the root first, then only directories an
/// earlier one referred to, each once, until none is missing.
pub struct RootFirst {
    root: B3Digest,
    /// Referred to but not received yet, with the sizes they were declared with.
    pending: HashMap<B3Digest, Vec<u64>>,
    received: HashMap<B3Digest, u64>,
}

impl RootFirst {
    pub fn new(root: B3Digest) -> Self {
        Self {
            root,
            pending: HashMap::new(),
            received: HashMap::new(),
        }
    }

    /// Checks the next directory and returns its digest.
    pub fn add(&mut self, dir: &Directory) -> Result<B3Digest, GraphError> {
        let digest = dir.digest();
        if self.received.is_empty() {
            if digest != self.root {
                return Err(GraphError::WrongRoot {
                    expected: self.root,
                    actual: digest,
                });
            }
        } else {
            let sizes = self
                .pending
                .remove(&digest)
                .ok_or(GraphError::Unexpected(digest))?;
            for declared in sizes {
                check_size(digest, declared, dir)?;
            }
        }
        self.received.insert(digest, dir.documented_size());
        for (_, child, declared) in dir.child_directories() {
            if let Some(&actual) = self.received.get(&child) {
                if declared < actual {
                    return Err(GraphError::SizeTooSmall {
                        child,
                        declared,
                        actual,
                    });
                }
            } else {
                self.pending.entry(child).or_default().push(declared);
            }
        }
        Ok(digest)
    }

    /// Whether nothing has been received yet (an empty stream means "not found").
    pub fn is_empty(&self) -> bool {
        self.received.is_empty()
    }

    /// Fails if a referenced directory never arrived.
    pub fn finish(self) -> Result<(), GraphError> {
        match self.pending.keys().next() {
            Some(d) => Err(GraphError::Incomplete(*d)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::castore::node::Node;

    fn leaf(n: u8) -> Directory {
        let mut d = Directory::new();
        d.add(
            format!("f{n}").into(),
            Node::File {
                digest: [n; 32].into(),
                size: 1,
                executable: false,
            },
        )
        .unwrap();
        d
    }

    fn parent(children: &[&Directory]) -> Directory {
        let mut d = Directory::new();
        for (i, c) in children.iter().enumerate() {
            d.add(
                format!("d{i}").into(),
                Node::Directory {
                    digest: c.digest(),
                    size: c.size(),
                },
            )
            .unwrap();
        }
        d
    }

    #[test]
    fn leaves_first_accepts_connected_graph() {
        let (a, b) = (leaf(1), leaf(2));
        let root = parent(&[&a, &b, &a]);
        let mut v = LeavesFirst::new();
        v.add(a.clone()).unwrap();
        v.add(b.clone()).unwrap();
        v.add(a.clone()).unwrap();
        v.add(root.clone()).unwrap();
        let g = v.finish().unwrap();
        assert_eq!(g.root(), Some(root.digest()));
        assert_eq!(g.dirs.len(), 3);
    }

    #[test]
    fn leaves_first_rejects_missing_child_and_disconnected() {
        let a = leaf(1);
        let root = parent(&[&a]);
        let mut v = LeavesFirst::new();
        assert!(matches!(
            v.add(root.clone()),
            Err(GraphError::MissingChild { .. })
        ));
        let mut v = LeavesFirst::new();
        v.add(leaf(9)).unwrap();
        v.add(a).unwrap();
        v.add(root).unwrap();
        assert!(matches!(v.finish(), Err(GraphError::Disconnected(_))));
        assert!(matches!(
            LeavesFirst::new().finish(),
            Err(GraphError::Empty)
        ));
    }

    #[test]
    fn size_rule_accepts_documented_and_tvix_rejects_smaller() {
        let a = leaf(1); // 1 entry: documented 1, tvix 2
        for (size, ok) in [(2, true), (1, true), (0, false)] {
            let mut root = Directory::new();
            root.add(
                "d".into(),
                Node::Directory {
                    digest: a.digest(),
                    size,
                },
            )
            .unwrap();
            let mut v = LeavesFirst::new();
            v.add(a.clone()).unwrap();
            assert_eq!(v.add(root.clone()).is_ok(), ok, "size {size}");
            let mut r = RootFirst::new(root.digest());
            r.add(&root).unwrap();
            assert_eq!(r.add(&a).is_ok(), ok, "size {size}");
        }
    }

    #[test]
    fn root_first_order_rules() {
        let (a, b) = (leaf(1), leaf(2));
        let mid = parent(&[&a]);
        let root = parent(&[&mid, &b]);
        let mut r = RootFirst::new(root.digest());
        assert!(matches!(r.add(&mid), Err(GraphError::WrongRoot { .. })));
        let mut r = RootFirst::new(root.digest());
        r.add(&root).unwrap();
        assert!(matches!(r.add(&a), Err(GraphError::Unexpected(_))));
        let mut r = RootFirst::new(root.digest());
        r.add(&root).unwrap();
        r.add(&mid).unwrap();
        r.add(&b).unwrap();
        assert!(matches!(r.add(&b), Err(GraphError::Unexpected(_))));
        let mut r = RootFirst::new(root.digest());
        r.add(&root).unwrap();
        r.add(&mid).unwrap();
        r.add(&b).unwrap();
        assert!(matches!(r.finish(), Err(GraphError::Incomplete(_))));
    }
}
