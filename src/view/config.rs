//! How the view behaves: [`FsConfig`], the guest's page-cache policy and
//! the defaults the command line shows. Plain settings, read once by
//! [`super::StoreFs::new`]; apart so an operator's knobs are found without
//! reading the filesystem that obeys them.
use fuse_backend_rs::api::filesystem::OpenOptions;
use std::time::Duration;

/// How the view behaves.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Let `readdir` of the root list every store path.
    pub list_root: bool,
    /// Upper bound for one store request (for a blob: without progress;
    /// for a directory: more for a larger one); past it the reader gets
    /// ETIMEDOUT.
    pub store_timeout: Duration,
    /// Bytes of decoded directories kept in memory.
    pub dir_cache_bytes: u64,
    /// Blobs remembered as checked (each is checked again once forgotten).
    pub verified_blobs: usize,
    /// Open file and directory handles a guest may hold at once; past it
    /// OPEN and OPENDIR answer ENFILE (a guest kernel that never releases
    /// cannot grow the daemon without bound).
    pub max_handles: usize,
    /// What the guest may keep in its page cache.
    pub cache: CachePolicy,
    /// Files read ahead at most when the guest reads a directory's files
    /// in order (0: none).
    pub read_ahead_files: usize,
}

/// virtiofsd's `--cache` modes, for content that never changes: metadata
/// can never go stale, so only data pages (and directory pages) differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CachePolicy {
    /// Files with direct I/O (no data pages in the guest), directory
    /// listings not kept either. For many guests sharing one store.
    Never,
    /// Files with direct I/O; directory listings kept.
    Metadata,
    /// Data cached while a file is open, dropped when it is opened again.
    Auto,
    /// Data kept across opens (nothing can change it).
    #[default]
    Always,
}

impl CachePolicy {
    pub(super) fn file(self) -> OpenOptions {
        match self {
            // MAP_PRIVATE mappings (programs, shared libraries) still work
            // with direct I/O; shared ones need the kernel's
            // FUSE_DIRECT_IO_ALLOW_MMAP, which the vhost-user transport
            // grants where offered (`serve::vhost_user::fuse_init`).
            CachePolicy::Never | CachePolicy::Metadata => OpenOptions::DIRECT_IO,
            CachePolicy::Auto => OpenOptions::empty(),
            CachePolicy::Always => OpenOptions::KEEP_CACHE,
        }
    }

    pub(super) fn dir(self) -> OpenOptions {
        match self {
            CachePolicy::Never => OpenOptions::empty(),
            _ => OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE,
        }
    }
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            list_root: false,
            store_timeout: Duration::from_secs(30),
            dir_cache_bytes: DEFAULT_DIR_CACHE_BYTES,
            verified_blobs: DEFAULT_VERIFIED_BLOBS,
            max_handles: DEFAULT_MAX_HANDLES,
            cache: CachePolicy::Always,
            read_ahead_files: usize::from(DEFAULT_READ_AHEAD_FILES),
        }
    }
}

/// Default [`FsConfig::dir_cache_bytes`]: a few thousand directories.
pub const DEFAULT_DIR_CACHE_BYTES: u64 = 2 << 20;

/// Default [`FsConfig::read_ahead_files`]: 16 files of 256 KiB at most
/// in flight, far more than a disk needs to stay busy.
pub const DEFAULT_READ_AHEAD_FILES: u16 = 16;
/// Default [`FsConfig::verified_blobs`]: a large closure's files, each
/// checked once per daemon, in at most about 2.2 MiB (8,192 before: a
/// warm walk of a 26,000-file tree read and hashed every file again).
pub const DEFAULT_VERIFIED_BLOBS: usize = 65_536;
/// Default [`FsConfig::max_handles`]: far above what a guest's programs
/// keep open, far below what would strain the host (a descriptor and a
/// few hundred bytes each).
pub const DEFAULT_MAX_HANDLES: usize = 65_536;
