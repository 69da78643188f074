//! The systemd units in `systemd/`: checked with systemd's own tools
//! offline (`systemd-analyze verify` and `security --offline`, no running
//! systemd needed), then run for real. A microVM boots against a daemon
//! that `systemd-socket-activate` starts with the unit's command line on
//! the VMM's first connection, and the shipped units, unchanged, serve
//! microVM boots under a real systemd booted in `systemd-nspawn`.
mod common;

use common::vm::{
    closure_of, copy_paths, fixture_app, fixture_data, host_digest, line_after, run_vm, wait_exit,
    VmOpts, DIGEST_SCRIPT, NIX, QEMU,
};
use common::{bin, cli_ok, free_port, metric, require_tools, scrape_metrics, sh};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the unit files ship; every unit there is checked.
fn units_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// The path the units name the binary by (their install location).
const INSTALLED_BIN: &str = "/usr/bin/tvix-virtiofsd";

const VIRTIOFS_SERVICE: &str = "tvix-virtiofsd@.service";
const STORE_SERVICE: &str = "tvix-store-daemon.service";
const CACHE_SERVICE: &str = "tvix-store-cache.service";

fn require_systemd_analyze() {
    require_tools(&[("systemd-analyze", "systemd")]);
}

/// The unit files shipped in `systemd/`, by file name.
fn shipped_units() -> Vec<String> {
    let mut units: Vec<String> = std::fs::read_dir(units_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".service") || n.ends_with(".socket"))
        .collect();
    units.sort();
    assert!(
        units.len() >= 6,
        "expected the virtiofs, store daemon and host cache units in systemd/, found {units:?}"
    );
    units
}

/// The name a unit is checked as: a template gets the instance `vm1`.
fn instance(unit: &str) -> String {
    unit.replacen("@.", "@vm1.", 1)
}

fn read_unit(unit: &str) -> String {
    std::fs::read_to_string(units_dir().join(unit)).unwrap()
}

/// Copies the units into `dir` with the binary under test in place of the
/// installed path (verify checks that ExecStart= is executable), applying
/// `edit` to the text of each.
fn stage_units(dir: &Path, edit: impl Fn(&str, String) -> String) {
    for unit in shipped_units() {
        let text = read_unit(&unit);
        if unit.ends_with(".service") {
            assert!(
                text.contains(&format!("\nExecStart={INSTALLED_BIN} ")),
                "{unit}: ExecStart= does not run {INSTALLED_BIN}"
            );
        }
        let text = text.replace(INSTALLED_BIN, bin().to_str().unwrap());
        std::fs::write(dir.join(&unit), edit(&unit, text)).unwrap();
    }
}

/// `systemd-analyze verify` of the staged units (templates as instance
/// `vm1`): its exit status and everything it printed. Unknown or
/// unparsable directives are only warnings (exit 0), so callers require the
/// output to be empty as well.
fn verify(dir: &Path, units: &[String]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(units.iter().map(|u| dir.join(instance(u))))
        .env("SYSTEMD_LOG_LEVEL", "info")
        .env("SYSTEMD_LOG_COLOR", "0")
        .env_remove("SYSTEMD_UNIT_PATH")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Inserts `line` right after the first line of `text` that is `section`.
fn insert_after(text: &str, section: &str, line: &str) -> String {
    let at = text
        .find(&format!("\n{section}\n"))
        .unwrap_or_else(|| panic!("no {section} section"))
        + section.len()
        + 2;
    format!("{}{line}\n{}", &text[..at], &text[at..])
}

/// Every unit loads cleanly: no unknown or misspelt directive, no value
/// systemd cannot parse, every referenced unit found, every command
/// executable. The same check is then shown to catch a misspelt directive
/// and a missing binary in each unit, so a silent verifier cannot pass it.
#[test]
fn units_pass_systemd_analyze_verify() {
    require_systemd_analyze();
    let units = shipped_units();

    let good = tempfile::tempdir().unwrap();
    stage_units(good.path(), |_, t| t);
    let (ok, out) = verify(good.path(), &units);
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify {units:?} complained:\n{out}"
    );

    for unit in &units {
        let bad = tempfile::tempdir().unwrap();
        stage_units(bad.path(), |u, t| {
            if u == unit {
                insert_after(&t, "[Unit]", "Descripton=misspelt")
            } else {
                t
            }
        });
        let (_, out) = verify(bad.path(), std::slice::from_ref(unit));
        assert!(
            out.contains("Descripton"),
            "verify did not report a misspelt directive in {unit}:\n{out}"
        );
    }
    for unit in units.iter().filter(|u| u.ends_with(".service")) {
        let bad = tempfile::tempdir().unwrap();
        stage_units(bad.path(), |u, t| {
            if u == unit {
                t.replace(bin().to_str().unwrap(), "/nonexistent/tvix-virtiofsd")
            } else {
                t
            }
        });
        let (ok, out) = verify(bad.path(), std::slice::from_ref(unit));
        assert!(
            !ok && out.contains("/nonexistent/tvix-virtiofsd"),
            "verify accepted {unit} with a missing binary:\n{out}"
        );
    }
}

/// `systemd-analyze security --offline` of a staged unit: each check's
/// JSON name and whether the unit restricts it.
fn security(dir: &Path, unit: &str, threshold: u32) -> (bool, Vec<(String, Option<bool>)>) {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--json=short", "--no-pager"])
        .arg(format!("--threshold={threshold}"))
        .arg(dir.join(instance(unit)))
        .env("SYSTEMD_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "systemd-analyze security {unit}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = checks
        .iter()
        .map(|c| {
            (
                c["json_field"].as_str().unwrap().to_string(),
                c["set"].as_bool(),
            )
        })
        .collect();
    (out.status.success(), checks)
}

fn assert_checks(unit: &str, checks: &[(String, Option<bool>)], want: bool, names: &[&str]) {
    for name in names {
        let got = checks
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("systemd-analyze security has no check {name}"))
            .1;
        assert_eq!(
            got,
            Some(want),
            "{unit}: {name} should be {}",
            if want {
                "restricted"
            } else {
                "left open (the sandbox needs it)"
            }
        );
    }
}

