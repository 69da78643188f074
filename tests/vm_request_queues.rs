//! More than one request queue, in a real guest: Linux 6.11+ spreads FUSE
//! requests over a virtio-fs device's request queues, one per CPU. A
//! Debian 12 6.12 guest (the mmap test's kernel; this binary shares its
//! guest cache) with 2 vCPUs on 2 request queues (QEMU's
//! `num-request-queues=2`, the daemon's `--request-queues 2`) reads a tree
//! from two readers pinned one to each CPU; what they read is the tree,
//! byte for byte, and the daemon's log shows both queues served, each by
//! its own vring thread.
mod common;

use common::vm::{line_after, require_vm_tools, run_vm, wait_exit, VmOpts};
use common::{cli_ok, pseudo_random, require_tools, sh};
use std::time::Duration;

#[test]
fn two_vcpus_read_through_two_request_queues() {
    require_vm_tools();
    require_tools(&[("apt-cache", "apt"), ("md5sum", "coreutils")]);
    let pkg = sh("apt-cache pkgnames linux-image-6.12 | grep -E '^linux-image-6\\.12\\.[0-9]+\\+deb12-amd64-unsigned$' | sort -V | tail -n1")
        .trim()
        .to_string();
    assert!(
        !pkg.is_empty(),
        "no Debian 12 linux-image-6.12 package known to apt (bookworm-security): cannot boot a \
         kernel that spreads requests over request queues"
    );
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let root = t.join("tree");
    for i in 0..240u64 {
        let dir = root.join(format!("d{}", i % 8));
        std::fs::create_dir_all(&dir).unwrap();
        let len = 1_000 + (i as usize * 997) % 60_000;
        std::fs::write(dir.join(format!("f{i:03}")), pseudo_random(len, 900 + i)).unwrap();
    }
    // what either half of the files sums to, on the host
    let host_sum = sh(&format!(
        "cd {} && find . -type f | sort > /tmp/list.$$ && \
         (head -n 120 /tmp/list.$$ | xargs md5sum; tail -n +121 /tmp/list.$$ | xargs md5sum) \
         | md5sum | cut -d' ' -f1; rm -f /tmp/list.$$",
        root.display()
    ))
    .trim()
    .to_string();
    let store = format!("local://{}", t.join("store").display());
    let path = String::from_utf8(cli_ok(&[
        "--store",
        &store,
        "import",
        root.to_str().unwrap(),
    ]))
    .unwrap()
    .trim()
    .to_string();
    std::env::set_var("VMTEST_CACHE", "/var/tmp/tvix-vmtest-6.12");
    std::env::set_var("VMTEST_KERNEL_PKG", &pkg);
    let guest = format!(
        "cd {path}\n\
         echo \"CPUS: $(nproc)\"\n\
         find . -type f | sort > /tmp/list\n\
         head -n 120 /tmp/list | taskset 1 xargs md5sum > /tmp/a &\n\
         tail -n +121 /tmp/list | taskset 2 xargs md5sum > /tmp/b &\n\
         wait\n\
         echo \"SUM: $(cat /tmp/a /tmp/b | md5sum | cut -d' ' -f1)\"\n\
         uname -r | sed 's/^/KERNEL: /'\n\
         exit 7\n"
    );
    let sock = t.join("vfs.sock");
    let log = t.join("vfs.log");
    let mut d = common::spawn_virtiofs(&store, &sock, &log, &["--request-queues", "2"]);
    common::wait_for_socket_file(&sock);
    let (status, console) = run_vm(
        Some("qemu"),
        &sock,
        &guest,
        t,
        VmOpts {
            args: &["--smp", "2", "--request-queues", "2"],
            timeout_secs: 600,
            on_line: None,
        },
    );
    assert!(
        wait_exit(&mut d, Duration::from_secs(20)).is_some_and(|s| s.success()),
        "the daemon exits 0 when its VMM goes"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status, 7, "{console}\n{text}");
    assert!(
        line_after(&console, "KERNEL: ").starts_with("6.12"),
        "{console}"
    );
    assert_eq!(line_after(&console, "CPUS: "), "2", "{console}");
    assert_eq!(
        line_after(&console, "SUM: "),
        host_sum,
        "the tree, byte for byte"
    );
    let line = text
        .lines()
        .find(|l| l.contains("requests served per request queue:"))
        .unwrap_or_else(|| panic!("no per-queue count in the log: {text}"));
    let count = |q: &str| -> u64 {
        let rest = &line[line
            .find(&format!("queue {q}: "))
            .unwrap_or_else(|| panic!("{line}"))
            + format!("queue {q}: ").len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    assert!(
        count("1") > 0 && count("2") > 0,
        "both queues served: {line}"
    );
}
