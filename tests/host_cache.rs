//! The host cache end to end ("a remote store served at local speed"):
//! the filler is a real `daemon --cache-dir` process, readers are real FUSE
//! mounts (`mount --cache-dir`, separate processes), and the remote is
//! either a real `daemon` (when it has to go down and come back) or a
//! *counting remote*: an in-process tonic server over an embedded store
//! that counts blob Reads (per digest), directory Gets and path info Gets,
//! and can be told to hold a Read back, trickle it, or lie.
mod common;

use bytes::Bytes;
use common::{bin, cli_err, cli_ok, free_port, pseudo_random, sh, Daemon};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tvix_virtiofsd::castore::{B3Digest, Directory};
use tvix_virtiofsd::serve::grpc::StoreServer;
use tvix_virtiofsd::store::channel::WireChannel;
use tvix_virtiofsd::store::{blob::read_to_vec, Addr, Store};
use tvix_virtiofsd::wire::cache::cache_service_client::CacheServiceClient;
use tvix_virtiofsd::wire::cache::{FillBlobRequest, FillBlobsRequest};
use tvix_virtiofsd::wire::castore as cpb;
use tvix_virtiofsd::wire::store as spb;

const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------
// The counting remote

/// How the remote answers a Read of one digest.
#[derive(Clone)]
enum Behaviour {
    /// Served as stored once the gate is open.
    Gated(watch::Receiver<bool>),
    /// Chunks of `chunk` bytes, each after `delay`.
    Trickle { chunk: usize, delay: Duration },
    /// One byte in the middle flipped.
    Corrupt,
    /// The last 1000 bytes left off.
    Truncated,
    /// 1000 bytes too many.
    TooLong,
}

#[derive(Default)]
struct Ctl {
    reads: Mutex<HashMap<B3Digest, u64>>,
    /// Every Read's digest, in the order they came.
    read_order: Mutex<Vec<B3Digest>>,
    dir_gets: AtomicU64,
    info_gets: AtomicU64,
    /// Bytes of trickled blobs sent so far.
    trickled: AtomicU64,
    behaviour: Mutex<HashMap<B3Digest, Behaviour>>,
    /// Directory digests answered with another directory.
    dir_lies: Mutex<HashMap<B3Digest, Directory>>,
}

impl Ctl {
    fn reads(&self, d: &B3Digest) -> u64 {
        self.reads.lock().unwrap().get(d).copied().unwrap_or(0)
    }
    fn all_reads(&self) -> u64 {
        self.reads.lock().unwrap().values().sum()
    }
    fn set(&self, d: B3Digest, b: Behaviour) {
        self.behaviour.lock().unwrap().insert(d, b);
    }
    fn clear(&self, d: &B3Digest) {
        self.behaviour.lock().unwrap().remove(d);
    }
}

#[derive(Clone)]
struct Remote {
    inner: StoreServer,
    store: Store,
    ctl: Arc<Ctl>,
}

type ChunkStream = BoxStream<'static, Result<cpb::BlobChunk, Status>>;

fn chunks(data: Vec<u8>, size: usize) -> ChunkStream {
    let msgs: Vec<_> = data
        .chunks(size)
        .map(|c| {
            Ok(cpb::BlobChunk {
                data: Bytes::copy_from_slice(c),
            })
        })
        .collect();
    futures::stream::iter(msgs).boxed()
}

#[tonic::async_trait]
impl cpb::blob_service_server::BlobService for Remote {
    type ReadStream = ChunkStream;

    async fn stat(
        &self,
        req: Request<cpb::StatBlobRequest>,
    ) -> Result<Response<cpb::StatBlobResponse>, Status> {
        cpb::blob_service_server::BlobService::stat(&self.inner, req).await
    }

    async fn read(
        &self,
        req: Request<cpb::ReadBlobRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let digest = B3Digest::try_from(&req.get_ref().digest[..])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        *self.ctl.reads.lock().unwrap().entry(digest).or_default() += 1;
        self.ctl.read_order.lock().unwrap().push(digest);
        let behaviour = self.ctl.behaviour.lock().unwrap().get(&digest).cloned();
        let Some(behaviour) = behaviour else {
            return cpb::blob_service_server::BlobService::read(&self.inner, req).await;
        };
        if let Behaviour::Gated(mut open) = behaviour {
            let _ = open.wait_for(|o| *o).await;
            return cpb::blob_service_server::BlobService::read(&self.inner, req).await;
        }
        let mut data = read_to_vec(self.store.blob.as_ref(), &digest)
            .await
            .map_err(Status::from)?
            .ok_or_else(|| Status::not_found("no such blob"))?;
        let s = match behaviour {
            Behaviour::Gated(_) => unreachable!(),
            Behaviour::Trickle { chunk, delay } => {
                let ctl = self.ctl.clone();
                async_stream::stream! {
                    for c in data.chunks(chunk) {
                        tokio::time::sleep(delay).await;
                        ctl.trickled.fetch_add(c.len() as u64, SeqCst);
                        yield Ok(cpb::BlobChunk { data: Bytes::copy_from_slice(c) });
                    }
                }
                .boxed()
            }
            Behaviour::Corrupt => {
                let mid = data.len() / 2;
                data[mid] ^= 0x40;
                chunks(data, 64 << 10)
            }
            Behaviour::Truncated => {
                data.truncate(data.len() - 1000);
                chunks(data, 64 << 10)
            }
            Behaviour::TooLong => {
                data.extend_from_slice(&[7u8; 1000]);
                chunks(data, 64 << 10)
            }
        };
        Ok(Response::new(s))
    }

    async fn put(
        &self,
        req: Request<Streaming<cpb::BlobChunk>>,
    ) -> Result<Response<cpb::PutBlobResponse>, Status> {
        cpb::blob_service_server::BlobService::put(&self.inner, req).await
    }
}

#[tonic::async_trait]
impl cpb::directory_service_server::DirectoryService for Remote {
    type GetStream = BoxStream<'static, Result<cpb::Directory, Status>>;

    async fn get(
        &self,
        req: Request<cpb::GetDirectoryRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        self.ctl.dir_gets.fetch_add(1, SeqCst);
        if let Some(cpb::get_directory_request::ByWhat::Digest(d)) = &req.get_ref().by_what {
            if let Ok(d) = B3Digest::try_from(&d[..]) {
                if let Some(lie) = self.ctl.dir_lies.lock().unwrap().get(&d) {
                    let msg = Ok(lie.to_proto());
                    return Ok(Response::new(futures::stream::iter([msg]).boxed()));
                }
            }
        }
        cpb::directory_service_server::DirectoryService::get(&self.inner, req).await
    }

    async fn put(
        &self,
        req: Request<Streaming<cpb::Directory>>,
    ) -> Result<Response<cpb::PutDirectoryResponse>, Status> {
        cpb::directory_service_server::DirectoryService::put(&self.inner, req).await
    }
}

#[tonic::async_trait]
impl spb::path_info_service_server::PathInfoService for Remote {
    type ListStream = BoxStream<'static, Result<spb::PathInfo, Status>>;

    async fn get(
        &self,
        req: Request<spb::GetPathInfoRequest>,
    ) -> Result<Response<spb::PathInfo>, Status> {
        self.ctl.info_gets.fetch_add(1, SeqCst);
        spb::path_info_service_server::PathInfoService::get(&self.inner, req).await
    }

    async fn put(&self, req: Request<spb::PathInfo>) -> Result<Response<spb::PathInfo>, Status> {
        spb::path_info_service_server::PathInfoService::put(&self.inner, req).await
    }

    async fn calculate_nar(
        &self,
        req: Request<cpb::Node>,
    ) -> Result<Response<spb::CalculateNarResponse>, Status> {
        spb::path_info_service_server::PathInfoService::calculate_nar(&self.inner, req).await
    }

    async fn list(
        &self,
        req: Request<spb::ListPathInfoRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        spb::path_info_service_server::PathInfoService::list(&self.inner, req).await
    }
}

/// Serves the embedded store at `store_dir` as a counting remote on a unix
/// socket at `sock`; returns its address and its controls.
fn counting_remote(
    rt: &tokio::runtime::Runtime,
    store_dir: &Path,
    sock: &Path,
) -> (String, Arc<Ctl>) {
    let a = Addr::Local(store_dir.to_path_buf());
    let store = Store::open(&a, &a, &a).expect("open the remote's store");
    let ctl = Arc::new(Ctl::default());
    let remote = Remote {
        inner: StoreServer::new(store.clone(), true),
        store,
        ctl: ctl.clone(),
    };
    let _in_rt = rt.enter();
    let l = tokio::net::UnixListener::bind(sock).expect("bind the remote's socket");
    let router = tonic::transport::Server::builder()
        .add_service(cpb::blob_service_server::BlobServiceServer::new(
            remote.clone(),
        ))
        .add_service(cpb::directory_service_server::DirectoryServiceServer::new(
            remote.clone(),
        ))
        .add_service(spb::path_info_service_server::PathInfoServiceServer::new(
            remote,
        ));
    rt.spawn(router.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l)));
    (format!("grpc+unix://{}", sock.display()), ctl)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Adds `paths` to the embedded store at `store_dir` with the CLI; answers
