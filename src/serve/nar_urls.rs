//! The NAR URLs of narinfos the binary cache accepted. Nix names an
//! upload's NAR itself (`nar/<hash of the compressed file>.nar.xz`) and
//! keeps the narinfo it uploaded in its own disk cache for a month, so the
//! client that pushed asks for exactly that URL when it pulls, never for
//! the narinfo again. The store keeps no such name: this map does, from
//! the name after `nar/` to the store path hash it serves. With a
//! directory (the embedded store's) it is one small file per name,
//! written whole and kept across restarts, at most [`MAX_ON_DISK`];
//! without one it is in memory, at most [`MAX_IN_MEMORY`] names.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// Names kept in memory when there is no directory to keep them in.
pub const MAX_IN_MEMORY: usize = 100_000;
/// Names kept on disk: an uploader re-sending a path's narinfo under ever
/// new NAR names adds a file each; past this, new names are not kept.
pub const MAX_ON_DISK: usize = 1_000_000;

pub struct NarUrls {
    dir: Option<PathBuf>,
    mem: Mutex<HashMap<String, String>>,
    /// Names on disk (counted once at start, then as they are added).
    on_disk: std::sync::atomic::AtomicUsize,
}

/// Whether `name` (what follows `nar/`) is one Nix writes and we take: a
/// base-32 or hex hash and `.nar`, `.nar.xz` or `.nar.zst`; nothing that
/// could name another file.
pub fn valid(name: &str) -> bool {
    let Some((hash, rest)) = name.split_once('.') else {
        return false;
    };
    (1..=128).contains(&hash.len())
        && hash
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && matches!(rest, "nar" | "nar.xz" | "nar.zst")
}

impl NarUrls {
    /// Names kept under `dir` (created 0700 when missing), or in memory.
    pub fn new(dir: Option<PathBuf>) -> Self {
        let dir = dir.and_then(|d| {
            use std::os::unix::fs::DirBuilderExt;
            match std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
            {
                Ok(()) => Some(d),
                Err(e) => {
                    tracing::warn!(
                        "binary cache: cannot keep NAR URLs in {}: {e}; keeping them in memory",
                        d.display()
                    );
                    None
                }
            }
        });
        let on_disk = dir
            .as_ref()
            .and_then(|d| std::fs::read_dir(d).ok())
            .map_or(0, |entries| entries.take(MAX_ON_DISK + 1).count());
        Self {
            dir,
            mem: Mutex::new(HashMap::new()),
            on_disk: on_disk.into(),
        }
    }

    /// Remembers that `name` serves the store path of hash `hash` (its
    /// 32 nixbase32 characters).
    pub async fn put(&self, name: &str, hash: &str) {
        if !valid(name) {
            return;
        }
        let Some(dir) = &self.dir else {
            let mut m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
            if m.len() >= MAX_IN_MEMORY && !m.contains_key(name) {
                if let Some(k) = m.keys().next().cloned() {
                    m.remove(&k);
                }
            }
            m.insert(name.to_string(), hash.to_string());
            return;
        };
        use std::sync::atomic::Ordering::Relaxed;
        if dir.join(name).exists() {
            return; // a name is content-addressed by Nix: the same path
        }
        if self.on_disk.fetch_add(1, Relaxed) >= MAX_ON_DISK {
            self.on_disk.fetch_sub(1, Relaxed);
            tracing::warn!("binary cache: {MAX_ON_DISK} NAR URLs kept already; {name} is not");
            return;
        }
        let (dir, name, hash) = (dir.clone(), name.to_string(), hash.to_string());
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = tempfile::NamedTempFile::new_in(&dir)?;
            f.write_all(hash.as_bytes())?;
            f.persist(dir.join(&name)).map_err(|e| e.error)?;
            Ok(())
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("binary cache: keeping a NAR URL: {e}"),
            Err(e) => tracing::warn!("binary cache: keeping a NAR URL: {e}"),
        }
    }

    /// The store path hash `name` serves, if a narinfo named it.
    pub async fn get(&self, name: &str) -> Option<String> {
        if !valid(name) {
            return None;
        }
        let Some(dir) = &self.dir else {
            let m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
            return m.get(name).cloned();
        };
        let path = dir.join(name);
        let got = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            use std::io::Read;
            let mut b = Vec::new();
            std::fs::File::open(path)?.take(64).read_to_end(&mut b)?;
            Ok(b)
        })
        .await
        .ok()?
        .ok()?;
        let hash = String::from_utf8(got).ok()?;
        (hash.len() == 32).then_some(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_nix_writes_are_taken() {
        assert!(valid(
            "1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz"
        ));
        assert!(valid("abc.nar"));
        for bad in [
            "../x.nar", "a/b.nar", ".nar", "abc.txt", "ABC.nar", "abc", "",
        ] {
            assert!(!valid(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn names_are_kept_across_instances_on_disk_and_bounded_in_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nar-urls");
        let hash = "0123456789abcdfghijklmnpqrsvwxyz";
        NarUrls::new(Some(dir.clone()))
            .put("aaaa.nar.xz", hash)
            .await;
        let again = NarUrls::new(Some(dir));
        assert_eq!(again.get("aaaa.nar.xz").await.as_deref(), Some(hash));
        assert_eq!(again.get("bbbb.nar.xz").await, None);
        let mem = NarUrls::new(None);
        for i in 0..(MAX_IN_MEMORY + 10) {
            mem.put(&format!("{i}.nar"), hash).await;
        }
        assert_eq!(mem.mem.lock().unwrap().len(), MAX_IN_MEMORY);
    }
}