/// Restrictions every unit shares.
const COMMON_HARDENING: &[&str] = &[
    "NoNewPrivileges",
    "AmbientCapabilities",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "ProtectProc",
    "ProcSubset",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "SystemCallArchitectures",
    "RestrictNamespaces_user",
    "RestrictNamespaces_cgroup",
    "RestrictAddressFamilies_AF_PACKET",
    "RestrictAddressFamilies_AF_NETLINK",
    "RestrictAddressFamilies_OTHER",
    "CapabilityBoundingSet_CAP_DAC_FOWNER_IPC_OWNER",
    "CapabilityBoundingSet_CAP_CHOWN_FSETID_SETFCAP",
    "CapabilityBoundingSet_CAP_SYS_PTRACE",
    "CapabilityBoundingSet_CAP_SYS_MODULE",
    "CapabilityBoundingSet_CAP_SYS_RAWIO",
    "CapabilityBoundingSet_CAP_SYS_TIME",
    "CapabilityBoundingSet_CAP_SYS_BOOT",
    "CapabilityBoundingSet_CAP_NET_ADMIN",
    "CapabilityBoundingSet_CAP_MKNOD",
    "CapabilityBoundingSet_CAP_KILL",
    "CapabilityBoundingSet_CAP_BPF",
    "CapabilityBoundingSet_CAP_SYS_NICE_RESOURCE",
    "CapabilityBoundingSet_CAP_IPC_LOCK",
    "SystemCallFilter_module",
    "SystemCallFilter_raw_io",
    "SystemCallFilter_reboot",
    "SystemCallFilter_swap",
    "SystemCallFilter_debug",
    "SystemCallFilter_clock",
    "SystemCallFilter_obsolete",
    "SystemCallFilter_cpu_emulation",
];

/// systemd's own reading of the hardening: the virtiofs service keeps
/// exactly what the daemon's sandbox setup needs (CAP_SYS_ADMIN,
/// CAP_SETPCAP, CAP_SYS_CHROOT; mount, PID, IPC, UTS and network
/// namespaces; the @mount calls) and is restricted in everything else; the
/// store daemon keeps nothing of that, and the host cache daemon nothing
/// but the network it reaches the remote store over. Each stays under an
/// exposure score.
#[test]
fn hardening_leaves_exactly_what_the_sandbox_needs() {
    require_systemd_analyze();
    let dir = tempfile::tempdir().unwrap();
    stage_units(dir.path(), |_, t| t);

    let (under, checks) = security(dir.path(), VIRTIOFS_SERVICE, 35);
    assert_checks(VIRTIOFS_SERVICE, &checks, true, COMMON_HARDENING);
    assert_checks(
        VIRTIOFS_SERVICE,
        &checks,
        false,
        &[
            "CapabilityBoundingSet_CAP_SYS_ADMIN",
            "CapabilityBoundingSet_CAP_SET_UID_GID_PCAP",
            "CapabilityBoundingSet_CAP_SYS_CHROOT",
            "RestrictNamespaces_mnt",
            "RestrictNamespaces_pid",
            "RestrictNamespaces_ipc",
            "RestrictNamespaces_uts",
            "RestrictNamespaces_net",
            "SystemCallFilter_mount",
            // a grpc+http:// store is reached over TCP
            "RestrictAddressFamilies_AF_INET_INET6",
        ],
    );
    assert!(under, "{VIRTIOFS_SERVICE}: exposure above 3.5");

    let (under, checks) = security(dir.path(), STORE_SERVICE, 15);
    assert_checks(STORE_SERVICE, &checks, true, COMMON_HARDENING);
    assert_checks(
        STORE_SERVICE,
        &checks,
        true,
        &[
            "CapabilityBoundingSet_CAP_SYS_ADMIN",
            "CapabilityBoundingSet_CAP_SET_UID_GID_PCAP",
            "CapabilityBoundingSet_CAP_SYS_CHROOT",
            "RestrictNamespaces_mnt",
            "RestrictNamespaces_pid",
            "RestrictNamespaces_ipc",
            "RestrictNamespaces_uts",
            "RestrictNamespaces_net",
            "SystemCallFilter_mount",
            "SystemCallFilter_privileged",
            "SystemCallFilter_resources",
            "PrivateNetwork",
            "RestrictAddressFamilies_AF_INET_INET6",
        ],
    );
    assert!(under, "{STORE_SERVICE}: exposure above 1.5");

    let (under, checks) = security(dir.path(), CACHE_SERVICE, 20);
    assert_checks(CACHE_SERVICE, &checks, true, COMMON_HARDENING);
    assert_checks(
        CACHE_SERVICE,
        &checks,
        true,
        &[
            "CapabilityBoundingSet_CAP_SYS_ADMIN",
            "CapabilityBoundingSet_CAP_SET_UID_GID_PCAP",
            "CapabilityBoundingSet_CAP_SYS_CHROOT",
            "RestrictNamespaces_mnt",
            "RestrictNamespaces_pid",
            "RestrictNamespaces_ipc",
            "RestrictNamespaces_uts",
            "RestrictNamespaces_net",
            "SystemCallFilter_mount",
            "SystemCallFilter_privileged",
            "SystemCallFilter_resources",
            "UMask",
        ],
    );
    // the remote store is reached over TCP
    assert_checks(
        CACHE_SERVICE,
        &checks,
        false,
        &["PrivateNetwork", "RestrictAddressFamilies_AF_INET_INET6"],
    );
    assert!(under, "{CACHE_SERVICE}: exposure above 2.0");
}