/// their store path basenames.
/// Makes the directory `T/name` holding `files` (paths relative to it),
/// adds it to the remote store at `T/remote`, and answers its store path's
/// name.
fn remote_tree(t: &Path, name: &str, files: &[(&str, &[u8])]) -> String {
    let src = t.join(name);
    for (rel, data) in files {
        let path = src.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    import(&t.join("remote"), &[&src]).remove(0)
}

fn import(store_dir: &Path, paths: &[&Path]) -> Vec<String> {
    let store = format!("local://{}", store_dir.display());
    let mut args = vec!["--store", store.as_str(), "import"];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    String::from_utf8(cli_ok(&args))
        .unwrap()
        .lines()
        .map(|l| l.trim().trim_start_matches("/nix/store/").to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// Processes: filler, readers

/// Environment for the processes under test: no colours in their logs.
fn command() -> Command {
    let mut c = Command::new(bin());
    c.env("NO_COLOR", "1")
        .env_remove("TVIX_VIRTIOFSD_CACHE_DIR")
        .env_remove("TVIX_VIRTIOFSD_CACHE_SIZE")
        .stdin(Stdio::null());
    c
}

fn log_file(path: &Path) -> Stdio {
    Stdio::from(std::fs::File::create(path).unwrap())
}

fn read_log(path: &Path) -> String {
    strip_ansi(&std::fs::read_to_string(path).unwrap_or_default())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn wait_connectable(sock: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("process exited ({st}) before listening: {}", read_log(log));
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tvix-virtiofsd --store REMOTE --cache-dir DIR daemon` on a unix socket,
/// with metrics on another, prefetching nothing unless `extra` says;
/// SIGKILLed on drop.
struct Filler {
    child: Child,
    sock: PathBuf,
    metrics: PathBuf,
    log: PathBuf,
}

impl Filler {
    fn start(remote: &str, dir: &Path, work: &Path, name: &str, extra: &[&str]) -> Filler {
        let sock = work.join(format!("{name}.sock"));
        let metrics = work.join(format!("{name}.metrics"));
        let log = work.join(format!("{name}.log"));
        let mut c = command();
        c.arg("--store")
            .arg(remote)
            .arg("--cache-dir")
            .arg(dir)
            .arg("daemon")
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()));
        if !extra.contains(&"--metrics-listen") {
            c.arg("--metrics-listen")
                .arg(format!("unix:{}", metrics.display()));
        }
        // These tests count the fetches guests cause; prefetch has its own.
        if !extra.contains(&"--prefetch") {
            c.args(["--prefetch", "none"]);
        }
        let mut child = c.args(extra).stderr(log_file(&log)).spawn().unwrap();
        wait_connectable(&sock, &mut child, &log);
        Filler {
            child,
            sock,
            metrics,
            log,
        }
    }

    fn addr(&self) -> String {
        format!("grpc+unix://{}", self.sock.display())
    }

    /// SIGKILL, as a crash.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// A CacheService client (what readers use), on `rt`.
    fn cache_client(&self, rt: &tokio::runtime::Runtime) -> CacheServiceClient<WireChannel> {
        let _g = rt.enter();
        CacheServiceClient::new(
            tvix_virtiofsd::store::channel::connect_unix(self.sock.clone(), Default::default())
                .unwrap(),
        )
    }

    fn metrics(&self) -> Metrics {
        scrape(&self.metrics)
    }

    /// SIGTERM; answers the exit status and the log.
    fn stop(mut self) -> (ExitStatus, String) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        let log = read_log(&self.log);
        std::mem::forget(self);
        (st, log)
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prometheus samples by `name{labels}`, without the common prefix.
struct Metrics(HashMap<String, u64>);

impl Metrics {
    /// Calls of a CacheService method served.
    fn cache_calls(&self, method: &str) -> u64 {
        let label = format!("method=\"tvix_virtiofsd.cache.v1.CacheService/{method}\"");
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with("grpc_call_seconds_count{") && k.contains(&label))
            .map(|(_, v)| *v)
            .sum()
    }

    fn get(&self, name: &str) -> u64 {
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("no metric {name} in {:?}", self.0.keys()))
    }
    fn blob(&self, family: &str) -> u64 {
        self.get(&format!("{family}{{kind=\"blob\"}}"))
    }
}

/// One HTTP/1.1 request on `s`; answers the whole response.
fn http(mut s: impl Read + Write, method: &str, path: &str) -> String {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

/// GET /metrics over a unix socket (HTTP/1.1, as Prometheus scrapes).
fn scrape(sock: &Path) -> Metrics {
    let s = std::os::unix::net::UnixStream::connect(sock).expect("metrics socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    parse_metrics(&http(s, "GET", "/metrics"))
}

fn parse_metrics(resp: &str) -> Metrics {
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body = &resp[resp.find("\r\n\r\n").expect("header end") + 4..];
    let mut m = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').expect("sample line");
        if let Some(n) = name.strip_prefix("tvix_virtiofsd_cache_") {
            m.insert(n.to_string(), value.parse().expect("integer sample"));
        } else if let Some(n) = name
            .strip_prefix("tvix_virtiofsd_")
            .filter(|n| n.starts_with("grpc_call_seconds_count{"))
        {
            m.insert(n.to_string(), value.parse().expect("integer sample"));
        }
    }
    assert!(m.contains_key("used_bytes"), "no cache metrics in {body}");
    Metrics(m)
}

/// `tvix-virtiofsd --store STORE [--cache-dir DIR] mount MNT`; unmounted on
/// drop.
struct Mount {
    child: Child,
    path: PathBuf,
    log: PathBuf,
}

impl Mount {
    fn start(store: &str, cache: Option<&Path>, mnt: &Path, extra: &[&str]) -> Mount {
        std::fs::create_dir_all(mnt).unwrap();
        let log = mnt.with_extension("log");
        let mut c = command();
        c.arg("--store").arg(store);
        if let Some(dir) = cache {
            c.arg("--cache-dir").arg(dir);
        }
        let mut child = c
            .arg("mount")
            .arg(mnt)
            .args(extra)
            .stderr(log_file(&log))
            .spawn()
            .unwrap();
        let path = mnt.canonicalize().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !common::is_mounted(&path) {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("mount exited ({st}): {}", read_log(&log));
            }
            assert!(Instant::now() < deadline, "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        Mount { child, path, log }
    }

    fn file(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// SIGTERM: unmounts and exits; answers the log.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        let log = read_log(&self.log);
        assert!(st.success(), "mount exited with {st}: {log}");
        assert!(
            !common::is_mounted(&self.path),
            "still mounted after SIGTERM"
        );
        std::mem::forget(self);
        log
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The reader's closing log line, `cache DIR: hits: N blob, N directory,
/// N path_info; misses: ...`, as ([hits], [misses]) by kind.
fn summary(log: &str) -> ([u64; 3], [u64; 3]) {
    let line = log
        .lines()
        .rfind(|l| l.contains("cache ") && l.contains(": hits: "))
        .unwrap_or_else(|| panic!("no cache summary in the log: {log}"));
    let part = |label: &str| -> [u64; 3] {
        let rest = &line[line.find(label).unwrap() + label.len()..];
        let rest = &rest[..rest.find(';').unwrap()];
        let mut out = [0; 3];
        for (i, kind) in ["blob", "directory", "path_info"].iter().enumerate() {
            let item = rest
                .split(", ")
                .find(|s| s.trim().ends_with(&format!(" {kind}")))
                .unwrap_or_else(|| panic!("no {kind} in {line}"));
            out[i] = item.split_whitespace().next().unwrap().parse().unwrap();
        }
        out
    };
    (part("hits: "), part("misses: "))
}

// ---------------------------------------------------------------------------
// The cache directory

fn blob_file(dir: &Path, d: &B3Digest) -> PathBuf {
    let hex = d.to_hex();
    dir.join("blobs").join(&hex[..2]).join(hex)
}

fn dir_file(dir: &Path, d: &B3Digest) -> PathBuf {
    let hex = d.to_hex();
    dir.join("directories").join(&hex[..2]).join(hex)
}

/// Every object file of the cache directory: (path, length, allocated bytes).
fn objects(dir: &Path) -> Vec<(PathBuf, u64, u64)> {
    let mut out = Vec::new();
    for area in ["blobs", "directories", "pathinfo"] {
        let mut stack = vec![dir.join(area)];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                } else if !is_fill(&e.path()) {
                    out.push((e.path(), m.len(), m.blocks() * 512));
                }
            }
        }
    }
    out
}

/// A fill under way: `.fill*` beside its destination.
fn is_fill(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.as_encoded_bytes().starts_with(b".fill"))
}

/// What the cache charges for an object: whole 4 KiB blocks, at least one.
fn cost(len: u64) -> u64 {
    len.div_ceil(4096).max(1) * 4096
}

/// What the objects in the cache directory cost, as the cache counts it.
fn charged(dir: &Path) -> u64 {
    objects(dir).iter().map(|o| cost(o.1)).sum()
}

/// Fills under way anywhere in the cache directory (and anything left in
/// its staging directory).
fn tmp_entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if is_fill(&p) || d.ends_with("tmp") {
                out.push(p);
            }
        }
    }
    out
}

fn atime(p: &Path) -> (i64, i64) {
    let m = std::fs::metadata(p).unwrap();
    (m.atime(), m.atime_nsec())
}

/// Polls `cond` until it holds, failing after `secs` with `what`.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn b3_of_file(p: &Path) -> std::io::Result<B3Digest> {
    let mut f = std::fs::File::open(p)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(B3Digest::from(h.finalize()))
}

// ---------------------------------------------------------------------------
// Tests

/// A file read through one reader, then through a second reader (a fresh
/// mount: no page cache) costs exactly one remote Read, one directory Get
/// and one path info Get; the blob sits in DIR/blobs with its bytes; the
/// filler counted the misses, the second reader only hits; a read through
/// the filler's own gRPC is a hit there.
#[test]
fn miss_then_hit() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = pseudo_random(3 * MIB + 17, 1);
    let base = remote_tree(
        t,
        "pkg",
        &[("share/data", &data), ("small", b"small file\n")],
    );
    let digest = B3Digest::of(&data);
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &[]);
    let m0 = filler.metrics();
    assert_eq!(m0.blob("misses_total"), 0);
    assert_eq!(m0.get("max_bytes"), 10 << 30, "the default --cache-size");

    let file = format!("{base}/share/data");
    let m1 = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt1"), &[]);
    assert!(std::fs::read(m1.file(&file)).unwrap() == data);
    assert_eq!(ctl.reads(&digest), 1);
    let on_disk = blob_file(&dir, &digest);
    assert!(
        std::fs::read(&on_disk).unwrap() == data,
        "DIR/blobs holds the bytes"
    );
    let m = filler.metrics();
    assert_eq!(m.blob("misses_total"), 1);
    assert_eq!(m.get("misses_total{kind=\"path_info\"}"), 1);
    assert!(m.get("misses_total{kind=\"directory\"}") >= 1);
    assert!(m.get("fetched_bytes_total") >= data.len() as u64);
    assert!(m.get("fills_total") >= 3, "path info, tree, blob");
    assert_eq!(m.get("fills_in_flight"), 0);
    assert_eq!(m.get("fill_errors_total"), 0);
    assert_eq!(m.get("used_bytes"), charged(&dir));
    let (hits1, misses1) = summary(&m1.stop());
    assert_eq!(misses1[0], 1, "the first reader missed the blob");
    assert_eq!(hits1[0], 0);

    // a second reader: everything from DIR, nothing from the remote
    let m2 = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt2"), &[]);
    assert!(std::fs::read(m2.file(&file)).unwrap() == data);
    assert_eq!(
        std::fs::read(m2.file(&format!("{base}/small"))).unwrap(),
        b"small file\n"
    );
    let (hits2, misses2) = summary(&m2.stop());
    // only `small`, which the first reader never read, was a miss
    assert_eq!(misses2, [1, 0, 0], "second reader: hits but for `small`");
    // `data` opened from DIR; the tree (2 directories) and the path info too
    assert!(hits2[0] == 1 && hits2[1] >= 2 && hits2[2] >= 1, "{hits2:?}");
    assert_eq!(ctl.reads(&digest), 1, "one remote Read for two readers");
    assert_eq!(ctl.info_gets.load(SeqCst), 1);
    assert_eq!(
        ctl.dir_gets.load(SeqCst),
        1,
        "the tree in one recursive Get"
    );
    // `small` was never read by the first reader: filled for the second
    assert_eq!(ctl.all_reads(), 2);

    // the filler's own gRPC serves the blob as a hit
    let before = filler.metrics().blob("hits_total");
    let client = {
        let _g = rt.enter();
        common::grpc_store(&filler.addr())
    };
    let got = rt
        .block_on(read_to_vec(client.blob.as_ref(), &digest))
        .unwrap()
        .unwrap();
    assert!(got == data);
    assert_eq!(filler.metrics().blob("hits_total"), before + 1);
    assert_eq!(ctl.reads(&digest), 1);
    let (st, log) = filler.stop();
    assert!(st.success(), "{log}");
    assert!(
        log.contains("hits: "),
        "the filler logs its summary at exit: {log}"
    );
}

