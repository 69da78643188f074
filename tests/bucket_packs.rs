//! Packs in a bucket (a real three-node Garage cluster): `import` into
//! `s3://` also writes each tree's small blobs into packs and its
//! directories into one object, a store daemon over the bucket answers a
//! batch that names its tree from the packs and the tree from that object
//! (proved by deleting the blobs' and directories' own objects), a host
//! cache prefetching the tree gets both from there, and a pack part or
//! index overwritten with other bytes costs a fallback read, never a
//! wrong byte.
mod common;

use common::garage::Garage;
use common::{bin, free_port, pseudo_random};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tvix_virtiofsd::castore::B3Digest;
use tvix_virtiofsd::wire::cache::cache_service_client::CacheServiceClient;
use tvix_virtiofsd::wire::cache::{BlobPiece, ReadBlobsRequest};

const PREFIX: &str = "pk";

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A store daemon over the bucket on a loopback TCP port, its log in `log`.
fn store_daemon(garage: &Garage, store: &str, log: &Path) -> (Kill, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(bin())
        .envs(garage.env())
        .args(["--store", store, "daemon", "--read-only", "--listen", &addr])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    common::wait_listening(&addr);
    (Kill(child), addr)
}

/// The keys under `PREFIX/packs/` (index, parts, tree).
fn pack_keys(garage: &Garage) -> Vec<String> {
    pack_keys_in(garage, PREFIX)
}

