//! Bad input gets a clear error and leaves the store unchanged.
//!
//! Malformed NARs are written by hand and described by a path-info JSON whose
//! hash and size match the bytes, so only the NAR structure is wrong.
mod common;

use common::{cli_err, cli_ok};
use sha2::{Digest, Sha256};
use std::path::Path;
use tvix_virtiofsd::nix::nixbase32;

/// A NAR node; directory entries are written in the order given.
enum N {
    File { executable: bool, contents: Vec<u8> },
    Link(Vec<u8>),
    Dir(Vec<(Vec<u8>, N)>),
}

fn file(contents: &[u8]) -> N {
    N::File {
        executable: false,
        contents: contents.to_vec(),
    }
}

fn exe(contents: &[u8]) -> N {
    N::File {
        executable: true,
        contents: contents.to_vec(),
    }
}

fn link(target: &[u8]) -> N {
    N::Link(target.to_vec())
}

fn dir(entries: Vec<(&[u8], N)>) -> N {
    N::Dir(
        entries
            .into_iter()
            .map(|(n, node)| (n.to_vec(), node))
            .collect(),
    )
}

/// NAR string: u64 LE length, bytes, zero padding to a multiple of 8.
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

fn put_node(out: &mut Vec<u8>, node: &N) {
    put_str(out, b"(");
    put_str(out, b"type");
    match node {
        N::File {
            executable,
            contents,
        } => {
            put_str(out, b"regular");
            if *executable {
                put_str(out, b"executable");
                put_str(out, b"");
            }
            put_str(out, b"contents");
            put_str(out, contents);
        }
        N::Link(target) => {
            put_str(out, b"symlink");
            put_str(out, b"target");
            put_str(out, target);
        }
        N::Dir(entries) => {
            put_str(out, b"directory");
            for (name, child) in entries {
                put_str(out, b"entry");
                put_str(out, b"(");
                put_str(out, b"name");
                put_str(out, name);
                put_str(out, b"node");
                put_node(out, child);
                put_str(out, b")");
            }
        }
    }
    put_str(out, b")");
}

fn nar(root: &N) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, b"nix-archive-1");
    put_node(&mut out, root);
    out
}

/// A valid tree with a nested directory, used around the broken bits.
fn good_tree() -> N {
    dir(vec![
        (b"bin", dir(vec![(b"tool", exe(b"#!/bin/sh\necho tool\n"))])),
        (b"empty", dir(vec![])),
        (b"file", file(b"some contents")),
        (b"link", link(b"file")),
    ])
}

/// A made-up but well-formed store path for test case `name`.
fn store_path(name: &str) -> String {
    let d = Sha256::digest(name.as_bytes());
    format!("/nix/store/{}-{name}", nixbase32::encode(&d[..20]))
}

/// Nix 2.8 style path info for `path` whose NAR is `bytes`.
fn path_info_json(path: &str, bytes: &[u8]) -> String {
    let hash = nixbase32::encode(&Sha256::digest(bytes));
    serde_json::json!([{
        "path": path,
        "narHash": format!("sha256:{hash}"),
        "narSize": bytes.len(),
        "references": [],
    }])
    .to_string()
}

/// Number of files below `dir` (recursively); 0 if it does not exist.
fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.map(|e| e.unwrap())
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// A local store in a tempdir, already holding one valid path.
struct TestStore {
    tmp: tempfile::TempDir,
    url: String,
}

impl TestStore {
    fn new() -> TestStore {
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("local://{}", tmp.path().join("store").display());
        let s = TestStore { tmp, url };
        let good = nar(&good_tree());
        let p = store_path("good-tree");
        assert_eq!(s.import_nar("good", &p, &good), Ok(p.clone()));
        assert_eq!(cli_ok(&["--store", &s.url, "nar", &p]), good);
        s
    }

    fn root(&self) -> std::path::PathBuf {
        self.tmp.path().join("store")
    }

    /// Files under `directories` and `pathinfo`.
    fn counts(&self) -> (usize, usize) {
        (
            count_files(&self.root().join("directories")),
            count_files(&self.root().join("pathinfo")),
        )
    }

    /// `import-nar` of `bytes` as `path`: Ok(stdout) or Err(stderr).
    fn import_nar(&self, tag: &str, path: &str, bytes: &[u8]) -> Result<String, String> {
        self.import_nar_as(tag, path, bytes, &path_info_json(path, bytes))
    }

