//! Nix's binary cache protocol against Debian's real Nix: `nix copy --to
//! http://` fills our store (every NAR then byte-identical to
//! `nix-store --dump`), Nix substitutes from us into empty stores checking
//! our signatures, `nix path-info --store http://` lists what our
//! `path-info` does, and bad uploads are refused with nothing visible.
mod common;

use common::vm::{closure_of, fixture_app, NIX};
use common::{cli_ok, free_port, pseudo_random, require_tools, Daemon};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use common::{dechunk, nix_in as nix, output_ok as ok};

/// One HTTP/1.1 request; answers (status, body).
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    // a server may answer (403) before reading the body, and close
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A Nix signing key pair in `dir`: (secret key file, public key).
fn keypair(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let (sk, pk) = (
        dir.join(format!("{name}.sk")),
        dir.join(format!("{name}.pk")),
    );
    if !sk.exists() {
        ok(
            nix(
                dir,
                "nix-store",
                &[
                    "--generate-binary-cache-key",
                    name,
                    sk.to_str().unwrap(),
                    pk.to_str().unwrap(),
                ],
            ),
            "generate key",
        );
    }
    (sk, std::fs::read_to_string(pk).unwrap().trim().to_string())
}

struct Cache {
    daemon: Daemon,
    http: String,
    public: String,
}

fn start(dir: &Path, extra: &[&str]) -> Cache {
    start_on(dir, &format!("127.0.0.1:{}", free_port()), extra)
}

