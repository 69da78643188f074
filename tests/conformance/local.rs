//! The on-disk backend, in a temporary directory.
use tempfile::TempDir;
use tvix_virtiofsd::store::{Addr, Store};

async fn make_store() -> (Store, TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = Addr::Local(dir.path().to_path_buf());
    let store = Store::open(&addr, &addr, &addr).expect("open local store");
    (store, dir)
}

conformance_suite!(make_store);
