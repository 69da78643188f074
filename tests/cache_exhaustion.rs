//! The host cache's filler (`daemon --cache-dir`) against those who would
//! exhaust it: a compromised per-VM daemon or any tenant who can push to
//! the remote declaring sizes it never sends (the cache must not be
//! emptied for them), a remote serving a tree of huge directories (the
//! filler's memory must stay bounded; its unit has `MemoryMax`), and a
//! filler short of descriptors (its good objects must not be taken for
//! damaged and discarded). The filler is the real binary; remotes are a
//! real `daemon` or an in-process gRPC server that makes up its tree.
mod common;

use common::{bin, cli_ok, free_port, metric, pseudo_random, scrape_metrics, Daemon};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status, Streaming};
use tvix_virtiofsd::castore::{B3Digest, Directory, Node};
use tvix_virtiofsd::serve::grpc::StoreServer;
use tvix_virtiofsd::store::channel::WireChannel;
use tvix_virtiofsd::store::Store;
use tvix_virtiofsd::wire::cache::cache_service_client::CacheServiceClient;
use tvix_virtiofsd::wire::cache::FillBlobRequest;
use tvix_virtiofsd::wire::castore as cpb;
use tvix_virtiofsd::wire::store as spb;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `tvix-virtiofsd --store REMOTE --cache-dir DIR daemon` on a unix
/// socket, metrics on loopback TCP, its log in a file; killed on drop.
struct Filler {
    child: Child,
    sock: PathBuf,
    metrics: String,
    log: PathBuf,
}