/// As [`start`], the binary cache on `http` (HOST:PORT).
fn start_on(dir: &Path, http: &str, extra: &[&str]) -> Cache {
    let (sk, public) = keypair(dir, "tvix-test-1");
    let http = http.to_string();
    let store = format!("local://{}", dir.join("store").display());
    let mut args = vec![
        "--http-listen",
        &http,
        "--signing-key",
        sk.to_str().unwrap(),
    ];
    args.extend(extra);
    let daemon = Daemon::start_with(
        &store,
        &format!("unix:{}", dir.join("d.sock").display()),
        &args,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(&http).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no binary cache on {http}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Cache {
        daemon,
        http,
        public,
    }
}

#[test]
fn nix_copies_to_us_and_substitutes_from_us() {
    require_tools(&[NIX]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let c = start(t, &["--http-writable", "--sign-unverified-uploads"]);
    let url = format!("http://{}", c.http);
    let app = fixture_app();
    let closure = closure_of(&[&app]);
    assert!(closure.len() >= 3);

    let (status, info) = http(&c.http, "GET", "/nix-cache-info", b"");
    assert_eq!(status, 200);
    assert!(
        info.contains("StoreDir: /nix/store\n") && info.contains("WantMassQuery: 1\n"),
        "{info}"
    );

    // 1. nix copy --to: every path's NAR from our store is nix-store --dump's
    let up = t.join("xdg-upload");
    ok(
        nix(&up, "nix", &["copy", "--to", &url, &app]),
        "nix copy --to",
    );
    for p in &closure {
        let ours = cli_ok(&["--store", &c.daemon.addr, "nar", p]);
        let theirs = ok(nix(&up, "nix-store", &["--dump", p]), "nix-store --dump");
        assert!(ours == theirs, "{p}: our NAR differs from nix-store --dump");
    }

    // the same NARs compressed where asked
    let leaf = &closure[0];
    let hash = &leaf["/nix/store/".len().."/nix/store/".len() + 32];
    let plain = ok(nix(&up, "nix-store", &["--dump", leaf]), "nix-store --dump");
    for (ext, tool) in [("zst", "zstd"), ("xz", "xz")] {
        let mut s = std::net::TcpStream::connect(&c.http).unwrap();
        write!(
            s,
            "GET /nar/{hash}.nar.{ext} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let at = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(resp.starts_with(b"HTTP/1.1 200"), "{ext}");
        // a streamed body comes chunked
        let body = dechunk(&resp[at..]);
        let mut child = Command::new(tool)
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || stdin.write_all(&body));
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap().unwrap();
        assert!(out.stdout == plain, "{leaf} as .nar.{ext}");
    }

    // 2. Nix substitutes from us into empty stores, checking our signature
    let down = t.join("xdg-download");
    let root = t.join("root");
    ok(
        nix(
            &down,
            "nix",
            &[
                "copy",
                "--from",
                &url,
                "--to",
                root.to_str().unwrap(),
                "--option",
                "trusted-public-keys",
                &c.public,
                &app,
            ],
        ),
        "nix copy --from",
    );
    for p in &closure {
        ok(
            nix(
                &down,
                "nix-store",
                &["--store", root.to_str().unwrap(), "--verify-path", p],
            ),
            "verify-path",
        );
    }
    let root2 = t.join("root2");
    ok(
        nix(
            &down,
            "nix-store",
            &[
                "--store",
                root2.to_str().unwrap(),
                "-r",
                &app,
                "--option",
                "substituters",
                &url,
                "--option",
                "trusted-public-keys",
                &c.public,
            ],
        ),
        "nix-store -r",
    );
    // another key's trust is not ours: Nix refuses the substitute
    let other = t.join("xdg-other");
    let refused = nix(
        &other,
        "nix",
        &[
            "copy",
            "--from",
            &url,
            "--to",
            t.join("root3").to_str().unwrap(),
            "--option",
            "trusted-public-keys",
            &keypair(t, "someone-else-1").1,
            &app,
        ],
    );
    assert!(!refused.status.success(), "Nix took unsigned-for-it paths");

    // 3. nix path-info --store http:// -r lists what our path-info lists
    let theirs: serde_json::Value = serde_json::from_slice(&ok(
        nix(
            &down,
            "nix",
            &["path-info", "--store", &url, "--json", "-r", &app],
        ),
        "nix path-info",
    ))
    .unwrap();
    let mut args = vec!["--store", c.daemon.addr.as_str(), "path-info", "--json"];
    args.extend(closure.iter().map(String::as_str));
    let ours: serde_json::Value = serde_json::from_slice(&cli_ok(&args)).unwrap();
    let key = |v: &serde_json::Value| {
        let mut rows: Vec<(String, String, u64, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["path"].as_str().unwrap().to_string(),
                    e["narHash"].as_str().unwrap().to_string(),
                    e["narSize"].as_u64().unwrap(),
                    e["references"].to_string(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(key(&theirs), key(&ours), "nix path-info vs ours");
}

/// A NAR and narinfo Nix would upload for the store path `p` (its
/// metadata from the host's Nix), with `edit` applied to the narinfo.
fn upload(c: &Cache, p: &str, nar: &[u8], edit: impl Fn(String) -> String) -> (u16, String) {
    common::nix_db_ready();
    let info: serde_json::Value = serde_json::from_slice(
        &std::process::Command::new("nix")
            .env("NIX_REMOTE", "")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
                p,
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let e = &info[0];
    let refs: Vec<String> = e["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_str()
                .unwrap()
                .trim_start_matches("/nix/store/")
                .to_string()
        })
        .collect();
    let hash = &p["/nix/store/".len().."/nix/store/".len() + 32];
    let (s, b) = http(&c.http, "PUT", &format!("/nar/{hash}-test.nar"), nar);
    if s != 200 {
        return (s, b);
    }
    let narinfo = format!(
        "StorePath: {p}\nURL: nar/{hash}-test.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
        e["narHash"].as_str().unwrap(),
        e["narSize"].as_u64().unwrap(),
        refs.join(" ")
    );
    http(
        &c.http,
        "PUT",
        &format!("/{hash}.narinfo"),
        edit(narinfo).as_bytes(),
    )
}

#[test]
fn bad_uploads_are_refused_and_leave_nothing() {
    require_tools(&[NIX]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let app = fixture_app();
    let closure = closure_of(&[&app]);
    // a path without references, and one with
    let leaf = closure
        .iter()
        .find(|p| p.ends_with("-busybox-static"))
        .unwrap()
        .clone();
    let dump = |p: &str| {
        common::nix_db_ready();
        std::process::Command::new("nix-store")
            .env("NIX_REMOTE", "")
            .args(["--dump", p])
            .output()
            .unwrap()
            .stdout
    };
    let hash_of = |p: &str| p["/nix/store/".len().."/nix/store/".len() + 32].to_string();
    let visible = |c: &Cache, p: &str| {
        http(&c.http, "GET", &format!("/{}.narinfo", hash_of(p)), b"").0 == 200
    };

    let c = start(t, &["--http-writable", "--sign-unverified-uploads"]);
    let nar = dump(&leaf);
    // a NAR whose hash differs from its narinfo
    let (s, why) = upload(&c, &leaf, &nar, |n| {
        n.lines()
            .map(|l| match l.starts_with("NarSize: ") {
                true => "NarSize: 1\n".to_string(),
                false => format!("{l}\n"),
            })
            .collect()
    });
    assert_eq!(s, 400, "{why}");
    assert!(why.contains("mismatch"), "{why}");
    assert!(!visible(&c, &leaf));
    // a truncated NAR
    let (s, why) = upload(&c, &leaf, &nar[..nar.len() / 2], |n| n);
    assert_eq!(s, 400, "{why}");
    assert!(!visible(&c, &leaf));
    // a narinfo whose references are not in the store
    let data = closure
        .iter()
        .find(|p| p.ends_with("-fixture-app"))
        .unwrap();
    let (s, why) = upload(&c, data, &dump(data), |n| n);
    assert_eq!(s, 400, "{why}");
    assert!(why.contains("is not in the store"), "{why}");
    assert!(!visible(&c, data));
    // a narinfo for a NAR never uploaded
    let (s, why) = http(
        &c.http,
        "PUT",
        &format!("/{}.narinfo", hash_of(&leaf)),
        format!("StorePath: {leaf}\nURL: nar/nothing.nar\nCompression: none\nNarHash: sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\nNarSize: 1\nReferences: \n").as_bytes(),
    );
    assert_eq!(s, 400, "{why}");
    // the good upload then works, and the same path again is idempotent
    let (s, why) = upload(&c, &leaf, &nar, |n| n);
    assert_eq!(s, 200, "{why}");
    assert!(visible(&c, &leaf));
    assert_eq!(cli_ok(&["--store", &c.daemon.addr, "nar", &leaf]), nar);
    drop(c);

    // with trusted keys: an unsigned or wrongly signed narinfo is refused
    let t2 = t.join("signed");
    std::fs::create_dir_all(&t2).unwrap();
    let (trusted_sk, trusted) = keypair(&t2, "someone-1");
    let c = start(&t2, &["--http-writable", "--trusted-public-keys", &trusted]);
    let (s, why) = upload(&c, &leaf, &nar, |n| {
        n + "Sig: someone-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\n"
    });
    assert_eq!(s, 403, "{why}");
    assert!(!visible(&c, &leaf));
    // and unsigned too
    let (s, why) = upload(&c, &leaf, &nar, |n| n);
    assert_eq!(s, 403, "{why}");
    assert!(!visible(&c, &leaf));
    // Nix signing with the trusted key gets in
    let to = format!("http://{}?secret-key={}", c.http, trusted_sk.display());
    ok(
        nix(&t2.join("xdg"), "nix", &["copy", "--to", &to, &leaf]),
        "signed nix copy --to",
    );
    assert!(visible(&c, &leaf));
    drop(c);

    // the binary cache alone (no gRPC listener) serves the same store
    let port = free_port();
    let mut alone = Command::new(common::bin())
        .args(["--store", &format!("local://{}", t.join("store").display())])
        .args([
            "daemon",
            "--listen",
            "none",
            "--http-listen",
            &format!("127.0.0.1:{port}"),
            "--min-free-space",
            "16M",
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no binary cache alone"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (s, info) = http(&addr, "GET", &format!("/{}.narinfo", hash_of(&leaf)), b"");
    assert_eq!(s, 200, "{info}");
    assert!(info.contains(&format!("StorePath: {leaf}\n")), "{info}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(alone.id() as i32, libc::SIGTERM) };
    assert!(alone.wait().unwrap().success());

    // a read-only cache refuses every upload
    let t3 = t.join("ro");
    std::fs::create_dir_all(&t3).unwrap();
    let c = start(&t3, &[]);
    let (s, _) = http(&c.http, "PUT", "/nar/x.nar", &nar);
    assert_eq!(s, 403);
}

/// A NAR holding one regular file, written by our NAR writer.
fn nar_of_file(data: &[u8]) -> Vec<u8> {
    use tvix_virtiofsd::nar::NarWriter;
    let len = data.len() as u64;
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut out = Vec::new();
        let mut w = NarWriter::new(&mut out).await.unwrap();
        w.file_start(false, len).await.unwrap();
        w.file_data(data).await.unwrap();
        w.file_end(len).await.unwrap();
        out
    })
}

/// An upload that would take the store's disk below `--min-free-space` is
/// stopped while it streams (507), not only refused when it starts: the
/// store lives on a 128 MiB tmpfs, keeps 64 MiB free, and is sent a
/// 100 MiB NAR, which fits the disk but not the room.
#[test]
fn an_upload_stops_at_the_room_kept_free() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("small");
    std::fs::create_dir_all(&t).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=128m", "tmpfs"])
        .arg(&t)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("\n!!! UPLOAD ROOM TEST NOT RUN: cannot mount a tmpfs (needs root) !!!\n");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(t.clone());
    let c = start(
        &t,
        &[
            "--http-writable",
            "--sign-unverified-uploads",
            "--min-free-space",
            "64M",
        ],
    );
    let nar = nar_of_file(&pseudo_random(100 << 20, 11));
    let (status, why) = http(&c.http, "PUT", "/nar/big.nar", &nar);
    assert_eq!(status, 507, "{why}");
    assert!(why.contains("kept free"), "{why}");
    let free = {
        let st = free_bytes(&t);
        st >> 20
    };
    assert!(free >= 32, "the disk kept {free} MiB free");
    // a small one still goes in
    let (status, why) = http(&c.http, "PUT", "/nar/small.nar", &nar_of_file(b"small\n"));
    assert_eq!(status, 200, "{why}");
    drop(c);
}

fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs fills the plain struct it is given.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and out-pointer.
    assert_eq!(unsafe { libc::statvfs(p.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

/// A client that pushed pulls back on the same machine: Nix keeps the
/// narinfos it uploaded in its own disk cache, with the NAR URL it chose
/// (`nar/<hash of the .nar.xz>.nar.xz`), and asks for that URL without
/// asking for the narinfo again. We serve the NAR under it (rendered and
/// compressed again: Nix checks the NarHash of what it decompressed), and
/// still after a restart of the daemon.
#[test]
fn a_client_that_pushed_pulls_back_by_the_urls_it_chose() {
    require_tools(&[NIX]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let c = start(t, &["--http-writable", "--sign-unverified-uploads"]);
    let url = format!("http://{}", c.http);
    let app = fixture_app();
    let closure = closure_of(&[&app]);
    let xdg = t.join("xdg");
    ok(
        nix(&xdg, "nix", &["copy", "--to", &url, &app]),
        "nix copy --to",
    );
    // the client's own narinfos name NARs by their file hash, not ours
    let cached = std::fs::read_dir(xdg.join("nix"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        cached > 0,
        "Nix keeps a disk cache of narinfos under XDG_CACHE_HOME"
    );
    let pull = |into: &Path| {
        ok(
            nix(
                &xdg,
                "nix",
                &[
                    "copy",
                    "--from",
                    &url,
                    "--to",
                    into.to_str().unwrap(),
                    "--no-check-sigs",
                    &app,
                ],
            ),
            "nix copy --from, on the client that pushed",
        );
        for p in &closure {
            ok(
                nix(
                    &xdg,
                    "nix-store",
                    &["--store", into.to_str().unwrap(), "--verify-path", p],
                ),
                "verify-path",
            );
        }
    };
    pull(&t.join("root1"));
    // the names are kept with the store: the daemon restarted on the same
    // address serves them to the same client (its narinfo cache is per URL)
    let names: Vec<String> = std::fs::read_dir(t.join("store").join("nar-urls"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.len() >= closure.len() && names.iter().all(|n| n.ends_with(".nar.xz")),
        "the chosen names kept beside the store: {names:?}"
    );
    let http = c.http.clone();
    let Cache { daemon, .. } = c;
    assert!(daemon.stop().success());
    let _c = start_on(t, &http, &["--http-writable", "--sign-unverified-uploads"]);
    pull(&t.join("root2"));
}
