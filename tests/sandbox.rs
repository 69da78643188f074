//! The sandbox, checked on the running `virtiofs` daemon through /proc:
//! seccomp mode, no_new_privs, capability sets, namespaces, and what its
//! root holds; a forbidden system call kills it. (The microVM suite in
//! tests/vm.rs runs with the default sandbox on.)
mod common;

use common::{bin, cli_ok, Daemon};
use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The daemon started with `args`, and its serving process once confined.
const LEAKED_FD: &str = "leaked-fd";

/// Whether `pid` holds a descriptor of the file `name`.
fn holds_file(pid: u32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|t| t.file_name().is_some_and(|n| n == name))
}

struct Running {
    child: Child,
    sock: PathBuf,
    serving: u32,
}

fn start(store: &str, sock: &Path, args: &[&str], uid: Option<u32>) -> Running {
    let mut cmd = Command::new(bin());
    cmd.args(["--store", store, "virtiofs", "--socket-path"])
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(u) = uid {
        cmd.uid(u).gid(u);
    }
    // A descriptor a careless VMM or unit leaves open: fd 9, a file named
    // LEAKED_FD next to the socket. The serving process must not hold it.
    let leaked = std::fs::File::create(sock.with_file_name(LEAKED_FD)).unwrap();
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = leaked.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; it runs between fork and exec
        // (the copy on fd 9 has no close-on-exec flag).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 9) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    drop(leaked);
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("daemon exited early ({st}): {}", stderr_of(&mut child));
        }
        let kids =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let serving = kids.split_whitespace().next().and_then(|k| k.parse().ok());
        let sandboxed = |p: u32| status(p).get("Seccomp").map(String::as_str) == Some("2");
        match serving {
            Some(s) if sandboxed(s) && sock.exists() => {
                return Running {
                    child,
                    sock: sock.into(),
                    serving: s,
                }
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the serving process never got sandboxed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// A test that fails part-way leaves no daemon behind (the serving
/// process dies with its supervisor).
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// SIGTERM to the daemon: it exits 0 and removes its socket.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        let err = stderr_of(&mut self.child);
        assert!(st.success(), "daemon exited with {st}: {err}");
        assert!(!self.sock.exists(), "socket left behind");
    }
}

