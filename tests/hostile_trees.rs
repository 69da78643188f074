//! Directory trees a hostile store can build from valid directories: a
//! chain nested 100,000 deep, and a graph of 60 directories each naming
//! the next twice (2^60 entries once expanded). Rendering their NAR
//! (`nar`, CalculateNAR, a path info's import check) ends in a clear error,
//! promptly, and the daemon that was asked keeps serving.
mod common;

use common::{cli_err, cli_ok, Daemon};
use std::time::{Duration, Instant};
use tvix_virtiofsd::castore::{Directory, LeavesFirst, Node};
use tvix_virtiofsd::nix::store_path::StorePath;
use tvix_virtiofsd::store::Store;

fn dir_node(d: &Directory) -> Node {
    Node::Directory {
        digest: d.digest(),
        size: d.size(),
    }
}

/// A chain: each directory holds one directory, `depth` deep.
fn chain(depth: usize) -> Vec<Directory> {
    let mut dirs = vec![Directory::new()];
    for _ in 0..depth {
        let mut d = Directory::new();
        d.add("d".into(), dir_node(dirs.last().unwrap())).unwrap();
        dirs.push(d);
    }
    dirs
}

/// Each directory names the one below it twice.
fn doubling(levels: usize) -> Vec<Directory> {
    let mut leaf = Directory::new();
    leaf.add("f".into(), Node::Symlink { target: "x".into() })
        .unwrap();
    let mut dirs = vec![leaf];
    for _ in 0..levels {
        let below = dir_node(dirs.last().unwrap());
        let mut d = Directory::new();
        d.add("a".into(), below.clone()).unwrap();
        d.add("b".into(), below).unwrap();
        dirs.push(d);
    }
    dirs
}

async fn put(store: &Store, dirs: Vec<Directory>) -> Node {
    let root = dir_node(dirs.last().unwrap());
    let mut g = LeavesFirst::new();
    for d in dirs {
        g.add(d).unwrap();
    }
    store
        .directory
        .put_graph(g.finish().unwrap())
        .await
        .unwrap();
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_and_exponential_trees_are_refused_not_rendered() {
    let store = Store::memory();
    for (what, dirs, expect) in [
        ("a 100,000-deep chain", chain(100_000), "nested deeper than"),
        (
            "2^60 expanded entries",
            doubling(60),
            "expands to more than",
        ),
    ] {
        let root = put(&store, dirs).await;
        let t = Instant::now();
        let err = tvix_virtiofsd::ingest::calculate_nar(&root, &store)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(expect), "{what}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{what}: took {:?}",
            t.elapsed()
        );
    }
    // a deep chain within the bound still renders
    let root = put(&store, chain(1000)).await;
    let (size, _) = tvix_virtiofsd::ingest::calculate_nar(&root, &store)
        .await
        .unwrap();
    assert!(size > 1000 * 40, "{size}");
}

/// The same trees (the chain 10,000 deep) behind store paths of a
/// read-only daemon: `nar` gets the error, and the daemon still answers
/// afterwards.
#[test]
fn a_daemon_asked_for_them_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("local://{}", tmp.path().join("store").display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let names = [
        "00000000000000000000000000000001-deep",
        "00000000000000000000000000000002-wide",
    ];
    rt.block_on(async {
        let a: tvix_virtiofsd::store::Addr = url.parse().unwrap();
        let store = Store::open(&a, &a, &a).unwrap();
        // 10,000 deep here, for time: 100,000 pass too (30-60 s in a debug
        // build) since the recursive Get sends directories many to a frame
        for (name, dirs) in names.iter().zip([chain(10_000), doubling(60)]) {
            let node = put(&store, dirs).await;
            let sp = StorePath::from_basename(name).unwrap();
            store
                .path_info
                .put(common::bare_path_info(sp, node))
                .await
                .unwrap();
        }
    });
    let f = tmp.path().join("ok");
    std::fs::write(&f, b"fine").unwrap();
    let ok = String::from_utf8(cli_ok(&["--store", &url, "import", f.to_str().unwrap()]))
        .unwrap()
        .trim()
        .to_string();
    let sock = tmp.path().join("ro.sock");
    let d = Daemon::start(&url, &format!("unix:{}", sock.display()), &["--read-only"]);
    for (name, expect) in names
        .iter()
        .zip(["nested deeper than", "expands to more than"])
        .rev()
    {
        let err = cli_err(&["--store", &d.addr, "nar", &format!("/nix/store/{name}")]);
        assert!(err.contains(expect), "{name}: {err}");
    }
    let nar = cli_ok(&["--store", &d.addr, "nar", &ok]);
    assert!(nar.windows(4).any(|w| w == b"fine"));
    assert!(d.stop().success());
}

/// A tree is held whole in memory only within its bounds (directories and
/// bytes): one past them, from a store over gRPC, is RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_is_collected_within_bounds() {
    use tvix_virtiofsd::store::directory::get_tree_within;
    let backend = Store::memory();
    let root = put(&backend, chain(100)).await;
    let Node::Directory { digest, .. } = root else {
        unreachable!()
    };
    let client = common::grpc_store(&common::serve_in_process(backend, None).await);
    let tree = get_tree_within(client.directory.as_ref(), digest, 101, 1 << 20)
        .await
        .unwrap();
    assert_eq!(tree.len(), 101);
    let err = get_tree_within(client.directory.as_ref(), digest, 100, 1 << 20)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("more than 100 directories"),
        "{err}"
    );
    let err = get_tree_within(client.directory.as_ref(), digest, 1000, 4096)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("out of room"), "{err}");
}
