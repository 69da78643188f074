//! What a blob larger than any buffer costs a store daemon over a bucket
//! (a real three-node Garage cluster): uploaded in parts while it is
//! hashed, fetched into a spool file while it is checked, so the daemon's
//! peak memory does not follow the blob's size in either direction.
mod common;

use common::garage::Garage;
use common::{bin, cli_ok, pseudo_random, status_bytes};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The blob: larger than the daemon may hold.
const BLOB: usize = 192 << 20;
/// The daemon's peak resident memory may not pass this.
const PEAK: u64 = 128 << 20;

#[test]
fn a_store_daemon_over_the_bucket_holds_a_large_blob_in_neither_direction() {
    let garage = Garage::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("big-tree");
    std::fs::create_dir(&src).unwrap();
    let mut f = std::fs::File::create(src.join("big")).unwrap();
    for i in 0..(BLOB >> 20) {
        f.write_all(&pseudo_random(1 << 20, 2 * i as u64 + 1))
            .unwrap();
    }
    drop(f);
    let store = format!(
        "s3://{}/bounds?endpoint={}&region=garage",
        garage.bucket(),
        garage.endpoint(0)
    );
    let sock = tmp.path().join("daemon.sock");
    let mut daemon = Command::new(bin())
        .envs(garage.env())
        .args([
            "--store",
            &store,
            "daemon",
            "--min-free-space",
            "16M",
            "--listen",
        ])
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "the daemon does not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr = format!("grpc+unix://{}", sock.display());
    let path = String::from_utf8(cli_ok(&["--store", &addr, "import", src.to_str().unwrap()]))
        .unwrap()
        .trim()
        .to_string();
    let after_upload = status_bytes(daemon.id(), "VmHWM");
    let nar = Command::new(bin())
        .args(["--store", &addr, "nar", &path])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(nar.status.success(), "nar through the daemon failed");
    assert!(
        nar.stdout.len() > BLOB,
        "a NAR of {} bytes",
        nar.stdout.len()
    );
    // Nix's own NAR of the same tree: the bytes came back whole and right.
    let dump = Command::new("nix-store")
        .arg("--dump")
        .arg(&src)
        .output()
        .expect("nix-store (nix-bin) is needed");
    assert!(dump.status.success());
    assert!(
        nar.stdout == dump.stdout,
        "the NAR differs from nix-store --dump's"
    );
    let after_read = status_bytes(daemon.id(), "VmHWM");
    let _ = daemon.kill();
    let _ = daemon.wait();
    eprintln!(
        "daemon peak RSS: {} MiB after a {} MiB upload, {} MiB after reading it back",
        after_upload >> 20,
        BLOB >> 20,
        after_read >> 20
    );
    assert!(after_upload > 0, "no VmHWM read");
    assert!(
        after_read < PEAK,
        "the daemon's peak RSS reached {} MiB for a {} MiB blob",
        after_read >> 20,
        BLOB >> 20
    );
}
