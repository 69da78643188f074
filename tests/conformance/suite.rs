//! The cases every store backend must pass, and `conformance_suite!`, which
//! turns them into one test per case for a backend's `make_store`.
use bytes::Bytes;
use futures::TryStreamExt;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::SeekFrom;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tvix_virtiofsd::castore::{B3Digest, Directory, LeavesFirst, Node};
use tvix_virtiofsd::ingest;
use tvix_virtiofsd::nix::path_info::{ContentAddress, PathInfo, Signature};
use tvix_virtiofsd::nix::store_path::StorePath;
use tvix_virtiofsd::store::blob::{put_bytes, read_to_vec, BlobReader, Direct, Shared};
use tvix_virtiofsd::store::Store;
use tvix_virtiofsd::wire::store::nar_info::ca::Hash as CaKind;

/// Expands to one multi-threaded `#[tokio::test]` per case; `$make` is an
/// `async fn() -> (Store, Guard)`, the guard living as long as the test.
macro_rules! conformance_suite {
    ($make:expr) => {
        conformance_suite!(@cases $make;
            blobs_roundtrip,
            dropped_blob_writer_stores_nothing,
            directory_graph_roundtrip,
            large_directory_roundtrip,
            path_infos_roundtrip,
            nar_of_imported_tree_roundtrips,
            nar_of_missing_or_wrong_blob_fails,
            blob_fast_paths_agree_with_open_read,
            open_read_sized_refuses_a_longer_blob,
            directory_fast_paths_agree_with_get,
            path_info_fast_path_agrees_with_get,
        );
    };
    (@cases $make:expr; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (store, _guard) = ($make)().await;
                $crate::suite::$case(&store).await;
            }
        )*
    };
}

const MIB: usize = 1 << 20;

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

fn b3(data: &[u8]) -> B3Digest {
    B3Digest::from(blake3::hash(data))
}

/// Stores `data` through several writes of an odd size.
async fn put_in_pieces(store: &Store, data: &[u8]) -> B3Digest {
    let mut w = store.blob.open_write().await.unwrap();
    for piece in data.chunks(777_777) {
        w.write(piece).await.unwrap();
    }
    w.close().await.unwrap()
}

/// Blobs of 0 bytes, a few bytes and 5 MiB + 3 read back intact, by digest and by seeking.
pub async fn blobs_roundtrip(store: &Store) {
    let big = random_bytes(5 * MIB + 3);
    for data in [&b""[..], b"hello, conformance", &big] {
        let digest = put_in_pieces(store, data).await;
        assert_eq!(digest, b3(data), "{} byte blob", data.len());
        assert!(store.blob.has(&digest).await.unwrap());
        let back = read_to_vec(store.blob.as_ref(), &digest).await.unwrap();
        let back = back.expect("stored blob is readable");
        assert_eq!(back.len(), data.len());
        assert!(
            back == data,
            "{} byte blob read back differently",
            data.len()
        );
    }
    // the same bytes in one write give the same digest
    assert_eq!(
        put_bytes(store.blob.as_ref(), &big).await.unwrap(),
        b3(&big)
    );

    let unknown = b3(b"never stored");
    assert!(!store.blob.has(&unknown).await.unwrap());
    assert!(store.blob.open_read(&unknown).await.unwrap().is_none());

    let mut r = store.blob.open_read(&b3(&big)).await.unwrap().unwrap();
    let off = 4 * MIB + 12_345;
    assert_eq!(
        r.seek(SeekFrom::Start(off as u64)).await.unwrap(),
        off as u64
    );
    let mut buf = vec![0u8; 100_000];
    r.read_exact(&mut buf).await.unwrap();
    assert!(buf == big[off..off + buf.len()], "read after seek differs");
    r.seek(SeekFrom::End(-10)).await.unwrap();
    let mut tail = Vec::new();
    r.read_to_end(&mut tail).await.unwrap();
    assert_eq!(tail, big[big.len() - 10..]);
    r.seek(SeekFrom::Start(1)).await.unwrap();
    let mut head = [0u8; 4];
    r.read_exact(&mut head).await.unwrap();
    assert_eq!(head, big[1..5]);
}

