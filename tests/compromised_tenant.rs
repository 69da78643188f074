//! A tenant's per-VM daemon taken over by its guest, on a host where
//! tenants share one host cache: it must reach its own closure and nothing
//! else. Real processes: a remote `daemon`, the host `daemon --cache-dir`
//! (the filler) in front of it, and `virtiofs --closure ... --cache-dir`
//! driven by the load generator's vhost-user frontend as a guest.
//!
//! - the scoped daemon serves its closure byte for byte, and another
//!   tenant's path is absent;
//! - its serving process's root (seen through /proc/PID/root, as code
//!   running in it would see it) holds neither the cache directory nor
//!   the host daemon's socket: no other tenant's file to open and no way
//!   to open an unscoped connection;
//! - on a scoped connection, spoken to directly as a compromised daemon
//!   would, every object outside the closure is refused (path infos
//!   absent, directories and blobs PERMISSION_DENIED, fills included),
//!   nothing is listed or written, and a blob inside arrives as a passed,
//!   read-only descriptor of the cache's file.
mod common;
#[path = "../benches/common/frontend.rs"]
mod frontend;

use common::{cli_ok, pseudo_random};
use frontend::*;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tvix_virtiofsd::castore::{B3Digest, Node};
use tvix_virtiofsd::fuzz::{cstr, fuse_msg, read_in};
use tvix_virtiofsd::nix::store_path::StorePath;
use tvix_virtiofsd::store::blob::read_to_vec;
use tvix_virtiofsd::store::cache::tenant;
use tvix_virtiofsd::wire::cache::cache_service_client::CacheServiceClient;
use tvix_virtiofsd::wire::cache::{FillBlobRequest, FillBlobsRequest, TouchRequest};
use tvix_virtiofsd::wire::castore as cpb;
use tvix_virtiofsd::wire::store as spb;

const IN_BUF: u64 = 0x20_0000;
const OUT_BUF: u64 = 0x30_0000;
/// Room for one READ reply of up to 64 KiB and its header.
const OUT_LEN: u32 = 0x1_1000;

