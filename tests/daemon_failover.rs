//! A store given as several daemons (`--store A,B`): two real `daemon`
//! processes over one embedded store directory, and clients of the list
//! (the CLI, and a host cache daemon whose remote is the list). The first
//! daemon is killed, frozen (SIGSTOP) or both are down; answers about an
//! object (a refused Put, a corrupt blob, not found) are not failed over;
//! a blob read that fails midway goes on at the next daemon with the right
//! bytes. Times are printed (`--nocapture`) as the figures of the change.
mod common;

use common::{bin, cli_err, cli_ok, free_port, metric, scrape_metrics, wait_stopped, Daemon};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// One embedded store served by two daemons: `a` read-only on TCP, `b`
/// writable on a unix socket (in a directory of its own), each with its
/// gRPC call metrics on TCP.
struct Fleet {
    tmp: TempDir,
    store: String,
    a_listen: String,
    b_sock: PathBuf,
    a_metrics: String,
    b_metrics: String,
    a: Option<Daemon>,
    b: Option<Daemon>,
}

impl Fleet {
    fn new() -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let store = format!("local://{}", tmp.path().join("store").display());
        std::fs::create_dir(tmp.path().join("b")).unwrap();
        let mut f = Fleet {
            store,
            a_listen: format!("127.0.0.1:{}", free_port()),
            b_sock: tmp.path().join("b/daemon.sock"),
            a_metrics: format!("127.0.0.1:{}", free_port()),
            b_metrics: format!("127.0.0.1:{}", free_port()),
            tmp,
            a: None,
            b: None,
        };
        // the store exists before either daemon opens it
        f.import("seed", b"seed");
        f.start_a();
        f.start_b();
        f
    }

    fn start_a(&mut self) {
        let extra = ["--read-only", "--metrics-listen", &self.a_metrics];
        self.a = Some(Daemon::start(&self.store, &self.a_listen, &extra));
    }

    fn start_b(&mut self) {
        let listen = format!("unix:{}", self.b_sock.display());
        let extra = ["--metrics-listen", &self.b_metrics];
        self.b = Some(Daemon::start(&self.store, &listen, &extra));
    }

    /// `--store` naming both, `a` first.
    fn list(&self) -> String {
        format!(
            "grpc+http://{},grpc+unix://{}",
            self.a_listen,
            self.b_sock.display()
        )
    }

    /// Imports a file of `content` into the store directly; its store path.
    fn import(&self, name: &str, content: &[u8]) -> String {
        let f = self.tmp.path().join(name);
        std::fs::write(&f, content).unwrap();
        let out = cli_ok(&["--store", &self.store, "import", f.to_str().unwrap()]);
        String::from_utf8(out).unwrap().trim().to_string()
    }

    /// The NAR of `path` read from the store directly.
    fn nar(&self, path: &str) -> Vec<u8> {
        cli_ok(&["--store", &self.store, "nar", path])
    }

    fn pid(d: &Option<Daemon>) -> i32 {
        d.as_ref().expect("daemon running").child.id() as i32
    }

    /// SIGKILLs `a` (or `b`) and waits for it.
    fn kill(d: &mut Option<Daemon>) {
        let mut d = d.take().expect("daemon running");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(d.child.id() as i32, libc::SIGKILL) };
        d.child.wait().unwrap();
    }

    fn freeze(d: &Option<Daemon>) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(Self::pid(d), libc::SIGSTOP) };
        wait_stopped(Self::pid(d) as u32);
    }

    fn thaw(d: &Option<Daemon>) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(Self::pid(d), libc::SIGCONT) };
    }
}

/// Calls of `method` (e.g. `tvix.store.v1.PathInfoService/Get`) a daemon
/// served, from its `--metrics-listen`.
fn calls(metrics: &str, method: &str) -> u64 {
    let text = scrape_metrics(metrics);
    let sample = format!("tvix_virtiofsd_grpc_call_seconds_count{{method=\"{method}\"}}");
    if text.contains(&sample) {
        metric(&text, &sample)
    } else {
        0
    }
}