fn status(pid: u32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Seccomp filter mode, no_new_privs and five empty capability sets.
fn assert_powerless(pid: u32) {
    let st = status(pid);
    assert_eq!(st["Seccomp"], "2", "pid {pid} has no seccomp filter");
    assert_eq!(st["NoNewPrivs"], "1");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(st[set], "0000000000000000", "{set} of pid {pid}");
    }
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// Every path under the process's root (not descending into `stop`).
fn root_listing(pid: u32, stop: &Path) -> BTreeSet<PathBuf> {
    fn walk(base: &Path, rel: &Path, stop: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(base.join(rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            out.insert(Path::new("/").join(&r));
            if e.file_type().unwrap().is_dir() && Path::new("/").join(&r) != stop {
                walk(base, &r, stop, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(
        &PathBuf::from(format!("/proc/{pid}/root")),
        Path::new(""),
        stop,
        &mut out,
    );
    out
}

/// `path` and its ancestors, as the root's listing shows them.
fn with_ancestors(path: &Path) -> BTreeSet<PathBuf> {
    path.ancestors()
        .filter(|a| *a != Path::new("/"))
        .map(Path::to_path_buf)
        .collect()
}

/// A store directory any user can read, with one store path in it.
fn store_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::Builder::new()
        .prefix("sandbox-test")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), "hello\n").unwrap();
    let store = std::fs::canonicalize(tmp.path()).unwrap().join("store");
    cli_ok(&[
        "--store",
        &format!("local://{}", store.display()),
        "import",
        src.to_str().unwrap(),
    ]);
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(tmp.path())
        .status()
        .unwrap();
    (tmp, store)
}

#[test]
fn namespace_sandbox_over_the_embedded_store() {
    let (tmp, store) = store_dir();
    let d = start(
        &format!("local://{}", store.display()),
        &tmp.path().join("v.sock"),
        &[],
        None,
    );
    assert_powerless(d.serving);
    assert!(holds_file(d.child.id(), LEAKED_FD), "the fd was not passed");
    assert!(
        !holds_file(d.serving, LEAKED_FD),
        "the serving process holds an inherited descriptor"
    );
    let parent = d.child.id();
    let st = status(parent);
    assert_eq!(
        st["CapEff"], "0000000000000000",
        "the waiting parent keeps capabilities"
    );
    assert_eq!(st["NoNewPrivs"], "1");
    // PID 1 of its own PID namespace
    let nspid = status(d.serving)["NSpid"].clone();
    assert!(nspid.ends_with("\t1"), "NSpid {nspid:?}");
    for kind in ["mnt", "pid", "net", "ipc", "uts"] {
        assert_ne!(
            ns(&d.serving.to_string(), kind),
            ns("self", kind),
            "{kind} namespace shared with the host"
        );
    }
    // root: the store directory (read-only) and its ancestors, nothing else
    let listing = root_listing(d.serving, &store);
    assert_eq!(listing, with_ancestors(&store));
    let root = PathBuf::from(format!("/proc/{}/root", d.serving));
    let inside = root.join(store.strip_prefix("/").unwrap());
    assert!(inside.join("pathinfo").is_dir(), "store not visible inside");
    let err = std::fs::write(inside.join("x"), "x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "store writable: {err}"
    );
    let err = std::fs::write(root.join("x"), "x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "root writable: {err}"
    );
    d.stop();
}

#[test]
fn namespace_sandbox_over_remote_stores() {
    let (tmp, store) = store_dir();
    let url = format!("local://{}", store.display());
    let unix = Daemon::start(
        &url,
        &format!("unix:{}", tmp.path().join("store.sock").display()),
        &["--read-only"],
    );
    let d = start(&unix.addr, &tmp.path().join("v.sock"), &[], None);
    assert_powerless(d.serving);
    let sock = std::fs::canonicalize(tmp.path().join("store.sock")).unwrap();
    assert_eq!(
        root_listing(d.serving, Path::new("/nonexistent")),
        with_ancestors(&sock),
        "root must hold the store's socket only"
    );
    assert_ne!(ns(&d.serving.to_string(), "net"), ns("self", "net"));
    d.stop();

    // over TCP the host network stays, nothing else
    let port = common::free_port();
    let tcp = Daemon::start(&url, &format!("127.0.0.1:{port}"), &["--read-only"]);
    let d = start(&tcp.addr, &tmp.path().join("v2.sock"), &[], None);
    assert_powerless(d.serving);
    assert_eq!(ns(&d.serving.to_string(), "net"), ns("self", "net"));
    assert_ne!(ns(&d.serving.to_string(), "mnt"), ns("self", "mnt"));
    assert!(root_listing(d.serving, Path::new("/")).is_empty());
    d.stop();
}

#[test]
fn unprivileged_user_gets_a_user_namespace() {
    let (tmp, store) = store_dir();
    let sockdir = tmp.path().join("sockets");
    std::fs::create_dir(&sockdir).unwrap();
    Command::new("chown")
        .args(["65534:65534"])
        .arg(&sockdir)
        .status()
        .unwrap();
    let d = start(
        &format!("local://{}", store.display()),
        &sockdir.join("v.sock"),
        &[],
        Some(65534),
    );
    assert_powerless(d.serving);
    assert_eq!(
        status(d.serving)["Uid"].split_whitespace().next(),
        Some("65534")
    );
    assert_ne!(ns(&d.serving.to_string(), "user"), ns("self", "user"));
    assert_ne!(ns(&d.serving.to_string(), "mnt"), ns("self", "mnt"));
    d.stop();
}

#[test]
fn rlimit_nofile_is_applied() {
    let (tmp, store) = store_dir();
    let d = start(
        &format!("local://{}", store.display()),
        &tmp.path().join("v.sock"),
        &["--rlimit-nofile", "777"],
        None,
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.serving)).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().skip(3).take(2).collect::<Vec<_>>(),
        ["777", "777"],
        "{line}"
    );
    d.stop();
}

#[test]
fn chroot_and_none_modes() {
    let (tmp, store) = store_dir();
    let url = format!("local://{}", store.display());
    let d = start(
        &url,
        &tmp.path().join("c.sock"),
        &["--sandbox", "chroot"],
        None,
    );
    assert_powerless(d.serving);
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/root", d.serving)).unwrap(),
        store
    );
    assert_eq!(ns(&d.serving.to_string(), "mnt"), ns("self", "mnt"));
    d.stop();

    // a memory store: chrooted into an empty directory that no longer exists
    let d = start(
        "memory://",
        &tmp.path().join("m.sock"),
        &["--sandbox", "chroot"],
        None,
    );
    let root = std::fs::read_link(format!("/proc/{}/root", d.serving)).unwrap();
    assert!(root.to_string_lossy().ends_with("(deleted)"), "{root:?}");
    d.stop();

    let mut d = start(
        &url,
        &tmp.path().join("n.sock"),
        &["--sandbox", "none"],
        None,
    );
    assert_powerless(d.serving);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    assert!(d.child.wait().unwrap().success());
    assert!(stderr_of(&mut d.child).contains("debugging only"));
    assert!(!d.sock.exists());
}

fn run_selftest(seccomp: &str) -> (std::process::ExitStatus, String) {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["--store", "memory://", "virtiofs", "--socket-path"])
        .arg(tmp.path().join("v.sock"))
        .args(["--selftest-seccomp", "--seccomp", seccomp])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let st = child.wait().unwrap();
    (st, stderr_of(&mut child))
}

