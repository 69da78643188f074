//! The staging directory of a local store, where objects are written before
//! being renamed into place, and the checks of a store directory opened to
//! write or to read.
use super::store_dir::{Access, DirError, StoreDir};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Temporary files untouched for this long belong to a killed import.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// The areas of a local store, the staging directory among them.
const AREAS: [&str; 4] = ["blobs", "directories", "pathinfo", "tmp"];

/// Opens the store at `root` to write it (created if missing, mode 0755:
/// the sandboxed views of other users read it), creates its areas, and
/// removes from `ROOT/tmp` what killed imports left there. Files still
/// being written by a live importer are recent and stay. Refuses a
/// directory others may write (see [`super::store_dir`]).
pub fn prepare(root: &Path) -> std::io::Result<PathBuf> {
    let dir = StoreDir::open(root, Access::Write, Some(0o755))?;
    for area in AREAS {
        let a = dir.area(area, 0o755)?;
        if area == "tmp" {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            let stale = i64::try_from(STALE_AFTER.as_secs()).unwrap_or(i64::MAX);
            a.remove_files(|mtime| now.saturating_sub(mtime) > stale);
        }
    }
    Ok(root.join("tmp"))
}

/// A store opened for reading must exist (a typo in the path is an
/// operator error, not an empty store), and no one but its owner may
/// write it.
pub fn check_exists(root: &Path) -> std::io::Result<()> {
    StoreDir::open(root, Access::Read, None).map_err(|e| match e {
        DirError::Io { source, .. } => {
            std::io::Error::new(source.kind(), format!("store {}: {source}", root.display()))
        }
        DirError::NotDirectory { .. } => std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("store {} is not a directory", root.display()),
        ),
        e => e.into(),
    })?;
    Ok(())
}

/// The name prefix of a file being written beside its destination (or in
/// the staging directory): scans skip it, and a new filler removes it.
pub const TEMP_PREFIX: &str = ".fill";

/// A temporary file for a blob's fill, in the store's staging directory
/// (`ROOT/tmp`, where the embedded store writes its blobs too). Not beside
/// its destination: ext4 places a file's inode in its directory's block
/// group, and 256 shard directories made a fresh filler's blobs land in as
/// many groups, so files read one after another in a guest's walk had
/// their inodes far apart and a cold walk over the cache ran slower than
/// over the embedded store (BENCHMARKS.md, "Depth 64: the second VM against the embedded
/// store": where the inodes landed).
/// Staged together they are allocated together, in the order they were
/// filled. Leftovers are
/// removed by the next filler (`Cache::open`).
pub fn staged_temp(root: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    temp_in(&root.join("tmp"))
}

/// A temporary file for a directory or a path info, beside its
/// destination: renamed within one directory, the many small objects of a
/// tree written at once do not contend for one staging directory's lock.
/// Its name starts with [`TEMP_PREFIX`], which the scans skip and a
/// new filler removes.
pub fn temp_beside(dest: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let dir = dest
        .parent()
        .ok_or_else(|| std::io::Error::other(format!("{} has no parent", dest.display())))?;
    temp_in(dir)
}

/// A temporary file named [`TEMP_PREFIX`]... in `dir`. The
/// directory exists (the filler makes it when it opens): no lookup per
/// fill unless it went missing.
fn temp_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let make = || {
        tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
    };
    match make() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            make()
        }
        r => r,
    }
}