/// A host cache daemon (`daemon --cache-dir`) whose remote is `list`,
/// on a unix socket, its log in `tmp/host.log`.
fn host_cache(list: &str, tmp: &Path, store_timeout: &str) -> Daemon {
    let sock = tmp.join("host.sock");
    let child = Command::new(bin())
        .args(["--store", list, "--cache-dir"])
        .arg(tmp.join("cache"))
        .args(["daemon", "--read-only", "--min-free-space", "16M"])
        .args(["--store-timeout", store_timeout, "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(tmp.join("host.log")).unwrap())
        .spawn()
        .expect("spawn the host cache daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "the host cache daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon {
        child,
        addr: format!("grpc+unix://{}", sock.display()),
    }
}

fn host_log(tmp: &Path) -> String {
    std::fs::read_to_string(tmp.join("host.log")).unwrap_or_default()
}

/// `f`'s result and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

fn sha(b: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(b))
}

#[test]
fn a_killed_first_daemon_is_failed_over_without_an_error() {
    let mut f = Fleet::new();
    let paths: Vec<String> = (0..4)
        .map(|n| f.import(&format!("k{n}"), format!("killed {n}").as_bytes()))
        .collect();
    let list = f.list();
    let host = host_cache(&list, f.tmp.path(), "30");
    let via_host = |args: &[&str]| cli_ok(&[&["--store", host.addr.as_str()], args].concat());
    via_host(&["path-info", &paths[0]]);
    cli_ok(&["--store", &list, "path-info", &paths[0]]);

    Fleet::kill(&mut f.a);
    let (_, t) = timed(|| via_host(&["path-info", &paths[1]]));
    eprintln!("FIGURE after SIGKILL: host cache's first miss answered in {t:?}");
    assert!(t < Duration::from_secs(5), "{t:?}");
    let (nar, t) = timed(|| via_host(&["nar", &paths[1]]));
    eprintln!("FIGURE after SIGKILL: host cache's NAR (tree and blob fills) in {t:?}");
    assert_eq!(nar, f.nar(&paths[1]));
    // the CLI on the list itself, its first call meeting the dead daemon
    let (nar, t) = timed(|| cli_ok(&["--store", &list, "nar", &paths[2]]));
    eprintln!("FIGURE after SIGKILL: a new CLI process's NAR in {t:?}");
    assert_eq!(nar, f.nar(&paths[2]));
    // a Put goes on at the next daemon too (the dead one came first)
    let up = f.tmp.path().join("uploaded");
    std::fs::write(&up, b"uploaded while a is dead").unwrap();
    let out = cli_ok(&["--store", &list, "import", up.to_str().unwrap()]);
    let uploaded = String::from_utf8(out).unwrap().trim().to_string();
    cli_ok(&["--store", &f.store, "path-info", &uploaded]);
    assert!(calls(&f.b_metrics, "tvix.store.v1.PathInfoService/Put") >= 1);

    // restarted, the first daemon is probed after its backoff and is the
    // one asked again (not only as a last resort): the host cache daemon
    // was not restarted
    f.start_a();
    let restarted = Instant::now();
    let missing = "/nix/store/00000000000000000000000000000000-missing";
    while calls(&f.a_metrics, "tvix.store.v1.PathInfoService/Get") == 0 {
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "the restarted daemon is never asked again"
        );
        cli_err(&["--store", &host.addr, "path-info", missing]);
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "FIGURE a restarted: asked again by the host cache after {:?}",
        restarted.elapsed()
    );
    let log = host_log(f.tmp.path());
    assert!(log.contains("answers again"), "{log}");
    assert!(host.stop().success());
}

#[test]
fn a_frozen_first_daemon_is_failed_over_within_the_idle_timeout() {
    let f = Fleet::new();
    let paths: Vec<String> = (0..3)
        .map(|n| f.import(&format!("s{n}"), format!("stopped {n}").as_bytes()))
        .collect();
    // --store-timeout 2: each of the two daemons gets 1 s to make progress
    let host = host_cache(&f.list(), f.tmp.path(), "2");
    let via_host = |args: &[&str]| cli_ok(&[&["--store", host.addr.as_str()], args].concat());
    via_host(&["path-info", &paths[0]]);
    let before = calls(&f.b_metrics, "tvix.store.v1.PathInfoService/Get");

    Fleet::freeze(&f.a);
    let (_, t) = timed(|| via_host(&["path-info", &paths[1]]));
    eprintln!("FIGURE after SIGSTOP: host cache's first miss answered in {t:?}");
    assert!(
        t >= Duration::from_millis(900),
        "{t:?}: it waited for the frozen one"
    );
    assert!(
        t < Duration::from_secs(3),
        "{t:?}: within about the idle timeout"
    );
    assert_eq!(
        calls(&f.b_metrics, "tvix.store.v1.PathInfoService/Get"),
        before + 1
    );
    // the frozen one is left out now: no more waiting for it
    let (nar, t) = timed(|| via_host(&["nar", &paths[1]]));
    eprintln!("FIGURE after SIGSTOP: host cache's next NAR in {t:?}");
    assert!(t < Duration::from_secs(1), "{t:?}");
    assert_eq!(nar, f.nar(&paths[1]));
    let (_, t) = timed(|| via_host(&["path-info", &paths[2]]));
    eprintln!("FIGURE after SIGSTOP: host cache's next miss in {t:?}");
    assert!(t < Duration::from_secs(1), "{t:?}");
    Fleet::thaw(&f.a);
    assert!(host.stop().success());
}

#[test]
fn a_blob_whose_daemon_freezes_midway_goes_on_at_the_next_with_the_right_bytes() {
    let f = Fleet::new();
    let big = common::pseudo_random(64 << 20, 7);
    let path = f.import("big", &big);
    let expected = sha(&f.nar(&path));
    let host = host_cache(&f.list(), f.tmp.path(), "2");
    let addr = host.addr.clone();
    let p = path.clone();
    let reader = std::thread::spawn(move || cli_ok(&["--store", &addr, "nar", &p]));
    // freeze the first daemon once the host cache holds part of the blob
    let staging = f.tmp.path().join("cache/tmp");
    let deadline = Instant::now() + Duration::from_secs(60);
    'wait: loop {
        assert!(Instant::now() < deadline, "the fill never started");
        for e in std::fs::read_dir(&staging).into_iter().flatten().flatten() {
            if e.metadata().map_or(0, |m| m.len()) > 4 << 20 {
                break 'wait;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let frozen = Instant::now();
    Fleet::freeze(&f.a);
    let nar = reader.join().unwrap();
    eprintln!(
        "FIGURE frozen mid-blob (64 MiB): the NAR came {:?} after SIGSTOP",
        frozen.elapsed()
    );
    assert_eq!(sha(&nar), expected, "the NAR read through the host cache");
    let log = host_log(f.tmp.path());
    assert!(
        log.contains("resuming at byte"),
        "no resume in the log:\n{log}"
    );
    Fleet::thaw(&f.a);
    assert!(host.stop().success());
}

#[test]
fn with_every_daemon_down_a_call_fails_in_bounded_time_and_a_restarted_one_answers() {
    let mut f = Fleet::new();
    let paths: Vec<String> = (0..4)
        .map(|n| f.import(&format!("d{n}"), format!("down {n}").as_bytes()))
        .collect();
    let host = host_cache(&f.list(), f.tmp.path(), "2");
    let host_addr = host.addr.clone();
    let via_host = |args: &[&str]| cli_ok(&[&["--store", host_addr.as_str()], args].concat());
    via_host(&["path-info", &paths[0]]);

    Fleet::kill(&mut f.a);
    Fleet::kill(&mut f.b);
    let (err, t) = timed(|| cli_err(&["--store", &host.addr, "path-info", &paths[1]]));
    eprintln!("FIGURE both down: the error came in {t:?}: {}", err.trim());
    assert!(t < Duration::from_secs(5), "{t:?}");
    assert!(
        err.contains("Unavailable") || err.contains("unavailable"),
        "{err}"
    );
    // the direct client of the list too
    let (err, t) = timed(|| cli_err(&["--store", &f.list(), "path-info", &paths[1]]));
    eprintln!("FIGURE both down, CLI on the list: the error came in {t:?}");
    assert!(t < Duration::from_secs(5), "{t:?}: {err}");

    // one comes back: the host cache daemon, not restarted, answers again
    f.start_b();
    let (_, t) = timed(|| via_host(&["path-info", &paths[1]]));
    eprintln!("FIGURE b restarted: host cache answered in {t:?}");
    // the other comes back and takes over when b goes
    f.start_a();
    Fleet::kill(&mut f.b);
    let (nar, t) = timed(|| via_host(&["nar", &paths[2]]));
    eprintln!("FIGURE a restarted, b killed: host cache's NAR in {t:?}");
    assert_eq!(nar, f.nar(&paths[2]));
    assert!(calls(&f.a_metrics, "tvix.castore.v1.BlobService/Read") >= 1);
    assert!(host.stop().success());
}

#[test]
fn answers_about_the_object_are_returned_not_failed_over() {
    let f = Fleet::new();
    let list = f.list();
    // a refused Put: `a` is read-only, `b` would take it
    let other = f.tmp.path().join("refused");
    std::fs::write(&other, b"refused by a").unwrap();
    let err = cli_err(&["--store", &list, "import", other.to_str().unwrap()]);
    assert!(err.contains("read-only"), "{err}");
    assert_eq!(calls(&f.b_metrics, "tvix.castore.v1.BlobService/Put"), 0);
    assert_eq!(calls(&f.b_metrics, "tvix.store.v1.PathInfoService/Put"), 0);
    // not found
    let missing = "/nix/store/00000000000000000000000000000000-missing";
    let (err, t) = timed(|| cli_err(&["--store", &list, "path-info", missing]));
    assert!(err.contains("not") || err.contains("NotFound"), "{err}");
    assert!(t < Duration::from_secs(5), "{t:?}");
    assert!(calls(&f.a_metrics, "tvix.store.v1.PathInfoService/Get") >= 1);
    assert_eq!(calls(&f.b_metrics, "tvix.store.v1.PathInfoService/Get"), 0);
}

/// In-process servers whose blob Reads misbehave, to check the failover
/// client's reads byte for byte.
mod misbehaving {
    use super::*;
    use bytes::Bytes;
    use futures::StreamExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tonic::{Request, Response, Status};
    use tvix_virtiofsd::castore::B3Digest;
    use tvix_virtiofsd::serve::grpc::StoreServer;
    use tvix_virtiofsd::store::blob::{put_bytes, read_to_vec};
    use tvix_virtiofsd::store::{Addr, Error, Store, StoreOptions};
    use tvix_virtiofsd::wire::castore as cpb;

    #[derive(Clone, Copy)]
    enum Fault {
        None,
        /// Half the blob, then UNAVAILABLE (a daemon going away).
        Cut,
        /// Half the blob, then nothing (a frozen daemon).
        Stall,
        /// One byte flipped.
        Corrupt,
    }

    #[derive(Clone)]
    struct Server {
        inner: StoreServer,
        store: Store,
        fault: Fault,
        reads: Arc<AtomicU64>,
    }

    type Chunks = futures::stream::BoxStream<'static, Result<cpb::BlobChunk, Status>>;

    #[tonic::async_trait]
    impl cpb::blob_service_server::BlobService for Server {
        type ReadStream = Chunks;

        async fn stat(
            &self,
            req: Request<cpb::StatBlobRequest>,
        ) -> Result<Response<cpb::StatBlobResponse>, Status> {
            cpb::blob_service_server::BlobService::stat(&self.inner, req).await
        }

        async fn read(
            &self,
            req: Request<cpb::ReadBlobRequest>,
        ) -> Result<Response<Chunks>, Status> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let digest = B3Digest::try_from(&req.get_ref().digest[..])
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let mut data = read_to_vec(self.store.blob.as_ref(), &digest)
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .ok_or_else(|| Status::not_found("no such blob"))?;
            let half = data.len() / 2;
            if let Fault::Corrupt = self.fault {
                data[half] ^= 1;
            }
            let end = match self.fault {
                Fault::Cut | Fault::Stall => half,
                _ => data.len(),
            };
            let msgs: Vec<_> = data[..end]
                .chunks(64 << 10)
                .map(|c| {
                    Ok(cpb::BlobChunk {
                        data: Bytes::copy_from_slice(c),
                    })
                })
                .collect();
            let head = futures::stream::iter(msgs);
            let tail: Chunks = match self.fault {
                Fault::Cut => {
                    futures::stream::iter([Err(Status::unavailable("going away"))]).boxed()
                }
                Fault::Stall => futures::stream::pending().boxed(),
                _ => futures::stream::empty().boxed(),
            };
            Ok(Response::new(head.chain(tail).boxed()))
        }

        async fn put(
            &self,
            req: Request<tonic::Streaming<cpb::BlobChunk>>,
        ) -> Result<Response<cpb::PutBlobResponse>, Status> {
            cpb::blob_service_server::BlobService::put(&self.inner, req).await
        }
    }

    /// Serves `store`'s blobs with `fault` on a unix socket in `dir`.
    fn serve(store: &Store, fault: Fault, dir: &Path, name: &str) -> (String, Arc<AtomicU64>) {
        let reads = Arc::new(AtomicU64::new(0));
        let srv = Server {
            inner: StoreServer::new(store.clone(), false),
            store: store.clone(),
            fault,
            reads: reads.clone(),
        };
        let path = dir.join(name);
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(cpb::blob_service_server::BlobServiceServer::new(srv))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l)),
        );
        (format!("grpc+unix://{}", path.display()), reads)
    }

    /// A client of `first,second`, giving each 1 s to make progress.
    fn client(first: &str, second: &str) -> Store {
        let a: Addr = format!("{first},{second}").parse().unwrap();
        let opts = StoreOptions {
            idle_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        Store::open_with(&[a.clone(), a.clone(), a], &opts)
            .unwrap()
            .0
    }

    async fn stream_all(store: &Store, d: &B3Digest) -> Vec<u8> {
        let mut s = store.blob.read_stream(d).await.unwrap().expect("blob");
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blob_stream_cut_or_stalled_midway_resumes_at_the_offset_delivered() {
        let tmp = tempfile::tempdir().unwrap();
        let backend = Store::memory();
        let data = common::pseudo_random(3 << 20, 11);
        let d = put_bytes(backend.blob.as_ref(), &data).await.unwrap();
        let (good, good_reads) = serve(&backend, Fault::None, tmp.path(), "good.sock");
        for (fault, name) in [(Fault::Cut, "cut.sock"), (Fault::Stall, "stall.sock")] {
            let (bad, bad_reads) = serve(&backend, fault, tmp.path(), name);
            let before = good_reads.load(Ordering::SeqCst);
            let t = Instant::now();
            // the raw stream (what a host cache fills from) resumes
            let got = stream_all(&client(&bad, &good), &d).await;
            eprintln!("{name}: stream joined in {:?}", t.elapsed());
            assert!(got == data, "{name}: the joined stream differs");
            assert_eq!(bad_reads.load(Ordering::SeqCst), 1);
            assert_eq!(good_reads.load(Ordering::SeqCst), before + 1);
            // a checked read starts again at the next daemon
            let got = read_to_vec(client(&bad, &good).blob.as_ref(), &d).await;
            assert!(got.unwrap().unwrap() == data, "{name}: open_read");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_blob_is_an_answer_not_a_fault() {
        let tmp = tempfile::tempdir().unwrap();
        let backend = Store::memory();
        let data = common::pseudo_random(1 << 20, 5);
        let d = put_bytes(backend.blob.as_ref(), &data).await.unwrap();
        let (good, good_reads) = serve(&backend, Fault::None, tmp.path(), "good.sock");
        let (bad, _) = serve(&backend, Fault::Corrupt, tmp.path(), "corrupt.sock");
        let err = read_to_vec(client(&bad, &good).blob.as_ref(), &d)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert_eq!(good_reads.load(Ordering::SeqCst), 0, "not asked");
    }
}
