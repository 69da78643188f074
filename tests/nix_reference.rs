//! Nix itself is the reference: store paths, NARs and path info produced by
//! this crate must be exactly what Debian's nix-bin (Nix 2.8) produces.
//!
//! These tests need `nix-store` and `nix` on PATH and a single-user store at
//! /nix (they run as root with `NIX_REMOTE=` empty). Without Nix they fail
//! loudly instead of passing silently.
mod common;

use common::{bin, cli_err, cli_ok, free_port, Daemon};
use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use tvix_virtiofsd::nix::nixbase32;

/// Whether an executable named `tool` is found on PATH.
fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Fails the test unless Nix is installed: skipping would hide regressions.
fn require_nix() {
    for tool in ["nix-store", "nix"] {
        assert!(
            on_path(tool),
            "`{tool}` is not on PATH: these tests compare against Nix and need Debian's \
             nix-bin package (`apt-get install nix-bin`; CI installs it)"
        );
    }
}

/// A Nix command talking to the local single-user store.
fn nix_cmd(prog: &str) -> Command {
    common::nix_db_ready();
    let mut c = Command::new(prog);
    c.env("NIX_REMOTE", "");
    c
}

fn check(out: Output, what: &str) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs a Nix tool, asserting success; returns stdout.
fn nix_ok(prog: &str, args: &[&str]) -> Vec<u8> {
    let out = nix_cmd(prog)
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"));
    check(out, &format!("{prog} {args:?}"))
}

fn lines(stdout: &[u8]) -> Vec<String> {
    String::from_utf8(stdout.to_vec())
        .expect("utf-8 output")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `nix path-info --json [--recursive] PATHS`.
fn nix_path_info_json(paths: &[&str], recursive: bool) -> Vec<u8> {
    let mut args = vec![
        "--extra-experimental-features",
        "nix-command",
        "path-info",
        "--json",
    ];
    if recursive {
        args.push("--recursive");
    }
    args.extend_from_slice(paths);
    nix_ok("nix", &args)
}

/// A JSON list of path infos (Nix 2.8 shape, and ours) keyed by "path".
fn by_path(json: &[u8]) -> BTreeMap<String, Value> {
    let v: Value = serde_json::from_slice(json).expect("path-info JSON");
    v.as_array()
        .expect("path-info JSON is a list")
        .iter()
        .map(|e| {
            let p = e["path"].as_str().expect("entry has a path").to_owned();
            (p, e.clone())
        })
        .collect()
}

/// Raw digest of a SHA-256 hash string in any form Nix prints:
/// `sha256-<base64>` (SRI) or `sha256:<nix32|hex|base64>`.
fn sha256_digest(s: &str) -> Vec<u8> {
    let d = if let Some(b64) = s.strip_prefix("sha256-") {
        BASE64.decode(b64.as_bytes()).expect("SRI base64")
    } else if let Some(enc) = s.strip_prefix("sha256:") {
        match enc.len() {
            64 => HEXLOWER_PERMISSIVE.decode(enc.as_bytes()).expect("hex"),
            52 => nixbase32::decode(enc.as_bytes()).expect("nix32"),
            44 => BASE64.decode(enc.as_bytes()).expect("base64"),
            n => panic!("{s:?}: unexpected encoded length {n}"),
        }
    } else {
        panic!("{s:?} is not a sha256 hash");
    };
    assert_eq!(d.len(), 32, "{s:?}");
    d
}

fn str_list(v: &Value) -> Vec<String> {
    let mut l: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("string").to_owned())
                .collect()
        })
        .unwrap_or_default();
    l.sort();
    l
}

