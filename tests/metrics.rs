//! Metrics a fleet scrapes: a QEMU guest reads through a per-VM `virtiofs`
//! daemon (`--metrics-socket`) whose store is a gRPC `daemon`
//! (`--metrics-listen`); both are scraped while the guest runs and their
//! counters move with its reads: FUSE requests by opcode, bytes read,
//! errors by errno, inodes and handles, store calls, gRPC calls by method.
mod common;

use common::vm::{require_vm_tools, run_vm, wait_exit, VmOpts};
use common::{cli_ok, Daemon};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// `GET /metrics` over a unix socket: the body.
fn scrape_unix(sock: &Path) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// A sample's value, 0 when absent (a counter not yet moved).
fn value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[test]
fn counters_move_with_a_guests_reads() {
    require_vm_tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let backing = format!("local://{}", t.join("backing").display());
    let f = t.join("data");
    std::fs::write(&f, common::pseudo_random(300_000, 1)).unwrap();
    let path = String::from_utf8(cli_ok(&[
        "--store",
        &backing,
        "import",
        f.to_str().unwrap(),
    ]))
    .unwrap()
    .trim()
    .to_string();
    let daemon_metrics = format!("127.0.0.1:{}", common::free_port());
    let d = Daemon::start(
        &backing,
        &format!("unix:{}", t.join("d.sock").display()),
        &["--metrics-listen", &daemon_metrics],
    );
    let sock = t.join("vfs.sock");
    let msock = t.join("vfs-metrics.sock");
    let log = t.join("vfs.log");
    let mut vfs = common::spawn_virtiofs(
        &d.addr,
        &sock,
        &log,
        &["--metrics-socket", msock.to_str().unwrap()],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() || !msock.exists() {
        assert!(Instant::now() < deadline, "no sockets");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = scrape_unix(&msock);
    assert_eq!(value(&before, "tvix_virtiofsd_read_bytes_total"), 0.0);
    let daemon_before = common::scrape_metrics(&daemon_metrics);

    let absent = format!("/nix/store/{}-absent", "0".repeat(32));
    let guest = format!(
        "cat {path} | wc -c | sed 's/^/SIZE: /'\n\
         cat {absent} 2>/dev/null; echo SCRAPE-NOW\n\
         sleep 3\n\
         exit 7\n"
    );
    let mut during = None;
    let mut on_line = |line: &str| {
        if line.contains("SCRAPE-NOW") && during.is_none() {
            during = Some((scrape_unix(&msock), common::scrape_metrics(&daemon_metrics)));
        }
    };
    let (status, console) = run_vm(
        Some("qemu"),
        &sock,
        &guest,
        t,
        VmOpts {
            on_line: Some(&mut on_line),
            ..Default::default()
        },
    );
    assert_eq!(status, 7, "{}", std::fs::read_to_string(&log).unwrap());
    assert!(console.contains("SIZE: 300000"), "{console}");
    let (vm, dm) = during.expect("scraped while the guest ran");

    // the per-VM daemon
    for op in ["lookup", "open", "read", "init"] {
        let n = value(
            &vm,
            &format!("tvix_virtiofsd_fuse_request_seconds_count{{op=\"{op}\"}}"),
        );
        assert!(n >= 1.0, "no {op} counted:\n{vm}");
    }
    assert!(
        value(&vm, "tvix_virtiofsd_read_bytes_total") >= 300_000.0,
        "{vm}"
    );
    // an absent name is a negative entry, not an error; the guest
    // kernel's FLUSH, which a read-only view does not implement, is one
    let errors: f64 = vm
        .lines()
        .filter(|l| l.starts_with("tvix_virtiofsd_fuse_errors_total{errno="))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    assert!(errors >= 1.0, "no error counted:\n{vm}");
    assert!(value(&vm, "tvix_virtiofsd_inodes") >= 1.0, "{vm}");
    assert!(
        value(&vm, "tvix_virtiofsd_store_call_seconds_count") >= 2.0,
        "path info and blob at least:\n{vm}"
    );
    assert!(
        vm.contains("tvix_virtiofsd_fuse_request_seconds_bucket{op=\"read\",le=\"+Inf\"}"),
        "{vm}"
    );
    // the gRPC daemon behind it
    for m in [
        "tvix.store.v1.PathInfoService/Get",
        "tvix.castore.v1.BlobService/Read",
    ] {
        let sample = format!("tvix_virtiofsd_grpc_call_seconds_count{{method=\"{m}\"}}");
        assert!(
            value(&dm, &sample) > value(&daemon_before, &sample),
            "{m} did not move:\n{dm}"
        );
    }
    assert!(wait_exit(&mut vfs, Duration::from_secs(20)).is_some_and(|s| s.success()));
    assert!(d.stop().success());
}
