//! Helpers shared by the integration tests: in-process gRPC servers, the
//! daemon as a real process, and the binary under test; the microVM tests'
//! plumbing is in [`vm`], the Garage cluster of the S3 tests in [`garage`].
#![allow(dead_code)]
pub mod garage;
pub mod static_http;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tvix_virtiofsd::serve::grpc::StoreServer;
use tvix_virtiofsd::store::{Addr, Store};
use tvix_virtiofsd::wire::{castore, store};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tvix-virtiofsd"))
}

/// Serves `backend` over gRPC in this process on a unix socket (in `dir`)
/// or loopback TCP, and returns the address a client uses.
pub async fn serve_in_process(backend: Store, unix_dir: Option<&Path>) -> String {
    serve_in_process_with(backend, unix_dir, Default::default()).await
}

/// [`serve_in_process`] with upload limits.
#[allow(dead_code)]
pub async fn serve_in_process_with(
    backend: Store,
    unix_dir: Option<&Path>,
    limits: tvix_virtiofsd::serve::grpc::Limits,
) -> String {
    let srv = StoreServer::new(backend, false).with_limits(limits);
    let router = tonic::transport::Server::builder()
        .layer(tower::util::MapRequestLayer::new(
            tvix_virtiofsd::serve::grpc::reset_is_error,
        ))
        .add_service(castore::blob_service_server::BlobServiceServer::new(
            srv.clone(),
        ))
        .add_service(castore::directory_service_server::DirectoryServiceServer::new(srv.clone()))
        .add_service(store::path_info_service_server::PathInfoServiceServer::new(
            srv,
        ));
    match unix_dir {
        Some(dir) => {
            let path = dir.join("store.sock");
            let l = tokio::net::UnixListener::bind(&path).expect("bind unix socket");
            tokio::spawn(
                router.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l)),
            );
            format!("grpc+unix://{}", path.display())
        }
        None => {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind tcp");
            let addr = l.local_addr().expect("local addr");
            tokio::spawn(
                router.serve_with_incoming(tvix_virtiofsd::cli::daemon::nodelay(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                )),
            );
            format!("grpc+http://{addr}")
        }
    }
}

/// A client store for a gRPC address.
pub fn grpc_store(addr: &str) -> Store {
    let a: Addr = addr.parse().expect("address");
    Store::open(&a, &a, &a).expect("open grpc store")
}

/// `tvix-virtiofsd daemon` as a real process; SIGTERM on drop.
pub struct Daemon {
    pub child: Child,
    /// Client address: grpc+unix:///… or grpc+http://…
    pub addr: String,
}

impl Daemon {
    /// Starts the daemon on `listen` (HOST:PORT or unix:PATH) over
    /// `store_url`. Tests write through TCP too: `--writable` is added there
    /// unless `extra` says `--read-only` (`start_with` adds nothing).
    pub fn start(store_url: &str, listen: &str, extra: &[&str]) -> Daemon {
        let tcp = !listen.starts_with("unix:");
        let mut args = extra.to_vec();
        if tcp && !extra.contains(&"--read-only") {
            args.push("--writable");
        }
        Self::start_with(store_url, listen, &args)
    }