/// An optional string field: absent and `null` are the same.
fn opt_str(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// Compares our path-info entry with Nix's for `path`.
fn assert_same_info(path: &str, ours: &Value, nix: &Value, compare_refs: bool) {
    let our_hash = ours["narHash"].as_str().expect("our narHash");
    let nix_hash = nix["narHash"].as_str().expect("nix narHash");
    assert_eq!(
        sha256_digest(our_hash),
        sha256_digest(nix_hash),
        "{path}: narHash ours {our_hash} vs nix {nix_hash}"
    );
    // `nix-store -q --hash` prints `sha256:<nix32>`.
    let q = lines(&nix_ok("nix-store", &["-q", "--hash", path]));
    assert_eq!(
        sha256_digest(our_hash),
        sha256_digest(&q[0]),
        "{path}: narHash ours {our_hash} vs nix-store -q --hash {}",
        q[0]
    );
    assert_eq!(
        ours["narSize"].as_u64(),
        nix["narSize"].as_u64(),
        "{path}: narSize"
    );
    assert!(ours["narSize"].as_u64().is_some(), "{path}: no narSize");
    if compare_refs {
        assert_eq!(
            str_list(&ours["references"]),
            str_list(&nix["references"]),
            "{path}: references"
        );
        assert_eq!(
            opt_str(ours, "deriver"),
            opt_str(nix, "deriver"),
            "{path}: deriver"
        );
    }
    assert_eq!(opt_str(ours, "ca"), opt_str(nix, "ca"), "{path}: ca");
    // Field for field, in Nix's order: all but what only a local Nix
    // database records.
    let local_only = ["registrationTime", "ultimate", "closureSize"];
    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .expect("an object")
            .keys()
            .filter(|k| !local_only.contains(&k.as_str()))
            .cloned()
            .collect()
    };
    assert_eq!(keys(ours), keys(nix), "{path}: fields");
    for k in keys(nix) {
        if compare_refs || !["references", "deriver"].contains(&k.as_str()) {
            assert_eq!(ours[&k], nix[&k], "{path}: {k}");
        }
    }
}

/// Our `path-info --json` for `paths` in `store`, keyed by path.
fn our_path_info(store: &str, paths: &[String]) -> BTreeMap<String, Value> {
    let mut args = vec!["--store", store, "path-info", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let out = cli_ok(&args);
    assert_eq!(
        out.iter().filter(|&&b| b == b'\n').count(),
        1,
        "one line, as Nix writes it"
    );
    by_path(&out)
}

fn local_url(dir: &Path) -> String {
    format!("local://{}", dir.display())
}

/// Deterministic pseudo-random bytes (splitmix64), so repeated runs reuse
/// one path in /nix/store instead of adding a new megabyte every time.
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write_file(path: &Path, contents: &[u8], mode: u32) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The import roots of test (a): a rich tree, a plain file, an executable.
fn build_import_roots(base: &Path) -> Vec<PathBuf> {
    let tree = base.join("tree+x=y_z.v1");
    std::fs::create_dir(&tree).unwrap();
    write_file(&tree.join("bin/run.sh"), b"#!/bin/sh\necho run\n", 0o755);
    write_file(&tree.join("data/plain.txt"), b"plain text\n", 0o644);
    write_file(&tree.join("data/empty-file"), b"", 0o644);
    write_file(
        &tree.join("data/random.bin"),
        &pseudo_random(1 << 20, 0x7469_7876),
        0o644,
    );
    write_file(&tree.join("nested/a/b/c/deep.txt"), b"deep down\n", 0o644);
    write_file(&tree.join("nested/a/b/exec-too"), b"\x7fELF-ish", 0o700);
    std::fs::create_dir_all(tree.join("empty-dir")).unwrap();
    std::fs::create_dir_all(tree.join("nested/a/empty")).unwrap();
    write_file(&tree.join(".hidden"), b"hidden\n", 0o644);
    write_file(&tree.join(".hidden-dir/inner"), b"inner\n", 0o644);
    write_file(&tree.join("we+ir=d_name.x-y"), b"odd name\n", 0o644);
    write_file(&tree.join("with space"), b"space\n", 0o644);
    symlink("data/plain.txt", tree.join("link-rel")).unwrap();
    symlink("../../../data", tree.join("nested/a/b/uplink")).unwrap();
    symlink("/nonexistent/absolute/target", tree.join("dangling")).unwrap();

    let single = base.join("single-file.txt");
    write_file(&single, b"just one file\n", 0o644);
    let exec = base.join("single-exec");
    write_file(&exec, b"#!/bin/sh\nexit 0\n", 0o755);
    vec![tree, single, exec]
}

#[test]
fn import_matches_nix_store_add() {
    require_nix();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let roots = build_import_roots(&src);
    let roots: Vec<&str> = roots.iter().map(|p| p.to_str().unwrap()).collect();
    let store = local_url(&tmp.path().join("store"));

    let mut args = vec!["--store", store.as_str(), "import"];
    args.extend_from_slice(&roots);
    let ours = lines(&cli_ok(&args));
    let mut args = vec!["--add"];
    args.extend_from_slice(&roots);
    let nix = lines(&nix_ok("nix-store", &args));
    assert_eq!(ours.len(), roots.len(), "one store path per import root");
    assert_eq!(ours, nix, "store paths of `import` vs `nix-store --add`");

    for p in &ours {
        let our_nar = cli_ok(&["--store", &store, "nar", p]);
        let nix_nar = nix_ok("nix-store", &["--dump", p]);
        assert!(
            our_nar == nix_nar,
            "{p}: our NAR differs from nix-store --dump"
        );
    }

    let our_info = our_path_info(&store, &ours);
    let paths: Vec<&str> = ours.iter().map(String::as_str).collect();
    let nix_info = by_path(&nix_path_info_json(&paths, false));
    for p in &ours {
        let o = our_info
            .get(p)
            .unwrap_or_else(|| panic!("{p} missing from our JSON"));
        let n = nix_info
            .get(p)
            .unwrap_or_else(|| panic!("{p} missing from nix's JSON"));
        assert_same_info(p, o, n, true);
        assert_eq!(str_list(&o["references"]), Vec::<String>::new(), "{p}");
    }

    // Text mode shows the hash both as SRI and as `nix-store -q --hash` does.
    for p in &ours {
        let text = String::from_utf8(cli_ok(&["--store", &store, "path-info", p])).unwrap();
        let q = lines(&nix_ok("nix-store", &["-q", "--hash", p])).remove(0);
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("nar-hash: sha256-")
                    && l.contains(&format!("({q})"))),
            "{p}: text path-info lacks `nar-hash: sha256-… ({q})`:\n{text}"
        );
    }
}

