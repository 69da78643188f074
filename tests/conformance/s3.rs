//! The object storage backend (`s3://`) against a real three-node Garage
//! cluster (replication 3), one cluster for all cases of this binary, each
//! case under a key prefix of its own.
use crate::common::garage::Garage;
use std::sync::Mutex;
use tvix_virtiofsd::store::{Addr, Store};

/// The cluster, started by the first case and stopped when the test
/// binary exits (statics are never dropped: `atexit` does it).
static CLUSTER: Mutex<Option<Garage>> = Mutex::new(None);

extern "C" fn stop_cluster() {
    if let Ok(mut c) = CLUSTER.lock() {
        c.take();
    }
}

/// The address of a fresh prefix in the shared cluster, with the process
/// environment holding its credentials.
fn fresh_prefix() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut c = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if c.is_none() {
        let g = Garage::start();
        for (k, v) in g.env() {
            std::env::set_var(k, v);
        }
        // SAFETY: registers a plain function with no arguments.
        unsafe { libc::atexit(stop_cluster) };
        *c = Some(g);
    }
    let g = c.as_ref().expect("started above");
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "s3://{}/conformance-{n}?endpoint={}&region=garage",
        g.bucket(),
        g.endpoint(n % 3)
    )
}

async fn make_store() -> (Store, ()) {
    let addr: Addr = fresh_prefix().parse().expect("s3 address");
    let store = Store::open(&addr, &addr, &addr).expect("open the bucket");
    (store, ())
}

conformance_suite!(make_store);
