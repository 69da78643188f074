//! The failover client (`Addr::List`) over several gRPC daemons of one
//! store: one dead address followed by a live server (every call finds
//! the first refused and goes on at the second, then prefers the second
//! while the first is down), and two live servers over one backend.
use crate::common::{grpc_store, serve_in_process};
use tempfile::TempDir;
use tvix_virtiofsd::store::{Addr, Store};

/// Nothing listens on the first address (its socket file is absent).
mod dead_then_live {
    use super::*;

    async fn make_store() -> (Store, TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = serve_in_process(Store::memory(), None).await;
        let dead = format!("grpc+unix://{}", dir.path().join("gone.sock").display());
        let list = format!("{dead},{live}");
        assert!(matches!(list.parse::<Addr>(), Ok(Addr::List(v)) if v.len() == 2));
        (grpc_store(&list), dir)
    }

    conformance_suite!(make_store);
}

/// Two servers (unix and TCP, mixed) over one memory store.
mod two_live_over_one_store {
    use super::*;

    async fn make_store() -> (Store, TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = Store::memory();
        let a = serve_in_process(backend.clone(), Some(dir.path())).await;
        let b = serve_in_process(backend, None).await;
        (grpc_store(&format!("{a},{b}")), dir)
    }

    conformance_suite!(make_store);
}
