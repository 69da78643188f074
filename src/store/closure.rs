//! A VM's closure: the store paths it may see (some roots and everything
//! they reference, transitively, by their path infos). Sharing one store
//! between tenants must not show each guest every tenant's paths: with a
//! closure, any other name below /nix/store is absent, answered from this
//! set alone, before any store call (so not even timing tells).
use crate::castore::Node;
use crate::nix::store_path::StorePath;
use crate::store::Store;
use std::collections::{HashMap, VecDeque};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    #[error("{0} is not in the store")]
    Missing(StorePath),
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {text:?} is not a store path")]
    BadLine {
        path: String,
        line: usize,
        text: String,
    },
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

/// The store paths of a closure, with their root nodes (immutable, so
/// lookups and listings need no store call).
#[derive(Debug, Default)]
pub struct Closure {
    paths: HashMap<[u8; 20], (StorePath, Node)>,
}

impl Closure {
    /// The closure of `roots`: each root must be in the store; references
    /// missing from it are left out (a store may hold a partial closure),
    /// with a warning.
    pub async fn resolve(store: &Store, roots: &[StorePath]) -> Result<Closure, ClosureError> {
        let mut paths = HashMap::new();
        let mut todo: VecDeque<(StorePath, bool)> =
            roots.iter().map(|r| (r.clone(), true)).collect();
        while let Some((sp, is_root)) = todo.pop_front() {
            if paths.contains_key(sp.digest()) {
                continue;
            }
            let info = store
                .path_info
                .get(sp.digest())
                .await?
                .filter(|i| i.store_path == sp);
            let Some(info) = info else {
                if is_root {
                    return Err(ClosureError::Missing(sp));
                }
                tracing::warn!("closure: {sp} is referenced but not in the store");
                continue;
            };
            for r in &info.references {
                if !paths.contains_key(r.digest()) {
                    todo.push_back((r.clone(), false));
                }
            }
            paths.insert(*sp.digest(), (sp, info.node));
        }
        Ok(Closure { paths })
    }

    /// The root node of `sp` when it is in the closure (the name must
    /// match too: `<hash>-<othername>` is absent).
    pub fn get(&self, sp: &StorePath) -> Option<&Node> {
        self.paths
            .get(sp.digest())
            .filter(|(p, _)| p == sp)
            .map(|(_, n)| n)
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Every member as (store path, root node).
    pub fn members(&self) -> impl Iterator<Item = (&StorePath, &Node)> {
        self.paths.values().map(|(p, n)| (p, n))
    }

    /// Every member as (basename, root node).
    pub fn entries(&self) -> impl Iterator<Item = (String, &Node)> {
        self.paths.values().map(|(p, n)| (p.to_basename(), n))
    }
}

/// Roots from a file: one store path a line (absolute or a basename);
/// blank lines and `#` comments are skipped.
pub fn read_roots(path: &Path) -> Result<Vec<StorePath>, ClosureError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ClosureError::File {
        path: shown.clone(),
        source,
    })?;
    read_roots_from(file, &shown)
}

/// Most bytes a closure file may hold: about 100,000 store paths at their
/// longest (an absolute path of a 211-byte name), far more than a
/// system's closure; the file is read whole into memory.
pub const MAX_CLOSURE_FILE: u64 = 24 << 20;

/// As [`read_roots`], from an opened file (`shown` names it in errors).
pub fn read_roots_from(
    reader: impl std::io::Read,
    shown: &str,
) -> Result<Vec<StorePath>, ClosureError> {
    let file_err = |source| ClosureError::File {
        path: shown.to_string(),
        source,
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut reader.take(MAX_CLOSURE_FILE + 1), &mut text)
        .map_err(file_err)?;
    if text.len() as u64 > MAX_CLOSURE_FILE {
        return Err(file_err(std::io::Error::other(format!(
            "larger than {MAX_CLOSURE_FILE} bytes"
        ))));
    }
    parse_roots(&text).map_err(|(line, text)| ClosureError::BadLine {
        path: shown.to_string(),
        line,
        text,
    })
}

/// Store paths, absolute or basenames; `Err((line number, text))` at the
/// first that is not one.
pub fn parse_roots(text: &str) -> Result<Vec<StorePath>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let sp = if l.starts_with('/') {
            StorePath::from_absolute_path(l.trim_end_matches('/'))
        } else {
            StorePath::from_basename(l)
        };
        out.push(sp.map_err(|_| (i + 1, l.to_string()))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::path_info::PathInfo;

    fn sp(i: u8, name: &str) -> StorePath {
        StorePath::new([i; 20], name.to_string()).unwrap()
    }

    #[tokio::test]
    async fn follows_references_and_only_them() {
        let store = Store::memory();
        let (a, b, c, other) = (sp(1, "a"), sp(2, "b"), sp(3, "c"), sp(4, "other"));
        for (p, refs) in [
            (&a, vec![b.clone()]),
            (&b, vec![c.clone(), b.clone()]),
            (&c, vec![sp(9, "missing")]),
            (&other, vec![a.clone()]),
        ] {
            let mut info = PathInfo::bare(p.clone(), Node::Symlink { target: "x".into() });
            info.references = refs;
            store.path_info.put(info).await.unwrap();
        }
        let cl = Closure::resolve(&store, std::slice::from_ref(&a))
            .await
            .unwrap();
        assert_eq!(cl.len(), 3);
        for p in [&a, &b, &c] {
            assert!(cl.get(p).is_some(), "{p}");
        }
        assert!(cl.get(&other).is_none());
        assert!(cl.get(&sp(1, "renamed")).is_none(), "the name counts");
        assert!(matches!(
            Closure::resolve(&store, &[sp(9, "missing")]).await,
            Err(ClosureError::Missing(_))
        ));
    }

    #[test]
    fn roots_are_read_a_line_each() {
        let text = format!(
            "# a VM\n/nix/store/{}-a\n\n  {}-b  \n",
            "1".repeat(32),
            "2".repeat(32)
        );
        let roots = parse_roots(&text).unwrap();
        assert_eq!(roots.len(), 2);
        assert_eq!(
            parse_roots("/nix/store/nope\n"),
            Err((1, "/nix/store/nope".into()))
        );
    }
}