/// A writer dropped without `close` leaves neither the blob nor any prefix of it stored.
pub async fn dropped_blob_writer_stores_nothing(store: &Store) {
    let data = random_bytes(2 * MIB + 5);
    // whatever part a client may already have sent: nothing, or whole 1 MiB chunks
    let candidates = [
        ("nothing", b3(b"")),
        ("the first MiB", b3(&data[..MIB])),
        ("the first 2 MiB", b3(&data[..2 * MIB])),
        ("everything", b3(&data)),
    ];
    let mut w = store.blob.open_write().await.unwrap();
    w.write(&data).await.unwrap();
    drop(w);
    // remote stores learn of the abort asynchronously: watch for a while
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        for (what, d) in &candidates {
            assert!(
                !store.blob.has(d).await.unwrap(),
                "dropped upload stored {what}"
            );
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the same bytes can still be stored properly
    assert_eq!(
        put_bytes(store.blob.as_ref(), &data).await.unwrap(),
        b3(&data)
    );
    assert!(store.blob.has(&b3(&data)).await.unwrap());
}

fn file(content: &[u8], executable: bool) -> Node {
    Node::File {
        digest: b3(content),
        size: content.len() as u64,
        executable,
    }
}

fn dir_node(d: &Directory) -> Node {
    Node::Directory {
        digest: d.digest(),
        size: d.size(),
    }
}

fn dir(entries: Vec<(&str, Node)>) -> Directory {
    let mut d = Directory::new();
    for (name, node) in entries {
        d.add(Bytes::copy_from_slice(name.as_bytes()), node)
            .unwrap();
    }
    d
}

async fn put_dirs(store: &Store, leaves_first: &[&Directory]) -> B3Digest {
    let mut g = LeavesFirst::new();
    for d in leaves_first {
        g.add((*d).clone()).unwrap();
    }
    store
        .directory
        .put_graph(g.finish().unwrap())
        .await
        .unwrap()
}

async fn recursive(store: &Store, root: B3Digest) -> Vec<Directory> {
    store
        .directory
        .get_recursive(root)
        .try_collect()
        .await
        .unwrap()
}

/// Checks `got` is root first, each directory once and after one that refers to it.
fn assert_root_first(got: &[Directory], root: &Directory, expected: &[&Directory]) {
    assert_eq!(got.first(), Some(root), "root comes first");
    let digests: Vec<B3Digest> = got.iter().map(Directory::digest).collect();
    let unique: HashSet<B3Digest> = digests.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "a directory came twice");
    for (i, d) in digests.iter().enumerate().skip(1) {
        let referenced = got[..i]
            .iter()
            .any(|p| p.child_directories().any(|(_, c, _)| c == *d));
        assert!(referenced, "{d} came before any directory referring to it");
    }
    let want: HashSet<B3Digest> = expected.iter().map(|d| d.digest()).collect();
    assert_eq!(unique, want);
}

/// A graph with a shared leaf and a diamond is stored once per directory and streams back root first.
pub async fn directory_graph_roundtrip(store: &Store) {
    let empty = Directory::new();
    let leaf = dir(vec![
        ("data", file(b"leaf data", false)),
        (
            "link",
            Node::Symlink {
                target: "data".into(),
            },
        ),
    ]);
    let left = dir(vec![("leaf", dir_node(&leaf)), ("x", file(b"x", true))]);
    let right = dir(vec![
        ("empty", dir_node(&empty)),
        ("leaf-1", dir_node(&leaf)),
        ("leaf-2", dir_node(&leaf)),
    ]);
    let root = dir(vec![("left", dir_node(&left)), ("right", dir_node(&right))]);
    let all = [&empty, &leaf, &left, &right, &root];
    // a repeated directory in the upload is harmless
    let got_root = put_dirs(store, &[&empty, &leaf, &leaf, &left, &right, &root]).await;
    assert_eq!(got_root, root.digest());

    for d in all {
        assert_eq!(
            store.directory.get(&d.digest()).await.unwrap().as_ref(),
            Some(d)
        );
    }
    let unknown = b3(b"no such directory");
    assert_eq!(store.directory.get(&unknown).await.unwrap(), None);

    assert_root_first(&recursive(store, root.digest()).await, &root, &all);
    assert_root_first(
        &recursive(store, right.digest()).await,
        &right,
        &[&right, &leaf, &empty],
    );
    assert_eq!(recursive(store, leaf.digest()).await, vec![leaf.clone()]);
    assert!(recursive(store, unknown).await.is_empty());
}