/// A reader whose guest reads a directory's files in their listed order
/// asks the filler for the next ones before they are read: they land in
/// DIR, fetched from the remote once each; files past the read-ahead
/// window, and a guest that reads one file, cause no fetch.
#[test]
fn files_read_in_order_are_filled_ahead() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let datas: Vec<Vec<u8>> = (0..12)
        .map(|i| pseudo_random(20_000 + i, i as u64))
        .collect();
    let names: Vec<String> = (0..12).map(|i| format!("f{i:02}")).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&datas)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let base = remote_tree(t, "pkg", &files);
    let digests: Vec<B3Digest> = datas.iter().map(|d| B3Digest::of(d)).collect();
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &[]);
    let m = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt"), &[]);
    let read = |i: usize| {
        let got = std::fs::read(m.file(&format!("{base}/{}", names[i]))).unwrap();
        assert!(got == datas[i], "f{i:02}");
    };
    let cached = |i: usize| blob_file(&dir, &digests[i]).exists();
    let settle = || std::thread::sleep(Duration::from_millis(500));

    read(5);
    settle();
    assert_eq!(ctl.all_reads(), 1, "one file read alone: nothing ahead");
    read(6);
    wait_until(10, "f07 and f08 filled ahead", || cached(7) && cached(8));
    settle();
    for i in (0..12).filter(|i| ![5, 6, 7, 8].contains(i)) {
        assert!(!cached(i), "f{i:02} filled, outside the window");
    }
    // The guest's own reads of f07 and f08 find them in DIR.
    read(7);
    read(8);
    for (i, d) in digests.iter().enumerate().take(9).skip(5) {
        assert_eq!(ctl.reads(d), 1, "f{i:02} fetched once");
    }
    let log = m.stop();
    let line = log
        .lines()
        .rfind(|l| l.contains(": hits: "))
        .unwrap_or_else(|| panic!("no cache summary: {log}"));
    assert!(
        line.contains("ahead)") && !line.contains("(0 ahead)"),
        "the reader counts its fills ahead: {line}"
    );
    let mf = filler.metrics();
    assert_eq!(mf.get("fill_errors_total"), 0);
}

/// Hashes a blob read through a gRPC store client, chunk by chunk.
async fn b3_over_grpc(store: Store, digest: B3Digest) -> B3Digest {
    use tokio::io::AsyncReadExt;
    let mut r = store
        .blob
        .open_read(&digest)
        .await
        .expect("read through the filler")
        .expect("the filler has the blob");
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB];
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    B3Digest::from(h.finalize())
}

/// 16 readers of one 64 MiB file across two mounts (separate processes on
/// one DIR) and 4 gRPC Reads against the filler, all while the remote
/// holds its Read back: the remote sees exactly one Read, the filler
/// counts the others as joining it, and every reader gets the right bytes.
#[test]
fn concurrent_misses_fetch_once() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = pseudo_random(64 * MIB + 5, 2);
    let digest = B3Digest::of(&data);
    let base = remote_tree(t, "big", &[("blob", &data)]);
    drop(data);
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    let (gate, gated) = watch::channel(false);
    ctl.set(digest, Behaviour::Gated(gated));
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &[]);
    let mounts = [
        Mount::start(&filler.addr(), Some(&dir), &t.join("mnt1"), &[]),
        Mount::start(&filler.addr(), Some(&dir), &t.join("mnt2"), &[]),
    ];
    let file = format!("{base}/blob");
    for m in &mounts {
        // path info and tree now; only the blob is held back
        assert_eq!(
            std::fs::metadata(m.file(&file)).unwrap().len(),
            64 << 20 | 5
        );
    }
    let waits_before = filler.metrics().get("dedup_waits_total");

    let mut cats = Vec::new();
    for m in &mounts {
        for _ in 0..8 {
            let p = m.file(&file);
            cats.push(std::thread::spawn(move || b3_of_file(&p)));
        }
    }
    let grpc: Vec<_> = (0..4)
        .map(|_| {
            let _g = rt.enter();
            rt.spawn(b3_over_grpc(common::grpc_store(&filler.addr()), digest))
        })
        .collect();
    // the readers pile up behind the one fetch under way
    wait_until(30, "readers joining the fetch under way", || {
        filler.metrics().get("dedup_waits_total") >= waits_before + 4
    });
    assert_eq!(ctl.reads(&digest), 1);
    assert_eq!(filler.metrics().get("fills_in_flight"), 1);
    gate.send(true).unwrap();

    for c in cats {
        assert_eq!(c.join().unwrap().expect("read through a mount"), digest);
    }
    for g in grpc {
        assert_eq!(rt.block_on(g).unwrap(), digest);
    }
    assert_eq!(ctl.reads(&digest), 1, "one remote Read for 20 readers");
    let m = filler.metrics();
    assert!(m.get("dedup_waits_total") >= waits_before + 4);
    assert_eq!(m.get("fills_in_flight"), 0);
    assert_eq!(m.get("fill_errors_total"), 0);
    assert_eq!(b3_of_file(&blob_file(&dir, &digest)).unwrap(), digest);
    for m in mounts {
        m.stop();
    }
}

/// `--cache-size 4M` and 11 store paths of 900 KiB to 2 MiB read through
/// readers: the bound holds after every read (the filler's gauge, the
/// charged sizes and the allocated blocks of the object files), the gauge
/// matches the files; the least recently used blob goes first, one a
/// reader hit since (reported to the filler when it exits) stays; a file
/// whose blob is evicted while it is open reads to its end.
#[test]
fn eviction_keeps_the_bound_lru() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    const MAX: u64 = 4 << 20;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::create_dir_all(t.join("src")).unwrap();
    let mut datas: Vec<Vec<u8>> = (0..10)
        .map(|i| pseudo_random(900 << 10, 1001 + 2 * i))
        .collect();
    datas.push(pseudo_random(2 * MIB, 99));
    let srcs: Vec<PathBuf> = (0..datas.len())
        .map(|i| {
            let p = t.join("src").join(format!("f{i}"));
            std::fs::write(&p, &datas[i]).unwrap();
            p
        })
        .collect();
    let bases = import(
        &t.join("remote"),
        &srcs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let digests: Vec<B3Digest> = datas.iter().map(|d| B3Digest::of(d)).collect();
    let distinct: std::collections::HashSet<_> = digests.iter().collect();
    assert_eq!(distinct.len(), digests.len(), "eleven different blobs");
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &["--cache-size", "4M"]);
    let within_bound = |after: &str| {
        let m = filler.metrics();
        assert_eq!(m.get("max_bytes"), MAX);
        assert!(
            m.get("used_bytes") <= MAX,
            "after {after}: used {}",
            m.get("used_bytes")
        );
        let objs = objects(&dir);
        let charged: u64 = objs.iter().map(|o| cost(o.1)).sum();
        let allocated: u64 = objs.iter().map(|o| o.2).sum();
        assert!(charged <= MAX, "after {after}: objects take {charged}");
        assert!(
            allocated <= MAX,
            "after {after}: {allocated} bytes allocated"
        );
    };
    let read = |m: &Mount, i: usize| {
        let got = std::fs::read(m.file(&bases[i])).unwrap();
        assert!(got == datas[i], "f{i} read back differently");
        within_bound(&format!("f{i}"));
    };

    let m1 = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt1"), &[]);
    for i in 0..3 {
        read(&m1, i);
    }
    m1.stop();
    // Make the three look used hours ago, f0 longest: only objects not
    // used within the last ten minutes have their use reported.
    for (i, hours) in [(0, 3), (1, 2), (2, 1)] {
        let when = std::time::SystemTime::now() - Duration::from_secs(hours * 3600);
        std::fs::File::open(blob_file(&dir, &digests[i]))
            .unwrap()
            .set_times(std::fs::FileTimes::new().set_accessed(when))
            .unwrap();
    }
    // f0 again, through a fresh reader (the first one's page cache would
    // answer without asking it): a hit, reported when it exits
    let m1b = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt1b"), &[]);
    read(&m1b, 0);
    let (hits, misses) = summary(&m1b.stop());
    assert_eq!(
        (hits[0], misses[0]),
        (1, 0),
        "f0 was a hit in the fresh reader"
    );
    let a0 = atime(&blob_file(&dir, &digests[0]));
    assert!(
        a0 > atime(&blob_file(&dir, &digests[1])) && a0 > atime(&blob_file(&dir, &digests[2])),
        "the reader's hit on f0 reached the filler"
    );

    let m2 = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt2"), &[]);
    for i in 3..5 {
        read(&m2, i);
    }
    let m = filler.metrics();
    assert!(m.get("evictions_total") >= 1 && m.get("evicted_bytes_total") >= 900 << 10);
    assert!(
        !blob_file(&dir, &digests[1]).exists(),
        "f1, least recently used, is evicted"
    );
    assert!(
        blob_file(&dir, &digests[0]).exists(),
        "f0, hit since, is kept"
    );
    assert!(blob_file(&dir, &digests[4]).exists());

    // f10 (2 MiB) opened and partly read; then enough newer objects that it
    // must go; the open file still reads to its end
    let x = &datas[10];
    let mut open = std::fs::File::open(m2.file(&bases[10])).unwrap();
    let mut head = vec![0u8; 64 << 10];
    open.read_exact(&mut head).unwrap();
    assert!(head == x[..head.len()]);
    assert!(blob_file(&dir, &digests[10]).exists());
    for i in 5..10 {
        read(&m2, i);
    }
    assert!(
        !blob_file(&dir, &digests[10]).exists(),
        "f10 is older than 5 x 900 KiB read since: evicted"
    );
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).unwrap();
    assert!(
        rest == x[head.len()..],
        "an evicted open file reads to its end"
    );
    drop(open);

    let m = filler.metrics();
    assert_eq!(
        m.get("used_bytes"),
        charged(&dir),
        "the gauge is what the files take"
    );
    assert_eq!(m.get("fill_errors_total"), 0);
    assert_eq!(ctl.all_reads(), 11, "every blob fetched once");
    assert!(tmp_entries(&dir).is_empty());
    m2.stop();
}

