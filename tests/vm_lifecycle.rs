//! MicroVM lifecycle of `tvix-virtiofsd virtiofs`, with real guests (see
//! vm-tests/README.md) and real gRPC over unix sockets:
//! * one store fetch that hangs does not hold up the guest's other reads;
//! * the daemon serves a listening socket inherited with `--fd`, and leaves
//!   the socket file (which it did not create) in place;
//! * the test script reaches the guest through the initramfs
//!   (`run-vm.sh --script-via initrd`, the way cloud-hypervisor needs).
//!
//! Each case runs once per VMM from `common::vm::vmms()`: QEMU (TCG) always,
//! cloud-hypervisor where it is installed.
mod common;

use common::vm::{
    closure_of, copy_paths, fixture_app, fixture_data, line_after, require_vm_tools, run_vm, vmms,
    wait_exit, VmOpts, QEMU,
};
use common::{bin, cli_ok, pseudo_random, require_tools, serve_in_process};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tvix_virtiofsd::castore::B3Digest;
use tvix_virtiofsd::store::blob::{BlobReader, BlobService, BlobWriter};
use tvix_virtiofsd::store::{Addr, Store};

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(data))
}

fn line_index(console: &str, line: &str) -> Option<usize> {
    console.lines().position(|l| l == line)
}