/// A directory of 10,000 files round-trips with its digest intact.
pub async fn large_directory_roundtrip(store: &Store) {
    let mut big = Directory::new();
    for i in 0..10_000u32 {
        let node = Node::File {
            digest: b3(&i.to_le_bytes()),
            size: u64::from(i),
            executable: i % 3 == 0,
        };
        big.add(format!("file-{i:05}").into(), node).unwrap();
    }
    let digest = big.digest();
    assert_eq!(put_dirs(store, &[&big]).await, digest);
    let back = store.directory.get(&digest).await.unwrap().expect("stored");
    assert_eq!(back.len(), 10_000);
    assert_eq!(back.digest(), digest);
    assert!(back == big, "large directory read back differently");
    let all = recursive(store, digest).await;
    assert_eq!(all.len(), 1);
    assert!(all[0] == big);
}

fn path_info(n: u8, name: &str, node: Node) -> PathInfo {
    PathInfo {
        store_path: StorePath::new([n; 20], name).unwrap(),
        node,
        references: vec![],
        nar_size: 1000 + u64::from(n),
        nar_sha256: [n; 32],
        signatures: vec![],
        deriver: None,
        ca: None,
    }
}

/// Path infos (symlink, file and directory roots) read back equal, list
/// exactly, and never change: a put of other contents for an existing path
/// is refused, of the same contents accepted.
pub async fn path_infos_roundtrip(store: &Store) {
    let blob = put_bytes(store.blob.as_ref(), b"#!/bin/sh\n")
        .await
        .unwrap();
    let file_node = Node::File {
        digest: blob,
        size: 10,
        executable: true,
    };
    let tree = dir(vec![("bin", file_node.clone())]);
    put_dirs(store, &[&tree]).await;

    let sym = path_info(
        1,
        "sym",
        Node::Symlink {
            target: "/nix/store/x".into(),
        },
    );
    let mut script = path_info(2, "script.sh", file_node);
    script.references = vec![
        sym.store_path.clone(),
        StorePath::new([2; 20], "script.sh").unwrap(),
    ];
    script.signatures = vec![Signature {
        name: "cache.example.org-1".into(),
        data: Bytes::from(vec![7u8; 64]),
    }];
    script.deriver = Some(StorePath::new([9; 20], "script.sh.drv").unwrap());
    script.ca = Some(ContentAddress {
        kind: CaKind::NarSha256,
        digest: Bytes::from(vec![3u8; 32]),
    });
    let pkg = path_info(3, "pkg-1.0", dir_node(&tree));
    let all = vec![sym, script, pkg];

    for info in &all {
        assert_eq!(store.path_info.put(info.clone()).await.unwrap(), *info);
    }
    for info in &all {
        let got = store.path_info.get(info.store_path.digest()).await.unwrap();
        assert_eq!(got.as_ref(), Some(info));
    }
    assert_eq!(store.path_info.get(&[0xee; 20]).await.unwrap(), None);
    assert_eq!(listed(store).await, all);

    // A store path never changes: the same contents again are accepted
    // (signatures may differ), other contents are refused.
    let mut resigned = all[1].clone();
    resigned.signatures.clear();
    let back = store.path_info.put(resigned).await.unwrap();
    assert!(back.same_contents(&all[1]));
    for change in [
        |i: &mut PathInfo| i.nar_size += 1,
        |i: &mut PathInfo| i.nar_sha256[0] ^= 1,
        |i: &mut PathInfo| {
            i.node = Node::Symlink {
                target: "/elsewhere".into(),
            }
        },
        |i: &mut PathInfo| i.references.pop().map(drop).unwrap_or(()),
    ] {
        let mut changed = all[1].clone();
        change(&mut changed);
        let err = store.path_info.put(changed).await.unwrap_err();
        assert!(err.is_conflict(), "{err}");
        assert!(err.to_string().contains("never changes"), "{err}");
    }
    let got = store
        .path_info
        .get(all[1].store_path.digest())
        .await
        .unwrap();
    assert_eq!(got.as_ref(), Some(&all[1]));
    assert_eq!(listed(store).await, all, "refused puts change nothing");
}