impl Filler {
    fn start(remote: &str, dir: &Path, work: &Path, extra: &[&str]) -> Filler {
        let sock = work.join("filler.sock");
        let log = work.join("filler.log");
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = Command::new(bin())
            .env("NO_COLOR", "1")
            .env_remove("TVIX_VIRTIOFSD_CACHE_SIZE")
            .arg("--store")
            .arg(remote)
            .arg("--cache-dir")
            .arg(dir)
            .arg("daemon")
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(["--metrics-listen", &metrics])
            // these tests count the fills and the memory their own asks cost
            .args(["--prefetch", "none"])
            .args(extra)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut f = Filler {
            child,
            sock,
            metrics,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&f.sock).is_err()
            || std::net::TcpStream::connect(&f.metrics).is_err()
        {
            if let Some(st) = f.child.try_wait().unwrap() {
                panic!("the filler exited ({st}): {}", f.log());
            }
            assert!(Instant::now() < deadline, "the filler never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }

    fn addr(&self) -> String {
        format!("grpc+unix://{}", self.sock.display())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A cache-family gauge or counter, e.g. `used_bytes`.
    fn metric(&self, name: &str) -> u64 {
        metric(
            &scrape_metrics(&self.metrics),
            &format!("tvix_virtiofsd_cache_{name}"),
        )
    }

    /// A CacheService client, as a per-VM daemon holds one.
    fn cache_client(&self, rt: &tokio::runtime::Runtime) -> CacheServiceClient<WireChannel> {
        let _g = rt.enter();
        CacheServiceClient::new(
            tvix_virtiofsd::store::channel::connect_unix(self.sock.clone(), Default::default())
                .unwrap(),
        )
    }

    /// The filler's store, as a gRPC client sees it.
    fn store(&self, rt: &tokio::runtime::Runtime) -> Store {
        let _g = rt.enter();
        common::grpc_store(&self.addr())
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks the filler to fill `digest`, declaring `size`: whether it was
/// stored, or the status it failed with.
async fn fill(
    mut c: CacheServiceClient<WireChannel>,
    digest: &[u8],
    size: u64,
) -> Result<bool, Status> {
    let req = FillBlobRequest {
        digest: bytes::Bytes::copy_from_slice(digest),
        size,
    };
    let mut s = c.fill_blob(req).await?.into_inner();
    while let Some(p) = s.message().await? {
        if p.done {
            return Ok(true);
        }
    }
    Ok(false)
}

fn blob_file(dir: &Path, d: &B3Digest) -> PathBuf {
    let hex = d.to_hex();
    dir.join("blobs").join(&hex[..2]).join(hex)
}

fn dir_file(dir: &Path, d: &B3Digest) -> PathBuf {
    let hex = d.to_hex();
    dir.join("directories").join(&hex[..2]).join(hex)
}

/// Adds `paths` to the embedded store at `store_dir` with the CLI; answers
/// their store path basenames.
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

/// A remote `daemon` over an embedded store at `T/remote`, on a unix socket.
fn remote_daemon(t: &Path) -> Daemon {
    let listen = format!("unix:{}", t.join("remote.sock").display());
    Daemon::start(
        &format!("local://{}", t.join("remote").display()),
        &listen,
        &[],
    )
}

/// A cache of 4 MiB holding twelve blobs of 256 KiB (3 MiB): a FillBlob of
/// a blob the remote does not have, declaring nearly the whole cache (as a
/// compromised per-VM daemon may, or a directory entry pushed to the
/// remote by any tenant), is answered NOT_FOUND and evicts nothing; one
/// declaring more than the cache is refused at once, evicting nothing. On
/// the unfixed filler the first emptied the cache: room for the declared
/// size was reserved before the remote was asked.
#[test]
fn a_fill_declaring_a_size_it_never_sends_evicts_nothing() {
    const MAX: u64 = 4 << 20;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let datas: Vec<Vec<u8>> = (0..12)
        .map(|i| pseudo_random(256 << 10, 1001 + 2 * i))
        .collect();
    let srcs: Vec<PathBuf> = (0..datas.len())
        .map(|i| {
            let p = t.join(format!("f{i}"));
            std::fs::write(&p, &datas[i]).unwrap();
            p
        })
        .collect();
    import(
        &t.join("remote"),
        &srcs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let remote = remote_daemon(t);
    let dir = t.join("cache");
    let filler = Filler::start(&remote.addr, &dir, t, &["--cache-size", "4M"]);
    let digests: Vec<B3Digest> = datas.iter().map(|d| B3Digest::of(d)).collect();
    for (d, data) in digests.iter().zip(&datas) {
        let stored = rt.block_on(fill(
            filler.cache_client(&rt),
            d.as_bytes(),
            data.len() as u64,
        ));
        assert_eq!(stored.ok(), Some(true), "filling {d}");
    }
    let used = filler.metric("used_bytes");
    assert_eq!(used, 12 * (256 << 10));

    let missing = B3Digest::of(b"a blob nobody has");
    let r = rt.block_on(fill(
        filler.cache_client(&rt),
        missing.as_bytes(),
        MAX - 4096,
    ));
    let e = r.expect_err("a missing blob is not stored");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let r = rt.block_on(fill(filler.cache_client(&rt), missing.as_bytes(), 64 * MAX));
    let e = r.expect_err("a blob declared larger than the cache is refused");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");

    // Give an eviction asked for a moment to run: it runs on its own thread.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(filler.metric("evictions_total"), 0, "{}", filler.log());
    for d in &digests {
        assert!(blob_file(&dir, d).exists(), "blob {d} was evicted");
    }
    assert_eq!(filler.metric("used_bytes"), used);
}

// ---------------------------------------------------------------------------
// A remote that makes up a tree of large directories

/// Directories below the made-up tree's root.
const TREE_DIRS: usize = 200;
/// Symlinks per directory: each a 4000-byte target, some 2 MiB a directory.
const LINKS_PER_DIR: usize = 500;

/// Directory `i` of the tree: its symlinks' names and targets say `i`.
fn tree_dir(i: usize) -> Directory {
    let mut d = Directory::new();
    for j in 0..LINKS_PER_DIR {
        let mut target = format!("{i:04}-{j:04}-").into_bytes();
        target.resize(4000, b'x');
        d.add(
            format!("link-{j:04}").into(),
            Node::Symlink {
                target: target.into(),
            },
        )
        .unwrap();
    }
    d
}

/// The tree's root: one entry per directory.
fn tree_root(children: &[(B3Digest, u64)]) -> Directory {
    let mut root = Directory::new();
    for (i, (digest, size)) in children.iter().enumerate() {
        let node = Node::Directory {
            digest: *digest,
            size: *size,
        };
        root.add(format!("d{i:04}").into(), node).unwrap();
    }
    root
}

/// A store whose directory service makes the tree up as it sends it (the
/// test's own memory and disk stay small); its other services are an
/// empty memory store's.
#[derive(Clone)]
struct TreeRemote {
    inner: StoreServer,
    root: Directory,
    /// The directories below the root, by index: digest and size.
    children: Arc<Vec<(B3Digest, u64)>>,
    /// Directories sent.
    sent: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl cpb::directory_service_server::DirectoryService for TreeRemote {
    type GetStream = BoxStream<'static, Result<cpb::Directory, Status>>;

    async fn get(
        &self,
        req: Request<cpb::GetDirectoryRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let req = req.into_inner();
        let Some(cpb::get_directory_request::ByWhat::Digest(d)) = req.by_what else {
            return Err(Status::invalid_argument("by_what missing"));
        };
        let d = B3Digest::try_from(&d[..]).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let which = if d == self.root.digest() {
            None
        } else {
            let i = self.children.iter().position(|(c, _)| *c == d);
            Some(i.ok_or_else(|| Status::not_found("no such directory"))?)
        };
        let (root, sent) = (self.root.clone(), self.sent.clone());
        let children = self.children.len();
        let s = async_stream::stream! {
            match which {
                Some(i) => {
                    sent.fetch_add(1, SeqCst);
                    yield Ok(tree_dir(i).to_proto());
                }
                None => {
                    sent.fetch_add(1, SeqCst);
                    yield Ok(root.to_proto());
                    if req.recursive {
                        for i in 0..children {
                            let d = tokio::task::spawn_blocking(move || tree_dir(i).to_proto())
                                .await
                                .unwrap();
                            sent.fetch_add(1, SeqCst);
                            yield Ok(d);
                        }
                    }
                }
            }
        };
        Ok(Response::new(s.boxed()))
    }

    async fn put(
        &self,
        _: Request<Streaming<cpb::Directory>>,
    ) -> Result<Response<cpb::PutDirectoryResponse>, Status> {
        Err(Status::permission_denied("read-only"))
    }
}

/// Serves a [`TreeRemote`] of `dirs` directories below its root on a unix
/// socket at `sock`; answers its address, the tree's root and the
/// directory counter.
fn tree_remote(
    rt: &tokio::runtime::Runtime,
    sock: &Path,
    dirs: usize,
) -> (String, B3Digest, Arc<AtomicU64>) {
    let children: Vec<(B3Digest, u64)> = (0..dirs)
        .map(|i| {
            let d = tree_dir(i);
            (d.digest(), d.size())
        })
        .collect();
    let root = tree_root(&children);
    let root_digest = root.digest();
    let sent = Arc::new(AtomicU64::new(0));
    let remote = TreeRemote {
        inner: StoreServer::new(Store::memory(), true),
        root,
        children: Arc::new(children),
        sent: sent.clone(),
    };
    let _in_rt = rt.enter();
    let l = tokio::net::UnixListener::bind(sock).unwrap();
    let router = tonic::transport::Server::builder()
        .add_service(cpb::blob_service_server::BlobServiceServer::new(
            remote.inner.clone(),
        ))
        .add_service(
            cpb::directory_service_server::DirectoryServiceServer::new(remote.clone())
                .max_encoding_message_size(64 << 20),
        )
        .add_service(spb::path_info_service_server::PathInfoServiceServer::new(
            remote.inner,
        ));
    rt.spawn(router.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l)));
    (format!("grpc+unix://{}", sock.display()), root_digest, sent)
}

/// Anonymous resident memory of `pid`, in bytes (`RssAnon`).
fn rss_anon(pid: u32) -> u64 {
    common::status_bytes(pid, "RssAnon")
}

/// Most anonymous memory the filler may use to fetch, write and serve a
/// 400 MiB tree: its queues hold at most 32 MiB (fetch) plus 16 MiB
/// (serving from the cache) plus 8 MiB (the gRPC server's read-ahead),
/// besides a few directories being decoded and encoded and the process's
/// own baseline (some 10-20 MiB).
const TREE_RSS_BOUND: u64 = 96 << 20;

/// A remote tree of 200 directories of 2 MiB each (400 MiB) fetched
/// through the filler, twice (a miss, then a hit served from the cache
/// directory): every directory arrives, checked, and the filler's
/// anonymous memory stays under [`TREE_RSS_BOUND`] all along, sampled
/// every 10 ms. The unfixed filler held the whole tree in memory, and then
/// once more to serve it.
#[test]
fn a_tree_of_huge_directories_is_fetched_and_served_within_a_memory_bound() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (remote, root, sent) = tree_remote(&rt, &t.join("remote.sock"), TREE_DIRS);
    let dir = t.join("cache");
    let filler = Filler::start(&remote, &dir, t, &["--cache-size", "1G"]);
    let pid = filler.pid();
    let baseline = rss_anon(pid);

    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(SeqCst) {
                peak.fetch_max(rss_anon(pid), SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let store = filler.store(&rt);
    for pass in ["miss", "hit"] {
        let got: Vec<B3Digest> = rt.block_on(async {
            let mut s = store.directory.get_recursive(root);
            let mut got = Vec::new();
            while let Some(d) = s.try_next().await.unwrap() {
                got.push(d.digest());
            }
            got
        });
        assert_eq!(got.len(), TREE_DIRS + 1, "{pass}: the whole tree");
        assert_eq!(got[0], root, "{pass}: root first");
    }
    done.store(true, SeqCst);
    sampler.join().unwrap();
    let peak = peak.load(SeqCst);
    eprintln!(
        "filler RssAnon: {} MiB at start, {} MiB at most",
        baseline >> 20,
        peak >> 20
    );
    assert_eq!(
        sent.load(SeqCst),
        TREE_DIRS as u64 + 1,
        "fetched from the remote once"
    );
    assert!(dir_file(&dir, &root).exists());
    assert!(
        peak < TREE_RSS_BOUND,
        "the filler's anonymous memory reached {} MiB (bound {} MiB)",
        peak >> 20,
        TREE_RSS_BOUND >> 20
    );
}

// ---------------------------------------------------------------------------
// Out of descriptors

/// The lowest descriptor number `pid` has free: with its soft
/// RLIMIT_NOFILE set to this, every new descriptor fails with EMFILE.
fn lowest_free_fd(pid: u32) -> u64 {
    let used: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

/// Sets the soft RLIMIT_NOFILE of `pid`; answers the old limits.
fn set_nofile(pid: u32, soft: u64, hard: Option<u64>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the current limits into `old`, a valid rlimit.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard.unwrap_or(old.rlim_max),
    };
    // SAFETY: `new` is a valid rlimit; the old one is not asked for.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    old
}

/// A filler out of descriptors (its RLIMIT_NOFILE lowered to what it has
/// open, over connections already made) cannot read its cached directory
/// and path info: the lookups fail, but the objects are not taken for
/// damaged: their files stay, and once descriptors are back they are
/// served again, from the cache, as they were. The unfixed filler counted
/// EMFILE as damage and deleted both.
#[test]
fn a_filler_out_of_descriptors_keeps_its_objects() {
    use tvix_virtiofsd::nix::store_path::StorePath;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/file"), b"kept\n").unwrap();
    let base = import(&t.join("remote"), &[&src]).remove(0);
    let remote = remote_daemon(t);
    let dir = t.join("cache");
    let filler = Filler::start(&remote.addr, &dir, t, &[]);
    let store = filler.store(&rt);
    let hash = *StorePath::from_basename(&base).unwrap().digest();

    let info = rt
        .block_on(store.path_info.get(&hash))
        .unwrap()
        .expect("the path info");
    let Node::Directory { digest, .. } = info.node else {
        panic!("not a directory: {:?}", info.node)
    };
    let tree = rt.block_on(store.directory.get(&digest)).unwrap();
    assert!(tree.is_some());
    let info_file = dir
        .join("pathinfo")
        .join(tvix_virtiofsd::nix::nixbase32::encode(&hash));
    assert!(info_file.exists() && dir_file(&dir, &digest).exists());
    let fills = filler.metric("fills_total");

    let pid = filler.pid();
    // The metrics scrape's connection may still be closing: lower the
    // limit until no descriptor below it is free.
    std::thread::sleep(Duration::from_millis(300));
    let mut limit = lowest_free_fd(pid);
    let old = set_nofile(pid, limit, None);
    while lowest_free_fd(pid) < limit {
        limit = lowest_free_fd(pid);
        set_nofile(pid, limit, None);
    }
    let info_out = rt.block_on(store.path_info.get(&hash));
    let dir_out = rt.block_on(store.directory.get(&digest));
    set_nofile(pid, old.rlim_cur, Some(old.rlim_max));
    eprintln!("out of descriptors: path info {info_out:?}, directory {dir_out:?}");
    assert!(
        info_out.is_err() && dir_out.is_err(),
        "the lookups could not read their files: {info_out:?} {dir_out:?}"
    );
    let log = filler.log();
    assert!(!log.contains("damaged"), "{log}");
    assert!(info_file.exists(), "the path info was discarded: {log}");
    assert!(
        dir_file(&dir, &digest).exists(),
        "the directory was discarded: {log}"
    );

    assert_eq!(rt.block_on(store.path_info.get(&hash)).unwrap(), Some(info));
    assert_eq!(rt.block_on(store.directory.get(&digest)).unwrap(), tree);
    assert_eq!(
        filler.metric("fills_total"),
        fills,
        "served from the cache, not fetched again"
    );
}

// ---------------------------------------------------------------------------
// A slow, honest remote

/// A unix-socket proxy at `listen` to `upstream` that passes the store's
/// answers on at most `chunk` bytes per `every` (requests go at full
/// speed): a slow link, but an honest one.
fn slow_proxy(listen: &Path, upstream: PathBuf, chunk: usize, every: Duration) {
    use std::io::{Read, Write};
    let l = std::os::unix::net::UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(client) = conn else { return };
            let Ok(server) = std::os::unix::net::UnixStream::connect(&upstream) else {
                continue;
            };
            let (mut from_client, mut to_server) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_client, &mut to_server);
            });
            let (mut from_server, mut to_client) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; chunk];
                loop {
                    let n = match from_server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if to_client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(every);
                }
            });
        }
    });
}