/// The fixture closure's top store path, built once per test binary.
fn fixture_app() -> &'static str {
    static APP: OnceLock<String> = OnceLock::new();
    APP.get_or_init(|| {
        require_nix();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nix-closure.sh");
        let out = nix_cmd("bash")
            .arg(&script)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::piped())
            .output()
            .expect("running nix-closure.sh");
        let out = check(out, "tests/fixtures/nix-closure.sh");
        let app = lines(&out)
            .pop()
            .expect("nix-closure.sh printed a store path");
        assert!(
            app.starts_with("/nix/store/"),
            "unexpected fixture output {app:?}"
        );
        app
    })
}

/// `nix-store -qR APP`.
fn fixture_closure() -> Vec<String> {
    let app = fixture_app();
    let closure = lines(&nix_ok("nix-store", &["-qR", app]));
    assert!(closure.len() >= 3, "fixture closure too small: {closure:?}");
    closure
}

/// Writes `nix path-info --json --recursive APP` into `dir`.
fn fixture_path_info_file(dir: &Path) -> PathBuf {
    let f = dir.join("path-info.json");
    std::fs::write(&f, nix_path_info_json(&[fixture_app()], true)).unwrap();
    f
}

/// Every closure path is in `store` with Nix's NAR and metadata.
fn assert_closure_matches(store: &str, closure: &[String]) {
    let nix_info = by_path(&nix_path_info_json(&[fixture_app()], true));
    let ours = our_path_info(store, closure);
    for p in closure {
        let our_nar = cli_ok(&["--store", store, "nar", p]);
        let nix_nar = nix_ok("nix-store", &["--dump", p]);
        assert!(
            our_nar == nix_nar,
            "{p}: our NAR differs from nix-store --dump"
        );
        let o = ours
            .get(p)
            .unwrap_or_else(|| panic!("{p} missing from our JSON"));
        let n = nix_info
            .get(p)
            .unwrap_or_else(|| panic!("{p} missing from nix's JSON"));
        assert_same_info(p, o, n, true);
    }
}

#[test]
fn copy_closure_matches_nix() {
    require_nix();
    let app = fixture_app();
    let closure = fixture_closure();
    let tmp = tempfile::tempdir().unwrap();
    let json = fixture_path_info_file(tmp.path());
    let store = local_url(&tmp.path().join("store"));
    let out = lines(&cli_ok(&[
        "--store",
        &store,
        "copy",
        "--path-info",
        json.to_str().unwrap(),
        app,
    ]));
    assert_eq!(out, [app], "copy prints the roots");
    assert_closure_matches(&store, &closure);

    // Copying again is a no-op that still succeeds.
    cli_ok(&[
        "--store",
        &store,
        "copy",
        "--path-info",
        json.to_str().unwrap(),
        app,
    ]);
    assert_closure_matches(&store, &closure);
}