/// The filler SIGKILLed in the middle of a fill (the remote trickles a
/// 16 MiB blob): no file for the digest in DIR/blobs, only a partial one in
/// a `.fill` file beside its destination, which the next filler removes
/// before it serves; the fill then
/// completes and a reader reads the right bytes.
#[test]
fn filler_killed_mid_fill() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = pseudo_random(16 * MIB + 3, 5);
    let digest = B3Digest::of(&data);
    std::fs::write(t.join("slow"), &data).unwrap();
    let base = import(&t.join("remote"), &[&t.join("slow")]).remove(0);
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    ctl.set(
        digest,
        Behaviour::Trickle {
            chunk: 256 << 10,
            delay: Duration::from_millis(40),
        },
    );
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &[]);

    // a reader's request, its progress watched until the fill is well under way
    let mut client = filler.cache_client(&rt);
    let req = FillBlobRequest {
        digest: digest.into(),
        size: data.len() as u64,
    };
    let mut progress = rt.block_on(client.fill_blob(req)).unwrap().into_inner();
    loop {
        let p = rt.block_on(progress.message()).unwrap().expect("progress");
        assert!(!p.done, "the fill cannot be done yet");
        if p.bytes >= 2 * MIB as u64 {
            break;
        }
    }
    assert!(
        !tmp_entries(&dir).is_empty(),
        "the fill is written in a temporary file"
    );
    filler.kill9();
    assert!(
        !matches!(rt.block_on(progress.message()), Ok(Some(p)) if p.done),
        "no fill completes after the crash"
    );
    assert!(
        ctl.trickled.load(SeqCst) < data.len() as u64,
        "killed mid-fill"
    );
    assert!(
        !blob_file(&dir, &digest).exists(),
        "no partial blob is visible"
    );
    assert!(objects(&dir).is_empty());
    assert!(
        !tmp_entries(&dir).is_empty(),
        "the crash left its temporary file"
    );

    ctl.clear(&digest);
    let filler = Filler::start(&remote, &dir, t, "filler2", &[]);
    assert_eq!(
        tmp_entries(&dir),
        Vec::<PathBuf>::new(),
        "the new filler removed the leftovers before serving"
    );
    let m = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt"), &[]);
    assert!(std::fs::read(m.file(&base)).unwrap() == data);
    assert_eq!(b3_of_file(&blob_file(&dir, &digest)).unwrap(), digest);
    assert_eq!(ctl.reads(&digest), 2, "fetched again after the crash");
    assert!(tmp_entries(&dir).is_empty());
    m.stop();
}

/// A remote that lies (a blob with a flipped byte, one too short, one too
/// long; a directory answered with another): readers get EIO, never bytes;
/// nothing of it is visible in DIR; the filler counts fill errors and
/// leaves no temporary files; once the remote tells the truth the same
/// reads succeed.
#[test]
fn lying_remote_is_refused() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    use tvix_virtiofsd::castore::Node;
    use tvix_virtiofsd::nix::store_path::StorePath;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("liar");
    std::fs::create_dir_all(&src).unwrap();
    let lies = [
        ("corrupt", pseudo_random(300 << 10, 7), Behaviour::Corrupt),
        ("short", pseudo_random(600 << 10, 9), Behaviour::Truncated),
        ("long", pseudo_random(100 << 10, 11), Behaviour::TooLong),
    ];
    for (name, data, _) in &lies {
        std::fs::write(src.join(name), data).unwrap();
    }
    std::fs::write(src.join("good"), b"the truth\n").unwrap();
    let wrongdir = t.join("wrongdir");
    std::fs::create_dir_all(wrongdir.join("sub")).unwrap();
    std::fs::write(wrongdir.join("sub/f"), b"in a lying tree\n").unwrap();
    let bases = import(&t.join("remote"), &[&src, &wrongdir]);
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    for (_, data, b) in &lies {
        ctl.set(B3Digest::of(data), b.clone());
    }
    // wrongdir's root directory is answered with another (valid) directory
    let root = {
        let a = Addr::Local(t.join("remote"));
        let store = Store::open(&a, &a, &a).unwrap();
        let sp = StorePath::from_basename(&bases[1]).unwrap();
        let info = rt
            .block_on(store.path_info.get(sp.digest()))
            .unwrap()
            .unwrap();
        let Node::Directory { digest, .. } = info.node else {
            panic!("wrongdir is a directory")
        };
        digest
    };
    let other = Directory::new();
    ctl.dir_lies.lock().unwrap().insert(root, other.clone());

    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &[]);
    let m = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt"), &[]);
    assert_eq!(
        std::fs::read(m.file(&format!("{}/good", bases[0]))).unwrap(),
        b"the truth\n"
    );
    for (name, data, _) in &lies {
        let e = std::fs::read(m.file(&format!("{}/{name}", bases[0]))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
        assert!(
            !blob_file(&dir, &B3Digest::of(data)).exists(),
            "{name} is not in DIR"
        );
    }
    let e = std::fs::metadata(m.file(&format!("{}/sub/f", bases[1]))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "wrong directory: {e}");
    assert!(!dir_file(&dir, &root).exists());
    assert!(!dir_file(&dir, &other.digest()).exists());

    // asked directly with the size the directory promises, the too long
    // blob is refused as well
    let (_, long, _) = &lies[2];
    let mut client = filler.cache_client(&rt);
    let r = rt.block_on(async {
        let mut s = client
            .fill_blob(FillBlobRequest {
                digest: B3Digest::of(long).into(),
                size: long.len() as u64,
            })
            .await?
            .into_inner();
        while let Some(p) = s.message().await? {
            if p.done {
                return Ok(true);
            }
        }
        Ok::<_, Status>(false)
    });
    assert!(r.is_err(), "FillBlob of a too long blob: {r:?}");

    let m1 = filler.metrics();
    assert!(
        m1.get("fill_errors_total") >= 5,
        "3 blobs, a tree, a sized fill"
    );
    assert!(
        tmp_entries(&dir).is_empty(),
        "failed fills leave no temporary files"
    );
    assert_eq!(m1.get("used_bytes"), charged(&dir));

    // the truth, and the same reads succeed: nothing was remembered as bad
    ctl.behaviour.lock().unwrap().clear();
    ctl.dir_lies.lock().unwrap().clear();
    for (name, data, _) in &lies {
        let got = std::fs::read(m.file(&format!("{}/{name}", bases[0]))).unwrap();
        assert!(&got == data, "{name}");
    }
    assert_eq!(
        std::fs::read(m.file(&format!("{}/sub/f", bases[1]))).unwrap(),
        b"in a lying tree\n"
    );
    assert!(dir_file(&dir, &root).exists());
    m.stop();
}

/// A tree with every kind of entry, for `diff -r` against a mount.
fn sample_tree(root: &Path, seed: u64) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("share/deep/er")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("share/deep/er/file"), b"deep\n").unwrap();
    std::fs::write(root.join("share/big"), pseudo_random(1536 << 10, seed)).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    for i in 0..40 {
        std::fs::write(root.join(format!("share/n{i:02}")), format!("{seed} {i}\n")).unwrap();
    }
    let tool = root.join("bin/tool");
    std::fs::write(&tool, b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("../share/big", root.join("bin/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent", root.join("dangling")).unwrap();
}

fn same_tree(src: &Path, mounted: &Path) {
    sh(&format!(
        "diff -r --no-dereference {} {}",
        src.display(),
        mounted.display()
    ));
    let modes = |root: &Path| {
        sh(&format!(
            "cd {} && find . -printf '%y %m %s %l %p\\n' | sort",
            root.display()
        ))
    };
    let strip = |s: String| -> String {
        // the mount has Nix's modes: compare only the executable bit
        s.lines()
            .map(|l| {
                let mut f = l.splitn(3, ' ');
                let (ty, mode, rest) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
                let x = u32::from_str_radix(mode, 8).unwrap() & 0o100 != 0;
                let x = if ty == "l" { false } else { x };
                // a directory's size is the file system's own
                let rest = if ty == "d" {
                    rest.split_once(' ').unwrap().1
                } else {
                    rest
                };
                format!("{ty} {x} {rest}\n")
            })
            .collect()
    };
    assert_eq!(strip(modes(src)), strip(modes(mounted)));
}

/// Two readers (separate mount processes) on one DIR: the first pulls two
/// store paths through the filler; then the remote is stopped and the
/// second reads them all from DIR (no misses), identical to the source;
/// a plain client of the filler (no --cache-dir) also gets them, served
/// by the filler from DIR.
#[test]
fn two_readers_share_one_cache() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (a, b) = (t.join("src/pkg-a"), t.join("src/pkg-b"));
    sample_tree(&a, 21);
    sample_tree(&b, 23);
    let bases = import(&t.join("remote"), &[&a, &b]);
    let srcs = [a, b];
    let remote = Daemon::start(
        &format!("local://{}", t.join("remote").display()),
        &format!("unix:{}", t.join("remote.sock").display()),
        &["--read-only"],
    );
    let dir = t.join("cache");
    let filler = Filler::start(&remote.addr, &dir, t, "filler", &[]);
    let first = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt1"), &[]);
    for (src, base) in srcs.iter().zip(&bases) {
        same_tree(src, &first.file(base));
    }
    assert!(remote.stop().success());

    let second = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt2"), &[]);
    let plain = Mount::start(&filler.addr(), None, &t.join("mnt3"), &[]);
    for (src, base) in srcs.iter().zip(&bases) {
        same_tree(src, &second.file(base));
        same_tree(src, &plain.file(base));
    }
    let (hits, misses) = summary(&second.stop());
    assert_eq!(
        misses,
        [0, 0, 0],
        "the second reader had everything from DIR"
    );
    assert!(hits.iter().all(|&h| h > 0), "{hits:?}");
    plain.stop();
    first.stop();
    let m = filler.metrics();
    assert_eq!(m.get("fill_errors_total"), 0);
    assert!(
        m.blob("hits_total") > 0,
        "the plain client was served from DIR"
    );
}