/// A remote that sends a 2 MiB directory (one gRPC message) over a link
/// of some 640 KiB/s, to a filler whose store timeout is one second: the
/// Get takes about three seconds but never stalls, so the filler waits for
/// it (and keeps the client that asked waiting) and serves the directory;
/// so too for the tree of a root and that directory, fetched recursively.
/// The unfixed filler limited the whole Get, and each message of the
/// recursive one, to the store timeout and failed them.
#[test]
fn a_slow_but_steady_directory_is_waited_for() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, root, _) = tree_remote(&rt, &t.join("remote.sock"), 1);
    let proxy = t.join("proxy.sock");
    slow_proxy(
        &proxy,
        t.join("remote.sock"),
        32 << 10,
        Duration::from_millis(50),
    );
    let dir = t.join("cache");
    let filler = Filler::start(
        &format!("grpc+unix://{}", proxy.display()),
        &dir,
        t,
        &["--store-timeout", "1"],
    );
    let want = tree_dir(0);
    let store = filler.store(&rt);
    let t0 = Instant::now();
    let got = rt.block_on(store.directory.get(&want.digest()));
    let took = t0.elapsed();
    eprintln!("a 2 MiB directory over the slow link: {took:?}");
    let got = got.unwrap_or_else(|e| panic!("after {took:?}: {e}: {}", filler.log()));
    assert_eq!(got.map(|d| d.digest()), Some(want.digest()));
    assert!(
        took > Duration::from_secs(2),
        "the link was not slow ({took:?}): the test proves nothing"
    );
    assert!(dir_file(&dir, &want.digest()).exists());

    let t0 = Instant::now();
    let tree: Result<Vec<Directory>, _> =
        rt.block_on(store.directory.get_recursive(root).try_collect());
    let took = t0.elapsed();
    eprintln!("a tree of a 2 MiB directory over the slow link: {took:?}");
    let tree = tree.unwrap_or_else(|e| panic!("after {took:?}: {e}: {}", filler.log()));
    let digests: Vec<B3Digest> = tree.iter().map(Directory::digest).collect();
    assert_eq!(digests, [root, want.digest()]);
    assert!(
        took > Duration::from_secs(2),
        "the link was not slow ({took:?})"
    );
}

