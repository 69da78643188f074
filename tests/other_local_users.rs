//! Another user on the host against the directories the daemons keep: a
//! cache or embedded-store directory it can write is refused (it could
//! plant objects in it), and a link it planted there (`tmp` pointing
//! elsewhere) never leads the start-up tidy into deleting files elsewhere.
//! Real processes: the filler (`daemon --cache-dir`), `import`, `virtiofs`.
mod common;

use common::{bin, cli_err, cli_ok, Daemon};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A file two hours old: what a start-up tidy takes for a killed import's.
fn old_file(p: &Path) {
    std::fs::write(p, b"precious").unwrap();
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
}

/// The filler over `remote`, filling `cache`; its stderr goes to `log`.
fn spawn_filler(remote: &str, cache: &Path, sock: &Path, log: &Path) -> Child {
    Command::new(bin())
        .arg("--store")
        .arg(remote)
        .arg("--cache-dir")
        .arg(cache)
        .args(["daemon", "--min-free-space", "16M", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for the filler to exit (a refusal); a filler still running after
/// `within` is killed and None answered.
fn exit_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_cache_or_store_directory_others_can_write_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let remote = Daemon::start(
        "memory://",
        &format!("unix:{}", tmp.path().join("r.sock").display()),
        &[],
    );

    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    chmod(&cache, 0o777);
    let log = tmp.path().join("filler.log");
    let mut filler = spawn_filler(&remote.addr, &cache, &tmp.path().join("f.sock"), &log);
    let st = exit_within(&mut filler, Duration::from_secs(20));
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        st.is_some_and(|s| !s.success()),
        "the filler took a 0777 cache directory: {err}"
    );
    assert!(err.contains("can be written by others"), "{err}");
    assert!(err.contains("chmod go-w"), "{err}");
    assert!(
        !cache.join("blobs").exists(),
        "nothing is created in a refused directory"
    );

    // the embedded store: to write it (import), and to serve it (virtiofs)
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    chmod(&store, 0o775);
    let src = tmp.path().join("f");
    std::fs::write(&src, b"hello").unwrap();
    let url = format!("local://{}", store.display());
    let err = cli_err(&["--store", &url, "import", src.to_str().unwrap()]);
    assert!(err.contains("can be written by others"), "{err}");
    let sock = tmp.path().join("v.sock");
    let err = cli_err(&[
        "--store",
        &url,
        "virtiofs",
        "--socket-path",
        sock.to_str().unwrap(),
    ]);
    assert!(err.contains("can be written by others"), "{err}");
    assert!(remote.stop().success());
}

#[test]
fn a_planted_tmp_link_does_not_make_the_filler_delete_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let remote = Daemon::start(
        "memory://",
        &format!("unix:{}", tmp.path().join("r.sock").display()),
        &[],
    );
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    old_file(&elsewhere.join("precious"));

    // planted while the directory was open to all, then closed again:
    // the link stays
    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    chmod(&cache, 0o700);
    std::os::unix::fs::symlink(&elsewhere, cache.join("tmp")).unwrap();
    let log = tmp.path().join("filler.log");
    let mut filler = spawn_filler(&remote.addr, &cache, &tmp.path().join("f.sock"), &log);
    let st = exit_within(&mut filler, Duration::from_secs(10));
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        elsewhere.join("precious").exists(),
        "the filler deleted a file through a planted link: {err}"
    );
    assert!(st.is_some_and(|s| !s.success()), "{err}");
    assert!(err.contains("is a symbolic link"), "{err}");

    // the embedded store's tidy (stale files of killed imports) likewise
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::os::unix::fs::symlink(&elsewhere, store.join("tmp")).unwrap();
    let src = tmp.path().join("f");
    std::fs::write(&src, b"hello").unwrap();
    let url = format!("local://{}", store.display());
    let err = cli_err(&["--store", &url, "import", src.to_str().unwrap()]);
    assert!(
        elsewhere.join("precious").exists(),
        "import deleted a file through a planted link: {err}"
    );
    assert!(err.contains("is a symbolic link"), "{err}");
    assert!(remote.stop().success());
}

#[test]
fn an_owned_private_directory_works_as_before() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("remote");
    let src = tmp.path().join("f");
    std::fs::write(&src, b"hello").unwrap();
    let url = format!("local://{}", store.display());
    let out = cli_ok(&["--store", &url, "import", src.to_str().unwrap()]);
    let path = String::from_utf8(out).unwrap().trim().to_string();
    // a new embedded store: readable by all (sandboxed views of other
    // users read it), writable by its owner only
    let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755);
    let remote = Daemon::start(
        &url,
        &format!("unix:{}", tmp.path().join("r.sock").display()),
        &[],
    );

    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    chmod(&cache, 0o700);
    std::fs::create_dir(cache.join("tmp")).unwrap();
    std::fs::write(cache.join("tmp/left-by-a-killed-filler"), b"x").unwrap();
    let log = tmp.path().join("filler.log");
    let sock = tmp.path().join("f.sock");
    let mut filler = spawn_filler(&remote.addr, &cache, &sock, &log);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            filler.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "the filler did not start: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cache.join("blobs/ff").is_dir() && cache.join("directories/00").is_dir());
    assert!(
        !cache.join("tmp/left-by-a-killed-filler").exists(),
        "a killed filler's leftovers are removed"
    );
    // and it fills: the path info through the filler
    let filled = cli_ok(&[
        "--store",
        &format!("grpc+unix://{}", sock.display()),
        "path-info",
        &path,
    ]);
    assert!(!filled.is_empty());
    assert!(std::fs::read_dir(cache.join("pathinfo")).unwrap().count() > 0);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(filler.id() as i32, libc::SIGTERM) };
    assert!(filler.wait().unwrap().success());
    assert!(remote.stop().success());
}