    /// Starts the daemon with the flags in `extra`, and `--min-free-space
    /// 16M` unless they set it: CI disks may have under the default 1 GiB
    /// free, and the floor has tests of its own.
    pub fn start_with(store_url: &str, listen: &str, extra: &[&str]) -> Daemon {
        let mut args = extra.to_vec();
        if !extra.iter().any(|a| a.starts_with("--min-free-space")) {
            args.extend(["--min-free-space", "16M"]);
        }
        let child = Command::new(bin())
            .args(["--store", store_url, "daemon", "--listen", listen])
            .args(&args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn daemon");
        let addr = match listen.strip_prefix("unix:") {
            Some(p) => format!("grpc+unix://{p}"),
            None => format!("grpc+http://{listen}"),
        };
        let d = Daemon { child, addr };
        d.wait_ready(listen);
        d
    }

    fn wait_ready(&self, listen: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = match listen.strip_prefix("unix:") {
                Some(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                None => std::net::TcpStream::connect(listen).is_ok(),
            };
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start listening on {listen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = self.child.wait().expect("wait daemon");
        std::mem::forget(self);
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Runs the CLI with `args`, asserting success; returns stdout.
pub fn cli_ok(args: &[&str]) -> Vec<u8> {
    let out = Command::new(bin()).args(args).output().expect("run cli");
    assert!(
        out.status.success(),
        "tvix-virtiofsd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs the CLI with `args`, asserting failure; returns stderr.
pub fn cli_err(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().expect("run cli");
    assert!(
        !out.status.success(),
        "tvix-virtiofsd {args:?} unexpectedly succeeded"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Deterministic incompressible-looking bytes (xorshift), fast to make.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Creates the local Nix store's database before a test binary's first
/// Nix command. Nix 2.8 creates it on first use, and of several Nix
/// processes doing so at once one may fail with "SQLite database ... is
/// busy": a fresh CI machine's first tests to run Nix, in parallel, did.
pub fn nix_db_ready() {
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(|| {
        // A missing nix-store is reported by the test's own Nix command.
        let _ = Command::new("nix-store")
            .env("NIX_REMOTE", "")
            .arg("--init")
            .status();
    });
}

/// Runs a shell command, asserting success; returns stdout.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A path info with just a name and a root node (no references, no NAR
/// facts), for tests that only need the store path to exist.
pub fn bare_path_info(
    store_path: tvix_virtiofsd::nix::store_path::StorePath,
    node: tvix_virtiofsd::castore::Node,
) -> tvix_virtiofsd::nix::path_info::PathInfo {
    tvix_virtiofsd::nix::path_info::PathInfo::bare(store_path, node)
}

/// Panics unless every command in `tools` (command, Debian package) is on
/// PATH: a missing tool fails the test, it never skips it.
pub fn require_tools(tools: &[(&str, &str)]) {
    for (tool, pkg) in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap()
            .status
            .success();
        assert!(
            found,
            "{tool} is not installed: this test needs it (apt-get install {pkg}); .ci/run installs it"
        );
    }
}

/// `GET /metrics` from a daemon's `--metrics-listen HOST:PORT`: the body.
pub fn scrape_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("connecting to the metrics endpoint {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response from {addr}: {resp:?}"));
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "GET http://{addr}/metrics: {head}"
    );
    body.to_string()
}

/// The value of one sample in Prometheus text, e.g.
/// `tvix_virtiofsd_cache_misses_total{kind="blob"}`; panics if absent.
pub fn metric(text: &str, sample: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sample}: {e}"))
}

/// `virtiofs --socket-path SOCK` over `store` with `extra` flags, its log
/// in `log`; the caller waits for it (it exits when its VMM goes).
#[allow(dead_code)]
pub fn spawn_virtiofs(store: &str, sock: &Path, log: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args(["--store", store, "virtiofs", "--socket-path"])
        .arg(sock)
        .args(extra)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).expect("create daemon log"))
        .spawn()
        .expect("spawn virtiofs daemon")
}

/// Whether real FUSE mounts can run here; says so loudly (naming `what`)
/// when not.
#[allow(dead_code)]
pub fn fuse_available(what: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("!!! SKIPPING {what}: cannot open /dev/fuse: {e} !!!");
            false
        }
    }
}

/// Whether `mnt` is a mount point of this process's namespace.
#[allow(dead_code)]
pub fn is_mounted(mnt: &Path) -> bool {
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    m.lines().any(|l| l.split(' ').nth(4) == mnt.to_str())
}

/// Waits up to 20 s for the socket file `sock` to appear.
#[allow(dead_code)]
pub fn wait_for_socket_file(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket {}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every thread of `pid` is stopped (state T).
#[allow(dead_code)]
pub fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .all(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
                    .unwrap_or(true)
            });
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A field of `/proc/PID/status` given in kB (`RssAnon`, `VmHWM`), in
/// bytes; 0 once the process is gone. `RssAnon` is a process's own memory:
/// a vhost-user daemon's VmRSS also counts guest memory it wrote into.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

/// Waits (at most 20 s) until something accepts on TCP `addr`.
pub fn wait_listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One bodiless HTTP/1.1 request on a connection of its own: (status,
/// body); status 0 when no answer came.
pub fn http_request(addr: &str, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    // a listener that is full answers at once and closes: the request
    // may then meet a closed socket, the answer is still there to read
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    parse_response(&resp)
}

/// An HTTP/1.1 answer's (status, body); status 0 when there is none.
pub fn parse_response(resp: &[u8]) -> (u16, String) {
    let resp = String::from_utf8_lossy(resp);
    let status = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Debian's Nix (`nix` or `nix-store`), daemonless, with its own narinfo
/// disk cache in `xdg` (a client that uploaded remembers its own narinfos;
/// the others must ask).
#[allow(dead_code)]
pub fn nix_in(xdg: &Path, prog: &str, args: &[&str]) -> std::process::Output {
    nix_db_ready();
    std::process::Command::new(prog)
        .env("NIX_REMOTE", "")
        .env("XDG_CACHE_HOME", xdg)
        .args(
            ["--extra-experimental-features", "nix-command"]
                .iter()
                .filter(|_| prog == "nix"),
        )
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"))
}

/// The output of a command that must have succeeded (`what` says which).
#[allow(dead_code)]
pub fn output_ok(o: std::process::Output, what: &str) -> Vec<u8> {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// The body of a chunked HTTP/1.1 response.
#[allow(dead_code)]
pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 2 + n + 2..];
    }
}
