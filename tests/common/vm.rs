//! Plumbing of the microVM tests (tests/vm.rs, tests/vm_lifecycle.rs,
//! tests/systemd_units.rs): the tools they need, booting a guest with
//! vm-tests/run-vm.sh and reading its console, the Nix fixture closure, and
//! waiting for a daemon to exit once its VM is gone.
use super::{cli_ok, require_tools, sh};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// QEMU, as (command, Debian package) for [`require_tools`].
pub const QEMU: (&str, &str) = ("qemu-system-x86_64", "qemu-system-x86");
/// Nix (for the fixture closure), as (command, Debian package).
pub const NIX: (&str, &str) = ("nix-store", "nix-bin");

/// What a microVM test with the Nix fixture needs: QEMU and Nix.
pub fn require_vm_tools() {
    require_tools(&[QEMU, NIX]);
}

/// The VMMs the microVM tests boot each guest with: QEMU always, plus
/// cloud-hypervisor when its binary is installed ($CLOUD_HYPERVISOR, else
/// `cloud-hypervisor` on PATH, as vm-tests/run-vm.sh looks for it). A
/// skipped cloud-hypervisor is announced loudly, never silently dropped.
pub fn vmms() -> Vec<&'static str> {
    let ch = std::env::var("CLOUD_HYPERVISOR")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cloud-hypervisor".into());
    let found = Command::new("sh")
        .args(["-c", "command -v \"$1\" >/dev/null", "sh", &ch])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if found {
        vec!["qemu", "cloud-hypervisor"]
    } else {
        eprintln!(
            "!!! SKIPPING cloud-hypervisor: {ch:?} is not installed (looked for \
             $CLOUD_HYPERVISOR, else cloud-hypervisor on PATH); only QEMU runs \
             these microVM tests. See vm-tests/README.md."
        );
        vec!["qemu"]
    }
}

/// How [`run_vm`] boots a guest, beyond the VMM, socket and script.
pub struct VmOpts<'a> {
    /// More run-vm.sh arguments, e.g. `["--script-via", "initrd"]`.
    pub args: &'a [&'a str],
    /// run-vm.sh's `--timeout`: seconds until the VMM is killed, boot
    /// included (default 300).
    pub timeout_secs: u32,
    /// Called with each console line as it arrives, so a test can act
    /// while the guest runs.
    pub on_line: Option<&'a mut dyn FnMut(&str)>,
}

impl Default for VmOpts<'_> {
    fn default() -> Self {
        VmOpts {
            args: &[],
            timeout_secs: 300,
            on_line: None,
        }
    }
}

/// Boots a guest with vm-tests/run-vm.sh whose /nix/store is the virtiofs
/// share served on `sock`, running `script` (written to `dir/guest.sh`).
/// `vmm` is run-vm.sh's `--vmm`; `None` leaves run-vm.sh its default
/// ($VMTEST_VMM, else qemu). Console lines and run-vm.sh's own messages are
/// echoed to the test's output as they come. Returns run-vm.sh's exit
/// status (the guest script's; 124 timeout, 125 harness failure) and the
/// console, one `\n`-terminated line per console line.
pub fn run_vm(
    vmm: Option<&str>,
    sock: &Path,
    script: &str,
    dir: &Path,
    opts: VmOpts,
) -> (i32, String) {
    let VmOpts {
        args,
        timeout_secs,
        mut on_line,
    } = opts;
    let f = dir.join("guest.sh");
    std::fs::write(&f, script).unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vm-tests/run-vm.sh"));
    if let Some(vmm) = vmm {
        cmd.args(["--vmm", vmm]);
    }
    let mut child = cmd
        .arg("--socket")
        .arg(sock)
        .arg("--script")
        .arg(&f)
        .args(["--timeout", &timeout_secs.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vm-tests/run-vm.sh");
    let who = vmm.unwrap_or("default VMM").to_string();
    // Through eprintln!, so the test harness captures it like the console.
    let stderr = child.stderr.take().unwrap();
    let messages = std::thread::spawn({
        let who = who.clone();
        move || for_each_line(stderr, |line| eprintln!("run-vm({who})| {line}"))
    });
    let mut console = String::new();
    for_each_line(child.stdout.take().unwrap(), |line| {
        eprintln!("guest({who})| {line}");
        if let Some(f) = on_line.as_mut() {
            f(line);
        }
        console.push_str(line);
        console.push('\n');
    });
    let status = child.wait().unwrap();
    messages.join().unwrap();
    (status.code().unwrap_or(-1), console)
}

/// Hands each line of `r` (without its `\n` or `\r\n`; bytes that are not
/// UTF-8 replaced) to `f` until end of file.
fn for_each_line(r: impl std::io::Read, mut f: impl FnMut(&str)) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    while r.read_until(b'\n', &mut buf).unwrap() > 0 {
        let line = String::from_utf8_lossy(&buf);
        let line = line.strip_suffix('\n').unwrap_or(&line);
        f(line.strip_suffix('\r').unwrap_or(line));
        buf.clear();
    }
}

/// The rest of the first console line that starts with `key` (e.g.
/// `"APP: "`), trimmed; panics if the guest printed no such line.
pub fn line_after<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("guest printed no {key:?} line"))
        .trim()
}

