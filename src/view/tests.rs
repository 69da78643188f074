//! Unit tests of the view that reach into its state (the directory cache,
//! handle table, blob checking); the FUSE-level behaviour is tested from
//! `tests/`. A sibling file so the view's modules stay short.
use super::dircache::LARGE_DIRECTORY_IDLE;
use super::open::{check_direct, CHECK_CHUNK};
use super::*;
use crate::castore::{B3Digest, Directory, Node};
use crate::lock;
use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn a_blob_file_is_checked_whole_at_any_size() {
    let dir = tempfile::tempdir().unwrap();
    for len in [0, 100, CHECK_CHUNK, CHECK_CHUNK + 1, 3 * CHECK_CHUNK] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join(format!("b{len}"));
        std::fs::write(&path, &data).unwrap();
        let digest = B3Digest::from(blake3::hash(&data));
        let open =
            || crate::store::blob::FileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let ok = check_direct(&mut open(), &digest, len as u64);
        assert!(matches!(ok, Ok(true)), "{len} bytes: {ok:?}");
        // a file longer than what its digest and size name
        let mut longer = data.clone();
        longer.push(1);
        std::fs::write(&path, &longer).unwrap();
        let bad = check_direct(&mut open(), &digest, len as u64);
        assert!(bad.is_err(), "{len} bytes and one more passed");
    }
}

#[test]
fn a_larger_directory_may_take_longer_within_a_bound() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = FsConfig {
        store_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let fs = StoreFs::new(Store::memory(), rt.handle().clone(), cfg);
    let s = Duration::from_secs;
    assert_eq!(fs.directory_limit(0), s(2));
    assert_eq!(fs.directory_limit(99_999), s(2));
    assert_eq!(fs.directory_limit(500_000), s(7));
    assert_eq!(
        fs.directory_limit(1_000_000),
        s(10),
        "at most 4 limits more"
    );
    assert_eq!(fs.directory_limit(u64::MAX), s(10), "whatever it declares");
}

/// Open root handles share one listing (unchanged store): a guest that
/// opens the root many times does not multiply it.
#[test]
fn root_handles_share_one_listing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::memory();
    rt.block_on(async {
        for i in 0..100u8 {
            let sp = crate::nix::store_path::StorePath::new([i; 20], format!("p{i}")).unwrap();
            store
                .path_info
                .put(crate::nix::path_info::PathInfo::bare(
                    sp,
                    Node::Symlink { target: "x".into() },
                ))
                .await
                .unwrap();
        }
    });
    let fs = StoreFs::new(
        store,
        rt.handle().clone(),
        FsConfig {
            list_root: true,
            ..Default::default()
        },
    );
    let ctx = Context::default();
    let mut handles = Vec::new();
    for round in 0..2 {
        if round == 1 {
            // past the freshness window: listed again, and still shared
            // because nothing changed
            std::thread::sleep(Duration::from_millis(1100));
        }
        for _ in 0..50 {
            handles.push(fs.opendir(&ctx, ROOT_INO, 0).unwrap().0.unwrap());
        }
    }
    let dh = lock(&fs.handles.dirs);
    let first = dh[&handles[0]].clone();
    assert_eq!(first.len(), 100);
    assert!(handles.iter().all(|h| Arc::ptr_eq(&dh[h], &first)));
}

/// Puts `d` (no subdirectories) into `store` as the store path `sp`;
/// answers its node.
async fn put_store_path(
    store: &Store,
    sp: &crate::nix::store_path::StorePath,
    d: Directory,
) -> Node {
    let node = Node::Directory {
        digest: d.digest(),
        size: d.size(),
    };
    crate::store::directory::put_one(&*store.directory, d)
        .await
        .unwrap();
    let info = crate::nix::path_info::PathInfo::bare(sp.clone(), node.clone());
    store.path_info.put(info).await.unwrap();
    node
}

/// Whether every page of the file at `path` is in the page cache.
fn resident(path: &std::path::Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a read-only shared map of a file this test owns, never
    // touched (mincore does not fault pages in), unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let mut pages = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `pages` has one byte per page of the mapping.
    let rc = unsafe { libc::mincore(map, len, pages.as_mut_ptr()) };
    // SAFETY: the mapping made above, of `len` bytes.
    unsafe { libc::munmap(map, len) };
    assert_eq!(rc, 0);
    pages.iter().all(|p| p & 1 == 1)
}

