//! A gRPC client over a unix socket, served in-process by a local backend.
use crate::common::{grpc_store, serve_in_process};
use tempfile::TempDir;
use tvix_virtiofsd::store::{Addr, Store};

async fn make_store() -> (Store, TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Addr::Local(dir.path().join("backend"));
    let backend = Store::open(&local, &local, &local).expect("open local store");
    let addr = serve_in_process(backend, Some(dir.path())).await;
    assert!(addr.starts_with("grpc+unix://"), "{addr}");
    (grpc_store(&addr), dir)
}

conformance_suite!(make_store);
