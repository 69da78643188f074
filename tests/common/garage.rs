//! A real three-node Garage cluster on loopback, for the tests of the S3
//! store tier (issue 24) and of what Garage itself does under faults.
//!
//! Why a real cluster and not a mock: the S3 tier must keep serving right
//! bytes (or a clear error, never wrong bytes) while nodes die, stall and
//! come back, and only Garage's own quorum logic (replication factor 3,
//! reads and writes need 2 of 3 nodes) shows what a client then sees.
//!
//! [`Garage::start`] runs three `garage server` processes, each with its
//! own config, metadata and data directory and log file under one temporary
//! directory, forms the cluster (connect, layout assign and apply), waits
//! until every node reports it fully operational, and creates the bucket
//! `tvix` and a key that may read, write and own it. Faults are signals to
//! one node: [`Garage::kill`], [`Garage::stop`], [`Garage::cont`], and
//! [`Garage::restart`] on the same directories and ports. [`Garage::s3`]
//! and [`Garage::s3_request`] talk to a node with curl (SigV4), so a test
//! can change objects behind a store's back. Drop kills every node.
//!
//! A missing `garage` binary fails the test, it never skips it.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The Garage release the harness is written against (and CI installs).
pub const GARAGE_VERSION: &str = "2.5.0";
/// The bucket [`Garage::start`] creates.
pub const BUCKET: &str = "tvix";
/// The region every node is configured with.
pub const REGION: &str = "garage";
/// Nodes in the cluster; with replication factor 3 each holds everything.
pub const NODES: usize = 3;
/// Longest a curl request of [`Garage::s3_request`] may take.
pub const S3_TIMEOUT: Duration = Duration::from_secs(30);
/// Garage's `rpc_timeout_msec` here. Its default, 300 s, is how long a
/// request in flight may wait on a node that stalls without closing its
/// connections (SIGSTOP): measured with the default, the first PUT after
/// stopping one node of three answered after 300.0 s (the next five in
/// 15-60 ms); with 15 s, requests took either ~10-150 ms or 15.0 s, even a
/// minute after the stop. 15 s keeps such tests within CI time and stays
/// far above an honest RPC on a busy machine.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// How to get the binary, for the failure message.
const INSTALL_HINT: &str = "install it with `cargo install --locked garage --version 2.5.0 --no-default-features --features bundled-libs,sqlite` \
     (about 10 minutes of two cores; ~/.cargo/bin is searched too), or run .ci/run, which does";

/// Where `garage` is: on PATH, else in `$HOME/.cargo/bin`. The error says
/// how to install it.
pub fn find_garage(path_var: Option<&str>, home: Option<&str>) -> Result<PathBuf, String> {
    let on_path = path_var
        .into_iter()
        .flat_map(|p| p.split(':'))
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join("garage"));
    let in_cargo = home.map(|h| Path::new(h).join(".cargo/bin/garage"));
    on_path
        .chain(in_cargo)
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            format!("garage is not installed: the Garage cluster tests need it; {INSTALL_HINT}")
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The `garage` binary, or a panic saying how to install it.
pub fn garage_bin() -> PathBuf {
    let path = std::env::var("PATH").ok();
    let home = std::env::var("HOME").ok();
    find_garage(path.as_deref(), home.as_deref()).unwrap_or_else(|e| panic!("{e}"))
}

/// One node: its files, ports and (while it runs) its process.
struct Node {
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    admin_port: u16,
    /// `HEXID@127.0.0.1:RPCPORT`, as `garage node connect` takes it.
    id: String,
    child: Option<Child>,
    stopped: bool,
}

/// A three-node Garage cluster; see the module header.
pub struct Garage {
    bin: PathBuf,
    root: PathBuf,
    /// The temporary directory [`Garage::start`] made (removed on drop).
    tmp: Option<tempfile::TempDir>,
    nodes: Vec<Node>,
    key_id: String,
    secret: String,
    /// Names scratch files of concurrent curl calls.
    seq: AtomicU64,
}

/// A raw S3 answer: status (0 when none came in time), headers, body.
#[derive(Debug)]
pub struct S3Reply {
    pub status: u16,
    /// Lower-cased names, in the order received (the last response's, if
    /// curl saw several, e.g. after `100 Continue`).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl S3Reply {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text, for messages and XML fields.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Garage {
    /// Starts a cluster in a fresh temporary directory.
    pub fn start() -> Garage {
        let tmp = tempfile::Builder::new()
            .prefix("garage-")
            .tempdir()
            .expect("create a temporary directory for the Garage cluster");
        let root = tmp.path().to_path_buf();
        Self::start_at(root, Some(tmp))
    }