async fn listed(store: &Store) -> Vec<PathInfo> {
    let mut v: Vec<PathInfo> = store.path_info.list().try_collect().await.unwrap();
    v.sort_by(|a, b| a.store_path.cmp(&b.store_path));
    v
}

/// Writes a tree with every kind of entry; returns the tempdir holding it.
fn sample_tree() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("nested/a/b")).unwrap();
    std::fs::write(root.join("nested/a/b/deep.txt"), b"deep\n").unwrap();
    std::fs::write(root.join("nested/top.txt"), b"top\n").unwrap();
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    std::fs::create_dir(root.join("bin")).unwrap();
    let tool = root.join("bin/tool");
    std::fs::write(&tool, b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("bin/tool", root.join("link")).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join("big"), random_bytes(200 << 10)).unwrap();
    tmp
}

async fn render(node: &Node, store: &Store) -> tvix_virtiofsd::store::Result<Vec<u8>> {
    let mut out = Vec::new();
    ingest::write_nar(&mut out, node, store).await?;
    Ok(out)
}

/// An imported tree renders to the NAR its import hashed, and that NAR ingests back to the same root.
pub async fn nar_of_imported_tree_roundtrips(store: &Store) {
    let tree = sample_tree();
    let imported = tvix_virtiofsd::ingest::tree::ingest_path(tree.path(), store, &|_| {})
        .await
        .unwrap();
    assert!(matches!(imported.node, Node::Directory { .. }));

    let bytes = render(&imported.node, store).await.unwrap();
    assert_eq!(bytes.len() as u64, imported.nar_size);
    assert_eq!(
        <[u8; 32]>::from(Sha256::digest(&bytes)),
        imported.nar_sha256
    );
    let calculated = ingest::calculate_nar(&imported.node, store).await.unwrap();
    assert_eq!(calculated, (imported.nar_size, imported.nar_sha256));

    let fresh = Store::memory();
    let ingested = ingest::ingest_nar(&bytes[..], &fresh).await.unwrap();
    assert_eq!(ingested.node, imported.node);
    assert_eq!(ingested.nar_size, imported.nar_size);
    assert_eq!(ingested.nar_sha256, imported.nar_sha256);
    assert!(render(&ingested.node, &fresh).await.unwrap() == bytes);
}

/// Rendering fails, rather than producing a short NAR, when a blob is missing or has the wrong size.
pub async fn nar_of_missing_or_wrong_blob_fails(store: &Store) {
    let missing = file(b"not in the store", false);
    assert!(render(&missing, store).await.is_err(), "missing blob");
    assert!(ingest::calculate_nar(&missing, store).await.is_err());

    let in_dir = dir(vec![("f", missing)]);
    put_dirs(store, &[&in_dir]).await;
    assert!(
        render(&dir_node(&in_dir), store).await.is_err(),
        "missing blob in a directory"
    );

    let digest = put_bytes(store.blob.as_ref(), b"abc").await.unwrap();
    for size in [2, 4] {
        let node = Node::File {
            digest,
            size,
            executable: false,
        };
        assert!(
            render(&node, store).await.is_err(),
            "3 byte blob as size {size}"
        );
    }
    let right = Node::File {
        digest,
        size: 3,
        executable: false,
    };
    assert!(!render(&right, store).await.unwrap().is_empty());
}

/// Everything a blob reader serves, by whichever access it offers: its
/// direct access (bytes or a file read at offsets) when it has one, else
/// its async reads.
async fn read_all(mut r: Box<dyn BlobReader>) -> Vec<u8> {
    if let Some(d) = r.direct() {
        let direct = direct_bytes(d);
        let mut streamed = Vec::new();
        r.read_to_end(&mut streamed).await.unwrap();
        assert!(direct == streamed, "direct access and async reads differ");
        return direct;
    }
    let mut out = Vec::new();
    r.read_to_end(&mut out).await.unwrap();
    out
}