#[test]
fn copy_without_path_info_runs_nix() {
    require_nix();
    let app = fixture_app();
    let closure = fixture_closure();
    let tmp = tempfile::tempdir().unwrap();
    let store = local_url(&tmp.path().join("store"));
    let out = nix_cmd(bin().to_str().unwrap())
        .args(["--store", &store, "copy", app])
        .output()
        .expect("run cli");
    let out = check(out, "tvix-virtiofsd copy (without --path-info)");
    assert_eq!(lines(&out), [app]);
    assert_closure_matches(&store, &closure);
}

/// Replaces the narHash of `victim` in a Nix 2.8 path-info list by a
/// different (but well-formed) `sha256:<nix32>` hash.
fn corrupt_nar_hash(json: &[u8], victim: &str) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(json).unwrap();
    let entry = v
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["path"] == victim)
        .unwrap_or_else(|| panic!("{victim} not in path-info JSON"));
    let mut d = sha256_digest(entry["narHash"].as_str().unwrap());
    d[0] ^= 0x01;
    entry["narHash"] = Value::String(format!("sha256:{}", nixbase32::encode(&d)));
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn copy_detects_nar_mismatch() {
    require_nix();
    let app = fixture_app();
    let closure = fixture_closure();
    let victim = closure
        .iter()
        .find(|p| p.ends_with("-fixture-data"))
        .expect("fixture-data in the closure")
        .clone();
    let tmp = tempfile::tempdir().unwrap();
    let good = fixture_path_info_file(tmp.path());
    let bad = tmp.path().join("bad.json");
    std::fs::write(
        &bad,
        corrupt_nar_hash(&std::fs::read(&good).unwrap(), &victim),
    )
    .unwrap();
    let store = local_url(&tmp.path().join("store"));

    let copy_err = cli_err(&[
        "--store",
        &store,
        "copy",
        "--path-info",
        bad.to_str().unwrap(),
        app,
    ]);
    assert!(
        copy_err.contains(&victim),
        "stderr does not name {victim}:\n{copy_err}"
    );
    assert!(
        copy_err.contains("mismatch"),
        "stderr does not say mismatch:\n{copy_err}"
    );

    let err = cli_err(&["--store", &store, "path-info", &victim]);
    assert!(err.contains("not in the store"), "{err}");
    let err = cli_err(&["--store", &store, "nar", &victim]);
    assert!(err.contains("not in the store"), "{err}");
    // The app refers to the victim: it is not stored either (no partial
    // closure), and stderr says why. busybox does not depend on it: stored.
    assert!(
        copy_err.contains(&format!(
            "{app}: not copied because its reference {victim} failed"
        )),
        "stderr does not explain the skipped dependent:\n{copy_err}"
    );
    let err = cli_err(&["--store", &store, "path-info", app]);
    assert!(err.contains("not in the store"), "{err}");
    let nix_info = by_path(&std::fs::read(&good).unwrap());
    let others: Vec<String> = closure
        .iter()
        .filter(|p| **p != victim && *p != app)
        .cloned()
        .collect();
    assert_eq!(others.len(), 1, "only busybox is independent of the victim");
    let ours = our_path_info(&store, &others);
    for p in &others {
        assert_same_info(p, &ours[p], &nix_info[p], true);
    }
}

