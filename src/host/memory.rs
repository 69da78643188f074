//! The allocator settings of the long-running commands (`virtiofs`,
//! `mount`, `daemon`). A daemon per microVM must stay small: glibc's
//! default of up to eight arenas per core, and freed memory that stays in
//! them, made a per-VM daemon hold twice its live heap after a walk.
use std::time::Duration;

/// Arenas glibc may create: threads share them instead of each keeping
/// its own free memory.
const ARENAS: libc::c_int = 2;
/// Allocations this large get their own mapping, returned on free (and
/// the threshold stays put instead of growing with the largest free).
const MMAP_THRESHOLD: libc::c_int = 128 << 10;
/// How often free memory inside the arenas is given back to the kernel.
const TRIM_PERIOD: Duration = Duration::from_secs(2);

/// Sets the arena and mapping limits. Call before threads start.
pub fn configure() {
    // SAFETY: mallopt only changes allocator parameters; before threads
    // start there is no concurrent allocation to race with.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Starts a thread that gives free arena memory back every few seconds
/// (`malloc_trim` also releases whole free pages in the middle of a heap).
pub fn spawn_trimmer() {
    let spawned = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(TRIM_PERIOD);
            // SAFETY: malloc_trim is thread-safe and has no preconditions.
            unsafe {
                libc::malloc_trim(0);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no allocator trimming thread: {e}");
    }
}
