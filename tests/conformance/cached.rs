//! The host cache in both its roles. The filler (what `daemon --cache-dir`
//! serves) in front of a remote: every read goes through the cache
//! directory (misses fetched, verified and stored, hits served from it),
//! writes go to the remote. The reader (what a per-VM daemon with
//! `--cache-dir` opens) in front of such a filler: hits read from the
//! shared directory, misses asked of the filler, writes go through it. The
//! bound is generous: eviction is tested in `tests/host_cache.rs`.
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use tvix_virtiofsd::store::cache::{Cache, CacheOptions, Role};
use tvix_virtiofsd::store::{Addr, Store, StoreOptions};

/// The cache's directory and the cache itself live as long as the test.
type Guard = (TempDir, Arc<Cache>);

fn cached(addrs: &[Addr; 3], dir: &TempDir) -> (Store, Arc<Cache>) {
    cached_as(addrs, dir, Role::Filler)
}

fn cached_as(addrs: &[Addr; 3], dir: &TempDir, role: Role) -> (Store, Arc<Cache>) {
    let opts = StoreOptions {
        sandboxed: false,
        idle_timeout: Duration::from_secs(30),
        cache: Some(CacheOptions {
            dir: dir.path().join("cache"),
            max_bytes: 256 << 20,
            role,
        }),
        ..Default::default()
    };
    let (store, cache) = Store::open_with(addrs, &opts).expect("open cached store");
    let cache = cache.expect("a cache was asked for");
    assert_eq!(cache.role(), role);
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

/// A reader of the cache directory a filler fills, the filler served in
/// this process over a unix socket as `daemon --cache-dir` serves it (the
/// store services and the cache's fill service), in front of a memory
/// store. The reader's store is that filler: misses are filled by it into
/// the shared directory, writes pass through it to the memory store.
mod reader_of_filler {
    use super::*;
    use tvix_virtiofsd::serve::grpc::{CacheServer, StoreServer};
    use tvix_virtiofsd::wire::{cache, castore, store};

    /// Serves the filler's store and its fill service; answers the address.
    fn serve_filler(filler: Store, cache: Arc<Cache>, dir: &TempDir) -> Addr {
        let srv = StoreServer::new(filler, false);
        let path = dir.path().join("filler.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind unix socket");
        let router = tonic::transport::Server::builder()
            .layer(tower::util::MapRequestLayer::new(
                tvix_virtiofsd::serve::grpc::reset_is_error,
            ))
            .add_service(castore::blob_service_server::BlobServiceServer::new(
                srv.clone(),
            ))
            .add_service(
                castore::directory_service_server::DirectoryServiceServer::new(srv.clone()),
            )
            .add_service(store::path_info_service_server::PathInfoServiceServer::new(
                srv,
            ))
            .add_service(cache::cache_service_server::CacheServiceServer::new(
                CacheServer::new(cache),
            ));
        tokio::spawn(
            router.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        format!("grpc+unix://{}", path.display())
            .parse()
            .expect("address")
    }

    async fn make_store() -> (Store, Guard) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (filler, filler_cache) = cached(&[Addr::Memory, Addr::Memory, Addr::Memory], &dir);
        let a = serve_filler(filler, filler_cache, &dir);
        let (store, cache) = cached_as(&[a.clone(), a.clone(), a], &dir, Role::Reader);
        (store, (dir, cache))
    }

    conformance_suite!(make_store);
}