/// Builds the Nix fixture closure (tests/fixtures/nix-closure.sh, into
/// this host's /nix/store; reruns reuse it) and returns its app's store
/// path. Its app prints `20000 {data}/share/numbers`, `data` being the
/// closure's `-fixture-data` path ([`fixture_data`]).
pub fn fixture_app() -> String {
    super::nix_db_ready();
    sh("NIX_REMOTE= bash tests/fixtures/nix-closure.sh")
        .trim()
        .to_string()
}

/// Every store path in the closure of `paths` (`nix-store -qR`).
pub fn closure_of<S: AsRef<str>>(paths: &[S]) -> Vec<String> {
    super::nix_db_ready();
    let paths: Vec<&str> = paths.iter().map(AsRef::as_ref).collect();
    sh(&format!("NIX_REMOTE= nix-store -qR {}", paths.join(" ")))
        .lines()
        .map(String::from)
        .collect()
}

/// The fixture's data output among `closure`.
pub fn fixture_data(closure: &[String]) -> String {
    closure
        .iter()
        .find(|p| p.ends_with("-fixture-data"))
        .expect("the fixture closure has no -fixture-data path")
        .clone()
}

/// Shell function `digest PATHS…`: the listing and checksums of store
/// paths, printed the same way on the host (coreutils) and in the guest
/// (busybox): modes, sizes and symlink targets of everything but
/// directories, then sha256 of every file. A guest prints
/// `printf '%s' "$(digest …)" | sha256sum`, to compare with
/// [`host_digest`].
pub const DIGEST_SCRIPT: &str = r#"digest() {
  for p in "$@"; do
    (cd "$p" && find . ! -type d | sort | while read -r f; do
       if [ -L "$f" ]; then echo "L $(stat -c '%A %s' "$f") $f -> $(readlink "$f")";
       else echo "F $(stat -c '%A %s' "$f") $f"; fi; done
     cd "$p" && find . -type f | sort | xargs sha256sum)
  done
}
"#;

/// The sha256 (hex) of [`DIGEST_SCRIPT`]'s `digest` of `paths` in this
/// host's /nix/store, as a guest computes it.
pub fn host_digest<S: AsRef<str>>(paths: &[S]) -> String {
    use sha2::Digest;
    let paths: Vec<&str> = paths.iter().map(AsRef::as_ref).collect();
    let host = sh(&format!("{DIGEST_SCRIPT}digest {}", paths.join(" ")));
    // the guest hashes "$(digest ...)", which drops trailing newlines
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(
        host.trim_end_matches('\n').as_bytes(),
    ))
}

/// Copies store paths from /nix/store into the store at `store_url`
/// (`tvix-virtiofsd --store URL copy PATHS…`).
pub fn copy_paths<S: AsRef<str>>(store_url: &str, paths: &[S]) {
    let mut args = vec!["--store", store_url, "copy"];
    args.extend(paths.iter().map(AsRef::as_ref));
    cli_ok(&args);
}

/// Waits up to `timeout` for `child` (a daemon whose VM has gone away) to
/// exit on its own and returns its status; `None` if it was still running
/// then, in which case it has been killed and reaped.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