#[test]
fn import_nar_roundtrip() {
    require_nix();
    let closure = fixture_closure();
    let tmp = tempfile::tempdir().unwrap();
    let json = fixture_path_info_file(tmp.path());
    let json = json.to_str().unwrap();
    let nars: Vec<(String, PathBuf)> = closure
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let f = tmp.path().join(format!("{i}.nar"));
            std::fs::write(&f, nix_ok("nix-store", &["--dump", p])).unwrap();
            (p.clone(), f)
        })
        .collect();

    // All paths at once.
    let store = local_url(&tmp.path().join("store"));
    let pairs: Vec<String> = nars
        .iter()
        .map(|(p, f)| format!("{p}={}", f.display()))
        .collect();
    let mut args = vec!["--store", store.as_str(), "import-nar", "--path-info", json];
    args.extend(pairs.iter().map(String::as_str));
    let out = lines(&cli_ok(&args));
    assert_eq!(out, closure, "import-nar prints the imported paths");
    for (p, f) in &nars {
        let our_nar = cli_ok(&["--store", &store, "nar", p]);
        assert!(
            our_nar == std::fs::read(f).unwrap(),
            "{p}: NAR differs after import-nar"
        );
    }
    let nix_info = by_path(&std::fs::read(json).unwrap());
    let ours = our_path_info(&store, &closure);
    for p in &closure {
        assert_same_info(p, &ours[p], &nix_info[p], true);
    }

    // One flipped content byte is refused and nothing is stored.
    let (data, data_nar) = nars
        .iter()
        .find(|(p, _)| p.ends_with("-fixture-data"))
        .expect("fixture-data in the closure");
    let mut bytes = std::fs::read(data_nar).unwrap();
    let needle = b"hello from data";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("script contents in fixture-data's NAR");
    bytes[at] ^= 0x20;
    let flipped = tmp.path().join("flipped.nar");
    std::fs::write(&flipped, &bytes).unwrap();
    let store2 = local_url(&tmp.path().join("store2"));
    let pair = format!("{data}={}", flipped.display());
    let err = cli_err(&["--store", &store2, "import-nar", "--path-info", json, &pair]);
    assert!(
        err.contains(data.as_str()),
        "stderr does not name {data}:\n{err}"
    );
    let err = cli_err(&["--store", &store2, "path-info", data]);
    assert!(err.contains("not in the store"), "{err}");

    // `-` reads the NAR from stdin.
    let (p, f) = &nars[0];
    let store3 = local_url(&tmp.path().join("store3"));
    let out = Command::new(bin())
        .args(["--store", &store3, "import-nar", "--path-info", json])
        .arg(format!("{p}=-"))
        .stdin(std::fs::File::open(f).unwrap())
        .output()
        .expect("run cli");
    let out = check(out, "import-nar from stdin");
    assert_eq!(lines(&out), std::slice::from_ref(p));
    let our_nar = cli_ok(&["--store", &store3, "nar", p]);
    assert!(
        our_nar == std::fs::read(f).unwrap(),
        "{p}: NAR differs after import from stdin"
    );
}

#[test]
fn copy_and_read_back_through_daemons() {
    require_nix();
    let app = fixture_app();
    let closure = fixture_closure();
    let tmp = tempfile::tempdir().unwrap();
    let json = fixture_path_info_file(tmp.path());
    let store = local_url(&tmp.path().join("store"));
    let sock = tmp.path().join("d.sock");

    let unix = Daemon::start(&store, &format!("unix:{}", sock.display()), &[]);
    let out = lines(&cli_ok(&[
        "--store",
        &unix.addr,
        "copy",
        "--path-info",
        json.to_str().unwrap(),
        app,
    ]));
    assert_eq!(out, [app]);

    // A second daemon over the same directory, reached over TCP.
    let tcp = Daemon::start(&store, &format!("127.0.0.1:{}", free_port()), &[]);
    assert!(tcp.addr.starts_with("grpc+http://"), "{}", tcp.addr);
    assert_closure_matches(&tcp.addr, &closure);
    // And the embedded store sees the same data.
    assert_closure_matches(&store, &closure);

    let status = tcp.stop();
    assert!(status.success(), "TCP daemon exited with {status}");
    let status = unix.stop();
    assert!(status.success(), "unix daemon exited with {status}");
}

/// `.nar.xz` and `.nar.zst` (what binary caches serve) are decompressed on
/// the way in and checked against Nix's hash of the plain NAR.
#[test]
fn import_compressed_nars() {
    require_nix();
    let closure = fixture_closure();
    let tmp = tempfile::tempdir().unwrap();
    let json = fixture_path_info_file(tmp.path());
    let json = json.to_str().unwrap();
    for (tool, ext) in [("xz", "xz"), ("zstd", "zst")] {
        assert!(
            on_path(tool),
            "{tool} is needed for this test (xz-utils, zstd)"
        );
        let store = local_url(&tmp.path().join(format!("store-{ext}")));
        for (i, p) in closure.iter().enumerate() {
            let plain = nix_ok("nix-store", &["--dump", p]);
            let raw = tmp.path().join(format!("{i}-{ext}.nar"));
            std::fs::write(&raw, &plain).unwrap();
            // both tools keep the input and write RAW.EXT next to it
            let st = Command::new(tool)
                .args(["-q", "-k", "-f"])
                .arg(&raw)
                .status()
                .unwrap();
            assert!(st.success(), "{tool} failed");
            let f = tmp.path().join(format!("{i}-{ext}.nar.{ext}"));
            let pair = format!("{p}={}", f.display());
            cli_ok(&["--store", &store, "import-nar", "--path-info", json, &pair]);
            let ours = cli_ok(&["--store", &store, "nar", p]);
            assert!(ours == plain, "{p}: NAR differs after import of .nar.{ext}");
        }
    }
}
