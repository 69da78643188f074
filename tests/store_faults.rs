//! A faulty remote store under a real FUSE mount of the view (`mount`, the
//! same view a VM's daemon serves): the store's connection killed in the
//! middle of a blob, blobs trickled, stalled, cut short, sent without end,
//! sizes that lie, a directory of a million entries and a chain of
//! directories 10,000 deep. Every fault reaches the reader as a clear errno
//! (or, for the slow but moving store, the right bytes), the mount keeps
//! serving its other paths, and its private memory stays bounded.
mod common;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status, Streaming};
use tvix_virtiofsd::castore::{B3Digest, Directory, LeavesFirst, Node};
use tvix_virtiofsd::nix::store_path::StorePath;
use tvix_virtiofsd::serve::grpc::StoreServer;
use tvix_virtiofsd::store::{blob, Store};
use tvix_virtiofsd::wire::castore as pb;
use tvix_virtiofsd::wire::castore::blob_service_server::{BlobService, BlobServiceServer};
use tvix_virtiofsd::wire::castore::directory_service_server::DirectoryServiceServer;
use tvix_virtiofsd::wire::store::path_info_service_server::PathInfoServiceServer;

/// What the store does when asked for a blob.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Sends this many bytes, then its connections die (as when the store
    /// process is killed).
    KillAfter(usize),
    /// Sends 4 KiB every 110 ms: slow, but never idle for long.
    Trickle,
    /// Sends this many bytes, then nothing, forever.
    StallAfter(usize),
    /// Ends the stream cleanly at half the blob.
    Truncate,
    /// Sends the blob, then garbage without end.
    Endless,
}

/// The blob service of a faulty store: honest for blobs without a fault.
#[derive(Clone)]
struct FaultyBlobs {
    store: Store,
    faults: Arc<Mutex<HashMap<B3Digest, Fault>>>,
    /// Duplicates of the accepted connections, to kill them.
    conns: Arc<Mutex<Vec<OwnedFd>>>,
}

impl FaultyBlobs {
    fn kill_connections(&self) {
        for fd in self.conns.lock().unwrap().drain(..) {
            // SAFETY: shutdown(2) on a descriptor we own (a dup of the
            // accepted socket); it ends the connection for every dup.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

type ChunkResult = Result<pb::BlobChunk, Status>;

fn chunk(b: &[u8]) -> ChunkResult {
    Ok(pb::BlobChunk {
        data: Bytes::copy_from_slice(b),
    })
}

#[tonic::async_trait]
impl BlobService for FaultyBlobs {
    type ReadStream = BoxStream<'static, ChunkResult>;
    async fn stat(
        &self,
        _: Request<pb::StatBlobRequest>,
    ) -> Result<Response<pb::StatBlobResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn read(
        &self,
        req: Request<pb::ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let digest = B3Digest::try_from(&req.get_ref().digest[..])
            .map_err(|_| Status::invalid_argument("digest"))?;
        let data = blob::read_to_vec(self.store.blob.as_ref(), &digest)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found("blob"))?;
        let fault = self.faults.lock().unwrap().get(&digest).copied();
        let s: Self::ReadStream = match fault {
            None => {
                futures::stream::iter(data.chunks(1 << 20).map(chunk).collect::<Vec<_>>()).boxed()
            }
            Some(Fault::KillAfter(n)) => {
                let this = self.clone();
                futures::stream::iter(vec![chunk(&data[..n])])
                    .chain(futures::stream::once(async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        this.kill_connections();
                        futures::future::pending::<ChunkResult>().await
                    }))
                    .boxed()
            }
            Some(Fault::Trickle) => {
                let chunks: Vec<Vec<u8>> = data.chunks(4096).map(<[u8]>::to_vec).collect();
                futures::stream::iter(chunks)
                    .then(|c| async move {
                        tokio::time::sleep(Duration::from_millis(110)).await;
                        chunk(&c)
                    })
                    .boxed()
            }
            Some(Fault::StallAfter(n)) => futures::stream::iter(vec![chunk(&data[..n])])
                .chain(futures::stream::pending())
                .boxed(),
            Some(Fault::Truncate) => {
                futures::stream::iter(vec![chunk(&data[..data.len() / 2])]).boxed()
            }
            Some(Fault::Endless) => futures::stream::iter(vec![chunk(&data)])
                .chain(futures::stream::repeat_with(|| chunk(&[0x5a; 64 << 10])))
                .boxed(),
        };
        Ok(Response::new(s))
    }
    async fn put(
        &self,
        _: Request<Streaming<pb::BlobChunk>>,
    ) -> Result<Response<pb::PutBlobResponse>, Status> {
        Err(Status::unimplemented("read-only"))
    }
}

/// Serves `store` on a unix socket in `dir`, blobs through `blobs`.
fn serve(rt: &tokio::runtime::Runtime, blobs: FaultyBlobs, dir: &Path) -> String {
    let path = dir.join("store.sock");
    let srv = StoreServer::new(blobs.store.clone(), false);
    let conns = blobs.conns.clone();
    let _guard = rt.enter();
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(l).map(move |c| {
        if let Ok(s) = &c {
            if let Ok(fd) = s.as_fd_dup() {
                conns.lock().unwrap().push(fd);
            }
        }
        c
    });
    let router = tonic::transport::Server::builder()
        .add_service(BlobServiceServer::new(blobs))
        .add_service(DirectoryServiceServer::new(srv.clone()).max_encoding_message_size(usize::MAX))
        .add_service(PathInfoServiceServer::new(srv));
    rt.spawn(router.serve_with_incoming(incoming));
    format!("grpc+unix://{}", path.display())
}

trait DupFd {
    fn as_fd_dup(&self) -> std::io::Result<OwnedFd>;
}

impl DupFd for tokio::net::UnixStream {
    fn as_fd_dup(&self) -> std::io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned()
    }
}