#[test]
fn a_forbidden_system_call_kills_the_daemon() {
    for action in ["kill", "trap"] {
        let (st, err) = run_selftest(action);
        assert_eq!(st.code(), Some(128 + libc::SIGSYS), "{action}: {st}: {err}");
        assert!(err.contains("killed by SIGSYS"), "{action}: {err}");
        assert!(!err.contains("was allowed"), "{action}: {err}");
        // clone3 is answered ENOSYS (threads come from clone, whose
        // CLONE_THREAD flag the filter checks), whatever the action
        assert!(
            err.contains("clone3 returned -1 (Function not implemented"),
            "{action}: {err}"
        );
    }
    // log: allowed and logged; the daemon keeps serving until SIGTERM
    let (st, err) = run_selftest("log");
    assert!(st.success(), "{st}: {err}");
    assert!(err.contains("personality() was allowed"), "{err}");
    assert!(
        err.contains("clone3 returned -1 (Function not implemented"),
        "{err}"
    );
}

/// A SIGTERM that reaches the serving process before its handlers exist
/// (PID 1 of a namespace would drop it) waits for them: the daemon still
/// exits 0, promptly.
#[test]
fn an_early_sigterm_is_not_lost() {
    let (tmp, store) = store_dir();
    for i in 0..5 {
        let sock = tmp.path().join(format!("e{i}.sock"));
        let mut child = Command::new(bin())
            .args(["--store", &format!("local://{}", store.display())])
            .args(["virtiofs", "--socket-path"])
            .arg(&sock)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // as soon as the serving process exists
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .trim()
            .is_empty()
        {
            assert!(Instant::now() < deadline, "no serving process");
            std::thread::yield_now();
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("SIGTERM {i} was lost: the daemon is still running");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "round {i}: {st}");
        assert!(!sock.exists());
    }
}

/// Lines of the daemon's stderr, read as they come.
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing `what`; answers the lines seen.
fn wait_for_line(rx: &std::sync::mpsc::Receiver<String>, what: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            let found = l.contains(what);
            seen.push(l);
            if found {
                return seen;
            }
        }
    }
    panic!("no line with {what:?} in: {seen:#?}");
}

/// `--closure-file /etc/x.closure` must not put `/etc` (and `/etc/shadow`
/// with it) in reach of the serving process, which runs as root: it gets
/// the opened file, from its supervisor, and nothing beside it. The file
/// is still followed when replaced by rename and read again on SIGHUP.
#[test]
fn a_closure_file_is_handed_in_without_its_directory() {
    let (tmp, store) = store_dir();
    let url = format!("local://{}", store.display());
    let g = tmp.path().join("g");
    std::fs::write(&g, "in the closure\n").unwrap();
    let out = cli_ok(&["--store", &url, "import", g.to_str().unwrap()]);
    let path = String::from_utf8(out).unwrap().trim().to_string();
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&store)
        .status()
        .unwrap();
    let etc = std::fs::canonicalize(tmp.path()).unwrap().join("etc");
    std::fs::create_dir(&etc).unwrap();
    std::fs::write(etc.join("shadow"), "root:secret\n").unwrap();
    let closure = etc.join("x.closure");
    std::fs::write(&closure, format!("# the VM's closure\n{path}\n")).unwrap();

    let mut d = start(
        &url,
        &tmp.path().join("c.sock"),
        &["--closure-file", closure.to_str().unwrap()],
        None,
    );
    let lines = stderr_lines(&mut d.child);
    let root = PathBuf::from(format!("/proc/{}/root", d.serving));
    let inside = root.join(etc.strip_prefix("/").unwrap());
    assert!(
        !inside.join("shadow").exists(),
        "the closure file's directory is exposed: {} is readable inside",
        etc.join("shadow").display()
    );
    assert!(!inside.exists(), "{} is inside the sandbox", etc.display());
    assert_eq!(
        root_listing(d.serving, &store),
        with_ancestors(&store),
        "the root holds the store alone"
    );

    // replaced by rename, then SIGHUP: the new file is read
    let new = etc.join("x.new");
    std::fs::write(&new, "# nothing any more\n").unwrap();
    std::fs::rename(&new, &closure).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    wait_for_line(&lines, "now serving a closure of 0 store paths");
    // gone, then SIGHUP: the closure served stays, with an error
    std::fs::remove_file(&closure).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    wait_for_line(&lines, "keeping the closure served");
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon ended");
    d.stop();

    // chroot mode serves a closure file too (it could expose one
    // directory only: the store's)
    std::fs::write(&closure, format!("{path}\n")).unwrap();
    let d = start(
        &url,
        &tmp.path().join("r.sock"),
        &[
            "--sandbox",
            "chroot",
            "--closure-file",
            closure.to_str().unwrap(),
        ],
        None,
    );
    d.stop();
}