/// The system calls in one `systemd-analyze syscall-filter` group, nested
/// groups expanded.
fn syscall_group(group: &str, out: &mut BTreeSet<String>) {
    let text = sh(&format!(
        "systemd-analyze syscall-filter --no-pager {group}"
    ));
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    assert_eq!(
        lines.next(),
        Some(group),
        "unexpected syscall-filter output"
    );
    for entry in lines.filter(|l| !l.starts_with('#')) {
        if entry.starts_with('@') {
            syscall_group(entry, out);
        } else {
            out.insert(entry.to_string());
        }
    }
}

/// The system calls a unit's SystemCallFilter= lines allow: the first
/// line is an allow list, later `~` lines take calls away.
fn allowed_syscalls(unit: &str) -> BTreeSet<String> {
    let mut allowed = BTreeSet::new();
    let mut first = true;
    for value in read_unit(unit)
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (deny, list) = match value.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        assert!(
            !(first && deny),
            "{unit}: SystemCallFilter= must start with an allow list"
        );
        first = false;
        let mut set = BTreeSet::new();
        for item in list.split_whitespace() {
            if item.starts_with('@') {
                syscall_group(item, &mut set);
            } else {
                set.insert(item.to_string());
            }
        }
        if deny {
            allowed.retain(|s| !set.contains(s));
        } else {
            allowed.extend(set);
        }
    }
    assert!(!allowed.is_empty(), "{unit} has no SystemCallFilter=");
    allowed
}

/// The virtiofs unit's system call allowlist has every call the sandbox
/// setup makes before its own, narrower seccomp policy takes over
/// (namespaces, mounts, pivot_root, chroot, capabilities, securebits and
/// no_new_privs through prctl, rlimits, seccomp itself, the forking parent
/// forwarding signals) and what serving needs; the store daemon's and the
/// host cache daemon's allow none of the privileged ones.
#[test]
fn syscall_filters_allow_the_sandbox_setup() {
    require_systemd_analyze();
    let virtiofs = allowed_syscalls(VIRTIOFS_SERVICE);
    let setup = [
        "unshare",
        "clone",
        "clone3",
        "fork",
        "wait4",
        "waitid",
        "kill",
        "rt_sigaction",
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "chdir",
        "mkdir",
        "mkdirat",
        "capget",
        "capset",
        "prctl",
        "setrlimit",
        "prlimit64",
        "seccomp",
    ];
    let serve = [
        "accept4",
        "recvmsg",
        "sendmsg",
        "socket",
        "connect",
        "eventfd2",
        "epoll_ctl",
        "epoll_wait",
        "mmap",
        "munmap",
        "madvise",
        "openat",
        "pread64",
        "preadv",
        "getdents64",
        "newfstatat",
        "statx",
        "futex",
        "exit_group",
    ];
    let missing: Vec<&str> = setup
        .iter()
        .chain(serve.iter())
        .copied()
        .filter(|s| !virtiofs.contains(*s))
        .collect();
    assert!(
        missing.is_empty(),
        "{VIRTIOFS_SERVICE}: SystemCallFilter= blocks {missing:?}"
    );

    for unit in [STORE_SERVICE, CACHE_SERVICE] {
        let store = allowed_syscalls(unit);
        let privileged: Vec<&str> = [
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "capset",
            "setuid",
            "setrlimit",
            "ptrace",
            "init_module",
            "reboot",
            "swapon",
            "settimeofday",
        ]
        .into_iter()
        .filter(|s| store.contains(*s))
        .collect();
        assert!(
            privileged.is_empty(),
            "{unit}: SystemCallFilter= allows {privileged:?}"
        );
        // writing the store or the cache; the cache also locks its
        // directory (flock) and marks what is used (utimensat)
        let needed: Vec<&str> = [
            "accept4",
            "openat",
            "renameat2",
            "fsync",
            "syncfs",
            "unlink",
            "getrandom",
            "futex",
            "epoll_wait",
            "flock",
            "utimensat",
            "statfs",
            "connect",
        ]
        .into_iter()
        .filter(|s| !store.contains(*s))
        .collect();
        assert!(
            needed.is_empty(),
            "{unit}: SystemCallFilter= blocks {needed:?}"
        );
    }
}

/// Each environment file example names only variables that its unit's
/// command line or the daemon itself reads, and the host cache's names
/// the remote store (which its unit requires).
#[test]
fn env_example_names_variables_that_are_read() {
    for (file, unit, command) in [
        ("tvix-virtiofsd.env.example", VIRTIOFS_SERVICE, "virtiofs"),
        ("tvix-store-cache.env.example", CACHE_SERVICE, "daemon"),
    ] {
        let example = std::fs::read_to_string(units_dir().join(file)).unwrap();
        let unit_text = read_unit(unit);
        let help = String::from_utf8(cli_ok(&[command, "--help"])).unwrap()
            + &String::from_utf8(cli_ok(&["--help"])).unwrap();
        let mut vars = BTreeSet::new();
        let mut set = BTreeSet::new();
        for line in example.lines() {
            let commented = line.starts_with('#');
            let line = line.trim_start_matches('#').trim();
            if let Some((name, _)) = line.split_once('=') {
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                    vars.insert(name.to_string());
                    if !commented {
                        set.insert(name.to_string());
                    }
                }
            }
        }
        assert!(set.contains("TVIX_VIRTIOFSD_STORE_URL"), "{file}: {set:?}");
        for var in &vars {
            let in_unit = unit_text.contains(&format!("${{{var}}}"))
                || unit_text.contains(&format!("${var} "))
                || unit_text.contains(&format!("${var}\n"));
            let read_by_daemon = help.contains(&format!("[env: {var}="));
            assert!(
                in_unit || read_by_daemon,
                "{file} sets {var}, which neither {unit} nor `tvix-virtiofsd {command}` reads"
            );
        }
    }
}