// ---------------------------------------------------------------------------
// Blobs larger than the cache

/// The files `pid` has open whose path starts with `prefix`.
fn open_files_under(pid: u32, prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.starts_with(prefix))
        .collect()
}

/// A 6 MiB blob read three times at once through a filler whose cache is
/// 1 MiB (over a slow link, so that the reads overlap): each read gets the
/// right bytes, spooled into unnamed files in the cache directory's
/// staging area (not the temporary directory, which may be memory), at
/// most two at once, none left after. The unfixed filler spooled every
/// such read into the temporary directory, as many as were asked.
#[test]
fn blobs_larger_than_the_cache_are_spooled_beside_it_two_at_a_time() {
    use tvix_virtiofsd::store::blob::read_to_vec;
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = pseudo_random(6 << 20, 4242);
    let src = t.join("big");
    std::fs::write(&src, &data).unwrap();
    import(&t.join("remote"), &[&src]);
    let _remote = remote_daemon(t);
    let proxy = t.join("proxy.sock");
    slow_proxy(
        &proxy,
        t.join("remote.sock"),
        64 << 10,
        Duration::from_millis(20),
    );
    let dir = t.join("cache");
    let filler = Filler::start(
        &format!("grpc+unix://{}", proxy.display()),
        &dir,
        t,
        &["--cache-size", "1M"],
    );
    let pid = filler.pid();
    let staging = format!("{}/", dir.join("tmp").display());
    let done = Arc::new(AtomicBool::new(false));
    let (most, elsewhere) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (done, most, elsewhere) = (done.clone(), most.clone(), elsewhere.clone());
        let staging = staging.clone();
        std::thread::spawn(move || {
            while !done.load(SeqCst) {
                // By name: a spooled file may be open twice (a reader
                // duplicates its descriptor for async reads).
                let spooled = open_files_under(pid, &staging)
                    .into_iter()
                    .filter(|p| p.ends_with("(deleted)"))
                    .collect::<std::collections::HashSet<_>>()
                    .len() as u64;
                most.fetch_max(spooled, SeqCst);
                let deleted = open_files_under(pid, "/")
                    .into_iter()
                    .filter(|p| p.ends_with("(deleted)") && !p.starts_with(&staging))
                    .count() as u64;
                elsewhere.fetch_max(deleted, SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let digest = B3Digest::of(&data);
    let store = filler.store(&rt);
    let reads: Vec<_> = (0..3)
        .map(|_| {
            let s = store.clone();
            rt.spawn(async move { read_to_vec(s.blob.as_ref(), &digest).await })
        })
        .collect();
    for r in reads {
        let got = rt.block_on(r).unwrap().unwrap().expect("the blob");
        assert!(got == data, "the large blob read back differently");
    }
    done.store(true, SeqCst);
    sampler.join().unwrap();
    let (most, elsewhere) = (most.load(SeqCst), elsewhere.load(SeqCst));
    eprintln!("spooled in the staging area at once: {most}; unnamed files elsewhere: {elsewhere}");
    assert_eq!(elsewhere, 0, "spooled outside the cache directory");
    assert!(
        (1..=2).contains(&most),
        "{most} blobs spooled at once in {staging}"
    );
    assert!(!blob_file(&dir, &digest).exists(), "kept in the cache");
    assert!(filler.metric("used_bytes") <= 1 << 20);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        open_files_under(pid, &staging).is_empty(),
        "spool files left open"
    );
}