/// An uncached file (and an uncached store path) read through a reader
/// while the remote hangs (SIGSTOP) or is down fails with EIO or ETIMEDOUT
/// within the store timeouts, never hangs; with the remote back on the same
/// address the same reads succeed.
fn remote_down_and_back(tcp: bool) {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let pkg = t.join("pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    for f in ["a", "b", "c"] {
        std::fs::write(pkg.join(f), format!("file {f}\n").repeat(1000)).unwrap();
    }
    std::fs::write(t.join("later"), b"added later\n").unwrap();
    let bases = import(&t.join("remote"), &[&pkg, &t.join("later")]);
    let store = format!("local://{}", t.join("remote").display());
    let listen = if tcp {
        format!("127.0.0.1:{}", free_port())
    } else {
        format!("unix:{}", t.join("remote.sock").display())
    };
    let remote = Daemon::start(&store, &listen, &["--read-only"]);
    let dir = t.join("cache");
    let filler = Filler::start(&remote.addr, &dir, t, "filler", &["--store-timeout", "2"]);
    let m = Mount::start(
        &filler.addr(),
        Some(&dir),
        &t.join("mnt"),
        &["--store-timeout", "4"],
    );
    let file = |f: &str| m.file(&format!("{}/{f}", bases[0]));
    let want = |f: &str| format!("file {f}\n").repeat(1000);
    assert_eq!(std::fs::read_to_string(file("a")).unwrap(), want("a"));
    let bounded = |what: &str, r: std::io::Result<Vec<u8>>, t0: Instant| {
        let e = r.expect_err(what);
        assert!(
            t0.elapsed() < Duration::from_secs(2 + 4 + 3),
            "{what}: not bounded: {:?}",
            t0.elapsed()
        );
        assert!(
            matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ETIMEDOUT)),
            "{what}: {e}"
        );
    };

    // hung remote
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(remote.child.id() as i32, libc::SIGSTOP) };
    // kill returns before the threads stop: a loaded machine can still
    // run one for a moment
    common::wait_stopped(remote.child.id());
    let t0 = Instant::now();
    bounded("b, remote hung", std::fs::read(file("b")), t0);
    // SAFETY: as above.
    unsafe { libc::kill(remote.child.id() as i32, libc::SIGCONT) };
    // the first read may still join the filler's fetch that failed while
    // the remote hung: served again within the store timeout
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(file("b")) {
            Ok(s) => {
                assert_eq!(s, want("b"));
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no recovery after SIGCONT: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // remote down
    assert!(remote.stop().success());
    let t0 = Instant::now();
    bounded("c, remote down", std::fs::read(file("c")), t0);
    let t0 = Instant::now();
    bounded("later, remote down", std::fs::read(m.file(&bases[1])), t0);
    // what is cached still reads
    assert_eq!(std::fs::read_to_string(file("a")).unwrap(), want("a"));

    // back on the same address
    let remote = Daemon::start(&store, &listen, &["--read-only"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match std::fs::read_to_string(file("c")) {
            Ok(s) => {
                assert_eq!(s, want("c"));
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no recovery: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read(m.file(&bases[1])).unwrap(), b"added later\n");
    m.stop();
    assert!(filler.metrics().get("fill_errors_total") >= 3);
    let (st, log) = filler.stop();
    assert!(st.success(), "{log}");
    assert!(remote.stop().success());
}

#[test]
fn remote_down_and_back_unix() {
    remote_down_and_back(false);
}

#[test]
fn remote_down_and_back_tcp() {
    remote_down_and_back(true);
}

/// A reader whose store is a plain `daemon` (no --cache-dir, so no
/// CacheService) still reads everything right, streaming blobs as a plain
/// client does, and says so once; it writes nothing into DIR.
#[test]
fn reader_of_a_plain_daemon_falls_back() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("pkg");
    sample_tree(&src, 31);
    std::fs::write(src.join("large"), pseudo_random(6 * MIB, 33)).unwrap();
    let base = import(&t.join("store"), &[&src]).remove(0);
    let daemon = Daemon::start(
        &format!("local://{}", t.join("store").display()),
        &format!("unix:{}", t.join("d.sock").display()),
        &["--read-only"],
    );
    let dir = t.join("cache");
    std::fs::create_dir_all(&dir).unwrap();
    let m = Mount::start(&daemon.addr, Some(&dir), &t.join("mnt"), &[]);
    same_tree(&src, &m.file(&base));
    let log = m.stop();
    let warning = "the store does not fill cache directories";
    assert_eq!(log.matches(warning).count(), 1, "warned once: {log}");
    let (hits, misses) = summary(&log);
    assert_eq!(hits, [0, 0, 0]);
    assert!(misses[0] > 0);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "a reader writes nothing"
    );
    assert!(daemon.stop().success());
}

/// Bad --cache-size values are refused with the reason; a second filler on
/// a directory that has one is refused while the first goes on serving,
/// and is welcome once it is gone; a reader needs a remote store and an
/// existing directory.
#[test]
fn bad_sizes_and_second_filler_refused() {
    use tvix_virtiofsd::cli::args::parse_size;
    for (s, v) in [
        ("512", 512),
        ("64K", 64 << 10),
        ("3m", 3 << 20),
        ("10G", 10 << 30),
        ("1T", 1 << 40),
    ] {
        assert_eq!(parse_size(s), Ok(v), "{s}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dir = t.join("cache");
    let dir_s = dir.to_str().unwrap();
    let listen = format!("unix:{}", t.join("x.sock").display());
    for (size, why) in [
        ("10X", "unknown suffix"),
        ("ten", "unknown suffix 'n'"),
        ("x1", "not a size in bytes"),
        ("1.5G", "not a size in bytes"),
        ("-5", "not a size in bytes"),
        ("0", "must be between 1 byte and 16 EiB"),
        ("99999999T", "must be between 1 byte and 16 EiB"),
        ("", "not a size in bytes"),
    ] {
        let e = cli_err(&[
            "--store",
            "memory://",
            "--cache-dir",
            dir_s,
            "daemon",
            "--listen",
            &listen,
            &format!("--cache-size={size}"),
        ]);
        assert!(
            e.contains("--cache-size") && e.contains(why),
            "{size:?}: {e}"
        );
    }
    assert!(!t.join("x.sock").exists());

    let first = Filler::start("memory://", &dir, t, "first", &[]);
    let second_sock = t.join("second.sock");
    let mut second = command()
        .args([
            "--store",
            "memory://",
            "--cache-dir",
            dir_s,
            "daemon",
            "--listen",
        ])
        .arg(format!("unix:{}", second_sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second filler on the same directory kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!st.success());
    assert!(
        err.contains("is filled by another process already"),
        "{err}"
    );
    assert!(err.contains(dir_s), "{err}");
    assert!(!second_sock.exists());
    assert!(std::os::unix::net::UnixStream::connect(&first.sock).is_ok());
    assert!(
        first.metrics().get("max_bytes") > 0,
        "the first still serves"
    );
    let (st, log) = first.stop();
    assert!(st.success(), "{log}");
    let third = Filler::start("memory://", &dir, t, "third", &[]);

    // readers: a cache directory goes in front of a remote store, and must exist
    let mnt = t.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let e = cli_err(&[
        "--store",
        "memory://",
        "--cache-dir",
        dir_s,
        "mount",
        mnt.to_str().unwrap(),
    ]);
    assert!(e.contains("in front of a remote store"), "{e}");
    let missing = t.join("no-such-cache");
    let e = cli_err(&[
        "--store",
        &third.addr(),
        "--cache-dir",
        missing.to_str().unwrap(),
        "mount",
        mnt.to_str().unwrap(),
    ]);
    assert!(e.contains(missing.to_str().unwrap()), "{e}");
    assert!(!common::is_mounted(&mnt));
    drop(third);
}

/// What a cached path info takes is charged: a large one (300 references)
/// fetched into a full cache makes room for its real size, not a guess, so
/// the bound holds; one put again through the filler replaces its file and
/// is charged once (the gauge stays what the files take).
#[test]
fn path_infos_are_charged_what_they_take() {
    use tvix_virtiofsd::castore::Node;
    use tvix_virtiofsd::nix::store_path::StorePath;
    const MAX: u64 = 1 << 20;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let remote_dir = t.join("remote");
    let a = Addr::Local(remote_dir.clone());
    let remote = Store::open(&a, &a, &a).unwrap();
    // a blob that leaves exactly one block of the bound free
    let filler_blob = pseudo_random(MAX as usize - 4096, 41);
    let small = b"#!/bin/sh\n".to_vec();
    let info = rt.block_on(async {
        use tvix_virtiofsd::store::blob::put_bytes;
        put_bytes(remote.blob.as_ref(), &filler_blob).await.unwrap();
        let digest = put_bytes(remote.blob.as_ref(), &small).await.unwrap();
        let mut info = common::bare_path_info(
            StorePath::new([7; 20], "many-references").unwrap(),
            Node::File {
                digest,
                size: small.len() as u64,
                executable: true,
            },
        );
        info.references = (0..300u32)
            .map(|i| {
                let mut h = [0u8; 20];
                h[..4].copy_from_slice(&i.to_le_bytes());
                StorePath::new(h, format!("dependency-number-{i}")).unwrap()
            })
            .collect();
        remote.path_info.put(info.clone()).await.unwrap();
        info
    });
    let dir = t.join("cache");
    let filler = Filler::start(
        &format!("local://{}", remote_dir.display()),
        &dir,
        t,
        "filler",
        &["--cache-size", "1M"],
    );
    let client = {
        let _g = rt.enter();
        common::grpc_store(&filler.addr())
    };
    let got = rt
        .block_on(read_to_vec(
            client.blob.as_ref(),
            &B3Digest::of(&filler_blob),
        ))
        .unwrap()
        .unwrap();
    assert!(got == filler_blob);
    assert_eq!(filler.metrics().get("used_bytes"), MAX - 4096);

    let back = rt
        .block_on(client.path_info.get(info.store_path.digest()))
        .unwrap();
    assert_eq!(back.as_ref(), Some(&info));
    let on_disk = charged(&dir);
    let m = filler.metrics();
    assert!(
        m.get("used_bytes") <= MAX && on_disk <= MAX,
        "a large path info overran the bound: gauge {}, files {on_disk}",
        m.get("used_bytes")
    );
    assert_eq!(m.get("used_bytes"), on_disk);

    for _ in 0..3 {
        rt.block_on(client.path_info.put(info.clone())).unwrap();
    }
    assert_eq!(
        filler.metrics().get("used_bytes"),
        charged(&dir),
        "a path info put again is charged once"
    );
    let (st, log) = filler.stop();
    assert!(st.success(), "{log}");
}

/// Asks the filler to fill `digest` (size unknown, as a mount's reader
/// asks); answers whether it was stored.
async fn fill(mut c: CacheServiceClient<WireChannel>, digest: B3Digest) -> Result<bool, Status> {
    let req = FillBlobRequest {
        digest: digest.into(),
        size: 0,
    };
    let mut s = c.fill_blob(req).await?.into_inner();
    while let Some(p) = s.message().await? {
        if p.done {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Fills that together need more than the bound, arriving at once (two
/// 700 KiB blobs in a 1 MiB cache, trickled so that both hold room when
/// they run out of it): they must not wait for each other until the store
/// timeout; at least one is stored at once and the other can be filled
/// right after. A blob larger than the whole cache fails at once too.
#[test]
fn fills_over_the_bound_do_not_stall() {
    const MAX: u64 = 1 << 20;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut datas: Vec<Vec<u8>> = (0..2)
        .map(|i| pseudo_random(700 << 10, 501 + 2 * i))
        .collect();
    datas.push(pseudo_random(2 * MIB, 509));
    let paths: Vec<PathBuf> = (0..3).map(|i| t.join(format!("x{i}"))).collect();
    for (p, d) in paths.iter().zip(&datas) {
        std::fs::write(p, d).unwrap();
    }
    import(
        &t.join("remote"),
        &paths.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let digests: Vec<B3Digest> = datas.iter().map(|d| B3Digest::of(d)).collect();
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    for d in &digests {
        let trickle = Behaviour::Trickle {
            chunk: 64 << 10,
            delay: Duration::from_millis(20),
        };
        ctl.set(*d, trickle);
    }
    let dir = t.join("cache");
    let timeout = 20;
    let filler = Filler::start(
        &remote,
        &dir,
        t,
        "filler",
        &[
            "--cache-size",
            "1M",
            "--store-timeout",
            &timeout.to_string(),
        ],
    );
    let quick = Duration::from_secs(timeout / 2);

    let t0 = Instant::now();
    let both: Vec<_> = digests[..2]
        .iter()
        .map(|d| rt.spawn(fill(filler.cache_client(&rt), *d)))
        .collect();
    let results: Vec<_> = both.into_iter().map(|h| rt.block_on(h).unwrap()).collect();
    assert!(
        t0.elapsed() < quick,
        "stalled {:?}: {results:?}",
        t0.elapsed()
    );
    assert!(results.iter().any(|r| matches!(r, Ok(true))), "{results:?}");
    for (d, r) in digests.iter().zip(&results) {
        if r.is_err() {
            let t1 = Instant::now();
            assert!(rt.block_on(fill(filler.cache_client(&rt), *d)).unwrap());
            assert!(t1.elapsed() < quick);
            assert_eq!(b3_of_file(&blob_file(&dir, d)).unwrap(), *d);
        }
    }

    // larger than the cache
    let t1 = Instant::now();
    let r = rt.block_on(fill(filler.cache_client(&rt), digests[2]));
    assert!(t1.elapsed() < quick, "stalled {:?}", t1.elapsed());
    let e = r.expect_err("a blob larger than the cache is not stored");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(!blob_file(&dir, &digests[2]).exists());
    // ... but it is served, checked, straight from the remote
    let client = {
        let _rt = rt.enter();
        common::grpc_store(&filler.addr())
    };
    let got = rt
        .block_on(read_to_vec(client.blob.as_ref(), &digests[2]))
        .unwrap()
        .unwrap();
    assert!(got == datas[2], "the large blob's bytes");
    assert!(!blob_file(&dir, &digests[2]).exists());
    let m = filler.metrics();
    assert!(m.get("used_bytes") <= MAX);
    assert_eq!(m.get("used_bytes"), charged(&dir));
    assert!(tmp_entries(&dir).is_empty());
}

/// That the remote lacks a store path is remembered for a moment only:
/// lookups within that second cost one remote Get; once the path exists
/// it is found, never before the second is over.
#[test]
fn absent_path_info_remembered_briefly() {
    use tvix_virtiofsd::castore::Node;
    use tvix_virtiofsd::nix::store_path::StorePath;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let remote_dir = t.join("remote");
    let a = Addr::Local(remote_dir.clone());
    let backend = Store::open(&a, &a, &a).unwrap();
    let (remote, ctl) = counting_remote(&rt, &remote_dir, &t.join("remote.sock"));
    let filler = Filler::start(&remote, &t.join("cache"), t, "filler", &[]);
    let client = {
        let _g = rt.enter();
        common::grpc_store(&filler.addr())
    };
    let sp = StorePath::new([9; 20], "appears-later").unwrap();
    let get = || rt.block_on(client.path_info.get(sp.digest())).unwrap();

    let t0 = Instant::now();
    assert_eq!(get(), None);
    assert_eq!(get(), None);
    assert_eq!(
        ctl.info_gets.load(SeqCst),
        1,
        "the second lookup was remembered"
    );
    let info = common::bare_path_info(
        sp.clone(),
        Node::Symlink {
            target: "/nowhere".into(),
        },
    );
    rt.block_on(backend.path_info.put(info.clone())).unwrap();
    let mut found = None;
    wait_until(10, "the new path to be found", || {
        found = get();
        found.is_some()
    });
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "found after {:?}: absence is remembered for a second",
        t0.elapsed()
    );
    assert_eq!(found, Some(info));
    assert!(
        ctl.info_gets.load(SeqCst) <= 3,
        "lookups within the second are not sent"
    );
    assert!(filler.metrics().get("misses_total{kind=\"path_info\"}") >= 2);
}

/// Metrics on TCP: /metrics in the Prometheus text format (HELP and TYPE
/// for each family), other paths 404, other methods 405.
#[test]
fn metrics_over_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let filler = Filler::start(
        "memory://",
        &t.join("cache"),
        t,
        "filler",
        &["--metrics-listen", &listen, "--cache-size", "64M"],
    );
    let conn = || {
        let s = std::net::TcpStream::connect(&listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let resp = http(conn(), "GET", "/metrics");
    let m = parse_metrics(&resp);
    assert_eq!(m.get("max_bytes"), 64 << 20);
    assert_eq!(m.get("used_bytes"), 0);
    assert!(resp.contains("text/plain; version=0.0.4"), "{resp}");
    assert!(resp.contains("\ntvix_virtiofsd_up 1\n"), "{resp}");
    for family in [
        "hits_total",
        "misses_total",
        "fetched_bytes_total",
        "fills_total",
        "fills_in_flight",
        "fill_errors_total",
        "dedup_waits_total",
        "evictions_total",
        "evicted_bytes_total",
        "used_bytes",
        "max_bytes",
    ] {
        assert!(
            resp.contains(&format!("# TYPE tvix_virtiofsd_cache_{family} ")),
            "{family}: {resp}"
        );
    }
    for kind in ["blob", "directory", "path_info"] {
        assert_eq!(m.get(&format!("hits_total{{kind=\"{kind}\"}}")), 0);
    }
    assert!(http(conn(), "GET", "/other").starts_with("HTTP/1.1 404"));
    assert!(http(conn(), "POST", "/metrics").starts_with("HTTP/1.1 405"));
    drop(filler);
}

/// A fill that takes longer than the reader's idle limit, but keeps moving
/// (the remote trickles 2 MiB over about 3 s): the filler's progress
/// messages keep the reader waiting, and it reads the right bytes; a fill
/// that ends quickly sends only its end.
#[test]
fn a_long_fill_keeps_its_reader_waiting() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = pseudo_random(2 * MIB, 77);
    let base = remote_tree(t, "pkg", &[("slow", &data)]);
    let digest = B3Digest::of(&data);
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    ctl.set(
        digest,
        Behaviour::Trickle {
            chunk: 64 << 10,
            delay: Duration::from_millis(100),
        },
    );
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &[]);
    let m = Mount::start(
        &filler.addr(),
        Some(&dir),
        &t.join("mnt"),
        &["--store-timeout", "1"],
    );
    let t0 = Instant::now();
    let got = std::fs::read(m.file(&format!("{base}/slow")));
    let took = t0.elapsed();
    assert!(took > Duration::from_secs(2), "was it trickled? {took:?}");
    assert!(
        got.as_ref().is_ok_and(|g| *g == data),
        "after {took:?}: {:?}",
        got.map(|g| g.len())
    );
    assert_eq!(ctl.reads(&digest), 1);
    m.stop();

    // the quick fill's stream carries one message, its end
    remote_tree(t, "q", &[("quick", b"quick\n")]);
    let quick = B3Digest::of(b"quick\n");
    let msgs = rt.block_on(async {
        let mut s = filler
            .cache_client(&rt)
            .fill_blob(FillBlobRequest {
                digest: quick.into(),
                size: 6,
            })
            .await
            .unwrap()
            .into_inner();
        let mut msgs = Vec::new();
        while let Some(p) = s.message().await.unwrap() {
            msgs.push((p.bytes, p.done));
        }
        msgs
    });
    assert_eq!(msgs, vec![(6, true)], "one message for a quick fill");
}

/// A guest reading 48 small files at once through a reader (48 FUSE
/// threads) while the remote holds them back: its misses reach the filler in FillBlobs calls
/// (a few, not one per file, and no FillBlob), each blob is read from the
/// remote once, and every file reads byte-identical.
#[test]
fn a_guests_many_misses_go_in_fill_batches() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    const FILES: usize = 48;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let datas: Vec<Vec<u8>> = (0..FILES)
        .map(|i| pseudo_random(3_000 + 91 * i, 4_100 + i as u64))
        .collect();
    let names: Vec<String> = (0..FILES).map(|i| format!("f{i:02}")).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&datas)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let base = remote_tree(t, "many", &files);
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    let (gate, gated) = watch::channel(false);
    for d in &datas {
        ctl.set(B3Digest::of(d), Behaviour::Gated(gated.clone()));
    }
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &[]);
    // a thread per reader: the misses reach the daemon together, as a
    // virtio-fs guest's do
    let m = Mount::start(
        &filler.addr(),
        Some(&dir),
        &t.join("mnt"),
        &["--threads", "48"],
    );
    for n in &names {
        // path info and tree now; only the blobs are held back
        std::fs::metadata(m.file(&format!("{base}/{n}"))).unwrap();
    }
    let readers: Vec<_> = names
        .iter()
        .map(|n| {
            let p = m.file(&format!("{base}/{n}"));
            std::thread::spawn(move || std::fs::read(p))
        })
        .collect();
    wait_until(30, "the first misses at the remote", || {
        ctl.reads.lock().unwrap().values().sum::<u64>() >= 1
    });
    // the other readers' misses pile up behind the batches out
    std::thread::sleep(Duration::from_millis(500));
    gate.send(true).unwrap();
    for ((r, d), n) in readers.into_iter().zip(&datas).zip(&names) {
        let got = r.join().unwrap().unwrap_or_else(|e| panic!("{n}: {e}"));
        assert!(got == *d, "{n} read other bytes");
        assert_eq!(
            ctl.reads(&B3Digest::of(d)),
            1,
            "{n} read from the remote once"
        );
    }
    let metrics = filler.metrics();
    let (batches, alone) = (
        metrics.cache_calls("FillBlobs"),
        metrics.cache_calls("FillBlob"),
    );
    assert!(
        (1..=FILES as u64 / 4).contains(&batches),
        "{batches} FillBlobs calls for {FILES} files"
    );
    assert_eq!(alone, 0, "no small blob asked alone");
    assert_eq!(metrics.get("fill_errors_total"), 0);
    m.stop();
}

/// FillBlobs asked directly: each blob answered once by its index (in
/// the cache, or missing), a slow one kept alive by signs of life while
/// its bytes arrive; more than 64 blobs, or one twice, refused.
#[test]
fn fill_blobs_answers_each_blob() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let small = pseudo_random(5_000, 8_801);
    let slow = pseudo_random(MIB, 8_802);
    remote_tree(t, "pkg", &[("small", &small), ("slow", &slow)]);
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    let slow_digest = B3Digest::of(&slow);
    ctl.set(
        slow_digest,
        Behaviour::Trickle {
            chunk: 64 << 10,
            delay: Duration::from_millis(60),
        },
    );
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &[]);
    let missing = B3Digest::of(b"no such blob");
    let asked = [
        (B3Digest::of(&small), small.len()),
        (missing, 12),
        (slow_digest, slow.len()),
    ];
    let req = FillBlobsRequest {
        blobs: asked
            .iter()
            .map(|(d, n)| FillBlobRequest {
                digest: (*d).into(),
                size: *n as u64,
            })
            .collect(),
    };
    let mut client = filler.cache_client(&rt);
    let answers = rt.block_on(async {
        let mut s = client.fill_blobs(req).await.unwrap().into_inner();
        let mut out = Vec::new();
        while let Some(a) = s.message().await.unwrap() {
            out.push(a);
        }
        out
    });
    let ends: Vec<_> = answers.iter().filter(|a| !a.alive).collect();
    assert_eq!(ends.len(), 3, "one answer a blob: {answers:?}");
    for (i, (d, _)) in asked.iter().enumerate() {
        let a = ends.iter().find(|a| a.index == i as u32).expect("answered");
        if *d == missing {
            assert!(a.missing && !a.done, "{a:?}");
        } else {
            assert!(a.done && !a.missing && a.code == 0, "{a:?}");
            assert_eq!(b3_of_file(&blob_file(&dir, d)).unwrap(), *d);
        }
    }
    let slow_end = answers
        .iter()
        .position(|a| !a.alive && a.index == 2)
        .unwrap();
    assert!(
        answers[..slow_end].iter().any(|a| a.alive),
        "signs of life while the slow blob arrived: {answers:?}"
    );

    let too_many = FillBlobsRequest {
        blobs: (0..65)
            .map(|i| FillBlobRequest {
                digest: B3Digest::of(&[i as u8]).into(),
                size: 1,
            })
            .collect(),
    };
    let e = rt.block_on(client.fill_blobs(too_many)).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let twice = FillBlobsRequest {
        blobs: vec![
            FillBlobRequest {
                digest: missing.into(),
                size: 1,
            };
            2
        ],
    };
    let e = rt.block_on(client.fill_blobs(twice)).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
}

// ---------------------------------------------------------------------------
// Prefetch

/// `--prefetch closure`: looking a store path up (a stat, no read) makes
/// the filler fetch every blob of its tree before the guest reads any;
/// the guest then reads them from DIR (it asks no fill), each fetched from
/// the remote once, and its reads count as prefetch hits. A guest read of
/// a blob whose prefetch is still under way joins it: one fetch.
#[test]
fn prefetch_fills_a_looked_up_path_before_the_guest_reads() {
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let names: Vec<String> = (0..24).map(|i| format!("d{}/f{i:02}", i % 3)).collect();
    let datas: Vec<Vec<u8>> = (0..24)
        .map(|i| pseudo_random(9_000 + i, 100 + i as u64))
        .collect();
    let big = pseudo_random(2 * MIB + 3, 99);
    let mut files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&datas)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    files.push(("big", &big));
    let base = remote_tree(t, "pkg", &files);
    let digests: Vec<B3Digest> = datas.iter().map(|d| B3Digest::of(d)).collect();
    let big_digest = B3Digest::of(&big);
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    let (gate, gated) = watch::channel(false);
    ctl.set(big_digest, Behaviour::Gated(gated));
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &["--prefetch", "closure"]);
    let m = Mount::start(&filler.addr(), Some(&dir), &t.join("mnt"), &[]);

    assert!(std::fs::metadata(m.file(&base)).unwrap().is_dir());
    let cached = |d: &B3Digest| blob_file(&dir, d).exists();
    wait_until(20, "every small file prefetched", || {
        digests.iter().all(cached)
    });
    let mf = filler.metrics();
    assert_eq!(mf.get("prefetch_paths_total"), 1);
    assert!(
        mf.get("prefetched_blobs_total") >= 24,
        "{}",
        mf.get("prefetched_blobs_total")
    );
    assert_eq!(mf.get("fill_requests_total"), 0, "the filler asks itself");
    assert!(!cached(&big_digest), "held back at the remote");
    assert_eq!(ctl.reads(&big_digest), 1, "its prefetch is under way");

    // the guest reads `big` while its prefetch waits: it joins it
    let big_path = m.file(&format!("{base}/big"));
    let reader = std::thread::spawn(move || std::fs::read(big_path));
    std::thread::sleep(Duration::from_millis(500));
    gate.send(true).unwrap();
    let got = reader.join().unwrap().unwrap();
    assert!(got == big, "big read whole and right");
    assert_eq!(
        ctl.reads(&big_digest),
        1,
        "one fetch for prefetch and guest"
    );
    assert!(filler.metrics().get("dedup_waits_total") >= 1);

    for (n, d) in names.iter().zip(&datas) {
        assert!(
            std::fs::read(m.file(&format!("{base}/{n}"))).unwrap() == *d,
            "{n}"
        );
    }
    for (n, d) in names.iter().zip(&digests) {
        assert_eq!(ctl.reads(d), 1, "{n} fetched once");
    }
    let (_, misses) = summary(&m.stop());
    assert_eq!(misses[0], 1, "the reader missed only `big`");
    // the reader reported its reads of fresh blobs as it stopped
    wait_until(10, "the reads counted as prefetch hits", || {
        filler.metrics().get("prefetch_hits_total") >= 25
    });
    let mf = filler.metrics();
    assert_eq!(mf.get("prefetch_wasted_bytes_total"), 0);
    assert_eq!(mf.get("fill_errors_total"), 0);
}

/// Prefetch follows references: a store path looked up brings its
/// dependencies' trees and blobs too, though the guest never looked them
/// up; with `--prefetch none` a lookup fetches no blob at all.
#[test]
fn prefetch_follows_references_and_can_be_off() {
    use tvix_virtiofsd::castore::Node;
    use tvix_virtiofsd::nix::store_path::StorePath;
    if !common::fuse_available("HOST CACHE FUSE TEST") {
        return;
    }
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dep_data: Vec<Vec<u8>> = (0..6)
        .map(|i| pseudo_random(5_000 + i, 200 + i as u64))
        .collect();
    let dep_names: Vec<String> = (0..6).map(|i| format!("lib/l{i}")).collect();
    let dep_files: Vec<(&str, &[u8])> = dep_names
        .iter()
        .zip(&dep_data)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let dep = remote_tree(t, "dep", &dep_files);
    let remote_dir = t.join("remote");
    let top = rt.block_on(async {
        let a = Addr::Local(remote_dir.clone());
        let store = Store::open(&a, &a, &a).unwrap();
        let script = b"#!/bin/sh\nexec dep\n";
        let digest = tvix_virtiofsd::store::blob::put_bytes(store.blob.as_ref(), script)
            .await
            .unwrap();
        let mut info = common::bare_path_info(
            StorePath::new([9; 20], "top").unwrap(),
            Node::File {
                digest,
                size: script.len() as u64,
                executable: true,
            },
        );
        info.references = vec![StorePath::from_basename(&dep).unwrap()];
        store.path_info.put(info.clone()).await.unwrap();
        info.store_path.to_basename()
    });
    let dep_digests: Vec<B3Digest> = dep_data.iter().map(|d| B3Digest::of(d)).collect();

    for prefetch in ["none", "closure"] {
        let (remote, ctl) =
            counting_remote(&rt, &remote_dir, &t.join(format!("remote-{prefetch}.sock")));
        let dir = t.join(format!("cache-{prefetch}"));
        let filler = Filler::start(&remote, &dir, t, prefetch, &["--prefetch", prefetch]);
        let m = Mount::start(
            &filler.addr(),
            Some(&dir),
            &t.join(format!("mnt-{prefetch}")),
            &[],
        );
        assert!(std::fs::metadata(m.file(&top)).unwrap().is_file());
        let cached = |d: &B3Digest| blob_file(&dir, d).exists();
        if prefetch == "closure" {
            wait_until(20, "the reference's blobs prefetched", || {
                dep_digests.iter().all(cached)
            });
            assert_eq!(filler.metrics().get("prefetch_paths_total"), 2);
            for (n, d) in dep_names.iter().zip(&dep_data) {
                assert!(
                    std::fs::read(m.file(&format!("{dep}/{n}"))).unwrap() == *d,
                    "{n}"
                );
            }
            for d in &dep_digests {
                assert_eq!(ctl.reads(d), 1);
            }
        } else {
            std::thread::sleep(Duration::from_secs(1));
            assert_eq!(ctl.all_reads(), 0, "nothing fetched ahead");
            assert_eq!(filler.metrics().get("prefetch_paths_total"), 0);
        }
        m.stop();
    }
}

/// A tenant's closure (a scoped connection, as `virtiofs --closure` with
/// `--cache-dir` opens) is prefetched for as long as the connection
/// lasts: with the remote trickling every blob, a tenant that goes away
/// after its handshake leaves the blobs already asked for to finish, and
/// no more are started.
#[test]
fn a_tenants_prefetch_stops_when_it_goes() {
    use tvix_virtiofsd::nix::store_path::StorePath;
    use tvix_virtiofsd::store::cache::tenant;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    const FILES: usize = 240;
    let datas: Vec<Vec<u8>> = (0..FILES)
        .map(|i| pseudo_random(4_000 + i, 300 + i as u64))
        .collect();
    let names: Vec<String> = (0..FILES).map(|i| format!("f{i:03}")).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&datas)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let base = remote_tree(t, "pkg", &files);
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    for d in &datas {
        ctl.set(
            B3Digest::of(d),
            Behaviour::Trickle {
                chunk: 1000,
                delay: Duration::from_millis(150),
            },
        );
    }
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &["--prefetch", "closure"]);
    let root = StorePath::from_basename(&base).unwrap();
    let conn = tenant::connect(&filler.sock, &[root], Duration::from_secs(30)).unwrap();
    wait_until(10, "the tenant's prefetch started", || ctl.all_reads() > 0);
    drop(conn);
    // what was asked for before it went finishes (each blob 5 chunks)
    std::thread::sleep(Duration::from_secs(3));
    let after = ctl.all_reads();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ctl.all_reads(),
        after,
        "no fetch started after the tenant went"
    );
    assert!(
        after < FILES as u64 / 2,
        "{after} of {FILES} blobs fetched for a tenant that went at once"
    );
    let m = filler.metrics();
    assert!(m.get("prefetch_cancelled_total") >= 1);
    assert_eq!(m.get("prefetch_paths_total"), 1);

    // the next tenant of the same closure gets it all
    let conn = tenant::connect(
        &filler.sock,
        &[StorePath::from_basename(&base).unwrap()],
        Duration::from_secs(30),
    )
    .unwrap();
    wait_until(30, "the whole closure prefetched", || {
        datas
            .iter()
            .all(|d| blob_file(&dir, &B3Digest::of(d)).exists())
    });
    drop(conn);
    for d in &datas {
        assert_eq!(ctl.reads(&B3Digest::of(d)), 1, "each blob fetched once");
    }
}