/// Panics with the daemon's state and log unless the guest script exited
/// with `want` (a daemon that died early shows up here, not as a bare
/// run-vm.sh status).
fn assert_guest_status(status: i32, want: i32, daemon: &mut Child, log: &Path) {
    if status == want {
        return;
    }
    let state = match daemon.try_wait().unwrap() {
        Some(s) => format!("the daemon had exited: {s}"),
        None => "the daemon is still running".to_string(),
    };
    panic!(
        "guest script exited with {status}, not {want} (124 timeout, 125 harness failure); \
         {state}; daemon log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Waits for the daemon to exit on its own (the VMM went away), then shows
/// its log.
fn wait_daemon_exit(daemon: &mut Child, log: &Path) -> ExitStatus {
    let status = wait_exit(daemon, Duration::from_secs(20));
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    match status {
        Some(s) => {
            eprintln!("--- daemon log ---\n{log_text}--- end ---");
            s
        }
        None => panic!("daemon still running 20 s after the VM exited; log:\n{log_text}"),
    }
}

/// What the gated blob service saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// The slow blob was asked for; its open now waits for the gate.
    SlowStart,
    /// The slow blob's open returned.
    SlowEnd,
    /// Any other blob was opened.
    Open(B3Digest),
}

/// A blob service that holds back one blob: opening it waits until the
/// test opens the gate. Every other call goes straight through.
struct GatedBlobs {
    inner: Arc<dyn BlobService>,
    slow: B3Digest,
    gate: tokio::sync::watch::Receiver<bool>,
    events: Arc<Mutex<Vec<Event>>>,
}

#[async_trait::async_trait]
impl BlobService for GatedBlobs {
    async fn has(&self, digest: &B3Digest) -> tvix_virtiofsd::store::Result<bool> {
        self.inner.has(digest).await
    }

    async fn open_read(
        &self,
        digest: &B3Digest,
    ) -> tvix_virtiofsd::store::Result<Option<Box<dyn BlobReader>>> {
        if *digest != self.slow {
            self.events.lock().unwrap().push(Event::Open(*digest));
            return self.inner.open_read(digest).await;
        }
        self.events.lock().unwrap().push(Event::SlowStart);
        // An error means the test is over (sender dropped): go on.
        let _ = self.gate.clone().wait_for(|&open| open).await;
        let r = self.inner.open_read(digest).await;
        self.events.lock().unwrap().push(Event::SlowEnd);
        r
    }

    async fn open_write(&self) -> tvix_virtiofsd::store::Result<Box<dyn BlobWriter>> {
        self.inner.open_write().await
    }
}

/// One blob fetch that hangs (its gRPC Read does not answer) must not
/// stall the guest's other requests: the daemon's worker pool keeps
/// serving while one worker waits on the store. The guest starts reading
/// `slow`, then reads three other files and reports that it got them while
/// the slow read is still pending; the store side confirms that the slow
/// fetch was in flight, unanswered, while the other blobs were fetched.
/// Only then does the test let the slow blob through, and the guest
/// checks its bytes. Ordering, not timing: the gate opens on the guest's
/// report, well inside the daemon's 30 s store timeout.
#[test]
fn slow_store_fetch_does_not_stall_other_guest_reads() {
    require_tools(&[QEMU]);
    for vmm in vmms() {
        let t0 = Instant::now();
        slow_fetch_case(vmm);
        eprintln!("slow-fetch case with {vmm}: {:.1?}", t0.elapsed());
    }
}

fn slow_fetch_case(vmm: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("lifecycle");
    std::fs::create_dir_all(&src).unwrap();
    let slow = pseudo_random(1 << 20, 11);
    std::fs::write(src.join("slow"), &slow).unwrap();
    let fast: Vec<Vec<u8>> = (1..=3u64)
        .map(|i| pseudo_random(20_000 * i as usize, 100 + i))
        .collect();
    for (i, data) in fast.iter().enumerate() {
        std::fs::write(src.join(format!("fast{}", i + 1)), data).unwrap();
    }
    let local = tmp.path().join("store");
    let out = cli_ok(&[
        "--store",
        &format!("local://{}", local.display()),
        "import",
        src.to_str().unwrap(),
    ]);
    let store_path = String::from_utf8(out).unwrap().trim().to_string();
    assert!(
        store_path.starts_with("/nix/store/") && store_path.ends_with("-lifecycle"),
        "import printed {store_path:?}"
    );

    // The local store, its blobs behind the gate, served over gRPC on a
    // unix socket from this process.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let a = Addr::Local(local);
    let inner = Store::open(&a, &a, &a).unwrap();
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let events = Arc::new(Mutex::new(Vec::new()));
    let slow_digest = B3Digest::of(&slow);
    let fast_digests: Vec<B3Digest> = fast.iter().map(|d| B3Digest::of(d)).collect();
    let store = Store {
        blob: Arc::new(GatedBlobs {
            inner: inner.blob.clone(),
            slow: slow_digest,
            gate: gate_rx,
            events: events.clone(),
        }),
        ..inner
    };
    let addr = rt.block_on(serve_in_process(store, Some(tmp.path())));

    let sock = tmp.path().join("vfs.sock");
    let log = tmp.path().join("daemon.log");
    // Default store timeout (30 s) on purpose: the gate opens long before.
    let mut daemon = common::spawn_virtiofs(&addr, &sock, &log, &["--thread-pool-size", "4"]);

    let guest = format!(
        r#"set -u
P={store_path}
sha256sum $P/slow > /tmp/slow.sum &
pid=$!
# wait until the reader sleeps in the kernel (on the daemon), plus a
# margin; the host checks that the slow fetch really was in flight
i=0
while [ $i -lt 100 ]; do
  case "$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null)" in D|S) break ;; esac
  sleep 0.1; i=$((i+1))
done
sleep 1
echo "FAST-SUM: $(cat $P/fast1 $P/fast2 $P/fast3 | sha256sum)"
echo "LIST: $(ls $P | tr '\n' ' ')"
echo FAST-DONE
kill -0 $pid 2>/dev/null && echo SLOW-PENDING
wait $pid
echo "SLOW-STATUS: $?"
echo "SLOW-SUM: $(cat /tmp/slow.sum)"
exit 0
"#
    );
    // What the store had seen when the guest reported SLOW-PENDING.
    let mut at_pending: Option<Vec<Event>> = None;
    let mut on_line = |line: &str| {
        if line == "SLOW-PENDING" && at_pending.is_none() {
            at_pending = Some(events.lock().unwrap().clone());
            gate.send_replace(true);
        }
    };
    let opts = VmOpts {
        on_line: Some(&mut on_line),
        ..VmOpts::default()
    };
    let (status, console) = run_vm(Some(vmm), &sock, &guest, tmp.path(), opts);
    // Whatever happened, let a still waiting fetch go.
    gate.send_replace(true);
    assert_guest_status(status, 0, &mut daemon, &log);

    let done = line_index(&console, "FAST-DONE").expect("guest did not finish the fast reads");
    let pending = line_index(&console, "SLOW-PENDING").unwrap_or_else(|| {
        panic!(
            "no SLOW-PENDING: the slow read had ended (status {:?}) before the fast reads \
             were done, so the hung fetch held them up",
            console
                .lines()
                .find_map(|l| l.strip_prefix("SLOW-STATUS: "))
        )
    });
    assert!(done < pending);
    let mut want_fast = Vec::new();
    for d in &fast {
        want_fast.extend_from_slice(d);
    }
    assert_eq!(
        line_after(&console, "FAST-SUM: ").split_whitespace().next(),
        Some(sha256_hex(&want_fast).as_str()),
        "fast files read wrong"
    );
    assert_eq!(line_after(&console, "LIST: "), "fast1 fast2 fast3 slow");

    // The store's view when the guest said the fast reads were done: the
    // slow fetch had started and not returned, and every fast blob was
    // fetched after it started.
    let seen = at_pending.unwrap();
    eprintln!("store events at SLOW-PENDING: {seen:?}");
    let start = seen
        .iter()
        .position(|e| *e == Event::SlowStart)
        .expect("the slow blob was never requested before the guest's fast reads");
    assert!(
        !seen.contains(&Event::SlowEnd),
        "the slow fetch had returned"
    );
    for d in &fast_digests {
        assert!(
            seen[start..].contains(&Event::Open(*d)),
            "fast blob {d} was not fetched while the slow fetch hung: {seen:?}"
        );
    }

    // After the gate opened, the slow read completed with the right bytes.
    assert_eq!(line_after(&console, "SLOW-STATUS: "), "0");
    assert_eq!(
        line_after(&console, "SLOW-SUM: ").split_whitespace().next(),
        Some(sha256_hex(&slow).as_str()),
        "slow file read wrong"
    );
    assert!(events.lock().unwrap().contains(&Event::SlowEnd));

    let st = wait_daemon_exit(&mut daemon, &log);
    assert!(st.success(), "daemon exited with {st}");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !log_text.contains("did not answer"),
        "a store request timed out"
    );
    assert!(!sock.exists(), "daemon left the socket it created");
}

