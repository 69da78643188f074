//! The host cache with real microVMs (QEMU under TCG, see vm-tests/), as
//! it is deployed without systemd: a remote store daemon on loopback TCP;
//! one host daemon filling a cache directory from it and serving gRPC on a
//! unix socket alone in its directory; one sandboxed per-VM `virtiofs`
//! daemon per guest, reading hits straight from the cache directory and
//! asking the host daemon for misses.
mod common;

use common::vm::{
    closure_of, copy_paths, fixture_app, fixture_data, host_digest, line_after, require_vm_tools,
    run_vm, wait_exit, VmOpts, DIGEST_SCRIPT,
};
use common::{bin, cli_ok, free_port, metric, pseudo_random, scrape_metrics, Daemon};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const FETCHED: &str = "tvix_virtiofsd_cache_fetched_bytes_total";
const BLOB_MISSES: &str = "tvix_virtiofsd_cache_misses_total{kind=\"blob\"}";
const FILL_ERRORS: &str = "tvix_virtiofsd_cache_fill_errors_total";

fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn show_log(what: &str, p: &Path) {
    for line in read_log(p).lines() {
        eprintln!("{what}| {line}");
    }
}

/// A store path made here, not in the remote until [`Extra::import`]: a
/// 1 MiB file `big` and a small one; its name is known in advance.
struct Extra {
    src: PathBuf,
    path: String,
    /// sha256 of big, then small.
    sum: String,
}

impl Extra {
    fn new(root: &Path, name: &str, seed: u64) -> Extra {
        let src = root.join(name);
        std::fs::create_dir_all(&src).unwrap();
        let big = pseudo_random(1 << 20, seed);
        let small = format!("{name}\n");
        std::fs::write(src.join("big"), &big).unwrap();
        std::fs::write(src.join("small"), &small).unwrap();
        let scratch = format!("local://{}", root.join(format!("scratch-{name}")).display());
        let path = String::from_utf8(cli_ok(&[
            "--store",
            &scratch,
            "import",
            src.to_str().unwrap(),
        ]))
        .unwrap()
        .trim()
        .to_string();
        let sum = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(&big);
            h.update(small.as_bytes());
            data_encoding::HEXLOWER.encode(&h.finalize())
        };
        Extra { src, path, sum }
    }

    /// Adds it to the (embedded) store at `url`.
    fn import(&self, url: &str) {
        let out = cli_ok(&["--store", url, "import", self.src.to_str().unwrap()]);
        assert_eq!(String::from_utf8(out).unwrap().trim(), self.path);
    }
}

/// `tvix-virtiofsd --store REMOTE --cache-dir DIR daemon --listen
/// unix:SOCK --read-only --metrics-listen 127.0.0.1:PORT`, its stderr in
/// `log`.
struct HostDaemon {
    child: Child,
    log: PathBuf,
    metrics: String,
}