/// `--prefetch recorded`: a tenant that opens its closure's files in an
/// order of its own (here backwards) leaves that order behind when it
/// goes; on a host whose cache was lost, the next tenant of that closure
/// is prefetched in that order, not in the tree walk's: with every Read
/// held at the remote, the first fills prefetch asks for are the last
/// files by name.
#[test]
fn a_recorded_order_leads_the_next_tenants_prefetch() {
    use tvix_virtiofsd::nix::store_path::StorePath;
    use tvix_virtiofsd::store::cache::tenant;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    const FILES: usize = 200;
    let datas: Vec<Vec<u8>> = (0..FILES)
        .map(|i| pseudo_random(3_000 + i, 500 + i as u64))
        .collect();
    let names: Vec<String> = (0..FILES).map(|i| format!("f{i:03}")).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&datas)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let base = remote_tree(t, "pkg", &files);
    let digests: Vec<B3Digest> = datas.iter().map(|d| B3Digest::of(d)).collect();
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    let orders = t.join("orders");
    let root = || vec![StorePath::from_basename(&base).unwrap()];
    let args = [
        "--prefetch",
        "recorded",
        "--prefetch-orders",
        orders.to_str().unwrap(),
    ];

    // the first tenant opens every file, last first, through its scoped
    // connection (as its per-VM daemon does for each file the guest opens)
    let first = Filler::start(&remote, &t.join("cache1"), t, "first", &args);
    let conn = tenant::connect(&first.sock, &root(), Duration::from_secs(30)).unwrap();
    let (ch, _inbox) = {
        let _g = rt.enter();
        tenant::channel(conn).unwrap()
    };
    rt.block_on(async {
        // the tree first: a scope learns a closure's blobs as it serves it
        let mut infos = spb::path_info_service_client::PathInfoServiceClient::new(ch.clone());
        let got = infos
            .get(spb::GetPathInfoRequest {
                by_what: Some(spb::get_path_info_request::ByWhat::ByOutputHash(
                    bytes::Bytes::copy_from_slice(root()[0].digest()),
                )),
            })
            .await
            .unwrap()
            .into_inner();
        let node = tvix_virtiofsd::castore::Node::from_proto_root(got.node.as_ref().unwrap())
            .unwrap()
            .1;
        let tvix_virtiofsd::castore::Node::Directory { digest: tree, .. } = node else {
            panic!("{node:?}")
        };
        let mut dirs = cpb::directory_service_client::DirectoryServiceClient::new(ch.clone());
        let mut s = dirs
            .get(cpb::GetDirectoryRequest {
                by_what: Some(cpb::get_directory_request::ByWhat::Digest(tree.into())),
                recursive: true,
            })
            .await
            .unwrap()
            .into_inner();
        while s.message().await.unwrap().is_some() {}
        let mut fills = CacheServiceClient::new(ch.clone());
        for (d, data) in digests.iter().zip(&datas).rev() {
            let mut s = fills
                .fill_blob(FillBlobRequest {
                    digest: (*d).into(),
                    size: data.len() as u64,
                })
                .await
                .unwrap()
                .into_inner();
            while let Some(p) = s.message().await.unwrap() {
                if p.done {
                    break;
                }
            }
        }
    });
    drop(ch);
    // renamed into place (not its temporary file)
    wait_until(10, "the order saved as the tenant went", || {
        std::fs::read_dir(&orders).is_ok_and(|d| {
            d.flatten()
                .any(|e| !e.file_name().to_string_lossy().contains(".tmp"))
        })
    });
    drop(first);

    // a new host cache (the old one lost), every Read held at the remote
    let (gate, gated) = watch::channel(false);
    for d in &digests {
        ctl.set(*d, Behaviour::Gated(gated.clone()));
    }
    ctl.read_order.lock().unwrap().clear();
    let dir = t.join("cache2");
    let second = Filler::start(&remote, &dir, t, "second", &args);
    let conn = tenant::connect(&second.sock, &root(), Duration::from_secs(30)).unwrap();
    wait_until(10, "prefetch asked the remote", || {
        ctl.read_order.lock().unwrap().len() >= 96
    });
    std::thread::sleep(Duration::from_millis(500));
    let asked: std::collections::HashSet<B3Digest> =
        ctl.read_order.lock().unwrap().iter().copied().collect();
    assert_eq!(asked.len(), 96, "prefetch keeps 96 fills in flight");
    let last: std::collections::HashSet<B3Digest> = digests[FILES - 96..].iter().copied().collect();
    assert_eq!(asked, last, "the first fills are the last 96 files by name");
    gate.send(true).unwrap();
    wait_until(30, "the whole closure prefetched", || {
        digests.iter().all(|d| blob_file(&dir, d).exists())
    });
    drop(conn);
    assert_eq!(second.metrics().get("fill_errors_total"), 0);
}