fn pack_keys_in(garage: &Garage, prefix: &str) -> Vec<String> {
    let r = garage.s3_request(
        0,
        "GET",
        &format!("?list-type=2&prefix={prefix}%2Fpacks%2F"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "listing the packs: {}", r.text());
    r.text()
        .split("<Key>")
        .skip(1)
        .filter_map(|s| s.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

fn read_blobs(addr: &str, digests: &[B3Digest], tree: Option<&B3Digest>) -> Vec<BlobPiece> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = CacheServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut s = c
            .read_blobs(ReadBlobsRequest {
                digests: digests.iter().map(|d| (*d).into()).collect(),
                tree: tree.map(|t| (*t).into()).unwrap_or_default(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while let Some(p) = s.message().await.unwrap() {
            got.push(p);
        }
        got
    })
}

fn blob_file(dir: &Path, d: &B3Digest) -> PathBuf {
    let hex = d.to_hex();
    dir.join("blobs").join(&hex[..2]).join(hex)
}

#[test]
fn batches_naming_their_tree_are_read_from_packs_and_bad_packs_serve_no_wrong_bytes() {
    let garage = Garage::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // 240 small files in 8 directories and one of 1 MiB (too large to pack)
    let src = t.join("tree");
    let mut small = Vec::new();
    for i in 0..240u64 {
        let dir = src.join(format!("d{}", i % 8));
        std::fs::create_dir_all(&dir).unwrap();
        let data = pseudo_random(300 + 41 * i as usize, 90_000 + i);
        std::fs::write(dir.join(format!("f{i:03}")), &data).unwrap();
        small.push((B3Digest::of(&data), data));
    }
    let big = pseudo_random(1 << 20, 89_999);
    std::fs::write(src.join("big"), &big).unwrap();
    let store = format!(
        "s3://{}/{PREFIX}?endpoint={}&region=garage",
        garage.bucket(),
        garage.endpoint(0)
    );
    let out = Command::new(bin())
        .envs(garage.env())
        .args(["--store", &store, "import", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();

    // one index (named by the tree's root directory), one part, and the
    // tree's 9 directories in one object
    let keys = pack_keys(&garage);
    let parts: Vec<&String> = keys.iter().filter(|k| k.contains("/parts/")).collect();
    let trees: Vec<&String> = keys.iter().filter(|k| k.contains("/trees/")).collect();
    let index: Vec<&String> = keys
        .iter()
        .filter(|k| !k.contains("/parts/") && !k.contains("/trees/"))
        .collect();
    assert_eq!(
        (index.len(), parts.len(), trees.len()),
        (1, 1, 1),
        "pack keys: {keys:?}"
    );
    let tree_hex = index[0].rsplit('/').next().unwrap();
    let tree =
        B3Digest::try_from(&data_encoding::HEXLOWER.decode(tree_hex.as_bytes()).unwrap()[..])
            .unwrap();

    assert!(
        trees[0].ends_with(tree_hex),
        "the tree object is named by the root"
    );

    // import-nar writes the same packs: the tree's NAR and path info, as
    // this store renders them, into another prefix
    let out = Command::new(bin())
        .envs(garage.env())
        .args(["--store", &store, "nar", &path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(t.join("tree.nar"), &out.stdout).unwrap();
    let out = Command::new(bin())
        .envs(garage.env())
        .args(["--store", &store, "path-info", "--json", &path])
        .output()
        .unwrap();
    assert!(out.status.success(), "path-info --json");
    std::fs::write(t.join("pi.json"), &out.stdout).unwrap();
    let store2 = format!(
        "s3://{}/pk2?endpoint={}&region=garage",
        garage.bucket(),
        garage.endpoint(0)
    );
    let out = Command::new(bin())
        .envs(garage.env())
        .args(["--store", &store2, "import-nar", "--path-info"])
        .arg(t.join("pi.json"))
        .arg(format!("{path}={}", t.join("tree.nar").display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import-nar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut keys2: Vec<String> = pack_keys_in(&garage, "pk2")
        .iter()
        .map(|k| k.trim_start_matches("pk2/").to_string())
        .collect();
    let mut keys1: Vec<String> = keys
        .iter()
        .map(|k| k.trim_start_matches(&format!("{PREFIX}/")).to_string())
        .collect();
    keys1.sort();
    keys2.sort();
    assert_eq!(keys2, keys1, "import-nar wrote the same packs as import");

    // the blobs' own objects of the first 40 are gone: only the packs
    // have them now
    let gone: Vec<B3Digest> = small.iter().take(40).map(|(d, _)| *d).collect();
    for d in &gone {
        let (status, _) = garage.s3(0, "DELETE", &format!("{PREFIX}/blobs/{}", d.to_hex()), b"");
        assert_eq!(status, 204, "deleting blob {d}");
    }
    // and the directories' own objects are gone: the tree object has them
    let r = garage.s3_request(
        0,
        "GET",
        &format!("?list-type=2&prefix={PREFIX}%2Fdirectories%2F"),
        &[],
        b"",
    );
    let dirs: Vec<String> = r
        .text()
        .split("<Key>")
        .skip(1)
        .filter_map(|s| s.split("</Key>").next())
        .map(str::to_string)
        .collect();
    assert_eq!(dirs.len(), 9, "directories: {dirs:?}");
    for k in &dirs {
        assert_eq!(garage.s3(0, "DELETE", k, b"").0, 204, "deleting {k}");
    }
    let log = t.join("store.log");
    let (daemon, addr) = store_daemon(&garage, &store, &log);
    let right = |p: &BlobPiece, want: &[u8]| !p.missing && !p.too_large && p.data[..] == *want;

    let got = read_blobs(&addr, &gone, Some(&tree));
    assert_eq!(got.len(), gone.len());
    for p in &got {
        assert!(
            right(p, &small[p.index as usize].1),
            "blob {} not answered from the packs",
            p.index
        );
    }
    // without the tree they are read alone: missing
    let got = read_blobs(&addr, &gone, None);
    assert!(
        got.iter().all(|p| p.missing),
        "read alone, the deleted blobs are missing"
    );

    // a host cache prefetching the path gets the tree from its one object
    // and the deleted blobs from the packs
    let cache = t.join("cache");
    let hsock = t.join("host.sock");
    let host = Kill(
        Command::new(bin())
            .args(["--store", &format!("grpc+http://{addr}"), "--cache-dir"])
            .arg(&cache)
            .args([
                "daemon",
                "--min-free-space",
                "16M",
                "--prefetch",
                "closure",
                "--listen",
            ])
            .arg(format!("unix:{}", hsock.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::wait_for_socket_file(&hsock);
    let info = Command::new(bin())
        .args([
            "--store",
            &format!("grpc+unix://{}", hsock.display()),
            "path-info",
            &path,
        ])
        .output()
        .unwrap();
    assert!(info.status.success(), "path-info through the host cache");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !small.iter().all(|(d, _)| blob_file(&cache, d).exists()) {
        assert!(
            Instant::now() < deadline,
            "the host cache did not prefetch every small blob (deleted ones from packs) in 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (d, data) in &small {
        assert!(
            std::fs::read(blob_file(&cache, d)).unwrap() == *data,
            "blob {d} in the cache"
        );
    }
    drop(host);

    // a part overwritten with other bytes of its length: the deleted
    // blobs are missing, never other bytes; the others still right
    let part_key = parts[0].clone();
    let (status, part) = garage.s3(0, "GET", &part_key, b"");
    assert_eq!(status, 200);
    let flipped: Vec<u8> = part.iter().map(|b| b ^ 0x5a).collect();
    assert_eq!(garage.s3(0, "PUT", &part_key, &flipped).0, 200);
    let asked: Vec<B3Digest> = small.iter().take(60).map(|(d, _)| *d).collect();
    let got = read_blobs(&addr, &asked, Some(&tree));
    assert_eq!(got.len(), asked.len());
    for p in &got {
        let i = p.index as usize;
        if i < 40 {
            assert!(p.missing && p.data.is_empty(), "blob {i}: from a bad part");
        } else {
            assert!(right(p, &small[i].1), "blob {i}: read alone, right");
        }
    }
    drop(daemon);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("holds other bytes for blob"),
        "the daemon logs the mismatch: {text}"
    );

    // a bad index: a fresh daemon refuses it and reads every blob alone
    let index_key = index[0].clone();
    assert_eq!(
        garage.s3(0, "PUT", &index_key, b"tvixpk1\nnot an index").0,
        200
    );
    let log2 = t.join("store2.log");
    let (_daemon, addr) = store_daemon(&garage, &store, &log2);
    let asked: Vec<B3Digest> = small[40..].iter().map(|(d, _)| *d).take(64).collect();
    let got = read_blobs(&addr, &asked, Some(&tree));
    assert_eq!(got.len(), asked.len());
    for p in &got {
        assert!(
            right(p, &small[40 + p.index as usize].1),
            "blob {}",
            p.index
        );
    }
    let text = std::fs::read_to_string(&log2).unwrap();
    assert!(
        text.contains("is refused"),
        "the daemon logs the bad index: {text}"
    );
}