    /// Starts a cluster in `dir/garage` (which must not exist yet); drop
    /// removes that directory, not `dir`.
    pub fn start_in(dir: &Path) -> Garage {
        let root = dir.join("garage");
        assert!(!root.exists(), "{} exists already", root.display());
        Self::start_at(root, None)
    }

    fn start_at(root: PathBuf, tmp: Option<tempfile::TempDir>) -> Garage {
        super::require_tools(&[("curl", "curl")]);
        let bin = garage_bin();
        let version = Command::new(&bin).arg("--version").output();
        let version = version.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        if !version.as_ref().is_ok_and(|v| v.contains(GARAGE_VERSION)) {
            eprintln!(
                "!!! {} is not Garage {GARAGE_VERSION} ({version:?}): the harness and \
                 tests/garage_cluster.rs pin down 2.5.0's behaviour !!!",
                bin.display()
            );
        }
        let began = Instant::now();
        let secret: [u8; 32] = rand::random();
        let rpc_secret = hex(&secret);
        let mut ports = std::collections::HashSet::new();
        let mut port = || loop {
            let p = super::free_port();
            if ports.insert(p) {
                return p;
            }
        };
        let nodes = (0..NODES)
            .map(|i| {
                let dir = root.join(format!("node{i}"));
                let (rpc_port, s3_port, admin_port) = (port(), port(), port());
                for sub in ["meta", "data"] {
                    std::fs::create_dir_all(dir.join(sub))
                        .unwrap_or_else(|e| panic!("create {}/{sub}: {e}", dir.display()));
                }
                let config = dir.join("garage.toml");
                std::fs::write(
                    &config,
                    node_config(&dir, &rpc_secret, rpc_port, s3_port, admin_port),
                )
                .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
                Node {
                    log: dir.join("garage.log"),
                    dir,
                    config,
                    rpc_port,
                    s3_port,
                    admin_port,
                    id: String::new(),
                    child: None,
                    stopped: false,
                }
            })
            .collect();
        let mut g = Garage {
            bin,
            root,
            tmp,
            nodes,
            key_id: String::new(),
            secret: String::new(),
            seq: AtomicU64::new(0),
        };
        for i in 0..NODES {
            g.spawn(i);
        }
        for i in 0..NODES {
            g.wait_listening(i);
        }
        for i in 0..NODES {
            let id = g.cli(i, &["node", "id", "-q"]).trim().to_string();
            g.nodes[i].id = id;
        }
        // every pair, both ways: a node counts a peer up only once its own
        // outgoing connection stands, and a failed first handshake would
        // leave it to a retry timer that, on a loaded CI machine, outlasted
        // the 60 s health wait below
        for i in 0..NODES {
            for j in (0..NODES).filter(|&j| j != i) {
                g.cli_retry(i, &["node", "connect", &g.nodes[j].id]);
            }
        }
        for i in 0..NODES {
            let hexid = g.nodes[i].id.split('@').next().unwrap_or_default();
            g.cli_retry(0, &["layout", "assign", "-z", "dc1", "-c", "1GB", hexid]);
        }
        g.cli(0, &["layout", "apply", "--version", "1"]);
        for i in 0..NODES {
            g.wait_health(i, true);
        }
        g.cli_retry(0, &["bucket", "create", BUCKET]);
        let key = g.cli_retry(0, &["key", "create", "tvix-key"]);
        g.key_id = field(&key, "Key ID:");
        g.secret = field(&key, "Secret key:");
        g.cli_retry(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "tvix-key",
            ],
        );
        // the key and bucket tables are replicated too: wait until every
        // node lets the key write
        for i in 0..NODES {
            g.wait_s3_ready(i);
        }
        eprintln!(
            "garage: 3-node cluster up in {} ms under {}",
            began.elapsed().as_millis(),
            g.root.display()
        );
        g
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint of node `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// `http://127.0.0.1:PORT`, the admin API of node `i` (`/health`).
    pub fn admin_endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].admin_port)
    }

    /// The bucket the key may read, write and own: `tvix`.
    pub fn bucket(&self) -> &str {
        BUCKET
    }

    /// The access key id (`GK…`).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The secret access key.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Node `i`'s log file (appended to across restarts).
    pub fn log(&self, i: usize) -> &Path {
        &self.nodes[i].log
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The environment a child process needs to reach the bucket through
    /// node 0: credentials, region (`AWS_REGION` and `AWS_DEFAULT_REGION`),
    /// endpoint (`AWS_ENDPOINT_URL` and the older `AWS_ENDPOINT`), and
    /// `AWS_ALLOW_HTTP=true`, without which object_store refuses a plain
    /// HTTP endpoint.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_for(0)
    }

    /// [`Garage::env`] with node `i`'s endpoint.
    pub fn env_for(&self, i: usize) -> Vec<(String, String)> {
        let ep = self.endpoint(i);
        [
            ("AWS_ACCESS_KEY_ID", self.key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.as_str()),
            ("AWS_REGION", REGION),
            ("AWS_DEFAULT_REGION", REGION),
            ("AWS_ENDPOINT_URL", ep.as_str()),
            ("AWS_ENDPOINT", ep.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Whether node `i`'s process exists (a stopped node counts).
    pub fn alive(&self, i: usize) -> bool {
        let Some(child) = &self.nodes[i].child else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with(['Z', 'X'])))
            .unwrap_or(false)
    }

    /// Whether node `i` runs and is not stopped.
    pub fn running(&self, i: usize) -> bool {
        self.alive(i) && !self.nodes[i].stopped
    }

    /// SIGKILLs node `i` and reaps it; its directories stay for
    /// [`Garage::restart`].
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("garage node {i} is not running"));
        let _ = child.kill();
        let _ = child.wait();
        node.stopped = false;
    }

    /// SIGSTOPs node `i`: its connections stay open, nothing answers.
    pub fn stop(&mut self, i: usize) {
        self.signal(i, libc::SIGSTOP);
        self.nodes[i].stopped = true;
    }

    /// SIGCONTs a node [`Garage::stop`] stopped.
    pub fn cont(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
        self.nodes[i].stopped = false;
    }

    fn signal(&self, i: usize, sig: libc::c_int) {
        let child = self.nodes[i]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("garage node {i} is not running"));
        // SAFETY: kill(2) on our own child, not yet reaped (we hold it).
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "signal {sig} to garage node {i}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Starts node `i` again after [`Garage::kill`], on the same
    /// directories and ports, and waits until it listens. It then connects
    /// it with the other running nodes at once (left alone, Garage retries
    /// a lost peer only every 30 s: measured, a restart then took 30 s to
    /// bring writes back), and if any runs, waits until each of them
    /// reports the cluster operational.
    pub fn restart(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "garage node {i} still runs: kill it first"
        );
        self.spawn(i);
        self.wait_listening(i);
        let others: Vec<usize> = (0..NODES).filter(|&n| n != i && self.running(n)).collect();
        // both ways: a node counts a peer up only once its own outgoing
        // connection stands, which its retry timer would make 30 s late
        for &n in &others {
            self.cli_retry(i, &["node", "connect", &self.nodes[n].id]);
            self.cli_retry(n, &["node", "connect", &self.nodes[i].id]);
        }
        if !others.is_empty() {
            for n in others.into_iter().chain([i]) {
                self.wait_health(n, false);
            }
        }
    }

    /// Waits (at most 60 s) until node `i`'s `/health` says 200; with
    /// `fully`, until every node is up in its view.
    pub fn wait_health(&self, i: usize, fully: bool) {
        let url = format!("{}/health", self.admin_endpoint(i));
        self.wait_for(
            i,
            Duration::from_secs(60),
            &format!("{url} to say healthy"),
            || {
                let out = Command::new("curl")
                    .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", &url])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout);
                let ok = text.ends_with("\n200") && (!fully || text.contains("fully operational"));
                ok.then_some(())
            },
        );
    }

    /// Runs `garage -c NODE_i_CONFIG ARGS` (at most 60 s), asserting
    /// success; returns stdout.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = self.cli_output(i, args);
        assert!(
            out.status.success(),
            "garage {args:?} on node {i}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Garage::cli`], retried for up to 30 s: right after a layout
    /// change the tables may lack a quorum for a moment.
    fn cli_retry(&self, i: usize, args: &[&str]) -> String {
        let mut last = String::new();
        let found = self.try_wait_for(Duration::from_secs(30), || {
            let out = self.cli_output(i, args);
            if out.status.success() {
                return Some(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            None
        });
        found.unwrap_or_else(|| {
            panic!(
                "garage {args:?} on node {i} kept failing: {last}{}",
                self.log_tails()
            )
        })
    }

    fn cli_output(&self, i: usize, args: &[&str]) -> Output {
        // coreutils timeout: a CLI call to a stopped node must not hang the test
        Command::new("timeout")
            .args(["-s", "KILL", "60"])
            .arg(&self.bin)
            .arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run garage")
    }

    /// Object `key` of the bucket through node `i`: `method` (GET, PUT,
    /// DELETE, HEAD) with `body` (PUT, POST); returns (status, body), status
    /// 0 when no answer came within [`S3_TIMEOUT`].
    pub fn s3(&self, i: usize, method: &str, key: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let r = self.s3_request(i, method, &url_encode_key(key), &[], body);
        (r.status, r.body)
    }

    /// A request to node `i` for `target`, a path in the bucket with any
    /// query (`obj?uploads`, `obj?partNumber=1&uploadId=…`; empty for the
    /// bucket itself), with extra `headers`, signed with SigV4 here and sent
    /// with curl. Path and query are percent-decoded and re-encoded the way
    /// SigV4 wants, so either form may be given.
    ///
    /// The harness signs rather than curl's `--aws-sigv4`: curl 7.88
    /// (Debian 12) sorts the signed headers by `name:value`, so a request
    /// with `x-amz-copy-source` and `x-amz-copy-source-if-match` gets a
    /// signature Garage rejects (403 "Invalid signature").
    pub fn s3_request(
        &self,
        i: usize,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> S3Reply {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let scratch = self.root.join("curl");
        std::fs::create_dir_all(&scratch).expect("create curl scratch dir");
        let hdr_file = scratch.join(format!("{n}.headers"));
        let body_file = scratch.join(format!("{n}.body"));

        let host = format!("127.0.0.1:{}", self.nodes[i].s3_port);
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let path = format!("/{BUCKET}/{}", uri_encode(&percent_decode(path), false));
        let query = canonical_query(query);
        let mut signed: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let with_body = matches!(method, "PUT" | "POST");
        if with_body && !signed.iter().any(|(k, _)| k == "content-type") {
            signed.push(("content-type".into(), "application/octet-stream".into()));
        }
        let auth = sigv4(SigV4 {
            method,
            host: &host,
            path: &path,
            query: &query,
            headers: &mut signed,
            key_id: &self.key_id,
            secret: &self.secret,
            now: std::time::SystemTime::now(),
        });
        signed.push(("authorization".into(), auth));

        let url = if query.is_empty() {
            format!("http://{host}{path}")
        } else {
            format!("http://{host}{path}?{query}")
        };
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "--path-as-is", "--max-time"])
            .arg(S3_TIMEOUT.as_secs().to_string())
            .arg("-D")
            .arg(&hdr_file)
            .args(["-w", "%{stderr}%{http_code}"])
            // curl would otherwise wait for `100 Continue` on bodies > 1 MiB
            .args(["-H", "Expect:"]);
        for (k, v) in &signed {
            cmd.args(["-H", &format!("{k}: {v}")]);
        }
        match method {
            "HEAD" => {
                cmd.arg("--head");
            }
            _ if with_body => {
                std::fs::write(&body_file, body).expect("write curl body");
                cmd.args(["-X", method, "--data-binary"])
                    .arg(format!("@{}", body_file.display()));
            }
            _ => {
                assert!(body.is_empty(), "a {method} with a body");
                cmd.args(["-X", method]);
            }
        }
        let out = cmd
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .expect("run curl");
        let status = String::from_utf8_lossy(&out.stderr)
            .trim()
            .parse()
            .unwrap_or(0);
        let raw = std::fs::read_to_string(&hdr_file).unwrap_or_default();
        let _ = std::fs::remove_file(&hdr_file);
        let _ = std::fs::remove_file(&body_file);
        // -D holds every response's head (a `100 Continue` first): keep the last
        let last = raw
            .rsplit("\r\n\r\n")
            .find(|h| !h.trim().is_empty())
            .unwrap_or("");
        let headers = last
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            out.stdout
        };
        S3Reply {
            status,
            headers,
            body,
        }
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", node.log.display()));
        let err = log.try_clone().expect("dup log file");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env(
                "RUST_LOG",
                std::env::var("GARAGE_LOG").unwrap_or_else(|_| "garage=info,warn".into()),
            )
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        node.child = Some(child);
        node.stopped = false;
    }

    /// Waits (at most 30 s) until node `i` accepts on its RPC, S3 and
    /// admin ports.
    fn wait_listening(&self, i: usize) {
        let n = &self.nodes[i];
        for port in [n.rpc_port, n.s3_port, n.admin_port] {
            self.wait_for(i, Duration::from_secs(30), &format!("port {port}"), || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(drop)
            });
        }
    }

    /// Waits (at most 60 s) until a probe object can be written through
    /// node `i`, then deletes it.
    fn wait_s3_ready(&self, i: usize) {
        let probe = format!(".harness-probe-{i}");
        self.wait_for(i, Duration::from_secs(60), "S3 writes", || {
            (self.s3(i, "PUT", &probe, b"probe").0 == 200).then_some(())
        });
        let (status, _) = self.s3(i, "DELETE", &probe, b"");
        assert_eq!(status, 204, "delete of the probe object through node {i}");
    }

    /// Polls `f` every 100 ms for `limit`; panics naming node `i`, `what`
    /// and the logs if it never yields, or if node `i` exits meanwhile.
    fn wait_for<T>(
        &self,
        i: usize,
        limit: Duration,
        what: &str,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                self.alive(i),
                "garage node {i} exited while waiting for {what}{}",
                self.log_tails()
            );
            assert!(
                Instant::now() < deadline,
                "garage node {i}: waited {limit:?} for {what}{}",
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn try_wait_for<T>(&self, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f() {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last 30 lines of every node's log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            s += &format!(
                "\n--- garage node {i} log ({}) ---\n{tail}",
                n.log.display()
            );
        }
        s
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                if n.stopped {
                    // SAFETY: kill(2) on our own unreaped child.
                    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) };
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if self.tmp.is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Node config: sqlite metadata, replication 3, everything on loopback.
fn node_config(dir: &Path, rpc_secret: &str, rpc: u16, s3: u16, admin: u16) -> String {
    format!(
        r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"
rpc_timeout_msec = {rpc_timeout}

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
        meta = dir.join("meta").display(),
        data = dir.join("data").display(),
        rpc_timeout = RPC_TIMEOUT.as_millis(),
    )
}

