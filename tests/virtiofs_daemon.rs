//! `tvix-virtiofsd virtiofs` as a process, without a VM: capabilities,
//! socket creation and permissions, stale sockets, bad flags, SIGTERM.
mod common;

use common::bin;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_for_socket(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "socket {} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn print_capabilities_needs_no_store() {
    let out = Command::new(bin())
        .args([
            "--store",
            "grpc+unix:///nonexistent.sock",
            "virtiofs",
            "--print-capabilities",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "fs");
}

#[test]
fn socket_lifecycle_and_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("vfs.sock");
    // a stale socket from a dead daemon is replaced
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let stale_ino = std::fs::metadata(&sock).unwrap().ino();
    let mut child = Command::new(bin())
        .args([
            "--store",
            "memory://",
            "virtiofs",
            "--socket-path",
            sock.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // the stale file is replaced by the daemon's socket (a new inode; a
    // connect alone could reach the stale one while a child that another
    // test forks still holds its listener before exec)
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&sock).map(|m| m.ino()).ok() == Some(stale_ino) {
        assert!(Instant::now() < deadline, "stale socket not replaced");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for_socket(&sock);
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "exit status {st}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn bad_flags_and_paths_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let long_tag = "x".repeat(37);
    let out = Command::new(bin())
        .args(["--store", "memory://", "virtiofs", "--socket-path"])
        .arg(tmp.path().join("a.sock"))
        .args(["--tag", &long_tag])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("36"));
    // a regular file where the socket should go is not deleted
    let f = tmp.path().join("not-a-socket");
    std::fs::write(&f, b"keep me").unwrap();
    let out = Command::new(bin())
        .args(["--store", "memory://", "virtiofs", "--socket-path"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
}