/// `virtiofs --fd N`: the test creates and binds the listening socket,
/// the daemon inherits it as fd 3 and serves a VM through it, the guest
/// runs a program from the store (its script handed over through the
/// initramfs), and once the VM is gone the daemon exits 0 and leaves the
/// socket file, which it did not create, where it was.
#[test]
fn virtiofs_serves_an_inherited_socket() {
    require_vm_tools();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app();
    let data = fixture_data(&closure_of(&[&app]));
    let store = format!("local://{}", tmp.path().join("store").display());
    copy_paths(&store, &[&app]);
    for vmm in vmms() {
        let t0 = Instant::now();
        inherited_socket_case(vmm, &store, &app, &data);
        eprintln!("inherited-socket case with {vmm}: {:.1?}", t0.elapsed());
    }
}

fn inherited_socket_case(vmm: &str, store: &str, app: &str, data: &str) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    const CHILD_FD: i32 = 3;

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vfs.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let log = dir.path().join("daemon.log");
    let mut cmd = Command::new(bin());
    cmd.args(["--store", store, "virtiofs", "--fd", &CHILD_FD.to_string()])
        .args(["--thread-pool-size", "2"])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: the hook runs in the forked child just before exec and only
    // calls dup2/fcntl (async-signal-safe, no allocation). `fd` is the
    // listener's, open in the parent until after spawn. dup2 gives the
    // copy no FD_CLOEXEC; if the listener already is fd 3, dup2 would be a
    // no-op, so its FD_CLOEXEC is cleared instead.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == CHILD_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, CHILD_FD)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut daemon = cmd.spawn().unwrap();
    // From here only the daemon holds the listening socket.
    drop(listener);

    let guest = format!(
        r#"set -u
echo "APP: $({app}/bin/app)"
echo "DEEP: $(cat {data}/share/deep/er/still/file)"
exit 5
"#
    );
    let opts = VmOpts {
        args: &["--script-via", "initrd"],
        ..VmOpts::default()
    };
    let (status, console) = run_vm(Some(vmm), &sock, &guest, dir.path(), opts);
    assert_guest_status(status, 5, &mut daemon, &log);
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("vmtest: running test script (from initrd)")),
        "the guest did not take its script from the initramfs"
    );
    assert_eq!(
        line_after(&console, "APP: "),
        format!("20000 {data}/share/numbers")
    );
    assert_eq!(line_after(&console, "DEEP: "), "deep");

    let st = wait_daemon_exit(&mut daemon, &log);
    assert!(st.success(), "daemon exited with {st}");
    let meta = std::fs::symlink_metadata(&sock).expect("the inherited socket file is gone");
    assert!(meta.file_type().is_socket());
    // Nobody listens on it any more: the daemon really was the server.
    let err = std::os::unix::net::UnixStream::connect(&sock).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

