//! A VM sees its closure, not the whole store: `virtiofs --closure` in a
//! real QEMU guest (see vm-tests/README.md). The closure's program runs, a
//! path that is in the store but outside the closure is absent, and
//! `--list-root` lists exactly the closure. Then `mount --closure-file`
//! (the same view through FUSE) takes a new closure on SIGHUP.
mod common;

use common::cli_ok;
use common::vm::{
    closure_of, copy_paths, fixture_app, fixture_data, line_after, require_vm_tools, run_vm,
    wait_exit, VmOpts,
};
use std::path::Path;
use std::time::{Duration, Instant};

fn basename(p: &str) -> &str {
    p.strip_prefix("/nix/store/").unwrap()
}

/// Imports a file holding `text`; answers its store path.
fn import(store: &str, dir: &Path, name: &str, text: &str) -> String {
    let f = dir.join(name);
    std::fs::write(&f, text).unwrap();
    String::from_utf8(cli_ok(&["--store", store, "import", f.to_str().unwrap()]))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_guest_sees_its_closure_and_nothing_else() {
    require_vm_tools();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app();
    let closure = closure_of(&[&app]);
    let store = format!("local://{}", tmp.path().join("store").display());
    copy_paths(&store, &closure);
    let outside = import(&store, tmp.path(), "outside", "another tenant's file\n");
    let numbers = fixture_data(&closure);

    let sock = tmp.path().join("vfs.sock");
    let log = tmp.path().join("daemon.log");
    let mut daemon =
        common::spawn_virtiofs(&store, &sock, &log, &["--list-root", "--closure", &app]);
    let guest = format!(
        "echo \"APP: $({app}/bin/app)\"\n\
         echo \"LIST: $(ls /nix/store | tr '\\n' ' ')\"\n\
         if [ -e {outside} ]; then echo 'OUTSIDE: visible'; else echo 'OUTSIDE: absent'; fi\n\
         cat {outside} 2>&1 | head -1 | sed 's/^/CAT: /'\n\
         exit 7\n"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "no socket: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, console) = run_vm(Some("qemu"), &sock, &guest, tmp.path(), VmOpts::default());
    let daemon_log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status, 7, "guest script status; daemon log:\n{daemon_log}");
    assert_eq!(
        line_after(&console, "APP: "),
        format!("20000 {numbers}/share/numbers")
    );
    let mut want: Vec<&str> = closure.iter().map(|p| basename(p)).collect();
    want.sort();
    let mut listed: Vec<&str> = line_after(&console, "LIST: ").split_whitespace().collect();
    listed.sort();
    assert_eq!(listed, want, "--list-root lists exactly the closure");
    assert_eq!(line_after(&console, "OUTSIDE: "), "absent");
    assert!(
        line_after(&console, "CAT: ").contains("No such file"),
        "{console}"
    );
    assert!(daemon_log.contains(&format!(
        "serving a closure of {} store paths",
        closure.len()
    )));
    let st = wait_exit(&mut daemon, Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "{daemon_log}");
}

/// `mount --closure-file`: what the file names (and references) is there,
/// the rest is absent; on SIGHUP the file is read again, and a path added
/// to it appears (a file the old one had no longer names stays absent).
#[test]
fn a_closure_file_is_read_again_on_sighup() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        eprintln!("!!! SKIPPING CLOSURE MOUNT TEST: cannot open /dev/fuse !!!");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("local://{}", tmp.path().join("store").display());
    let a = import(&store, tmp.path(), "a", "a\n");
    let b = import(&store, tmp.path(), "b", "b\n");
    let c = import(&store, tmp.path(), "c", "c\n");
    let list = tmp.path().join("closure");
    std::fs::write(&list, format!("# the VM's roots\n{a}\n{}\n", basename(&b))).unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut child = std::process::Command::new(common::bin())
        .args([
            "--store",
            &store,
            "mount",
            mnt.to_str().unwrap(),
            "--list-root",
        ])
        .arg("--closure-file")
        .arg(&list)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ls = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&mnt)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while ls().len() != 2 {
        assert!(
            Instant::now() < deadline,
            "mount did not list the closure: {:?}",
            ls()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut want = vec![basename(&a).to_string(), basename(&b).to_string()];
    want.sort();
    assert_eq!(ls(), want);
    let read = |p: &str| std::fs::read_to_string(mnt.join(basename(p)));
    assert_eq!(read(&a).unwrap(), "a\n");
    let e = read(&c).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "outside the closure");

    // a new file (written aside, renamed over), then SIGHUP
    let next = tmp.path().join("closure.new");
    std::fs::write(&next, format!("{a}\n{c}\n")).unwrap();
    std::fs::rename(&next, &list).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let mut want = vec![basename(&a).to_string(), basename(&c).to_string()];
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ls() != want {
        assert!(Instant::now() < deadline, "SIGHUP did not take: {:?}", ls());
        std::thread::sleep(Duration::from_millis(100));
    }
    // the negative entry the kernel kept for c lasts a second
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match read(&c) {
            Ok(t) => {
                assert_eq!(t, "c\n");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "c after SIGHUP: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // a bad file keeps the closure served
    std::fs::write(&list, "not a store path\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ls(), want, "a bad closure file changed the view");
    assert!(child.try_wait().unwrap().is_none(), "the mount died");

    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = wait_exit(&mut child, Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()));
}