impl HostDaemon {
    fn start(remote: &str, cache: &Path, sock: &Path, log: PathBuf) -> HostDaemon {
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = Command::new(bin())
            .args(["--store", remote, "--cache-dir"])
            .arg(cache)
            // the guests' own misses are what this test counts
            .args(["daemon", "--read-only", "--prefetch", "none", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .args(["--metrics-listen", &metrics])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = HostDaemon {
            child,
            log,
            metrics,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(sock).is_err()
            || std::net::TcpStream::connect(&d.metrics).is_err()
        {
            if let Some(s) = d.child.try_wait().unwrap() {
                panic!("host daemon exited with {s}: {}", read_log(&d.log));
            }
            assert!(
                Instant::now() < deadline,
                "host daemon not serving after 30 s: {}",
                read_log(&d.log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn metrics(&self) -> String {
        scrape_metrics(&self.metrics)
    }

    /// SIGTERM; the exit status and the log.
    fn stop(mut self) -> (ExitStatus, String) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = wait_exit(&mut self.child, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("host daemon ignored SIGTERM: {}", read_log(&self.log)));
        let log = read_log(&self.log);
        std::mem::forget(self);
        (st, log)
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A per-VM daemon: `--store grpc+unix://SOCK --cache-dir DIR virtiofs`,
/// sandbox and seccomp at their defaults, stderr in `log`.
fn start_vm_daemon(store: &str, cache: &Path, vsock: &Path, log: &Path) -> Child {
    Command::new(bin())
        .args(["--store", store, "--cache-dir"])
        .arg(cache)
        .args(["virtiofs", "--tag", "nix-store", "--socket-path"])
        .arg(vsock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for a per-VM daemon whose guest is gone: it exits 0 and logs its
/// `cache DIR: hits: …` line, whose counts are returned as
/// (hits, misses) of (blob, directory, path_info).
fn vm_daemon_done(mut child: Child, log: &Path, cache: &Path, what: &str) -> ([u64; 3], [u64; 3]) {
    let st = wait_exit(&mut child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{what}: per-VM daemon still running: {}", read_log(log)));
    let text = read_log(log);
    assert!(
        st.success(),
        "{what}: per-VM daemon exited with {st}: {text}"
    );
    let prefix = format!("cache {}: hits: ", cache.display());
    let line = text
        .lines()
        .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("{what}: no {prefix:?} line in the log: {text}"));
    eprintln!("{what}: per-VM daemon: {prefix}{line}");
    // "1 blob, 2 directory, 3 path_info; misses: 4 blob, ...; ..."
    let counts = |s: &str| -> [u64; 3] {
        let mut out = [0; 3];
        for (i, kind) in ["blob", "directory", "path_info"].iter().enumerate() {
            out[i] = s
                .split(", ")
                .find_map(|p| p.trim().strip_suffix(&format!(" {kind}")))
                .unwrap_or_else(|| panic!("{what}: no {kind} count in {s:?}"))
                .parse()
                .unwrap();
        }
        out
    };
    let (hits, rest) = line.split_once("; misses: ").unwrap();
    let misses = rest.split(';').next().unwrap();
    (counts(hits), counts(misses))
}

/// Remote (TCP) → host daemon with --cache-dir (unix socket) → per-VM
/// daemons with --cache-dir, one guest after the other:
/// 1. the first guest checksums the fixture closure against /nix/store;
///    the host daemon fetched it (blob misses, fetched bytes in /metrics);
/// 2. with the remote killed, a second guest (new per-VM daemon) reads the
///    same closure from the cache; the host daemon fetches nothing more;
/// 3. with the remote back, the host daemon is restarted on a new socket
///    inode while a third guest's per-VM daemon keeps running; the guest
///    then reads a store path that was not in the cache (it was added to
///    the remote only after the restart) through the new host daemon.
///
/// Every per-VM daemon exits 0 and logs its cache counts.
#[test]
fn host_cache_serves_microvms_with_the_remote_down() {
    require_vm_tools();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(tmp.path()).unwrap();
    let app = fixture_app();
    let closure = closure_of(&[&app]);
    let numbers = fixture_data(&closure);
    let host_sum = host_digest(&closure);
    let remote_url = format!("local://{}", root.join("remote").display());
    copy_paths(&remote_url, &closure);

    // Store paths that are not in the remote yet, for the third guest:
    // one added before it boots, one only after the host daemon's restart.
    let before = Extra::new(&root, "before", 1);
    let after = Extra::new(&root, "after", 2);

    let port = free_port();
    let remote_listen = format!("127.0.0.1:{port}");
    let remote = Daemon::start(&remote_url, &remote_listen, &["--read-only"]);
    let cache = root.join("cache");
    let run = root.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let sock = run.join("daemon.sock");
    let store = format!("grpc+unix://{}", sock.display());
    let host = HostDaemon::start(&remote.addr, &cache, &sock, root.join("host1.log"));

    let guest = format!(
        r#"set -u
{DIGEST_SCRIPT}
echo "APP: $({app}/bin/app)"
printf '%s' "$(digest {paths})" | sha256sum | sed 's/^/SUM: /'
exit 7
"#,
        paths = closure.join(" "),
    );
    let expected_app = format!("20000 {numbers}/share/numbers");

    // 1. the first guest fills the cache from the remote
    let t = Instant::now();
    let vsock = root.join("vm1.sock");
    let log1 = root.join("vm1.log");
    let vm1 = start_vm_daemon(&store, &cache, &vsock, &log1);
    let (status, console) = run_vm(None, &vsock, &guest, &root, VmOpts::default());
    assert_eq!(status, 7, "guest 1: {}", read_log(&log1));
    assert_eq!(line_after(&console, "APP: "), expected_app);
    assert_eq!(
        line_after(&console, "SUM: ").split_whitespace().next(),
        Some(host_sum.as_str()),
        "guest 1: the closure differs from /nix/store"
    );
    let (_, misses1) = vm_daemon_done(vm1, &log1, &cache, "guest 1");
    assert!(misses1[0] > 0, "guest 1 found blobs in an empty cache");
    assert!(
        !read_log(&log1).contains("shares its directory"),
        "the host daemon's socket was not alone in its directory: {}",
        read_log(&log1)
    );
    let m1 = host.metrics();
    let fetched = metric(&m1, FETCHED);
    assert!(metric(&m1, BLOB_MISSES) > 0, "{m1}");
    // the closure holds a 300,000-byte file and a static busybox
    assert!(fetched > 300_000, "fetched only {fetched} bytes:\n{m1}");
    eprintln!(
        "guest 1 (cold cache) done in {:.1} s; host daemon fetched {fetched} bytes",
        t.elapsed().as_secs_f64()
    );

    // 2. the remote goes away; a second guest reads the same closure
    drop(remote);
    assert!(
        std::net::TcpStream::connect(&remote_listen).is_err(),
        "the remote still answers"
    );
    let t = Instant::now();
    let vsock = root.join("vm2.sock");
    let log2 = root.join("vm2.log");
    let vm2 = start_vm_daemon(&store, &cache, &vsock, &log2);
    let (status, console) = run_vm(None, &vsock, &guest, &root, VmOpts::default());
    assert_eq!(
        status,
        7,
        "guest 2 (remote stopped): {}\nhost daemon: {}",
        read_log(&log2),
        read_log(&host.log)
    );
    assert_eq!(line_after(&console, "APP: "), expected_app);
    assert_eq!(
        line_after(&console, "SUM: ").split_whitespace().next(),
        Some(host_sum.as_str()),
        "guest 2: the closure read from the cache differs from /nix/store"
    );
    let (hits2, misses2) = vm_daemon_done(vm2, &log2, &cache, "guest 2");
    assert!(hits2[0] > 0, "guest 2 read no blob from the cache");
    assert_eq!(misses2[0], 0, "guest 2 missed blobs the cache holds");
    let m2 = host.metrics();
    assert_eq!(
        metric(&m2, FETCHED),
        fetched,
        "the host daemon fetched more with the remote down:\n{m2}"
    );
    assert_eq!(metric(&m2, FILL_ERRORS), metric(&m1, FILL_ERRORS), "{m2}");
    eprintln!(
        "guest 2 (remote down) done in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // 3. the remote is back; the host daemon restarts under a running
    // per-VM daemon, which has used it already
    let remote = Daemon::start(&remote_url, &remote_listen, &["--read-only"]);
    before.import(&remote_url);
    let t = Instant::now();
    // A second name for the old socket, outside its directory, keeps its
    // inode alive: the new daemon's socket is certainly a new inode.
    let old_sock = root.join("old-daemon.sock");
    std::fs::hard_link(&sock, &old_sock).unwrap();
    let inode_before = std::fs::metadata(&old_sock).unwrap().ino();
    let vsock = root.join("vm3.sock");
    let log3 = root.join("vm3.log");
    let vm3 = start_vm_daemon(&store, &cache, &vsock, &log3);
    let guest3 = format!(
        r#"set -u
echo "APP: $({app}/bin/app)"
echo "BEFORE: $(cat {before}/big {before}/small | sha256sum)"
echo "PHASE: restart the host daemon now"
i=0
while [ ! -e {after}/big ]; do
  i=$((i+1))
  if [ $i -gt 60 ]; then echo "MARKER: never appeared"; exit 3; fi
  sleep 1
done
echo "WAITED: $i"
echo "AFTER: $(cat {after}/big {after}/small | sha256sum)"
echo "APP2: $({app}/bin/app)"
exit 7
"#,
        before = before.path,
        after = after.path,
    );
    let mut host = Some(host);
    let mut m_host1 = String::new();
    let mut restarted: Option<(HostDaemon, ExitStatus, String)> = None;
    let (status, console) = {
        let mut on_line = |line: &str| {
            if !line.contains("PHASE: restart the host daemon now") || restarted.is_some() {
                return;
            }
            let old = host.take().unwrap();
            m_host1 = old.metrics();
            let (st, log) = old.stop();
            let new = HostDaemon::start(&remote.addr, &cache, &sock, root.join("host2.log"));
            after.import(&remote_url);
            restarted = Some((new, st, log));
        };
        run_vm(
            None,
            &vsock,
            &guest3,
            &root,
            VmOpts {
                on_line: Some(&mut on_line),
                ..VmOpts::default()
            },
        )
    };
    let (host, st1, log_host1) = restarted.expect("guest 3 never asked for the restart");
    assert_eq!(
        status,
        7,
        "guest 3: per-VM daemon: {}\nnew host daemon: {}",
        read_log(&log3),
        read_log(&host.log)
    );
    assert!(st1.success(), "host daemon exited with {st1}: {log_host1}");
    assert!(
        log_host1.contains(&format!("cache {}: hits: ", cache.display())),
        "the host daemon logged no cache counts at exit: {log_host1}"
    );
    assert_ne!(
        std::fs::metadata(&sock).unwrap().ino(),
        inode_before,
        "the restarted host daemon's socket is the same inode"
    );
    assert_eq!(line_after(&console, "APP: "), expected_app);
    assert_eq!(line_after(&console, "APP2: "), expected_app);
    assert_eq!(
        line_after(&console, "BEFORE: ").split_whitespace().next(),
        Some(before.sum.as_str()),
        "guest 3: the store path read before the restart is wrong"
    );
    assert_eq!(
        line_after(&console, "AFTER: ").split_whitespace().next(),
        Some(after.sum.as_str()),
        "guest 3: the uncached store path read after the restart is wrong"
    );
    assert!(
        metric(&m_host1, FETCHED) >= fetched + (1 << 20),
        "the first host daemon did not fetch the path read before the restart:\n{m_host1}"
    );
    eprintln!(
        "guest 3: the new store path appeared after {} polls",
        line_after(&console, "WAITED: ")
    );
    let (_, misses3) = vm_daemon_done(vm3, &log3, &cache, "guest 3");
    assert!(misses3[0] >= 2, "guest 3 did not miss the new blobs");
    show_log("guest 3's per-VM daemon", &log3);
    show_log("host daemon before the restart", &root.join("host1.log"));
    show_log("host daemon after the restart", &host.log);
    let m3 = host.metrics();
    assert!(
        metric(&m3, FETCHED) >= 1 << 20,
        "the new host daemon did not fetch the new store path:\n{m3}"
    );
    eprintln!(
        "guest 3 (host daemon restarted) done in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let (st, log) = host.stop();
    assert!(st.success(), "host daemon exited with {st}: {log}");
    assert!(remote.stop().success());
    eprintln!(
        "host cache microVM test: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