/// The unit's ExecStart= as an argument vector, with its Environment=
/// defaults substituted the way systemd does: `${VAR}` is one argument,
/// `$VAR` splits at whitespace (nothing when empty).
fn unit_command_line(unit: &str, binary: &Path) -> Vec<String> {
    let text = read_unit(unit);
    let env: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    let lookup = |name: &str| -> String {
        env.iter()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| {
                panic!("{unit}: ExecStart= uses ${name} without an Environment= default")
            })
            .1
            .clone()
    };
    let exec: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .collect();
    assert_eq!(exec.len(), 1, "{unit}: one ExecStart= expected");
    let mut argv = Vec::new();
    for word in exec[0].split_whitespace() {
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            argv.push(lookup(name));
        } else if let Some(name) = word.strip_prefix('$') {
            argv.extend(lookup(name).split_whitespace().map(String::from));
        } else {
            assert!(!word.contains('$'), "{unit}: cannot expand {word}");
            argv.push(word.to_string());
        }
    }
    assert_eq!(argv[0], INSTALLED_BIN);
    argv[0] = binary.to_str().unwrap().to_string();
    argv
}

/// Socket activation as tvix-virtiofsd@.socket does it: something else
/// owns the listening socket, the daemon (the unit's ExecStart= line, store
/// chosen by TVIX_VIRTIOFSD_STORE_URL as in the env file) starts only when
/// the VMM connects, takes the socket from LISTEN_FDS, serves a microVM
/// that runs the fixture's app from /nix/store, then exits 0 when the VM is
/// gone and leaves the socket file to its owner.
#[test]
fn socket_activated_daemon_serves_a_microvm() {
    require_tools(&[("systemd-socket-activate", "systemd"), QEMU, NIX]);
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app();
    let closure = closure_of(&[&app]);
    let numbers = fixture_data(&closure);
    let store = format!("local://{}", tmp.path().join("store").display());
    copy_paths(&store, &closure);

    let sock = tmp.path().join("vm1.sock");
    let log = tmp.path().join("daemon.log");
    let argv = unit_command_line(VIRTIOFS_SERVICE, &bin());
    assert_eq!(argv[1..], ["virtiofs", "--tag", "nix-store"]);
    let mut activator = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&sock)
        .arg(format!("--setenv=TVIX_VIRTIOFSD_STORE_URL={store}"))
        .arg("--setenv=TVIX_VIRTIOFSD_LOG=debug")
        .arg("--")
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let guest = format!(
        r#"set -u
echo "APP: $({app}/bin/app)"
echo "MOUNT: $(grep ' /nix/store ' /proc/mounts | cut -d' ' -f1,3,4 | cut -d, -f1)"
exit 7
"#
    );
    let (status, console) = run_vm(None, &sock, &guest, tmp.path(), VmOpts::default());
    assert_eq!(
        status,
        7,
        "guest script did not finish; daemon log:\n{}",
        daemon_log()
    );
    assert_eq!(
        line_after(&console, "APP: "),
        format!("20000 {numbers}/share/numbers")
    );
    assert_eq!(line_after(&console, "MOUNT: "), "nix-store virtiofs ro");

    // the VM is gone: the daemon (the activator's exec'd process) exits 0
    let status = wait_exit(&mut activator, Duration::from_secs(20)).unwrap_or_else(|| {
        panic!(
            "daemon still running 20 s after the VM exited; log:\n{}",
            daemon_log()
        )
    });
    assert!(
        status.success(),
        "daemon exited with {status}; log:\n{}",
        daemon_log()
    );
    // systemd owns the socket: the daemon must not unlink it
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(&sock)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false),
        "the daemon removed the socket it was handed"
    );
}

/// A throw-away systemd booted by systemd-nspawn from this host's /usr and
/// /etc, with the shipped units (unchanged) in /etc/systemd/system, the
/// binary under test at /usr/bin/tvix-virtiofsd, and a target that starts
/// the given sockets (as `systemctl enable` would at boot). The container
/// shares the host's network; its /run/tvix-virtiofsd, /etc/tvix-virtiofsd
/// and /var/lib/tvix-virtiofsd are directories of the test, its /var a
/// fresh tmpfs otherwise (so /var/cache/tvix-virtiofsd starts absent).
struct Container {
    nspawn: std::process::Child,
    /// The container's systemd (PID 1 inside), as seen from the host.
    init: u32,
    name: String,
    console: PathBuf,
}