/// `tvix-virtiofsd mount`, unmounted on drop.
struct Mount {
    child: Child,
    path: PathBuf,
}

impl Mount {
    fn start(store: &str, mnt: &Path) -> Mount {
        std::fs::create_dir_all(mnt).unwrap();
        let child = Command::new(common::bin())
            .args(["--store", store, "mount", mnt.to_str().unwrap()])
            // Short, so a stall fails quickly. The million-entry
            // directory gets more (a second per 100,000 entries, up to 4
            // limits): one call of 2 s timed out on a loaded 2-core CI
            // machine before directories got it.
            .args(["--store-timeout", "2"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let m = Mount {
            child,
            path: mnt.canonicalize().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !common::is_mounted(&m.path) {
            assert!(Instant::now() < deadline, "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn rss_anon_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
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

fn dir_node(d: &Directory) -> Node {
    Node::Directory {
        digest: d.digest(),
        size: d.size(),
    }
}

/// Puts `data` as a blob and a store path `name` holding it as a file
/// whose node declares `declared` bytes; answers the path's basename.
async fn put_file(store: &Store, name: &str, data: &[u8], declared: u64) -> (String, B3Digest) {
    let digest = blob::put_bytes(store.blob.as_ref(), data).await.unwrap();
    let node = Node::File {
        digest,
        size: declared,
        executable: false,
    };
    (put_path(store, name, node).await, digest)
}

async fn put_path(store: &Store, name: &str, node: Node) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sp = StorePath::from_basename(&format!("{n:0>32}-{name}")).unwrap();
    store
        .path_info
        .put(common::bare_path_info(sp.clone(), node))
        .await
        .unwrap();
    sp.to_basename()
}

async fn put_tree(store: &Store, name: &str, dirs: Vec<Directory>) -> String {
    let root = dir_node(dirs.last().unwrap());
    let mut g = LeavesFirst::new();
    for d in dirs {
        g.add(d).unwrap();
    }
    store
        .directory
        .put_graph(g.finish().unwrap())
        .await
        .unwrap();
    put_path(store, name, root).await
}

fn errno_of(r: std::io::Result<Vec<u8>>) -> i32 {
    match r {
        Ok(b) => panic!("read {} bytes where an error was due", b.len()),
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

#[test]
fn a_faulty_store_gives_clear_errors_and_the_mount_keeps_serving() {
    if !common::fuse_available("STORE FAULT TEST") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::memory();
    let blobs = FaultyBlobs {
        store: store.clone(),
        faults: Default::default(),
        conns: Default::default(),
    };
    // distinct odd seeds (the generator sets the low bit)
    let data = |i: u64| common::pseudo_random(256 << 10, 2 * i + 1);
    let (good, good_data) = (
        rt.block_on(put_file(&store, "good", &data(0), 256 << 10)).0,
        data(0),
    );
    let mut paths = HashMap::new();
    for (i, (name, fault)) in [
        ("killed", Fault::KillAfter(64 << 10)),
        ("trickle", Fault::Trickle),
        ("stalled", Fault::StallAfter(64 << 10)),
        ("truncated", Fault::Truncate),
        ("endless", Fault::Endless),
    ]
    .into_iter()
    .enumerate()
    {
        let (p, digest) = rt.block_on(put_file(&store, name, &data(i as u64 + 1), 256 << 10));
        blobs.faults.lock().unwrap().insert(digest, fault);
        paths.insert(name, p);
    }
    let small = b"fifty bytes, and the directory says a hundred....\n";
    let (longer, _) = rt.block_on(put_file(&store, "says-longer", small, 100));
    let (shorter, _) = rt.block_on(put_file(&store, "says-shorter", small, 10));
    // a million entries, all the same small file
    let (wide, deep) = rt.block_on(async {
        let digest = blob::put_bytes(store.blob.as_ref(), b"leaf\n")
            .await
            .unwrap();
        let leaf = Node::File {
            digest,
            size: 5,
            executable: false,
        };
        let mut d = Directory::new();
        for i in 0..1_000_000u32 {
            d.add(format!("e{i:07}").into(), leaf.clone()).unwrap();
        }
        let wide = put_tree(&store, "wide", vec![d]).await;
        let mut chain = vec![Directory::new()];
        for _ in 0..10_000 {
            let mut d = Directory::new();
            d.add("d".into(), dir_node(chain.last().unwrap())).unwrap();
            chain.push(d);
        }
        (wide, put_tree(&store, "deep", chain).await)
    });
    let addr = serve(&rt, blobs.clone(), tmp.path());
    let m = Mount::start(&addr, &tmp.path().join("mnt"));
    let read = |name: &str| std::fs::read(m.path.join(name));
    let still_serving = |after: &str| {
        assert!(
            read(&good).unwrap() == good_data,
            "the good path after {after}"
        );
    };
    let base = m.rss_anon_kib();

    // killed mid-stream: an error; once the store is back (it no longer
    // dies on that blob), it is dialled again and the same file reads
    let e = errno_of(read(&paths["killed"]));
    assert_eq!(e, libc::EIO, "killed mid-stream");
    let killed = blobs
        .faults
        .lock()
        .unwrap()
        .iter()
        .find(|(_, f)| matches!(f, Fault::KillAfter(_)))
        .map(|(d, _)| *d)
        .unwrap();
    blobs.faults.lock().unwrap().remove(&killed);
    still_serving("a killed connection");
    assert!(read(&paths["killed"]).unwrap() == data(1), "read again");

    // a trickle keeps moving: it is slow, not stalled (64 chunks, 110 ms
    // apart: longer in all than the 2 s limit, which is on silence)
    let t0 = Instant::now();
    assert!(
        read(&paths["trickle"]).unwrap() == data(2),
        "trickled bytes"
    );
    assert!(t0.elapsed() > Duration::from_secs(6), "was it trickled?");

    // stalled: ETIMEDOUT after the limit, other paths served meanwhile
    let stalled = {
        let p = m.path.join(&paths["stalled"]);
        std::thread::spawn(move || (std::fs::read(p), Instant::now()))
    };
    std::thread::sleep(Duration::from_millis(300));
    still_serving("during a stall");
    let (r, _) = stalled.join().unwrap();
    assert_eq!(errno_of(r), libc::ETIMEDOUT, "stalled");

    // cut short, endless, and sizes that lie: EIO, never the wrong bytes
    for name in ["truncated", "endless"] {
        assert_eq!(errno_of(read(&paths[name])), libc::EIO, "{name}");
    }
    assert_eq!(
        errno_of(read(&longer)),
        libc::EIO,
        "a node longer than its blob"
    );
    assert_eq!(
        errno_of(read(&shorter)),
        libc::EIO,
        "a node shorter than its blob"
    );
    still_serving("lies");

    // a million entries: looked up, read, listed in full
    let t0 = Instant::now();
    let w = m.path.join(&wide);
    assert_eq!(std::fs::read(w.join("e0999999")).unwrap(), b"leaf\n");
    for i in (0..1_000_000).step_by(99_991) {
        let md = std::fs::metadata(w.join(format!("e{i:07}"))).unwrap();
        assert_eq!(md.len(), 5);
    }
    let listed = std::fs::read_dir(&w).unwrap().count();
    assert_eq!(listed, 1_000_000);
    let wide_rss = m.rss_anon_kib();
    eprintln!(
        "a million entries: looked up, read and listed in {:?}; RssAnon {wide_rss} KiB (from {base})",
        t0.elapsed()
    );
    still_serving("a million entries");

    // 10,000 deep: walked to the bottom a level at a time
    let mut fd = open_dir(&m.path.join(&deep));
    for level in 0..10_000 {
        let next = CString::new("d").unwrap();
        // SAFETY: openat(2) on a descriptor we own, with a C string.
        let n = unsafe {
            libc::openat(
                fd.as_raw_fd(),
                next.as_ptr(),
                libc::O_DIRECTORY | libc::O_RDONLY,
            )
        };
        assert!(n >= 0, "level {level}: {}", std::io::Error::last_os_error());
        // SAFETY: openat just returned it; nothing else owns it.
        fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n) };
    }
    still_serving("a 10,000-deep chain");

    // What the decoding freed goes back to the kernel at the mount's next
    // allocator trim (every 2 s): wait a few of those, no longer.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut rss = m.rss_anon_kib();
    while rss >= 256 << 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        rss = m.rss_anon_kib();
    }
    eprintln!(
        "mount RssAnon: {base} KiB at start, {wide_rss} after the wide directory, {rss} at the end"
    );
    assert!(rss < 256 << 10, "the mount holds {rss} KiB");
}

fn open_dir(p: &Path) -> OwnedFd {
    std::fs::File::open(p).unwrap().into()
}
