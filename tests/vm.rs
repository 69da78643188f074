//! Real microVMs (QEMU, Debian kernel, busybox initramfs from
//! `vm-tests/`) mount the store through `tvix-virtiofsd virtiofs` and run
//! programs from it. Guests boot with TCG (see vm-tests/README.md).
mod common;

use common::vm::{
    closure_of, copy_paths, fixture_app, fixture_data, host_digest, line_after, require_vm_tools,
    run_vm, vmms, wait_exit, VmOpts, DIGEST_SCRIPT,
};
use common::{bin, sh};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A store path of 5,200 files (and symlinks and executables), added with
/// real Nix; deterministic, so reruns reuse it.
fn big_store_path(tmp: &Path) -> String {
    let src = tmp.join("vmtest-tree");
    for i in 0..5200u32 {
        let d = src.join(format!("d{:02}", i % 52));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join(format!("f{i:04}"));
        std::fs::write(&f, format!("file {i}\n").repeat((i % 7 + 1) as usize)).unwrap();
        if i % 13 == 0 {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        if i % 97 == 0 {
            std::os::unix::fs::symlink(format!("f{i:04}"), d.join(format!("l{i:04}"))).unwrap();
        }
    }
    common::nix_db_ready();
    sh(&format!("NIX_REMOTE= nix-store --add {}", src.display()))
        .trim()
        .to_string()
}

fn start_daemon(store: &str, sock: &Path) -> std::process::Child {
    Command::new(bin())
        .args([
            "--store",
            store,
            "virtiofs",
            "--socket-path",
            sock.to_str().unwrap(),
            "--tag",
            "nix-store",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// One boot covers the whole story: a program from the store runs; every
/// file of a 5,000+ file closure has the same bytes, modes, sizes and
/// symlinks as in /nix/store; 16 parallel readers get the same bytes;
/// writes fail with EROFS and no host path is reachable; and the daemon
/// exits 0 once the VM is gone.
#[test]
fn microvm_runs_programs_from_the_store() {
    require_vm_tools();
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(tmp.path());
    // the embedded store, then the same store through a gRPC daemon on a
    // unix socket; the sandbox (default: namespace, seccomp kill) is on
    let remote = common::Daemon::start(
        &fixture.store,
        &format!("unix:{}", tmp.path().join("store.sock").display()),
        &["--read-only"],
    );
    for vmm in vmms() {
        story(&fixture, vmm, &fixture.store, tmp.path());
        story(&fixture, vmm, &remote.addr, tmp.path());
    }
    assert!(remote.stop().success());
}

/// The Nix closure under test, copied into an embedded store.
struct Fixture {
    app: String,
    closure: Vec<String>,
    nfiles: usize,
    host_sum: String,
    store: String,
}

impl Fixture {
    fn new(tmp: &Path) -> Fixture {
        let app = fixture_app();
        let big = big_store_path(tmp);
        let closure = closure_of(&[&app, &big]);
        let nfiles: usize = sh(&format!("find {} -type f | wc -l", closure.join(" ")))
            .trim()
            .parse()
            .unwrap();
        assert!(nfiles >= 5000, "closure has only {nfiles} files");

        let store = format!("local://{}", tmp.join("store").display());
        copy_paths(&store, &closure);

        // what the host sees in Nix's own /nix/store
        let host_sum = host_digest(&closure);

        Fixture {
            app,
            closure,
            nfiles,
            host_sum,
            store,
        }
    }
}

fn story(fx: &Fixture, vmm: &str, store: &str, tmp: &Path) {
    let Fixture {
        app,
        closure,
        nfiles,
        host_sum,
        ..
    } = fx;
    eprintln!("=== {vmm} microVM over {store}");
    let sock = tmp.join("vfs.sock");
    let mut daemon = start_daemon(store, &sock);
    let bad = format!(
        "{}-othername",
        &Path::new(&app).file_name().unwrap().to_str().unwrap()[..32]
    );
    let guest = format!(
        r#"set -u
{DIGEST_SCRIPT}
echo "APP: $({app}/bin/app)"
printf '%s' "$(digest {paths})" | sha256sum | sed 's/^/SUM: /'
echo "FILES: $(find {paths} -type f | wc -l)"
# 16 parallel readers over the whole closure
i=0
while [ $i -lt 16 ]; do
  (find {paths} -type f | sort | xargs cat | sha256sum > /tmp/par.$i) &
  i=$((i+1))
done
wait
echo "PARALLEL: $(cat /tmp/par.* | sort -u | wc -l)"
touch /nix/store/new 2>&1 | sed 's/^/TOUCH: /'
echo x 2>&1 >> {app}/bin/app | sed 's/^/APPEND: /'
echo "ROOT: $(ls -A /nix/store | wc -l)"
for p in etc tmp root proc .. nix-store; do [ -e /nix/store/$p/passwd ] && echo "ESCAPE: $p"; done
[ -e /nix/store/{bad} ] && echo "ESCAPE: othername"
exit 7
"#,
        paths = closure.join(" "),
    );
    let (status, console) = run_vm(Some(vmm), &sock, &guest, tmp, VmOpts::default());
    assert_eq!(status, 7, "guest script did not finish");

    let numbers = fixture_data(closure);
    assert_eq!(
        line_after(&console, "APP: "),
        format!("20000 {numbers}/share/numbers")
    );
    assert_eq!(line_after(&console, "FILES: "), nfiles.to_string());
    assert_eq!(
        line_after(&console, "SUM: ").split_whitespace().next(),
        host_sum.split_whitespace().next(),
        "closure listing/checksums differ between guest and /nix/store"
    );
    assert_eq!(
        line_after(&console, "PARALLEL: "),
        "1",
        "parallel readers disagree"
    );
    assert!(line_after(&console, "TOUCH: ").contains("Read-only file system"));
    assert!(line_after(&console, "APPEND: ").contains("Read-only file system"));
    assert_eq!(line_after(&console, "ROOT: "), "0");
    assert!(
        !console.contains("ESCAPE:"),
        "guest reached something outside the store paths"
    );

    // the VM is gone: the daemon exits 0 and removes its socket
    let status = wait_exit(&mut daemon, Duration::from_secs(20))
        .expect("daemon still running after the VM exited");
    assert!(status.success(), "daemon exited with {status}");
    assert!(!sock.exists(), "daemon left its socket");
}
