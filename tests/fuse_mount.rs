//! The store view mounted for real through /dev/fuse, compared with the
//! /nix/store Nix itself made for the same paths, over the embedded store
//! and over a gRPC daemon.
mod common;

use common::{bin, cli_ok, pseudo_random, sh, Daemon};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `tvix-virtiofsd mount` as a process; unmounted with SIGTERM on drop.
struct Mount {
    child: Child,
    path: PathBuf,
}

impl Mount {
    fn start(store: &str, mnt: &Path, extra: &[&str]) -> Mount {
        std::fs::create_dir_all(mnt).unwrap();
        let child = Command::new(bin())
            .args(["--store", store, "mount", mnt.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let m = Mount {
            child,
            path: mnt.canonicalize().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !common::is_mounted(&m.path) {
            assert!(Instant::now() < deadline, "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        assert!(
            !common::is_mounted(&self.path),
            "still mounted after SIGTERM"
        );
        std::mem::forget(self);
        st
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn require_nix() {
    assert!(
        Command::new("nix-store").arg("--version").output().is_ok(),
        "nix-store is not on PATH: these tests compare with Nix (apt-get install nix-bin)"
    );
}

/// Builds the Nix fixture closure and returns its paths.
fn fixture_closure() -> Vec<String> {
    common::nix_db_ready();
    let app = sh("NIX_REMOTE= bash tests/fixtures/nix-closure.sh");
    let app = app.trim();
    sh(&format!("NIX_REMOTE= nix-store -qR {app}"))
        .lines()
        .map(String::from)
        .collect()
}

/// What `find` reports for a tree, the way the issue compares it: type and
/// mode, symlink target, path; sizes for files and symlinks; mtime.
fn listing(root: &str) -> String {
    sh(&format!(
        "cd {root} && find . -printf '%M %l %T@ %p\\n' | sort && find . ! -type d -printf '%s %p\\n' | sort"
    ))
}

fn compare_closure(mnt: &Path, closure: &[String]) {
    for p in closure {
        let base = Path::new(p).file_name().unwrap().to_str().unwrap();
        let ours = mnt.join(base);
        sh(&format!("diff -r --no-dereference {p} {}", ours.display()));
        assert_eq!(listing(p), listing(ours.to_str().unwrap()), "{p}");
    }
}

#[test]
fn mount_matches_nix_store() {
    if !common::fuse_available("FUSE TEST") {
        return;
    }
    require_nix();
    let closure = fixture_closure();
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("local://{}", tmp.path().join("store").display());
    let mut args = vec!["--store", store.as_str(), "copy"];
    args.extend(closure.iter().map(String::as_str));
    cli_ok(&args);

    // embedded store
    let mnt = tmp.path().join("mnt");
    let m = Mount::start(&store, &mnt, &[]);
    compare_closure(&m.path, &closure);

    // a binary from the mount runs
    let bb = closure
        .iter()
        .find(|p| p.ends_with("-busybox-static"))
        .unwrap();
    let bb_base = Path::new(bb).file_name().unwrap().to_str().unwrap();
    let out = sh(&format!(
        "{}/{bb_base}/busybox echo hello from the mount",
        m.path.display()
    ));
    assert_eq!(out, "hello from the mount\n");

    // the name is part of the store path; junk names are absent; the root lists nothing
    let hash = &bb_base[..32];
    assert!(!m.path.join(format!("{hash}-othername")).exists());
    assert!(!m.path.join("not-a-store-path").exists());
    assert_eq!(std::fs::read_dir(&m.path).unwrap().count(), 0);

    // writes fail with EROFS
    for cmd in [
        format!("touch {}/new", m.path.display()),
        format!("mkdir {}/{bb_base}/d", m.path.display()),
        format!("echo x >> {}/{bb_base}/busybox", m.path.display()),
        format!("rm {}/{bb_base}/busybox", m.path.display()),
    ] {
        let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
        assert!(!out.status.success(), "{cmd} succeeded");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("Read-only file system"), "{cmd}: {e}");
    }

    // digests as xattrs, as tvix-store exposes them
    let f = CString::new(format!("{}/{bb_base}/busybox", m.path.display())).unwrap();
    let mut buf = [0u8; 128];
    let name = CString::new("user.tvix.castore.blob.digest").unwrap();
    // SAFETY: valid C strings and a buffer of the given size.
    let n = unsafe {
        libc::getxattr(
            f.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(n > 0, "getxattr failed");
    let data = std::fs::read(format!("{bb}/busybox")).unwrap();
    let want = tvix_virtiofsd::castore::B3Digest::of(&data).to_string();
    assert_eq!(&buf[..n as usize], want.as_bytes());
    assert!(m.stop().success());

    // the same through a gRPC daemon on a unix socket
    let sock = tmp.path().join("d.sock");
    let d = Daemon::start(
        &store,
        &format!("unix:{}", sock.display()),
        &["--read-only"],
    );
    let mnt2 = tmp.path().join("mnt2");
    let m = Mount::start(&d.addr, &mnt2, &[]);
    compare_closure(&m.path, &closure);
    assert!(m.stop().success());
    assert!(d.stop().success());
}

/// Random-offset preads of a 96 MiB file, a 10,000-entry directory read
/// whole and resumed with telldir/seekdir.
#[test]
fn large_file_and_directory() {
    use std::os::unix::fs::FileExt;
    if !common::fuse_available("FUSE TEST") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("big");
    std::fs::create_dir_all(src.join("many")).unwrap();
    let data = pseudo_random(96 << 20, 3);
    std::fs::write(src.join("blob"), &data).unwrap();
    for i in 0..10_000 {
        std::fs::write(src.join("many").join(format!("e{i:05}")), i.to_string()).unwrap();
    }
    let store = format!("local://{}", tmp.path().join("store").display());
    let path = String::from_utf8(cli_ok(&[
        "--store",
        &store,
        "import",
        src.to_str().unwrap(),
    ]))
    .unwrap();
    let base = Path::new(path.trim())
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let m = Mount::start(&store, &tmp.path().join("mnt"), &[]);
    let root = m.path.join(&base);

    let f = std::fs::File::open(root.join("blob")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), data.len() as u64);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..300 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 300_000) as usize + 1;
        let off = (x >> 20) as usize % (data.len() - len);
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(buf == data[off..off + len], "bytes differ at {off}+{len}");
    }
    let mut tail = vec![0u8; 100];
    let n = f.read_at(&mut tail, data.len() as u64 - 10).unwrap();
    assert_eq!(n, 10);
    drop(f);

    // readdir of 10,000 entries: each exactly once; telldir/seekdir resume
    let dir = CString::new(root.join("many").to_str().unwrap()).unwrap();
    // SAFETY: opendir/readdir/telldir/seekdir/closedir on a handle we own;
    // each dirent is read before the next readdir call.
    let (all, again) = unsafe {
        let d = libc::opendir(dir.as_ptr());
        assert!(!d.is_null());
        let mut names = Vec::new();
        let mut mark = None;
        let mut after_mark = Vec::new();
        loop {
            if names.len() == 5000 && mark.is_none() {
                mark = Some(libc::telldir(d));
            }
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr())
                .to_string_lossy()
                .into_owned();
            if mark.is_some() {
                after_mark.push(name.clone());
            }
            names.push(name);
        }
        libc::seekdir(d, mark.unwrap());
        let mut again = Vec::new();
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            again.push(
                std::ffi::CStr::from_ptr((*e).d_name.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        libc::closedir(d);
        assert_eq!(again, after_mark);
        (names, again)
    };
    let mut real: Vec<String> = all.into_iter().filter(|n| n != "." && n != "..").collect();
    let n = real.len();
    real.sort();
    real.dedup();
    assert_eq!(real.len(), n, "duplicate entries");
    assert_eq!(n, 10_000);
    assert!(!again.is_empty());
    assert!(m.stop().success());
}

/// `--list-root` lists 20,000 store paths, each exactly once, across as
/// many readdir calls as the kernel needs.
#[test]
fn root_listing_of_20000_paths() {
    use tvix_virtiofsd::castore::Node;
    use tvix_virtiofsd::nix::store_path::StorePath;
    use tvix_virtiofsd::store::Store;
    if !common::fuse_available("FUSE TEST") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let backend = Store::memory();
    let mut want = Vec::new();
    rt.block_on(async {
        for i in 0..20_000u32 {
            let h = blake3::hash(&i.to_le_bytes());
            let digest: [u8; 20] = h.as_bytes()[..20].try_into().unwrap();
            let sp = StorePath::new(digest, format!("p{i}")).unwrap();
            want.push(sp.to_basename());
            backend
                .path_info
                .put(common::bare_path_info(
                    sp,
                    Node::Symlink {
                        target: "/nowhere".into(),
                    },
                ))
                .await
                .unwrap();
        }
    });
    let addr = rt.block_on(common::serve_in_process(backend, Some(tmp.path())));
    let m = Mount::start(&addr, &tmp.path().join("mnt"), &["--list-root"]);
    let mut got: Vec<String> = std::fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(got.len(), 20_000);
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(std::fs::symlink_metadata(m.path.join(&want[123]))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(m.stop().success());
}

/// A store that hangs or goes away yields an error after a bounded time;
/// the mount stays up and serves again once the store is back. A corrupt
/// blob in the embedded store is EIO, never its bytes.
#[test]
fn outage_and_corruption() {
    if !common::fuse_available("FUSE TEST") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let store = format!("local://{}", store_dir.display());
    let mut paths = Vec::new();
    for i in 0..3 {
        let f = tmp.path().join(format!("file{i}"));
        std::fs::write(&f, format!("content {i}\n")).unwrap();
        let out = cli_ok(&["--store", &store, "import", f.to_str().unwrap()]);
        let p = String::from_utf8(out).unwrap().trim().to_string();
        paths.push(
            Path::new(&p)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    let sock = tmp.path().join("d.sock");
    let listen = format!("unix:{}", sock.display());
    let d = Daemon::start(&store, &listen, &[]);
    let mnt = tmp.path().join("mnt");
    let m = Mount::start(&d.addr, &mnt, &["--store-timeout", "2"]);
    assert_eq!(
        std::fs::read_to_string(m.path.join(&paths[0])).unwrap(),
        "content 0\n"
    );

    // hung store: SIGSTOP the daemon, and wait until every thread of it
    // has stopped (kill returns before they do; a busy machine may still
    // run one for a moment)
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGSTOP) };
    common::wait_stopped(d.child.id());
    let t0 = Instant::now();
    let e = std::fs::read_to_string(m.path.join(&paths[1])).unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "not bounded: {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(e.raw_os_error(), Some(libc::ETIMEDOUT) | Some(libc::EIO)),
        "{e}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGCONT) };
    assert_eq!(
        std::fs::read_to_string(m.path.join(&paths[1])).unwrap(),
        "content 1\n"
    );

    // store down, then back on the same socket
    assert!(d.stop().success());
    let t0 = Instant::now();
    assert!(std::fs::read_to_string(m.path.join(&paths[2])).is_err());
    assert!(t0.elapsed() < Duration::from_secs(15));
    let d = Daemon::start(&store, &listen, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match std::fs::read_to_string(m.path.join(&paths[2])) {
            Ok(s) => {
                assert_eq!(s, "content 2\n");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no recovery: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(m.stop().success());
    assert!(d.stop().success());

    // corrupt every blob on disk (same length): reads fail with EIO
    for shard in std::fs::read_dir(store_dir.join("blobs"))
        .unwrap()
        .flatten()
    {
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            let mut b = std::fs::read(f.path()).unwrap();
            b[0] ^= 0xff;
            std::fs::write(f.path(), b).unwrap();
        }
    }
    let m = Mount::start(&store, &tmp.path().join("mnt2"), &[]);
    let e = std::fs::read(m.path.join(&paths[0])).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(m.stop().success());
}

/// A blob remembered as checked is not trusted once its file changed: a
/// blob file replaced (by rename: another inode) or written in place after
/// its first check is checked again when next opened, and damage is EIO,
/// never the wrong bytes. (`--cache never`: every open reaches the daemon.)
#[test]
fn a_blob_file_changed_after_its_check_is_checked_again() {
    if !common::fuse_available("FUSE TEST") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let store = format!("local://{}", store_dir.display());
    let f = tmp.path().join("file");
    std::fs::write(&f, "the checked bytes\n").unwrap();
    let out = cli_ok(&["--store", &store, "import", f.to_str().unwrap()]);
    let name = String::from_utf8(out)
        .unwrap()
        .trim()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let blob = std::fs::read_dir(store_dir.join("blobs"))
        .unwrap()
        .flatten()
        .flat_map(|shard| std::fs::read_dir(shard.path()).unwrap().flatten())
        .map(|e| e.path())
        .next()
        .unwrap();
    let m = Mount::start(&store, &tmp.path().join("mnt"), &["--cache", "never"]);
    let file = m.path.join(&name);
    // Reads until the daemon has let go of the previous open (the kernel
    // releases a closed file asynchronously): the result of a fresh open.
    let read_fresh = |expect_err: bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = std::fs::read(&file);
            if r.is_err() == expect_err || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(std::fs::read(&file).unwrap(), b"the checked bytes\n");

    // replaced by rename, same length
    let swap = blob.with_extension("swap");
    std::fs::write(&swap, "the swapped bytes\n").unwrap();
    std::fs::rename(&swap, &blob).unwrap();
    let r = read_fresh(true);
    assert_eq!(
        r.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "a replaced blob file was served unchecked: {:?}",
        r.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
    );

    // put back: checked again, served again
    std::fs::write(&swap, "the checked bytes\n").unwrap();
    std::fs::rename(&swap, &blob).unwrap();
    assert_eq!(read_fresh(false).unwrap(), b"the checked bytes\n");

    // written in place, same length
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&blob, "the altered bytes\n").unwrap();
    let r = read_fresh(true);
    assert_eq!(
        r.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "a blob file written in place was served unchecked: {:?}",
        r.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
    );
    assert!(m.stop().success());
}
