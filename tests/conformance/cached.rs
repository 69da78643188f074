//! The host cache in its filler role (what `daemon --cache-dir` serves)
//! in front of a remote: every read goes through the cache directory
//! (misses fetched, verified and stored, hits served from it), writes go
//! to the remote. The bound is generous: eviction is tested in
//! `tests/host_cache.rs`.
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use tvix_virtiofsd::services::cache::{Cache, CacheOptions, Role};
use tvix_virtiofsd::services::{Addr, Store, StoreOptions};

/// The cache's directory and the cache itself live as long as the test.
type Guard = (TempDir, Arc<Cache>);

fn cached(addrs: &[Addr; 3], dir: &TempDir) -> (Store, Arc<Cache>) {
    let opts = StoreOptions {
        sandboxed: false,
        idle_timeout: Duration::from_secs(30),
        cache: Some(CacheOptions {
            dir: dir.path().join("cache"),
            max_bytes: 256 << 20,
            role: Role::Filler,
        }),
    };
    let (store, cache) = Store::open_with(addrs, &opts).expect("open cached store");
    let cache = cache.expect("a cache was asked for");
    assert_eq!(cache.role(), Role::Filler);
    (store, cache)
}

/// A filler cache in front of a memory store.
mod memory_remote {
    use super::*;

    async fn make_store() -> (Store, Guard) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, cache) = cached(&[Addr::Memory, Addr::Memory, Addr::Memory], &dir);
        (store, (dir, cache))
    }

    conformance_suite!(make_store);
}

/// A filler cache in front of a gRPC client of an in-process server over a
/// unix socket (the deployment's shape: the remote is another host's
/// tvix-store).
mod grpc_unix_remote {
    use super::*;
    use crate::common::serve_in_process;

    async fn make_store() -> (Store, Guard) {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = serve_in_process(Store::memory(), Some(dir.path())).await;
        let a: Addr = addr.parse().expect("address");
        assert!(matches!(a, Addr::GrpcUnix(..)), "{addr}");
        let (store, cache) = cached(&[a.clone(), a.clone(), a], &dir);
        (store, (dir, cache))
    }

    conformance_suite!(make_store);
}