fn direct_bytes(d: Direct<'_>) -> Vec<u8> {
    match d {
        Direct::Bytes(b) => b.to_vec(),
        Direct::File(f) => file_at_offsets(f),
    }
}

/// A file's bytes read only at offsets, as the view reads a shared blob.
fn file_at_offsets(f: &std::fs::File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read_at(&mut buf, out.len() as u64).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

async fn shared_bytes(r: Box<dyn BlobReader>) -> Vec<u8> {
    match r.into_shared() {
        Shared::Bytes(b) => b.to_vec(),
        Shared::File(f) => file_at_offsets(&f),
        Shared::Stream(r) => read_all(r).await,
    }
}

/// `open_read_blocking`, called as the view calls it: on a thread that may block.
fn open_blocking(
    store: &Store,
    digest: &B3Digest,
) -> Option<tvix_virtiofsd::store::Result<Option<Box<dyn BlobReader>>>> {
    tokio::task::block_in_place(|| store.blob.open_read_blocking(digest))
}

/// Every way to read a blob (sized, streamed, blocking, direct, shared, and
/// after the read-soon and read-ahead hints) gives the bytes `open_read`
/// gives; a blob never stored is absent from each of them.
pub async fn blob_fast_paths_agree_with_open_read(store: &Store) {
    let big = random_bytes(300 << 10);
    let blobs: Vec<Vec<u8>> = vec![vec![], b"fast paths".to_vec(), big];
    let mut digests = Vec::new();
    for data in &blobs {
        digests.push(put_bytes(store.blob.as_ref(), data).await.unwrap());
    }
    let unknown = b3(b"never stored either");
    // Hints name stored and unknown blobs alike, and return at once.
    let mut soon = digests.iter().copied().chain([unknown]);
    store.blob.read_soon(&mut soon);
    let mut ahead = blobs
        .iter()
        .zip(&digests)
        .map(|(d, &g)| (g, d.len() as u64))
        .chain([(unknown, 19)]);
    store.blob.read_ahead(&mut ahead);

    for (data, digest) in blobs.iter().zip(&digests) {
        let len = data.len();
        let plain = store.blob.open_read(digest).await.unwrap().expect("stored");
        assert!(read_all(plain).await == *data, "open_read of {len} bytes");

        let sized = store.blob.open_read_sized(digest, len as u64).await;
        let sized = sized.unwrap().expect("stored blob opens at its size");
        assert!(
            read_all(sized).await == *data,
            "open_read_sized of {len} bytes"
        );

        let stream = store.blob.read_stream(digest).await.unwrap();
        let chunks: Vec<Bytes> = stream.expect("stored").try_collect().await.unwrap();
        assert!(chunks.concat() == *data, "read_stream of {len} bytes");

        if let Some(opened) = open_blocking(store, digest) {
            let r = opened.unwrap().expect("stored blob opens blocking");
            assert!(
                read_all(r).await == *data,
                "open_read_blocking of {len} bytes"
            );
        }

        let r = store.blob.open_read(digest).await.unwrap().expect("stored");
        assert!(shared_bytes(r).await == *data, "into_shared of {len} bytes");
    }

    assert!(store
        .blob
        .open_read_sized(&unknown, 19)
        .await
        .unwrap()
        .is_none());
    // Absent as no stream, or as a stream whose first item is the refusal.
    if let Some(mut s) = store.blob.read_stream(&unknown).await.unwrap() {
        use futures::StreamExt;
        assert!(
            matches!(s.next().await, Some(Err(_))),
            "a stream of an unknown blob yields no bytes"
        );
    }
    if let Some(opened) = open_blocking(store, &unknown) {
        assert!(opened.unwrap().is_none(), "unknown blob opened blocking");
    }
}

/// `open_read_sized` with a size short of the blob never serves the longer
/// bytes, whether the blob is fetched or already at hand; the right size
/// still opens it afterwards, and a larger claim serves only what is there.
pub async fn open_read_sized_refuses_a_longer_blob(store: &Store) {
    let data = random_bytes(3000);
    let digest = put_bytes(store.blob.as_ref(), &data).await.unwrap();
    // Twice: the first may be a fetch, the second, after a full read, a hit.
    for round in ["first", "after a full read"] {
        match store.blob.open_read_sized(&digest, 2999).await {
            Err(_) => {}
            Ok(None) => panic!("{round}: a stored blob opened at a short size was absent"),
            Ok(Some(mut r)) => {
                let mut out = Vec::new();
                let read = r.read_to_end(&mut out).await;
                assert!(
                    read.is_err(),
                    "{round}: a blob longer than asked was served"
                );
            }
        }
        let r = store.blob.open_read_sized(&digest, 3000).await.unwrap();
        assert!(read_all(r.expect("stored")).await == data, "{round}");
    }
    if let Ok(Some(r)) = store.blob.open_read_sized(&digest, 3001).await {
        assert!(read_all(r).await == data, "a larger claim is not padded");
    }
}

/// `get_blocking`, `get_watched` and `get_recursive_watched` agree with
/// `get` and `get_recursive`, and an unknown directory is absent from each.
pub async fn directory_fast_paths_agree_with_get(store: &Store) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let leaf = dir(vec![("f", file(b"fast", false))]);
    let mid = dir(vec![("leaf", dir_node(&leaf)), ("g", file(b"g", true))]);
    let root = dir(vec![("mid", dir_node(&mid)), ("leaf", dir_node(&leaf))]);
    let all = [&leaf, &mid, &root];
    put_dirs(store, &all).await;
    let idle = Duration::from_secs(20);
    let unknown = b3(b"no such directory either");

    for d in all {
        let digest = d.digest();
        let blocking = tokio::task::block_in_place(|| store.directory.get_blocking(&digest));
        if let Some(got) = blocking {
            assert_eq!(got.unwrap().as_ref(), Some(d), "get_blocking");
        }
        let progress = AtomicU64::new(0);
        let watched = store
            .directory
            .get_watched(&digest, idle, &|n| progress.store(n, Ordering::Relaxed))
            .await
            .unwrap();
        assert_eq!(watched.as_ref(), Some(d), "get_watched");
    }
    let blocking = tokio::task::block_in_place(|| store.directory.get_blocking(&unknown));
    if let Some(got) = blocking {
        assert_eq!(got.unwrap(), None, "get_blocking of an unknown directory");
    }
    let watched = store
        .directory
        .get_watched(&unknown, idle, &|_| {})
        .await
        .unwrap();
    assert_eq!(watched, None, "get_watched of an unknown directory");

    let received = Arc::new(AtomicU64::new(0));
    let got: Vec<Directory> = store
        .directory
        .get_recursive_watched(root.digest(), received.clone())
        .try_collect()
        .await
        .unwrap();
    assert_root_first(&got, &root, &all);
    assert_eq!(
        got,
        recursive(store, root.digest()).await,
        "get_recursive_watched and get_recursive differ"
    );
    let none: Vec<Directory> = store
        .directory
        .get_recursive_watched(unknown, received)
        .try_collect()
        .await
        .unwrap();
    assert!(none.is_empty(), "an unknown tree streams nothing");
}

/// `get_blocking` on path infos agrees with `get`, for stored and unknown paths.
pub async fn path_info_fast_path_agrees_with_get(store: &Store) {
    let info = path_info(
        7,
        "fast-path",
        Node::Symlink {
            target: "/nix/store/y".into(),
        },
    );
    store.path_info.put(info.clone()).await.unwrap();
    let digest = *info.store_path.digest();
    assert_eq!(
        store.path_info.get(&digest).await.unwrap(),
        Some(info.clone())
    );
    let blocking = tokio::task::block_in_place(|| store.path_info.get_blocking(&digest));
    if let Some(got) = blocking {
        assert_eq!(got.unwrap(), Some(info), "get_blocking");
    }
    let blocking = tokio::task::block_in_place(|| store.path_info.get_blocking(&[0xdd; 20]));
    if let Some(got) = blocking {
        assert_eq!(got.unwrap(), None, "get_blocking of an unknown path");
    }
}
