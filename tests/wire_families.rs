//! tvix and snix names on the wire. Our daemon answering only one family
//! (the hidden `--wire-families`) is read and written by our client, which
//! is not told which: import, import-nar, copy, nar, path-info, a daemon
//! in front of it, a FUSE mount and a microVM through `virtiofs`. Pinning
//! the other family (`?wire=`) fails with a message that says so.
mod common;

use common::vm::{
    closure_of, fixture_app, fixture_data, line_after, require_vm_tools, run_vm, wait_exit, VmOpts,
};
use common::{cli_err, cli_ok, Daemon};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap().trim().to_string()
}

fn every_command_against(family: &str) {
    require_vm_tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let backing = format!("local://{}", t.join("backing").display());
    let d = Daemon::start_with(
        &backing,
        &format!("unix:{}", t.join("d.sock").display()),
        &["--wire-families", family],
    );
    let store = d.addr.clone();

    // writes: import, import-nar (a NAR and path info made by a local store), copy
    let dir = t.join("tree");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/file"), "through the other names\n").unwrap();
    let imported = text(cli_ok(&[
        "--store",
        &store,
        "import",
        dir.to_str().unwrap(),
    ]));
    let local = format!("local://{}", t.join("local").display());
    let f = t.join("single");
    std::fs::write(&f, "a single file\n").unwrap();
    let single = text(cli_ok(&["--store", &local, "import", f.to_str().unwrap()]));
    let nar = t.join("single.nar");
    std::fs::write(&nar, cli_ok(&["--store", &local, "nar", &single])).unwrap();
    let info = t.join("single.json");
    std::fs::write(
        &info,
        cli_ok(&["--store", &local, "path-info", "--json", &single]),
    )
    .unwrap();
    cli_ok(&[
        "--store",
        &store,
        "import-nar",
        "--path-info",
        info.to_str().unwrap(),
        &format!("{single}={}", nar.display()),
    ]);
    let app = fixture_app();
    let closure = closure_of(&[&app]);
    cli_ok(&["--store", &store, "copy", &app]);

    // reads: nar, path-info, and both through a daemon in front of it
    assert_eq!(
        cli_ok(&["--store", &store, "nar", &single]),
        std::fs::read(&nar).unwrap()
    );
    let infos = text(cli_ok(&[
        "--store",
        &store,
        "path-info",
        &imported,
        &single,
    ]));
    assert!(
        infos.contains(&imported) && infos.contains(&single),
        "{infos}"
    );
    let front = Daemon::start(
        &store,
        &format!("unix:{}", t.join("front.sock").display()),
        &[],
    );
    let through = text(cli_ok(&["--store", &front.addr, "path-info", &app]));
    assert!(through.starts_with(&app), "{through}");
    drop(front);

    // a pinned wrong family says what to do
    let other = if family == "tvix" { "snix" } else { "tvix" };
    let err = cli_err(&[
        "--store",
        &format!("{store}?wire={other}"),
        "path-info",
        &single,
    ]);
    assert!(err.contains("?wire="), "{err}");

    // a FUSE mount
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok()
    {
        let mnt = t.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mut m = Command::new(common::bin())
            .args(["--store", &store, "mount", mnt.to_str().unwrap()])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let file = mnt
            .join(imported.strip_prefix("/nix/store/").unwrap())
            .join("sub/file");
        let deadline = Instant::now() + Duration::from_secs(20);
        let got = loop {
            match std::fs::read_to_string(&file) {
                Ok(s) => break s,
                Err(e) => assert!(Instant::now() < deadline, "{}: {e}", file.display()),
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(got, "through the other names\n");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(m.id() as i32, libc::SIGTERM) };
        assert!(wait_exit(&mut m, Duration::from_secs(20)).is_some_and(|s| s.success()));
    } else {
        eprintln!("!!! SKIPPING the FUSE part: cannot open /dev/fuse !!!");
    }

    // a microVM through virtiofs
    let sock = t.join("vfs.sock");
    let log = t.join("vfs.log");
    let mut vfs = common::spawn_virtiofs(&store, &sock, &log, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let guest = format!("echo \"APP: $({app}/bin/app)\"\nexit 7\n");
    let (status, console) = run_vm(Some("qemu"), &sock, &guest, t, VmOpts::default());
    assert_eq!(status, 7, "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(
        line_after(&console, "APP: "),
        format!("20000 {}/share/numbers", fixture_data(&closure))
    );
    assert!(wait_exit(&mut vfs, Duration::from_secs(20)).is_some_and(|s| s.success()));
    assert!(d.stop().success());
}

#[test]
fn a_snix_only_store_is_used_in_every_command() {
    every_command_against("snix");
}

#[test]
fn a_tvix_only_store_is_used_in_every_command() {
    every_command_against("tvix");
}
