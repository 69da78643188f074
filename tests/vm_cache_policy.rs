//! `--cache` in a real QEMU guest (see vm-tests/README.md): with `never`
//! reading a file leaves no data pages in the guest's page cache (so many
//! guests on one host do not each hold a copy of the store), with `always`
//! it does; and with `never` a dynamically linked program runs from the
//! store (its loader maps itself and libc out of direct-I/O files).
mod common;

use common::cli_ok;
use common::vm::{line_after, require_vm_tools, run_vm, wait_exit, VmOpts};
use std::path::Path;
use std::time::Duration;

/// A store path holding Debian's sha256sum with its loader and libc, as
/// bin/ and lib/ (run as `lib/ld-linux-x86-64.so.2 --library-path lib
/// bin/sha256sum`).
fn dynamic_program(store: &str, dir: &Path) -> String {
    let root = dir.join("dyn");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("lib")).unwrap();
    for (from, to) in [
        ("/usr/bin/sha256sum", "bin/sha256sum"),
        ("/lib64/ld-linux-x86-64.so.2", "lib/ld-linux-x86-64.so.2"),
        ("/lib/x86_64-linux-gnu/libc.so.6", "lib/libc.so.6"),
    ] {
        std::fs::copy(std::fs::canonicalize(from).unwrap(), root.join(to)).unwrap();
    }
    String::from_utf8(cli_ok(&[
        "--store",
        store,
        "import",
        root.to_str().unwrap(),
    ]))
    .unwrap()
    .trim()
    .to_string()
}

#[test]
fn never_keeps_no_data_pages_and_programs_still_run() {
    require_vm_tools();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = format!("local://{}", t.join("store").display());
    let dynp = dynamic_program(&store, t);
    let data = common::pseudo_random(8 << 20, 1);
    let f = t.join("big");
    std::fs::write(&f, &data).unwrap();
    let big = String::from_utf8(cli_ok(&["--store", &store, "import", f.to_str().unwrap()]))
        .unwrap()
        .trim()
        .to_string();
    let want_sum = {
        use sha2::Digest;
        data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(&data))
    };
    let guest = format!(
        "cached() {{ awk '/^Cached:/ {{ print $2 }}' /proc/meminfo; }}\n\
         c0=$(cached)\n\
         cat {big} > /dev/null\n\
         c1=$(cached)\n\
         echo \"GREW: $((c1 - c0))\"\n\
         echo \"DYN: $({dynp}/lib/ld-linux-x86-64.so.2 --library-path {dynp}/lib {dynp}/bin/sha256sum {big})\"\n\
         exit 7\n"
    );
    for policy in ["never", "always"] {
        let sock = t.join(format!("{policy}.sock"));
        let log = t.join(format!("{policy}.log"));
        let mut d = common::spawn_virtiofs(&store, &sock, &log, &["--cache", policy]);
        common::wait_for_socket_file(&sock);
        let (status, console) = run_vm(Some("qemu"), &sock, &guest, t, VmOpts::default());
        assert_eq!(
            status,
            7,
            "{policy}: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        let grew: i64 = line_after(&console, "GREW: ").parse().unwrap();
        let sum = line_after(&console, "DYN: ");
        assert!(
            sum.starts_with(&want_sum),
            "{policy}: the program printed {sum:?}"
        );
        match policy {
            "never" => assert!(grew < 2048, "never: the page cache grew {grew} KiB"),
            _ => assert!(
                grew >= 7 * 1024,
                "always: the page cache grew only {grew} KiB"
            ),
        }
        eprintln!("--cache {policy}: guest page cache grew {grew} KiB reading 8 MiB");
        assert!(wait_exit(&mut d, Duration::from_secs(20)).is_some_and(|s| s.success()));
    }
}
