//! The staging directory of a local store, where objects are written before
//! being renamed into place.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Temporary files untouched for this long belong to a killed import.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Creates `ROOT/tmp` and removes what killed imports left there. Files
/// still being written by a live importer are recent and stay.
pub fn prepare(root: &Path) -> std::io::Result<PathBuf> {
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    let now = SystemTime::now();
    for entry in std::fs::read_dir(&tmp)?.flatten() {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > STALE_AFTER);
        if stale {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!("cannot remove stale {}: {e}", entry.path().display());
            }
        }
    }
    Ok(tmp)
}

/// A store opened for reading must exist: a typo in the path is an
/// operator error, not an empty store.
pub fn check_exists(root: &Path) -> std::io::Result<()> {
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("store {} is not a directory", root.display()),
        )),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("store {}: {e}", root.display()),
        )),
    }
}