/// A QEMU guest that reboots (`reboot -f`; the VM goes on) keeps the
/// vhost-user connection: its new kernel sends INIT again and never
/// FORGETs what the old one looked up or kept open. The daemon drops those
/// inodes and handles at the second INIT (it says how many), and the
/// rebooted guest mounts and reads again.
#[test]
fn a_rebooting_guest_reads_again_and_leaks_nothing() {
    require_vm_tools();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("local://{}", dir.path().join("store").display());
    let import = |name: &str, contents: &[u8]| {
        let f = dir.path().join(name);
        std::fs::write(&f, contents).unwrap();
        String::from_utf8(cli_ok(&["--store", &store, "import", f.to_str().unwrap()]))
            .unwrap()
            .trim()
            .to_string()
    };
    let data = import("data", b"read me after a reboot\n");
    // the second boot's sign: a store path added while the first ran
    let marker_file = dir.path().join("rebooted");
    std::fs::write(&marker_file, b"x").unwrap();
    let marker_path = {
        // the path `import` will give it, without adding it yet
        let out = cli_ok(&[
            "--store",
            &format!("local://{}", dir.path().join("scratch").display()),
            "import",
            marker_file.to_str().unwrap(),
        ]);
        String::from_utf8(out).unwrap().trim().to_string()
    };
    let sock = dir.path().join("vfs.sock");
    let log = dir.path().join("daemon.log");
    let mut daemon = common::spawn_virtiofs(&store, &sock, &log, &[]);
    let guest = format!(
        r#"set -u
if [ -e {marker_path} ]; then
  [ "$(cat {data})" = "read me after a reboot" ] || exit 3
  echo SECOND-BOOT-OK
  exit 0
fi
# the first kernel looks paths up and keeps a file open, then reboots
ls -l {data} /nix/store/ > /dev/null
exec 3< {data}
cat {data} > /dev/null
echo FIRST-BOOT-DONE
sleep 3
reboot -f
sleep 60
"#
    );
    let mut added = false;
    let mut on_line = |line: &str| {
        if line == "FIRST-BOOT-DONE" && !added {
            cli_ok(&["--store", &store, "import", marker_file.to_str().unwrap()]);
            added = true;
        }
    };
    let (status, console) = run_vm(
        Some("qemu"),
        &sock,
        &guest,
        dir.path(),
        VmOpts {
            args: &["--reboot"],
            timeout_secs: 400,
            on_line: Some(&mut on_line),
        },
    );
    assert_guest_status(status, 0, &mut daemon, &log);
    assert!(console.contains("FIRST-BOOT-DONE"), "{console}");
    assert!(console.contains("SECOND-BOOT-OK"), "{console}");
    let exit = wait_daemon_exit(&mut daemon, &log);
    assert!(exit.success(), "{exit}");
    let text = std::fs::read_to_string(&log).unwrap();
    let dropped = text
        .lines()
        .find(|l| l.contains("FUSE INIT: dropped"))
        .unwrap_or_else(|| panic!("no reset at the second INIT:\n{text}"));
    // the old kernel held at least the data path's inode and one open file
    assert!(!dropped.contains("dropped 0 inodes"), "{dropped}");
    assert!(dropped.contains("1 open files"), "{dropped}");
}