/// A closure larger than the cache: prefetch takes at most half of
/// `--cache-size` that no VM has read yet, says so once in the log and in
/// its counter, and leaves the rest to the guest's reads; the cache stays
/// within its bound.
#[test]
fn prefetch_of_a_closure_larger_than_the_cache_stops_at_half() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    const FILES: usize = 64;
    let datas: Vec<Vec<u8>> = (0..FILES)
        .map(|i| pseudo_random(100_000 + i, 700 + i as u64))
        .collect();
    let names: Vec<String> = (0..FILES).map(|i| format!("f{i:02}")).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&datas)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    // 6.4 MB of files against a 4 MiB cache: 2 MiB may be prefetched
    let base = remote_tree(t, "big-closure", &files);
    let (remote, _ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    let dir = t.join("cache");
    let filler = Filler::start(
        &remote,
        &dir,
        t,
        "filler",
        &["--prefetch", "closure", "--cache-size", "4M"],
    );
    // a lookup, as a guest's first: the path info through the filler
    let client = {
        let _g = rt.enter();
        common::grpc_store(&filler.addr())
    };
    let sp = tvix_virtiofsd::nix::store_path::StorePath::from_basename(&base).unwrap();
    rt.block_on(client.path_info.get(sp.digest()))
        .unwrap()
        .unwrap();
    wait_until(20, "prefetch stopped at the bound", || {
        filler.metrics().get("prefetch_stopped_total") >= 1
    });
    std::thread::sleep(Duration::from_millis(500));
    let m = filler.metrics();
    let prefetched = m.get("prefetched_bytes_total");
    assert!(
        (1 << 20..=2 << 20).contains(&prefetched),
        "prefetched {prefetched} bytes of a 2 MiB allowance"
    );
    assert!(m.get("used_bytes") <= 4 << 20);
    let (_, log) = filler.stop();
    assert_eq!(
        log.matches("prefetched and not read yet").count(),
        1,
        "said once: {log}"
    );
}

