//! What a blob larger than any buffer costs over a bucket (a real
//! three-node Garage cluster): a store daemon uploads it in parts while it
//! is hashed and streams it back leaf by leaf, so its peak memory does not
//! follow the blob's size in either direction; and a page read through a
//! FUSE mount over the bucket fetches one checked leaf, not the blob.
mod common;

use common::garage::Garage;
use common::{bin, cli_ok, pseudo_random, status_bytes};
use std::io::{Read, Seek, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// Relays TCP to `upstream` (`http://HOST:PORT`) on threads; answers its
/// own `http://` address and the count of bytes sent back to clients.
fn counting_relay(upstream: &str) -> (String, Arc<AtomicU64>) {
    let up = upstream.trim_start_matches("http://").to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let down = Arc::new(AtomicU64::new(0));
    let count = down.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(&up) else {
                continue;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            let (mut client, mut server, count) = (client, server, count.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = server.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (format!("http://{addr}"), down)
}

#[test]
fn a_page_of_a_large_file_through_a_mount_over_the_bucket_fetches_one_leaf() {
    if !common::fuse_available("a FUSE mount over the bucket") {
        return;
    }
    let garage = Garage::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("tree");
    std::fs::create_dir(&src).unwrap();
    let big: Vec<u8> = (0..24u64)
        .flat_map(|i| pseudo_random(1 << 20, 1000 + i))
        .collect();
    std::fs::write(src.join("big"), &big).unwrap();
    let store = |endpoint: &str| {
        format!(
            "s3://{}/pages?endpoint={endpoint}&region=garage",
            garage.bucket()
        )
    };
    let import = Command::new(bin())
        .envs(garage.env())
        .args(["--store", &store(&garage.endpoint(0)), "import"])
        .arg(&src)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(import.status.success(), "import into the bucket failed");
    let path = String::from_utf8(import.stdout).unwrap().trim().to_string();
    let name = path.trim_start_matches("/nix/store/").to_string();

    let (relay, down) = counting_relay(&garage.endpoint(1));
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(bin())
        .envs(garage.env())
        .args(["--store", &store(&relay), "mount"])
        .arg(&mnt)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::is_mounted(&mnt) {
        assert!(Instant::now() < deadline, "mount did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    let file = mnt.join(&name).join("big");
    let result = std::panic::catch_unwind(|| {
        let mut f = std::fs::File::open(&file).unwrap();
        assert_eq!(f.metadata().unwrap().len(), big.len() as u64);
        let before = down.load(Ordering::Relaxed);
        let off = (17 << 20) + 12_288;
        f.seek(std::io::SeekFrom::Start(off as u64)).unwrap();
        let mut page = vec![0u8; 4096];
        f.read_exact(&mut page).unwrap();
        assert!(page == big[off..off + 4096], "the page differs");
        let fetched = down.load(Ordering::Relaxed) - before;
        eprintln!("one page of a 24 MiB file moved {fetched} bytes from the bucket");
        assert!(
            fetched < 3 << 20,
            "one page of a 24 MiB file moved {fetched} bytes from the bucket"
        );
        drop(f);
        assert!(std::fs::read(&file).unwrap() == big, "the file differs");
    });
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
