//! tvix-virtiofsd: a tvix-store compatible content-addressed store and the
//! pieces that serve it to microVMs as a read-only /nix/store.
//!
//! The layers, in the order data flows through them. Each imports only
//! the layers listed above it (`tests/layering.rs` checks this), so each
//! can be read and changed without the ones below it in this list. (A
//! blank line between them keeps rustfmt from sorting them by name.)

/// The host, at the bottom edge: sockets, descriptor passing, readiness,
/// the sandbox, seccomp, privileges and allocator settings. Knows nothing
/// of the store.
pub mod host;

/// The generated wire types of the gRPC services, and Prometheus' text.
pub mod wire;

/// The content-addressed model: digests, nodes, directories, graphs.
pub mod castore;

/// Nix's formats: store paths, hashes, narinfo, signatures, path infos.
pub mod nix;

/// The NAR format: writing, hashing and decompressing archives.
pub mod nar;

/// The store: service traits, addresses, errors, backends, their shared
/// on-disk layout, the gRPC client and the host cache.
pub mod store;

/// Trees and NARs into the store and NARs out of it, and the write policy
/// that decides which path infos may become visible.
pub mod ingest;

/// The read-only /nix/store view of a store, as a FUSE filesystem.
pub mod view;

/// Every transport: vhost-user, host FUSE, gRPC, binary cache, metrics.
pub mod serve;

/// The command line, at the top edge: wires the layers into commands.
pub mod cli;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;

/// Takes a lock even when a panicking thread poisoned it: what it guards
/// is still used, so one failed request does not stop the next.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