impl Container {
    fn boot(
        dir: &Path,
        store: &Path,
        env_dir: &Path,
        run_dir: &Path,
        tag: &str,
        sockets: &[&str],
        extra_units: &[(&str, String)],
    ) -> Container {
        // The container's root: mount points, and the os-release file
        // nspawn looks for before anything is mounted.
        let root = dir.join("root");
        for d in [
            "usr/lib", "etc", "dev", "proc", "sys", "run", "tmp", "var", "root",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for (link, target) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            std::os::unix::fs::symlink(target, root.join(link)).unwrap();
        }
        std::fs::copy("/usr/lib/os-release", root.join("usr/lib/os-release")).unwrap();

        // Layers over the host's /usr and /etc.
        let usr = dir.join("usr");
        std::fs::create_dir_all(usr.join("bin")).unwrap();
        let installed = usr.join("bin/tvix-virtiofsd");
        if std::fs::hard_link(bin(), &installed).is_err() {
            std::fs::copy(bin(), &installed).unwrap();
        }
        let etc = dir.join("etc");
        let units = etc.join("systemd/system");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::create_dir_all(etc.join("tvix-virtiofsd")).unwrap();
        for unit in shipped_units() {
            std::fs::copy(units_dir().join(&unit), units.join(&unit)).unwrap();
        }
        for (name, text) in extra_units {
            std::fs::write(units.join(name), text).unwrap();
        }
        let sockets = sockets.join(" ");
        std::fs::write(
            units.join("tvix-test.target"),
            format!(
                "[Unit]\nDescription=tvix-virtiofsd unit test\n\
                 Wants={sockets}\nAfter={sockets}\n"
            ),
        )
        .unwrap();

        let name = format!("tvix-units-{}-{tag}", std::process::id());
        let console = dir.join("console.log");
        let p = |p: &Path| p.to_str().unwrap().to_string();
        let nspawn = Command::new("systemd-nspawn")
            .arg(format!("--machine={name}"))
            .arg(format!("--directory={}", p(&root)))
            .args(["--register=no", "--keep-unit", "--link-journal=no"])
            .arg(format!("--uuid={:032x}", rand::random::<u128>()))
            .arg(format!("--overlay-ro=/usr:{}:/usr", p(&usr)))
            .arg(format!("--overlay-ro=/etc:{}:/etc", p(&etc)))
            .arg(format!("--bind={}:/etc/tvix-virtiofsd", p(env_dir)))
            .arg("--tmpfs=/var")
            .arg(format!("--bind={}:/var/lib/tvix-virtiofsd", p(store)))
            .arg(format!("--bind={}:/run/tvix-virtiofsd", p(run_dir)))
            .args(["--console=pipe", "--boot", "--", "--unit=tvix-test.target"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&console).unwrap())
            .stderr(std::fs::File::create(dir.join("nspawn.err")).unwrap())
            .spawn()
            .unwrap();
        let mut c = Container {
            nspawn,
            init: 0,
            name,
            console,
        };
        c.init = c.find_init();
        c
    }