/// The value after `label` on its line of `garage key create` output.
fn field(text: &str, label: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("no {label:?} in garage's output:\n{text}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An object key as a URL path: unreserved characters and `/` as they
/// are, everything else percent-encoded.
pub fn url_encode_key(key: &str) -> String {
    uri_encode(key.as_bytes(), false)
}

/// SigV4's URI encoding: unreserved characters as they are, `/` too
/// unless `slash`, everything else `%XX`.
fn uri_encode(bytes: &[u8], slash: bool) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b'/' if !slash => "/".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// A query string in SigV4's canonical form: each name and value encoded,
/// `name=` for a bare name, sorted.
fn canonical_query(q: &str) -> String {
    let mut pairs: Vec<(String, String)> = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), true),
                uri_encode(&percent_decode(v), true),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// What a SigV4 signature covers.
struct SigV4<'a> {
    method: &'a str,
    host: &'a str,
    /// Encoded, as sent.
    path: &'a str,
    /// Canonical, as sent.
    query: &'a str,
    /// Lower-case names; host, x-amz-date and x-amz-content-sha256 are
    /// added here.
    headers: &'a mut Vec<(String, String)>,
    key_id: &'a str,
    secret: &'a str,
    now: std::time::SystemTime,
}

/// AWS Signature Version 4 over an unsigned payload: adds the headers it
/// signs to `r.headers` and returns the `Authorization` value.
fn sigv4(r: SigV4) -> String {
    use sha2::{Digest, Sha256};
    let secs = r
        .now
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let (y, mo, d) = civil_from_days((secs / 86400) as i64);
    let t = secs % 86400;
    let date = format!("{y:04}{mo:02}{d:02}");
    let amz_date = format!("{date}T{:02}{:02}{:02}Z", t / 3600, t / 60 % 60, t % 60);
    r.headers.push(("host".into(), r.host.into()));
    r.headers.push(("x-amz-date".into(), amz_date.clone()));
    r.headers
        .push(("x-amz-content-sha256".into(), "UNSIGNED-PAYLOAD".into()));
    r.headers.sort();
    let canonical_headers: String = r
        .headers
        .iter()
        .map(|(k, v)| format!("{k}:{v}\n"))
        .collect();
    let signed_headers = r
        .headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\nUNSIGNED-PAYLOAD",
        r.method, r.path, r.query
    );
    let scope = format!("{date}/{REGION}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac(format!("AWS4{}", r.secret).as_bytes(), date.as_bytes());
    for part in [REGION, "s3", "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex(&hmac(&key, to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        r.key_id
    )
}

/// HMAC-SHA256 (RFC 2104).
fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |x: u8| block.iter().map(|b| b ^ x).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
