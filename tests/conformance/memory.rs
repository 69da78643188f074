//! The in-memory backend.
use tvix_virtiofsd::store::Store;

async fn make_store() -> (Store, ()) {
    (Store::memory(), ())
}

conformance_suite!(make_store);