    /// The child of systemd-nspawn that is PID 1 in its own namespace.
    fn find_init(&mut self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.nspawn.try_wait().unwrap() {
                panic!("systemd-nspawn exited with {s}: {}", self.logs());
            }
            let pid = self.nspawn.id();
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                for child in children.split_whitespace() {
                    let status = std::fs::read_to_string(format!("/proc/{child}/status"))
                        .unwrap_or_default();
                    let pid1 = status
                        .lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .is_some_and(|ns| ns.split_whitespace().last() == Some("1"));
                    if pid1 {
                        return child.parse().unwrap();
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the container's systemd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a command inside the container (its mount and PID namespaces).
    fn exec(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.try_exec(args);
        assert!(ok, "{args:?} in the container: {err}");
        out
    }

    /// Runs a command inside the container: whether it succeeded, its
    /// stdout and its stderr.
    fn try_exec(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("nsenter")
            .arg(format!("--target={}", self.init))
            .args(["--mount", "--pid", "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// What one invocation of a unit logged (`journalctl -o cat`), once it
    /// holds `want`: journald takes a stream's last lines a moment after
    /// the process is gone. Panics after 10 s.
    fn journal_of(&self, unit: &str, invocation: &str, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, text, _) = self.try_exec(&[
                "journalctl",
                "--no-pager",
                "-o",
                "cat",
                "-u",
                unit,
                &format!("_SYSTEMD_INVOCATION_ID={invocation}"),
            ]);
            if text.contains(want) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{unit} ({invocation}) logged no {want:?}:\n{text}{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Properties of a unit, as `systemctl show` gives them.
    fn show(&self, unit: &str) -> std::collections::HashMap<String, String> {
        self.exec(&[
            "systemctl",
            "show",
            "--no-pager",
            "--property=ActiveState,SubState,Result,ExecMainCode,ExecMainStatus,InvocationID,MainPID,StatusText,Type",
            unit,
        ])
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Waits until `unit` has stopped (after its VM went away) and returns
    /// its properties.
    fn wait_stopped(&self, unit: &str) -> std::collections::HashMap<String, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let props = self.show(unit);
            if ["inactive", "failed"].contains(&props["ActiveState"].as_str()) {
                return props;
            }
            assert!(
                Instant::now() < deadline,
                "{unit} still {} 20 s after its VM exited: {}",
                props["ActiveState"],
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The journal of the units under test and what nspawn printed.
    fn logs(&self) -> String {
        let journal = Command::new("nsenter")
            .arg(format!("--target={}", self.init))
            .args(["--mount", "--pid", "--", "journalctl", "--no-pager"])
            .args([
                "-u",
                "tvix-virtiofsd@vm1.service",
                "-u",
                "tvix-virtiofsd@vm1.socket",
            ])
            .args([
                "-u",
                "tvix-store-daemon.service",
                "-u",
                "tvix-store-daemon.socket",
                "-u",
                "tvix-store-cache.service",
                "-u",
                "tvix-store-cache.socket",
                "-u",
                "tvix-test-remote.service",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!(
            "\n--- journal ---\n{journal}--- console ---\n{}",
            std::fs::read_to_string(&self.console).unwrap_or_default()
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM: nspawn halts the container; a second one, or SIGKILL
        // after 30 s, ends it at once.
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.nspawn.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // nspawn leaves this behind when /run is not a tmpfs.
        let _ =
            std::fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&self.name));
    }
}

/// The shipped units, unchanged, under a real systemd (in a container):
/// the VMM's connection to /run/tvix-virtiofsd/vm1.sock (0600) starts
/// tvix-virtiofsd@vm1.service with all its hardening; it serves a microVM
/// from the default store and exits 0; the socket is listening again and
/// the VM's next boot gets a new daemon, which now (per
/// /etc/tvix-virtiofsd/vm1.env) reaches the store through
/// tvix-store-daemon.socket, starting the store daemon; that one stops
/// cleanly on SIGTERM.
#[test]
fn units_under_systemd_serve_a_microvm_twice() {
    require_tools(&[
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        QEMU,
        NIX,
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app();
    let closure = closure_of(&[&app]);
    let store = tmp.path().join("store");
    let store_url = format!("local://{}", store.display());
    copy_paths(&store_url, &closure);
    let numbers = fixture_data(&closure);
    let expected = format!("20000 {numbers}/share/numbers");

    let env_dir = tmp.path().join("etc-tvix-virtiofsd");
    let run_dir = tmp.path().join("run-tvix-virtiofsd");
    std::fs::create_dir_all(&env_dir).unwrap();
    std::fs::create_dir_all(&run_dir).unwrap();
    let container = Container::boot(
        tmp.path(),
        &store,
        &env_dir,
        &run_dir,
        "twice",
        &["tvix-virtiofsd@vm1.socket", "tvix-store-daemon.socket"],
        &[],
    );

    let sock = run_dir.join("vm1.sock");
    wait_for_socket(&container, &sock);

    let guest = format!("echo \"APP: $({app}/bin/app)\"\nexit 7\n");
    let service = "tvix-virtiofsd@vm1.service";
    let mut invocations = Vec::new();
    for boot in ["default store", "store daemon"] {
        if boot == "store daemon" {
            std::fs::write(
                env_dir.join("vm1.env"),
                "TVIX_VIRTIOFSD_STORE_URL=grpc+unix:///run/tvix-store/daemon.sock\n",
            )
            .unwrap();
        }
        let (status, console) = run_vm(None, &sock, &guest, tmp.path(), VmOpts::default());
        assert_eq!(status, 7, "boot from the {boot}: {}", container.logs());
        assert_eq!(line_after(&console, "APP: "), expected);

        let svc = container.wait_stopped(service);
        assert_eq!(
            (
                svc["Result"].as_str(),
                svc["ExecMainCode"].as_str(),
                svc["ExecMainStatus"].as_str()
            ),
            ("success", "1", "0"),
            "{service} after the boot from the {boot}: {svc:?}{}",
            container.logs()
        );
        invocations.push(svc["InvocationID"].clone());
        let socket = container.show("tvix-virtiofsd@vm1.socket");
        assert_eq!(
            (socket["ActiveState"].as_str(), socket["SubState"].as_str()),
            ("active", "listening"),
            "the socket is not re-armed after the boot from the {boot}"
        );
    }
    assert_ne!(
        invocations[0], invocations[1],
        "the second boot was not served by a new daemon"
    );

    let store_daemon = container.show("tvix-store-daemon.service");
    assert_eq!(
        store_daemon["ActiveState"],
        "active",
        "the virtiofs daemon did not reach the store through tvix-store-daemon.socket: {}",
        container.logs()
    );
    container.exec(&["systemctl", "stop", "tvix-store-daemon.service"]);
    let stopped = container.show("tvix-store-daemon.service");
    assert_eq!(
        (
            stopped["Result"].as_str(),
            stopped["ExecMainStatus"].as_str()
        ),
        ("success", "0"),
        "the store daemon did not stop cleanly: {stopped:?}{}",
        container.logs()
    );
}

/// Type=notify units of `virtiofs` and `daemon` (not socket-activated):
/// systemd counts them started only once they say READY=1, after their
/// socket listens and the store answered, so a unit ordered after them
/// finds the VMM socket in place and the store daemon answering; their
/// status names the store, and they stop cleanly.
#[test]
fn notify_units_are_ready_when_they_say_so() {
    require_tools(&[
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let store_url = format!("local://{}", store.display());
    let f = tmp.path().join("hello");
    std::fs::write(&f, "hello\n").unwrap();
    let path = String::from_utf8(cli_ok(&[
        "--store",
        &store_url,
        "import",
        f.to_str().unwrap(),
    ]))
    .unwrap()
    .trim()
    .to_string();
    let env_dir = tmp.path().join("etc-tvix-virtiofsd");
    let run_dir = tmp.path().join("run-tvix-virtiofsd");
    std::fs::create_dir_all(&env_dir).unwrap();
    std::fs::create_dir_all(&run_dir).unwrap();
    let store_flag = "--store local:///var/lib/tvix-virtiofsd";
    let notify = |what: &str, cmd: &str| {
        format!(
            "[Unit]\nDescription=tvix-virtiofsd {what}, Type=notify\n\
             [Service]\nType=notify\nTimeoutStartSec=60\n\
             ExecStart=/usr/bin/tvix-virtiofsd {store_flag} {cmd}\n"
        )
    };
    let after = format!(
        "[Unit]\nRequires=tvix-notify-vfs.service tvix-notify-daemon.service\n\
         After=tvix-notify-vfs.service tvix-notify-daemon.service\n\
         [Service]\nType=oneshot\nRemainAfterExit=yes\n\
         ExecStart=/bin/sh -c 'test -S /run/tvix-virtiofsd/vfs.sock && \
         /usr/bin/tvix-virtiofsd --store grpc+unix:///run/tvix-virtiofsd/d.sock path-info {path} \
         > /run/tvix-virtiofsd/after-ran'\n"
    );
    let container = Container::boot(
        tmp.path(),
        &store,
        &env_dir,
        &run_dir,
        "notify",
        &[],
        &[
            (
                "tvix-notify-vfs.service",
                notify(
                    "virtiofs",
                    "virtiofs --socket-path /run/tvix-virtiofsd/vfs.sock",
                ),
            ),
            (
                "tvix-notify-daemon.service",
                notify("daemon", "daemon --listen unix:/run/tvix-virtiofsd/d.sock"),
            ),
            ("tvix-after.service", after),
        ],
    );
    // booted (degraded is fine: the container lacks some host services)
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, state, _) = container.try_exec(&["systemctl", "is-system-running", "--wait"]);
        if ["running", "degraded"].contains(&state.trim()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not booted: {state}{}",
            container.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, out, err) = container.try_exec(&["systemctl", "start", "tvix-after.service"]);
    assert!(ok, "{out}{err}{}", container.logs());
    let ran = std::fs::read_to_string(run_dir.join("after-ran")).unwrap();
    assert!(ran.contains(&path), "the unit after ours: {ran}");
    for (unit, status) in [
        (
            "tvix-notify-vfs.service",
            "serving local:///var/lib/tvix-virtiofsd to the VMM on /run/tvix-virtiofsd/vfs.sock, tag nix-store",
        ),
        (
            "tvix-notify-daemon.service",
            "serving local:///var/lib/tvix-virtiofsd on unix:/run/tvix-virtiofsd/d.sock",
        ),
    ] {
        let props = container.show(unit);
        assert_eq!(
            (props["Type"].as_str(), props["ActiveState"].as_str()),
            ("notify", "active"),
            "{unit}: {props:?}{}",
            container.logs()
        );
        assert!(
            props["StatusText"].starts_with(status),
            "{unit}: {props:?}"
        );
        container.exec(&["systemctl", "stop", unit]);
        let stopped = container.show(unit);
        assert_eq!(
            (stopped["Result"].as_str(), stopped["ExecMainStatus"].as_str()),
            ("success", "0"),
            "{unit} did not stop cleanly: {stopped:?}{}",
            container.logs()
        );
    }
}

/// Waits until systemd has created the listening socket `sock`, mode 0600.
fn wait_for_socket(container: &Container, sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd did not create {}: {}",
            sock.display(),
            container.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

/// The host cache deployment under a real systemd, units unchanged and
/// enabled as the README says: tvix-store-cache.socket and
/// tvix-virtiofsd@vm1.socket at boot, /etc/tvix-virtiofsd/store-cache.env
/// naming the remote and default.env pointing the per-VM daemons at
/// /run/tvix-store/daemon.sock with TVIX_VIRTIOFSD_CACHE_DIR. The remote is
/// our daemon over an embedded store holding the Nix fixture closure, on
/// loopback TCP in the container.
///
/// A first microVM boots through the per-VM socket before the host cache
/// daemon has ever run (no /var/cache/tvix-virtiofsd yet): its daemon's
/// connection starts tvix-store-cache.service, which fetches the closure;
/// the guest checksums it against /nix/store, the cache directory is 0700
/// and read-only to the per-VM unit, /metrics counts the fetch. Then the
/// remote is stopped and a second microVM boots and reads the same closure
/// from the cache: nothing is fetched, and every daemon exits cleanly with
/// its cache counts in the journal.
#[test]
fn units_under_systemd_serve_microvms_through_the_host_cache() {
    require_tools(&[
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        QEMU,
        NIX,
    ]);
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let app = fixture_app();
    let closure = closure_of(&[&app]);
    let host_sum = host_digest(&closure);
    // the remote's embedded store, /var/lib/tvix-virtiofsd in the container
    let store = tmp.path().join("store");
    copy_paths(&format!("local://{}", store.display()), &closure);
    let expected = format!("20000 {}/share/numbers", fixture_data(&closure));

    // the container shares the host's network: these ports are free there
    let remote = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let env_dir = tmp.path().join("etc-tvix-virtiofsd");
    let run_dir = tmp.path().join("run-tvix-virtiofsd");
    std::fs::create_dir_all(&env_dir).unwrap();
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(
        env_dir.join("store-cache.env"),
        format!(
            "TVIX_VIRTIOFSD_STORE_URL=grpc+http://{remote}\n\
             TVIX_VIRTIOFSD_METRICS_LISTEN={metrics}\n\
             TVIX_VIRTIOFSD_CACHE_SIZE=1G\n"
        ),
    )
    .unwrap();
    std::fs::write(
        env_dir.join("default.env"),
        "TVIX_VIRTIOFSD_STORE_URL=grpc+unix:///run/tvix-store/daemon.sock\n\
         TVIX_VIRTIOFSD_CACHE_DIR=/var/cache/tvix-virtiofsd\n",
    )
    .unwrap();
    let container = Container::boot(
        tmp.path(),
        &store,
        &env_dir,
        &run_dir,
        "cache",
        &["tvix-virtiofsd@vm1.socket", "tvix-store-cache.socket"],
        &[],
    );
    let sock = run_dir.join("vm1.sock");
    wait_for_socket(&container, &sock);
    let deadline = Instant::now() + Duration::from_secs(30);
    while container.show("tvix-store-cache.socket")["SubState"] != "listening" {
        assert!(
            Instant::now() < deadline,
            "tvix-store-cache.socket is not listening: {}",
            container.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let cache_service = "tvix-store-cache.service";
    assert_eq!(
        container.show(cache_service)["ActiveState"],
        "inactive",
        "the host cache daemon started before anyone connected"
    );
    assert!(
        !container
            .try_exec(&["test", "-e", "/var/cache/tvix-virtiofsd"])
            .0,
        "the cache directory exists before any unit made it"
    );

    // the remote, stopped later with `systemctl stop`
    container.exec(&[
        "systemd-run",
        "--unit=tvix-test-remote",
        "--property=Type=exec",
        "/usr/bin/tvix-virtiofsd",
        "--store",
        "local:///var/lib/tvix-virtiofsd",
        "daemon",
        "--read-only",
        "--listen",
        &remote,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&remote).is_err() {
        assert!(
            Instant::now() < deadline,
            "the remote store daemon is not listening on {remote}: {}",
            container.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let service = "tvix-virtiofsd@vm1.service";
    let guest = |hold: u32| {
        format!(
            r#"set -u
{DIGEST_SCRIPT}
echo "APP: $({app}/bin/app)"
printf '%s' "$(digest {paths})" | sha256sum | sed 's/^/SUM: /'
echo "HOLD: {hold}"
sleep {hold}
exit 7
"#,
            paths = closure.join(" "),
        )
    };
    let hits_line = "cache /var/cache/tvix-virtiofsd: hits: ";
    let mut invocations = Vec::new();
    let mut fetched = 0;
    for boot in ["cold cache", "remote stopped"] {
        let t = Instant::now();
        if boot == "remote stopped" {
            container.exec(&["systemctl", "stop", "tvix-test-remote.service"]);
            assert!(
                std::net::TcpStream::connect(&remote).is_err(),
                "the remote still answers on {remote}"
            );
        }
        // While the first guest holds its daemon running: the unit sees the
        // cache directory (made by systemd, 0700) read-only.
        let mut probe = None;
        let mut on_line = |line: &str| {
            if line.starts_with("HOLD: ") && boot == "cold cache" {
                let pid = container.show(service)["MainPID"].clone();
                let mode = container.exec(&["stat", "-c", "%a %U", "/var/cache/tvix-virtiofsd"]);
                let write = container.try_exec(&[
                    "nsenter",
                    &format!("--target={pid}"),
                    "--mount",
                    "--",
                    "touch",
                    "/var/cache/tvix-virtiofsd/probe",
                ]);
                probe = Some((pid, mode, write));
            }
        };
        let hold = if boot == "cold cache" { 3 } else { 0 };
        let (status, console) = run_vm(
            None,
            &sock,
            &guest(hold),
            tmp.path(),
            VmOpts {
                on_line: Some(&mut on_line),
                ..VmOpts::default()
            },
        );
        assert_eq!(status, 7, "boot with the {boot}: {}", container.logs());
        assert_eq!(line_after(&console, "APP: "), expected);
        assert_eq!(
            line_after(&console, "SUM: ").split_whitespace().next(),
            Some(host_sum.as_str()),
            "boot with the {boot}: the closure differs from /nix/store"
        );
        if let Some((pid, mode, (ok, _, err))) = probe {
            assert_ne!(pid, "0", "{service} was not running during its VM");
            assert_eq!(mode.trim(), "700 root", "/var/cache/tvix-virtiofsd");
            assert!(
                !ok && err.contains("Read-only file system"),
                "{service} may write the cache directory: {err}"
            );
        } else {
            assert_ne!(boot, "cold cache", "the guest never printed HOLD");
        }

        let svc = container.wait_stopped(service);
        assert_eq!(
            (
                svc["Result"].as_str(),
                svc["ExecMainCode"].as_str(),
                svc["ExecMainStatus"].as_str()
            ),
            ("success", "1", "0"),
            "{service} after the boot with the {boot}: {svc:?}{}",
            container.logs()
        );
        let log = container.journal_of(service, &svc["InvocationID"], hits_line);
        let counts = log
            .lines()
            .find_map(|l| l.split_once(hits_line).map(|(_, c)| c.to_string()))
            .unwrap();
        eprintln!("{service} ({boot}): {hits_line}{counts}");
        invocations.push(svc["InvocationID"].clone());

        let cache = container.show(cache_service);
        assert_eq!(
            cache["ActiveState"],
            "active",
            "the per-VM daemon did not reach the host cache daemon: {}",
            container.logs()
        );
        let m = scrape_metrics(&metrics);
        let now = metric(&m, "tvix_virtiofsd_cache_fetched_bytes_total");
        if boot == "cold cache" {
            // fetched for the guest's misses or ahead of them (prefetch)
            assert!(
                metric(&m, "tvix_virtiofsd_cache_misses_total{kind=\"blob\"}")
                    + metric(&m, "tvix_virtiofsd_cache_prefetched_blobs_total")
                    > 0,
                "{m}"
            );
            // the closure holds a 300,000-byte file and a static busybox
            assert!(now > 300_000, "the host cache fetched {now} bytes:\n{m}");
            fetched = now;
        } else {
            assert!(
                counts.contains("; misses: 0 blob, 0 directory, 0 path_info;"),
                "with the remote stopped, the per-VM daemon missed: {counts}"
            );
            assert_eq!(
                now, fetched,
                "the host cache fetched more with the remote stopped:\n{m}"
            );
        }
        eprintln!("boot with the {boot}: {:.1} s", t.elapsed().as_secs_f64());
    }
    assert_ne!(
        invocations[0], invocations[1],
        "the second boot was not served by a new daemon"
    );

    let cache = container.show(cache_service);
    container.exec(&["systemctl", "stop", cache_service]);
    let stopped = container.show(cache_service);
    assert_eq!(
        (
            stopped["Result"].as_str(),
            stopped["ExecMainStatus"].as_str()
        ),
        ("success", "0"),
        "the host cache daemon did not stop cleanly: {stopped:?}{}",
        container.logs()
    );
    container.journal_of(cache_service, &cache["InvocationID"], hits_line);

    // the two store daemon sockets share one address: starting one stops
    // the other
    container.exec(&["systemctl", "start", "tvix-store-daemon.socket"]);
    assert_eq!(
        (
            container.show("tvix-store-cache.socket")["ActiveState"].as_str(),
            container.show("tvix-store-daemon.socket")["SubState"].as_str()
        ),
        ("inactive", "listening"),
        "tvix-store-daemon.socket and tvix-store-cache.socket do not conflict"
    );
    eprintln!(
        "host cache under systemd: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
