//! A gRPC client over loopback TCP, served in-process by a memory backend.
use crate::common::{grpc_store, serve_in_process};
use tvix_virtiofsd::store::Store;

async fn make_store() -> (Store, ()) {
    let addr = serve_in_process(Store::memory(), None).await;
    assert!(addr.starts_with("grpc+http://127.0.0.1:"), "{addr}");
    (grpc_store(&addr), ())
}

conformance_suite!(make_store);
