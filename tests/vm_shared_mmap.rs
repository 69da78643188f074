//! Shared mappings of direct-I/O files, in a real guest whose kernel
//! offers FUSE_DIRECT_IO_ALLOW_MMAP: Debian 12's 6.12 kernel (from
//! bookworm-security; the other VM tests boot 6.1, which does not offer
//! it). With `--cache never` a static program maps a store file
//! MAP_SHARED and reads it, which needs the flag the daemon grants.
//! (Own test binary: it points vm-tests at its own guest cache.)
mod common;

use common::vm::{line_after, require_vm_tools, run_vm, wait_exit, VmOpts};
use common::{cli_ok, require_tools, sh};
use std::time::Duration;

const MMAP_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { printf("MMAP: open %s\n", strerror(errno)); return 1; }
    struct stat st;
    fstat(fd, &st);
    unsigned char *p = mmap(0, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { printf("MMAP: shared %s\n", strerror(errno)); return 1; }
    unsigned long sum = 0;
    for (off_t i = 0; i < st.st_size; i++) sum = sum * 31 + p[i];
    printf("MMAP: ok %lu\n", sum);
    return 0;
}
"#;

#[test]
fn a_shared_mapping_of_a_direct_io_file_works_where_the_kernel_offers_it() {
    require_vm_tools();
    require_tools(&[("gcc", "gcc"), ("apt-cache", "apt")]);
    let pkg = sh("apt-cache pkgnames linux-image-6.12 | grep -E '^linux-image-6\\.12\\.[0-9]+\\+deb12-amd64-unsigned$' | sort -V | tail -n1")
        .trim()
        .to_string();
    assert!(
        !pkg.is_empty(),
        "no Debian 12 linux-image-6.12 package known to apt (bookworm-security): cannot boot a \
         kernel that offers FUSE_DIRECT_IO_ALLOW_MMAP"
    );
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // the program, static, in a store path with a file to map
    let root = t.join("mmap");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(t.join("mm.c"), MMAP_C).unwrap();
    sh(&format!(
        "gcc -static -O2 -o {} {}",
        root.join("bin/mm").display(),
        t.join("mm.c").display()
    ));
    let data = common::pseudo_random(3 << 20, 5);
    std::fs::write(root.join("data"), &data).unwrap();
    let want = data
        .iter()
        .fold(0u64, |s, &b| s.wrapping_mul(31).wrapping_add(u64::from(b)));
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
    // this binary's own guest cache, with the 6.12 kernel
    std::env::set_var("VMTEST_CACHE", "/var/tmp/tvix-vmtest-6.12");
    std::env::set_var("VMTEST_KERNEL_PKG", &pkg);
    let guest = format!("{path}/bin/mm {path}/data\nuname -r | sed 's/^/KERNEL: /'\nexit 7\n");
    for (policy, want_line) in [
        ("never", format!("ok {want}")),
        ("always", format!("ok {want}")),
    ] {
        let sock = t.join(format!("{policy}.sock"));
        let log = t.join(format!("{policy}.log"));
        let mut d = common::spawn_virtiofs(&store, &sock, &log, &["--cache", policy]);
        common::wait_for_socket_file(&sock);
        let (status, console) = run_vm(Some("qemu"), &sock, &guest, t, VmOpts::default());
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(status, 7, "{policy}: {text}");
        assert!(
            line_after(&console, "KERNEL: ").starts_with("6.12"),
            "{console}"
        );
        assert_eq!(
            line_after(&console, "MMAP: "),
            want_line,
            "--cache {policy}: {text}"
        );
        if policy == "never" {
            assert!(text.contains("granted DIRECT_IO_ALLOW_MMAP"), "{text}");
        }
        assert!(wait_exit(&mut d, Duration::from_secs(20)).is_some_and(|s| s.success()));
    }
}