fn wait_used(mem: &GuestMem, q: &mut Queue) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut used = Vec::new();
    loop {
        q.pop_used(mem, &mut used).unwrap();
        if let Some(&(_, len)) = used.first() {
            return len;
        }
        assert!(Instant::now() < deadline, "the daemon never answered");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// One FUSE request; answers the reply's error field and the reply.
fn request(mem: &GuestMem, q: &mut Queue, msg: &[u8]) -> (i32, Vec<u8>) {
    mem.write(IN_BUF, msg).unwrap();
    q.set_desc(mem, 0, IN_BUF, msg.len() as u32, VIRTQ_DESC_F_NEXT, 1)
        .unwrap();
    q.set_desc(mem, 1, OUT_BUF, OUT_LEN, VIRTQ_DESC_F_WRITE, 0)
        .unwrap();
    q.push(mem, 0).unwrap();
    q.kick.write(1).unwrap();
    let len = wait_used(mem, q);
    let mut reply = vec![0u8; len as usize];
    mem.read(OUT_BUF, &mut reply).unwrap();
    let err = i32::from_le_bytes(reply[4..8].try_into().unwrap());
    (err, reply)
}

/// Imports `data` as a file store path into `store`; answers its basename.
fn import(store: &str, dir: &Path, file: &str, data: &[u8]) -> String {
    let f = dir.join(file);
    std::fs::write(&f, data).unwrap();
    let path =
        String::from_utf8(cli_ok(&["--store", store, "import", f.to_str().unwrap()])).unwrap();
    path.trim().strip_prefix("/nix/store/").unwrap().to_string()
}

/// The host daemon with a cache directory, on a unix socket.
struct Filler {
    child: Child,
    sock: PathBuf,
}

impl Filler {
    fn start(remote: &str, cache: &Path, work: &Path) -> Filler {
        let sock = work.join("host.sock");
        let log = work.join("host.log");
        let mut child = Command::new(common::bin())
            .args(["--store", remote, "--cache-dir"])
            .arg(cache)
            .args(["daemon", "--min-free-space", "16M", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the host daemon died: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            assert!(Instant::now() < deadline, "the host daemon never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Filler { child, sock }
    }

    fn addr(&self) -> String {
        format!("grpc+unix://{}", self.sock.display())
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sandboxed process that serves the guest: the daemon's child.
fn serving_pid(daemon: &Child) -> u32 {
    let pid = daemon.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        if let Some(kid) = kids.split_whitespace().next() {
            return kid.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "the daemon never forked");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Two tenants' paths in a remote store, and a host daemon whose cache
/// already holds both (another tenant's VM read its path before).
struct Host {
    _tmp: tempfile::TempDir,
    work: PathBuf,
    cache: PathBuf,
    _remote: common::Daemon,
    filler: Filler,
    ours: String,
    ours_data: Vec<u8>,
    /// A small file of the closure too: kept open once passed.
    small: String,
    small_data: Vec<u8>,
    theirs: String,
    theirs_data: Vec<u8>,
}

fn host(rt: &tokio::runtime::Runtime) -> Host {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().to_path_buf();
    let store = format!("local://{}", work.join("remote").display());
    // 3 MiB: read at offsets from the passed file, checked before serving
    let ours_data = pseudo_random(3 << 20, 7);
    let theirs_data = b"another tenant's secret\n".to_vec();
    let ours = import(&store, &work, "ours", &ours_data);
    let small_data = pseudo_random(100 << 10, 8);
    let small = import(&store, &work, "small", &small_data);
    let theirs = import(&store, &work, "theirs", &theirs_data);
    let remote = common::Daemon::start(
        &store,
        &format!("unix:{}", work.join("remote.sock").display()),
        &[],
    );
    let cache = work.join("cache");
    let filler = Filler::start(&remote.addr, &cache, &work);
    // the other tenant's file is in the cache
    let client = {
        let _g = rt.enter();
        common::grpc_store(&filler.addr())
    };
    let got = rt
        .block_on(read_to_vec(
            client.blob.as_ref(),
            &B3Digest::of(&theirs_data),
        ))
        .unwrap()
        .unwrap();
    assert_eq!(got, theirs_data);
    Host {
        _tmp: tmp,
        work,
        cache,
        _remote: remote,
        filler,
        ours,
        ours_data,
        small,
        small_data,
        theirs,
        theirs_data,
    }
}

#[test]
fn a_tenant_daemon_serves_its_closure_and_reaches_no_other_tenant() {
    let rt = runtime();
    let h = host(&rt);
    let sock = h.work.join("vm.sock");
    let log = h.work.join("vm.log");
    let mut daemon = common::spawn_virtiofs(
        &h.filler.addr(),
        &sock,
        &log,
        &[
            "--cache-dir",
            h.cache.to_str().unwrap(),
            "--closure",
            &format!("/nix/store/{}", h.ours),
            "--closure",
            &format!("/nix/store/{}", h.small),
        ],
    );
    common::wait_for_socket_file(&sock);
    let mem = GuestMem::new(MEM_SIZE).unwrap();
    let (conn, mut queues) = setup(sock.to_str().unwrap(), &mem).unwrap();
    let serving = serving_pid(&daemon);
    let mut q = queues.remove(REQUEST_QUEUE);
    let (e, _) = request(&mem, &mut q, &tvix_virtiofsd::fuzz::init_message());
    assert_eq!(e, 0, "INIT");

    // its closure, byte for byte
    let (e, reply) = request(&mem, &mut q, &fuse_msg(1, 2, ROOT, &cstr(&h.ours)));
    assert_eq!(e, 0, "LOOKUP of the closure's path");
    let ino = u64::from_le_bytes(reply[16..24].try_into().unwrap());
    let (e, reply) = request(&mem, &mut q, &fuse_msg(14, 3, ino, &[0u8; 8]));
    assert_eq!(e, 0, "OPEN");
    let fh = u64::from_le_bytes(reply[16..24].try_into().unwrap());
    let mut read = Vec::new();
    let mut unique = 4;
    while read.len() < h.ours_data.len() {
        let (e, reply) = request(
            &mem,
            &mut q,
            &fuse_msg(15, unique, ino, &read_in(fh, read.len() as u64, 64 << 10)),
        );
        assert_eq!(e, 0, "READ at {}", read.len());
        assert!(reply.len() > 16, "READ at {} ended early", read.len());
        read.extend_from_slice(&reply[16..]);
        unique += 1;
    }
    assert!(read == h.ours_data, "the closure's file, byte for byte");
    // a small file, opened, released and opened again (then from the
    // descriptor kept when it was first passed)
    let (e, reply) = request(&mem, &mut q, &fuse_msg(1, unique, ROOT, &cstr(&h.small)));
    assert_eq!(e, 0, "LOOKUP of the small file");
    let small = u64::from_le_bytes(reply[16..24].try_into().unwrap());
    for _ in 0..2 {
        let (e, reply) = request(&mem, &mut q, &fuse_msg(14, unique + 1, small, &[0u8; 8]));
        assert_eq!(e, 0, "OPEN of the small file");
        let fh = u64::from_le_bytes(reply[16..24].try_into().unwrap());
        let mut got = Vec::new();
        while got.len() < h.small_data.len() {
            let at = got.len() as u64;
            let (e, reply) = request(
                &mem,
                &mut q,
                &fuse_msg(15, unique + 2, small, &read_in(fh, at, 64 << 10)),
            );
            assert_eq!(e, 0, "READ of the small file at {at}");
            assert!(reply.len() > 16, "READ at {at} ended early");
            got.extend_from_slice(&reply[16..]);
        }
        assert!(got == h.small_data, "the small file, byte for byte");
        let mut release = fh.to_le_bytes().to_vec();
        release.extend_from_slice(&[0u8; 16]);
        let (e, _) = request(&mem, &mut q, &fuse_msg(18, unique + 3, small, &release));
        assert_eq!(e, 0, "RELEASE");
        unique += 4;
    }
    // another tenant's path is absent (a negative entry: node id 0)
    let (e, reply) = request(&mem, &mut q, &fuse_msg(1, unique, ROOT, &cstr(&h.theirs)));
    let node = (e == 0).then(|| u64::from_le_bytes(reply[16..24].try_into().unwrap()));
    assert!(
        e == -libc::ENOENT || node == Some(0),
        "another tenant's path: error {e}, node {node:?}"
    );

    // What code running in the serving process could open.
    let root = PathBuf::from(format!("/proc/{serving}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    let their_blob = {
        let hex = B3Digest::of(&h.theirs_data).to_hex();
        h.cache.join("blobs").join(&hex[..2]).join(hex)
    };
    assert!(their_blob.exists(), "the other tenant's blob is cached");
    assert!(
        std::fs::read(inside(&their_blob)).is_err(),
        "the other tenant's cached file is readable from the serving process's root"
    );
    assert!(
        !inside(&h.cache).exists(),
        "the cache directory is in the serving process's root"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(inside(&h.filler.sock)).is_err(),
        "the host daemon's socket is reachable from the serving process's root \
         (an unscoped connection)"
    );
    // it holds its one connection: a socket descriptor
    let sockets = std::fs::read_dir(format!("/proc/{serving}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("socket:"))
        .count();
    assert!(sockets >= 2, "the VMM's connection and the scoped one");

    drop(conn);
    let status = common::vm::wait_exit(&mut daemon, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

#[test]
fn a_scoped_connection_answers_only_for_its_closure() {
    let rt = runtime();
    let h = host(&rt);
    let ours = StorePath::from_basename(&h.ours).unwrap();
    let theirs = StorePath::from_basename(&h.theirs).unwrap();
    let ours_blob = B3Digest::of(&h.ours_data);
    let theirs_blob = B3Digest::of(&h.theirs_data);

    // roots the store lacks, or that are not store paths: refused
    let missing = StorePath::from_basename(&format!("{}-nope", "0".repeat(32))).unwrap();
    let err = tenant::connect(&h.filler.sock, &[missing], Duration::from_secs(30))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refused") && err.contains("not in the store"),
        "{err}"
    );
    {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&h.filler.sock).unwrap();
        s.write_all(b"tvx-scp1\x05\x00\x00\x00hello").unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        assert_eq!(reply[0], 1, "a bad root is refused");
        assert!(String::from_utf8_lossy(&reply[5..]).contains("not a store path"));
        // a length that would have the host allocate 4 GiB: refused unread
        let mut s = std::os::unix::net::UnixStream::connect(&h.filler.sock).unwrap();
        s.write_all(b"tvx-scp1\xff\xff\xff\xff").unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        assert_eq!(reply[0], 1);
        assert!(String::from_utf8_lossy(&reply[5..]).contains("more than"));
    }

    let conn = tenant::connect(
        &h.filler.sock,
        std::slice::from_ref(&ours),
        Duration::from_secs(30),
    )
    .unwrap();
    let (ch, inbox) = {
        let _g = rt.enter();
        tenant::channel(conn).unwrap()
    };
    let mut infos = spb::path_info_service_client::PathInfoServiceClient::new(ch.clone());
    let mut blobs = cpb::blob_service_client::BlobServiceClient::new(ch.clone());
    let mut dirs = cpb::directory_service_client::DirectoryServiceClient::new(ch.clone());
    let mut fills = CacheServiceClient::new(ch.clone());
    rt.block_on(async {
        let info = |h: &StorePath| spb::GetPathInfoRequest {
            by_what: Some(spb::get_path_info_request::ByWhat::ByOutputHash(
                bytes::Bytes::copy_from_slice(h.digest()),
            )),
        };
        let got = infos.get(info(&ours)).await.unwrap().into_inner();
        let node = Node::from_proto_root(got.node.as_ref().unwrap()).unwrap().1;
        assert!(matches!(node, Node::File { digest, .. } if digest == ours_blob));
        let e = infos.get(info(&theirs)).await.unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::NotFound,
            "another tenant's path info"
        );

        // another tenant's blob, every way a blob can be asked for
        let read = |d: B3Digest| cpb::ReadBlobRequest { digest: d.into() };
        let e = match blobs.read(read(theirs_blob)).await {
            Err(e) => e,
            Ok(r) => r.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "Read: {e}");
        let stat = cpb::StatBlobRequest {
            digest: theirs_blob.into(),
            ..Default::default()
        };
        let e = blobs.stat(stat).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "Stat: {e}");
        let fill = |d: B3Digest| FillBlobRequest {
            digest: d.into(),
            size: 0,
        };
        let e = match fills.fill_blob(fill(theirs_blob)).await {
            Err(e) => e,
            Ok(r) => r.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "FillBlob: {e}");
        // in a batch too, however many of ours are beside it
        let batch = FillBlobsRequest {
            blobs: vec![fill(ours_blob), fill(theirs_blob)],
        };
        let e = match fills.fill_blobs(batch).await {
            Err(e) => e,
            Ok(r) => r.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "FillBlobs: {e}");
        // a directory digest never served on this connection
        let get = cpb::GetDirectoryRequest {
            by_what: Some(cpb::get_directory_request::ByWhat::Digest(
                theirs_blob.into(),
            )),
            recursive: true,
        };
        let e = match dirs.get(get).await {
            Err(e) => e,
            Ok(r) => r.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(
            e.code(),
            tonic::Code::PermissionDenied,
            "directory Get: {e}"
        );
        // nothing listed, nothing written
        let e = match infos.list(spb::ListPathInfoRequest::default()).await {
            Err(e) => e,
            Ok(r) => r.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "List: {e}");
        let put = blobs
            .put(futures::stream::iter([cpb::BlobChunk {
                data: bytes::Bytes::from_static(b"x"),
            }]))
            .await
            .unwrap_err();
        assert_eq!(put.code(), tonic::Code::PermissionDenied, "Put: {put}");
        // a Touch of another tenant's objects is ignored, not an error
        fills
            .touch(TouchRequest {
                blobs: vec![theirs_blob.into()],
                ..Default::default()
            })
            .await
            .unwrap();

        // our blob: a descriptor of the cache's file, read-only
        let mut s = fills.fill_blob(fill(ours_blob)).await.unwrap().into_inner();
        let mut seq = 0;
        while let Some(p) = s.message().await.unwrap() {
            if p.done {
                seq = p.fd_seq;
            }
        }
        assert!(seq > 0, "the fill names a passed descriptor");
        let f = std::fs::File::from(inbox.take(seq).unwrap());
        // SAFETY: fcntl(F_GETFL) on a descriptor we own.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY, "read-only");
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut data).unwrap();
        assert!(data == h.ours_data, "the passed file holds the blob");

        // and in a batch: its answer names another passed descriptor
        let batch = FillBlobsRequest {
            blobs: vec![fill(ours_blob)],
        };
        let mut s = fills.fill_blobs(batch).await.unwrap().into_inner();
        let mut batch_seq = 0;
        while let Some(a) = s.message().await.unwrap() {
            if a.done {
                batch_seq = a.fd_seq;
            }
        }
        assert!(batch_seq > seq, "the batch names a new passed descriptor");
        let f = std::fs::File::from(inbox.take(batch_seq).unwrap());
        // SAFETY: fcntl(F_GETFL) on a descriptor we own.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY, "read-only");
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut data).unwrap();
        assert!(
            data == h.ours_data,
            "the batch's passed file holds the blob"
        );
    });
}