    /// `import_nar` with `json` as the path info.
    fn import_nar_as(
        &self,
        tag: &str,
        path: &str,
        bytes: &[u8],
        json: &str,
    ) -> Result<String, String> {
        let nar_file = self.tmp.path().join(format!("{tag}.nar"));
        let json_file = self.tmp.path().join(format!("{tag}.json"));
        std::fs::write(&nar_file, bytes).unwrap();
        std::fs::write(&json_file, json).unwrap();
        let out = std::process::Command::new(common::bin())
            .args(["--store", &self.url, "import-nar", "--path-info"])
            .arg(&json_file)
            .arg(format!("{path}={}", nar_file.display()))
            .output()
            .expect("run cli");
        if out.status.success() {
            Ok(String::from_utf8(out.stdout).unwrap().trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// `bytes` is refused with "malformed NAR" and `detail`; nothing is added.
fn assert_refused(case: &str, bytes: &[u8], detail: &str) {
    let store = TestStore::new();
    let path = store_path(case);
    let before = store.counts();
    let err = match store.import_nar(case, &path, bytes) {
        Ok(out) => panic!("{case}: malformed NAR was accepted: {out}"),
        Err(e) => e,
    };
    assert!(err.contains("malformed NAR"), "{case}: {err}");
    assert!(
        err.contains(detail),
        "{case}: expected {detail:?} in: {err}"
    );
    assert!(
        err.contains(&path),
        "{case}: stderr does not name {path}: {err}"
    );
    assert_eq!(
        store.counts(),
        before,
        "{case}: directories/pathinfo changed"
    );
    let err = cli_err(&["--store", &store.url, "path-info", &path]);
    assert!(err.contains("not in the store"), "{case}: {err}");
}

#[test]
fn hand_written_nar_roundtrips() {
    // The writer itself is right: a well-formed NAR imports and reads back.
    let store = TestStore::new();
    let tree = dir(vec![
        (b".hidden", file(b"")),
        (
            b"a",
            dir(vec![(b"b", dir(vec![(b"c", file(&[7u8; 1000]))]))]),
        ),
        (b"x", exe(b"1234567")),
        (b"y", link(b"/abs/dangling")),
    ]);
    let bytes = nar(&tree);
    let p = store_path("roundtrip");
    assert_eq!(store.import_nar("rt", &p, &bytes), Ok(p.clone()));
    assert!(cli_ok(&["--store", &store.url, "nar", &p]) == bytes);
    for (i, root) in [file(b"single"), exe(b""), link(b"target")]
        .iter()
        .enumerate()
    {
        let bytes = nar(root);
        let p = store_path(&format!("single-{i}"));
        assert_eq!(store.import_nar("single", &p, &bytes), Ok(p.clone()));
        assert!(cli_ok(&["--store", &store.url, "nar", &p]) == bytes);
    }
}

#[test]
fn entry_named_dot_dot() {
    let bytes = nar(&dir(vec![(b"..", file(b"escape")), (b"sub", good_tree())]));
    assert_refused("dotdot", &bytes, "is . or ..");
}

#[test]
fn entry_named_dot() {
    let bytes = nar(&dir(vec![(b".", file(b"x")), (b"sub", good_tree())]));
    assert_refused("dot", &bytes, "is . or ..");
}

#[test]
fn entry_name_with_slash() {
    let bytes = nar(&dir(vec![(b"a/b", file(b"x")), (b"sub", good_tree())]));
    assert_refused("slash", &bytes, "contains '/'");
}

#[test]
fn empty_entry_name() {
    let bytes = nar(&dir(vec![(b"", file(b"x")), (b"sub", good_tree())]));
    assert_refused("emptyname", &bytes, "empty");
}

#[test]
fn duplicate_entry_names() {
    let bytes = nar(&dir(vec![
        (b"sub", good_tree()),
        (b"twice", file(b"one")),
        (b"twice", file(b"two")),
    ]));
    assert_refused("duplicate", &bytes, "duplicate or out of order");
}

#[test]
fn unsorted_entries() {
    let bytes = nar(&dir(vec![
        (b"sub", good_tree()),
        (b"b", file(b"b")),
        (b"a", file(b"a")),
    ]));
    assert_refused("unsorted", &bytes, "duplicate or out of order");
}

#[test]
fn unsorted_entries_deep() {
    let bytes = nar(&dir(vec![(
        b"sub",
        dir(vec![(b"z", file(b"z")), (b"y", file(b"y"))]),
    )]));
    assert_refused("unsorted-deep", &bytes, "duplicate or out of order");
}

#[test]
fn truncated_nar() {
    let full = nar(&dir(vec![(b"sub", good_tree()), (b"z", file(&[1u8; 100]))]));
    // Cut inside the last file's contents, and at a token boundary.
    assert_refused("truncated", &full[..full.len() - 60], "truncated");
    assert_refused("truncated-token", &full[..full.len() - 16], "truncated");
}

#[test]
fn bad_magic() {
    let mut bytes = nar(&good_tree());
    let at = bytes
        .windows(13)
        .position(|w| w == b"nix-archive-1")
        .unwrap();
    bytes[at + 12] = b'2';
    assert_refused("badmagic", &bytes, "bad magic");
}

#[test]
fn non_zero_padding() {
    // Root file "abc": its padding is the 5 bytes before the closing ")".
    let mut bytes = nar(&file(b"abc"));
    let last_pad = bytes.len() - 16 - 1;
    assert_eq!(bytes[last_pad], 0);
    bytes[last_pad] = 1;
    assert_refused("padding", &bytes, "non-zero padding");

    // The same inside a directory.
    let mut bytes = nar(&dir(vec![(b"sub", good_tree()), (b"z", file(b"abc"))]));
    // The tail is: contents pad, ")" of the file node, ")" of the entry, ")" of the root.
    let last_pad = bytes.len() - 3 * 16 - 1;
    assert_eq!(bytes[last_pad], 0);
    bytes[last_pad] = 0x80;
    assert_refused("padding-dir", &bytes, "non-zero padding");
}

#[test]
fn trailing_garbage() {
    let mut bytes = nar(&good_tree());
    bytes.extend_from_slice(b"garbage!");
    assert_refused("trailing", &bytes, "trailing bytes");
    let mut bytes = nar(&file(b"x"));
    bytes.push(0);
    assert_refused("trailing-byte", &bytes, "trailing bytes");
}

#[test]
fn symlink_with_empty_target() {
    let bytes = nar(&dir(vec![(b"sub", good_tree()), (b"void", link(b""))]));
    assert_refused("emptytarget", &bytes, "symlink target");
    let bytes = nar(&link(b""));
    assert_refused("emptytarget-root", &bytes, "symlink target");
}

#[test]
fn unknown_node_type() {
    let mut bytes = Vec::new();
    put_str(&mut bytes, b"nix-archive-1");
    for tok in [&b"("[..], b"type", b"fifo", b")"] {
        put_str(&mut bytes, tok);
    }
    assert_refused("fifo", &bytes, "unknown node type");
}

#[test]
fn unknown_store_scheme() {
    let err = cli_err(&["--store", "bogus:///tmp/x", "path-info", &store_path("x")]);
    assert!(err.contains("bogus:///tmp/x"), "{err}");
    assert!(err.contains("unknown scheme"), "{err}");
    let err = cli_err(&[
        "--store",
        "local://relative/dir",
        "path-info",
        &store_path("x"),
    ]);
    assert!(err.contains("absolute path"), "{err}");
}

#[test]
fn nar_of_missing_path() {
    let store = TestStore::new();
    let p = store_path("missing");
    let err = cli_err(&["--store", &store.url, "nar", &p]);
    assert!(
        err.contains("not in the store") && err.contains(&p),
        "{err}"
    );
    let err = cli_err(&["--store", &store.url, "path-info", &p]);
    assert!(
        err.contains("not in the store") && err.contains(&p),
        "{err}"
    );
    let err = cli_err(&["--store", &store.url, "nar", "/tmp/not-a-store-path"]);
    assert!(err.contains("not a store path"), "{err}");
}

#[test]
fn import_of_nonexistent_path() {
    let store = TestStore::new();
    let before = store.counts();
    let missing = store.tmp.path().join("does-not-exist");
    let missing = missing.to_str().unwrap();
    let err = cli_err(&["--store", &store.url, "import", missing]);
    assert!(err.contains(missing), "{err}");
    assert_eq!(store.counts(), before);
}

#[test]
fn import_nar_path_not_described() {
    let store = TestStore::new();
    let bytes = nar(&file(b"x"));
    let described = store_path("described");
    let other = store_path("other");
    let nar_file = store.tmp.path().join("x.nar");
    let json_file = store.tmp.path().join("x.json");
    std::fs::write(&nar_file, &bytes).unwrap();
    std::fs::write(&json_file, path_info_json(&described, &bytes)).unwrap();
    let err = cli_err(&[
        "--store",
        &store.url,
        "import-nar",
        "--path-info",
        json_file.to_str().unwrap(),
        &format!("{other}={}", nar_file.display()),
    ]);
    assert!(
        err.contains(&other) && err.contains("not described"),
        "{err}"
    );
    cli_err(&["--store", &store.url, "path-info", &other]);
}

/// A NAR longer than the narSize it is described with (an `.xz` that
/// expands without end, say) is stopped at that size, before its bytes
/// reach the store: no blob of the oversized file is written.
#[test]
fn nar_longer_than_its_nar_size() {
    let store = TestStore::new();
    let big = vec![b'x'; 4 << 20];
    let bytes = nar(&dir(vec![(b"big", file(&big))]));
    let path = store_path("too-long");
    // described as 64 KiB: the reader stops there
    let json = path_info_json(&path, &bytes)
        .replace(&format!("\"narSize\":{}", bytes.len()), "\"narSize\":65536");
    assert!(json.contains("65536"), "{json}");
    let blobs_before = count_files(&store.root().join("blobs"));
    let err = store
        .import_nar_as("long", &path, &bytes, &json)
        .unwrap_err();
    assert!(
        err.contains("longer than its narSize (65536 bytes)"),
        "{err}"
    );
    assert_eq!(count_files(&store.root().join("blobs")), blobs_before);
}