/// The guest opening a directory's files in order has the next ones'
/// data read ahead (on a local disk); a file opened alone, or far out
/// of order, does not.
#[test]
fn files_opened_in_order_have_the_next_read_ahead() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // On the disk: a tmpfs never lets go of a page.
    // (CARGO_TARGET_DIR may be elsewhere: make sure this one exists.)
    let on_disk = concat!(env!("CARGO_MANIFEST_DIR"), "/target");
    std::fs::create_dir_all(on_disk).unwrap();
    let tmp = tempfile::tempdir_in(on_disk).unwrap();
    let blob = crate::store::blob::local::LocalBlobService::open(tmp.path()).unwrap();
    let store = Store {
        blob: Arc::new(blob.clone()),
        ..Store::memory()
    };
    let sp = crate::nix::store_path::StorePath::new([9; 20], "files".to_string()).unwrap();
    let paths = rt.block_on(async {
        let mut d = Directory::new();
        let mut paths = Vec::new();
        for i in 0..12u8 {
            let data = vec![i; 64 << 10];
            let mut w = store.blob.open_write().await.unwrap();
            w.write(&data).await.unwrap();
            let digest = w.close().await.unwrap();
            let node = Node::File {
                digest,
                size: data.len() as u64,
                executable: false,
            };
            d.add(format!("f{i:02}").into(), node).unwrap();
            paths.push(blob.path_of(&digest));
        }
        put_store_path(&store, &sp, d).await;
        paths
    });
    for p in &paths {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(p).unwrap();
        f.sync_all().unwrap();
        // SAFETY: advice on a descriptor owned here, no memory passed.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        assert!(
            !resident(p),
            "{}: could not drop it from the page cache",
            p.display()
        );
    }
    let fs = StoreFs::new(store, rt.handle().clone(), FsConfig::default());
    let ctx = Context::default();
    let name = std::ffi::CString::new(sp.to_basename()).unwrap();
    let top = fs.lookup(&ctx, ROOT_INO, &name).unwrap().inode;
    let open = |i: usize| {
        let name = std::ffi::CString::new(format!("f{i:02}")).unwrap();
        let e = fs.lookup(&ctx, top, &name).unwrap();
        fs.open(&ctx, e.inode, libc::O_RDONLY as u32, 0).unwrap();
    };
    let settle = || std::thread::sleep(Duration::from_millis(300));
    let nothing_ahead = |why: &str| {
        settle();
        assert!(paths.iter().all(|p| !resident(p)), "{why}: read ahead");
    };
    // A guest with more requests queued keeps the disk busy itself.
    inline::with_others_waiting(true, || (0..4).for_each(open));
    nothing_ahead("others waiting");
    open(2);
    open(11);
    nothing_ahead("opened out of order");
    open(3);
    open(4);
    let start = std::time::Instant::now();
    while !(resident(&paths[5]) && resident(&paths[6])) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "5 and 6 never read ahead"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    settle();
    for (i, p) in paths
        .iter()
        .enumerate()
        .filter(|(i, _)| ![5, 6].contains(i))
    {
        // Opening reads nothing either: the first READ does.
        assert!(!resident(p), "f{i:02} read ahead, outside the window");
    }
}

/// A directory heavier than the whole cache is kept on its own while
/// it is used (not fetched again for each name), then let go.
#[test]
fn one_large_directory_is_kept_while_used() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::memory();
    let sp = crate::nix::store_path::StorePath::new([7; 20], "wide".to_string()).unwrap();
    let dir = rt.block_on(async {
        let mut d = Directory::new();
        for i in 0..100 {
            d.add(
                format!("e{i:03}").into(),
                Node::Symlink { target: "x".into() },
            )
            .unwrap();
        }
        put_store_path(&store, &sp, d).await
    });
    let Node::Directory { digest, .. } = dir else {
        unreachable!()
    };
    let fs = StoreFs::new(
        store,
        rt.handle().clone(),
        FsConfig {
            dir_cache_bytes: 1024,
            ..Default::default()
        },
    );
    let ctx = Context::default();
    let name = std::ffi::CString::new(sp.to_basename()).unwrap();
    let top = fs.lookup(&ctx, ROOT_INO, &name).unwrap();
    let held = fs
        .dircache
        .remembered(&digest)
        .expect("kept after the first lookup");
    assert!(
        !fs.dircache.dirs.contains_key(&digest),
        "too heavy for the cache"
    );
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        let e = std::ffi::CString::new(format!("e{:03}", i * 7)).unwrap();
        assert_ne!(fs.lookup(&ctx, top.inode, &e).unwrap().inode, 0);
    }
    let again = fs.dircache.remembered(&digest).expect("kept while used");
    assert!(Arc::ptr_eq(&held, &again), "not fetched again");
    drop((held, again));
    std::thread::sleep(LARGE_DIRECTORY_IDLE * 3);
    assert!(lock(&fs.dircache.large).is_none(), "let go once idle");
}
