//! A killed import leaves no half-written object visible in the embedded
//! store: every object file that exists is complete and matches its digest,
//! no path info appears, and importing again completes the store path.
mod common;

use common::{bin, cli_ok};
use std::path::Path;
use std::time::{Duration, Instant};
use tvix_virtiofsd::castore::{B3Digest, Directory};

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Every blob file hashes to its name; every directory file decodes and
/// hashes to its name.
fn verify_objects(store: &Path) -> (usize, usize) {
    let mut blobs = 0;
    for shard in std::fs::read_dir(store.join("blobs")).unwrap().flatten() {
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            let data = std::fs::read(f.path()).unwrap();
            let name = f.file_name().into_string().unwrap();
            assert_eq!(B3Digest::of(&data).to_hex(), name, "partial blob visible");
            blobs += 1;
        }
    }
    let mut dirs = 0;
    if let Ok(rd) = std::fs::read_dir(store.join("directories")) {
        for shard in rd.flatten() {
            for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
                let data = std::fs::read(f.path()).unwrap();
                let name = f.file_name().into_string().unwrap();
                let d = Directory::decode(&data[..]).expect("directory file decodes");
                assert_eq!(d.digest().to_hex(), name, "partial directory visible");
                dirs += 1;
            }
        }
    }
    (blobs, dirs)
}

#[test]
fn killed_import_leaves_only_complete_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("tree");
    // many small files, then large ones, so the kill lands mid-import
    for i in 0..2000 {
        let d = src.join(format!("d{:02}", i % 50));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), format!("small {i}\n")).unwrap();
    }
    let big = src.join("zz-big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..8 {
        let data: Vec<u8> = (0..(16u32 << 20))
            .map(|x| (x.wrapping_mul(2654435761) >> 13) as u8 ^ i)
            .collect();
        std::fs::write(big.join(format!("blob{i}")), data).unwrap();
    }
    let store = tmp.path().join("store");
    let url = format!("local://{}", store.display());

    let mut child = std::process::Command::new(bin())
        .args(["--store", &url, "import", src.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // wait until the small files and the first large one are stored, then
    // kill it while it writes the next large blob
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_files(&store.join("blobs")) < 2001 {
        assert!(Instant::now() < deadline, "import did not start");
        assert!(
            child.try_wait().unwrap().is_none(),
            "import finished before the kill: make the tree bigger"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let (blobs, _) = verify_objects(&store);
    assert!(blobs >= 2001);
    assert_eq!(
        count_files(&store.join("pathinfo")),
        0,
        "a path info became visible"
    );

    // Importing again completes it, and the result matches a clean import.
    let again = cli_ok(&["--store", &url, "import", src.to_str().unwrap()]);
    let path = String::from_utf8(again).unwrap().trim().to_string();
    let clean = format!("local://{}", tmp.path().join("clean").display());
    let clean_path = cli_ok(&["--store", &clean, "import", src.to_str().unwrap()]);
    assert_eq!(String::from_utf8(clean_path).unwrap().trim(), path);
    let a = cli_ok(&["--store", &url, "nar", &path]);
    let b = cli_ok(&["--store", &clean, "nar", &path]);
    assert!(
        a == b,
        "NAR after resumed import differs from a clean import"
    );
    verify_objects(&store);
}