/// A tenant that goes while its closure is still being prefetched, and
/// another tenant of the same closure right after it: the path queued
/// (or walked) for the first is queued again for the second, whose
/// prefetch then fetches the whole closure.
#[test]
fn a_path_left_by_a_tenant_that_went_is_prefetched_for_the_next() {
    use tvix_virtiofsd::nix::store_path::StorePath;
    use tvix_virtiofsd::store::cache::tenant;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    const FILES: usize = 200;
    let datas: Vec<Vec<u8>> = (0..FILES)
        .map(|i| pseudo_random(2_000 + i, 1_100 + i as u64))
        .collect();
    let names: Vec<String> = (0..FILES).map(|i| format!("g{i:03}")).collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&datas)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let base = remote_tree(t, "pkg", &files);
    let (remote, ctl) = counting_remote(&rt, &t.join("remote"), &t.join("remote.sock"));
    for d in &datas {
        ctl.set(
            B3Digest::of(d),
            Behaviour::Trickle {
                chunk: 1000,
                delay: Duration::from_millis(100),
            },
        );
    }
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, "filler", &["--prefetch", "closure"]);
    let root = || vec![StorePath::from_basename(&base).unwrap()];
    let first = tenant::connect(&filler.sock, &root(), Duration::from_secs(30)).unwrap();
    wait_until(10, "the first tenant's prefetch started", || {
        ctl.all_reads() > 0
    });
    drop(first);
    let second = tenant::connect(&filler.sock, &root(), Duration::from_secs(30)).unwrap();
    wait_until(60, "the whole closure prefetched for the second", || {
        datas
            .iter()
            .all(|d| blob_file(&dir, &B3Digest::of(d)).exists())
    });
    drop(second);
    for d in &datas {
        assert_eq!(ctl.reads(&B3Digest::of(d)), 1, "each blob fetched once");
    }
}

/// Against a remote daemon of ours, prefetch asks for small blobs in
/// batches (`CacheService/ReadBlobs`): a tree of 150 small files lands in
/// the cache in a handful of calls, every blob the right bytes (each is
/// written through the same digest-checked path as any fill), the large
/// one fetched alone. The other tests' counting remote has no ReadBlobs:
/// they prefetch blob by blob, which is the fallback.
#[test]
fn prefetch_batches_small_blobs_from_a_daemon_of_ours() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    const FILES: usize = 150;
    let datas: Vec<Vec<u8>> = (0..FILES)
        .map(|i| pseudo_random(500 + 37 * i, 1_300 + i as u64))
        .collect();
    let names: Vec<String> = (0..FILES).map(|i| format!("s{}/b{i:03}", i % 5)).collect();
    let mut files: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&datas)
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let big = pseudo_random(3 * MIB, 1_299);
    files.push(("big", &big));
    let base = remote_tree(t, "pkg", &files);
    let remote = Daemon::start(
        &format!("local://{}", t.join("remote").display()),
        &format!("unix:{}", t.join("remote.sock").display()),
        &["--read-only"],
    );
    let dir = t.join("cache");
    let filler = Filler::start(&remote.addr, &dir, t, "filler", &["--prefetch", "closure"]);
    let client = {
        let _g = rt.enter();
        common::grpc_store(&filler.addr())
    };
    let sp = tvix_virtiofsd::nix::store_path::StorePath::from_basename(&base).unwrap();
    rt.block_on(client.path_info.get(sp.digest()))
        .unwrap()
        .unwrap();
    wait_until(20, "every blob prefetched", || {
        datas
            .iter()
            .chain([&big])
            .all(|d| blob_file(&dir, &B3Digest::of(d)).exists())
    });
    for (n, d) in names.iter().zip(&datas) {
        assert!(
            std::fs::read(blob_file(&dir, &B3Digest::of(d))).unwrap() == *d,
            "{n}"
        );
    }
    assert!(std::fs::read(blob_file(&dir, &B3Digest::of(&big))).unwrap() == big);
    let m = filler.metrics();
    let batches = m.get("prefetch_batches_total");
    assert!(
        (5..=20).contains(&batches),
        "{batches} batches for {FILES} small blobs (32 a batch)"
    );
    assert_eq!(m.get("prefetched_blobs_total"), FILES as u64 + 1);
    assert_eq!(m.get("fill_errors_total"), 0);
}
