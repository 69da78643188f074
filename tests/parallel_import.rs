//! Importing overlaps blob uploads (issue 24): the tree and NAR importers
//! walk in NAR order but keep several blob uploads in flight, at most
//! `ingest::uploads::MAX_IN_FLIGHT`, and a failed upload fails the import
//! with its error, promptly, with no upload left running and no directory
//! or path info stored.
//!
//! Measured at the store, not in the importer: a wrapper around a real
//! backend's blob service counts the writers open at once. Against the
//! embedded store the wrapper also waits before each close (a store that
//! far away), so that overlap shows however fast the disk is; against a
//! real three-node Garage cluster it adds nothing, the bucket's own round
//! trips being what the overlap is for. The `import` command is run as a
//! real process against a store daemon served here, and every NAR is
//! compared with real Nix's `nix-store --dump`.
mod common;

use common::garage::Garage;
use common::{bin, pseudo_random, require_tools};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tvix_virtiofsd::castore::{B3Digest, Node};
use tvix_virtiofsd::ingest::uploads::{MAX_BUFFERED_BLOB, MAX_IN_FLIGHT};
use tvix_virtiofsd::nix::store_path::make_source_path;
use tvix_virtiofsd::store::blob::{BlobReader, BlobWriter};
use tvix_virtiofsd::store::{Addr, BlobService, Error, Result, Store};

const NIX_STORE: (&str, &str) = ("nix-store", "nix-bin");

/// Small files in the test tree (one blob upload each).
const SMALL_FILES: usize = 240;

/// The longest a failing import may take to give up.
const PROMPT: Duration = Duration::from_secs(30);

/// Writers open at once, and the most there were.
#[derive(Default)]
struct Gauge {
    open: AtomicUsize,
    peak: AtomicUsize,
    closes: AtomicUsize,
}

/// A real blob service, each writer counted while it is open; optionally
/// each close waits `latency` first, and the `fail_at`th close fails.
struct Counting {
    inner: Arc<dyn BlobService>,
    gauge: Arc<Gauge>,
    latency: Duration,
    fail_at: Option<usize>,
}

/// The error the `fail_at`th close answers.
const INJECTED: &str = "injected upload failure";

#[async_trait::async_trait]
impl BlobService for Counting {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        self.inner.has(digest).await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        self.inner.open_read(digest).await
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        let inner = self.inner.open_write().await?;
        let n = self.gauge.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.gauge.peak.fetch_max(n, Ordering::SeqCst);
        Ok(Box::new(CountedWriter {
            inner,
            _open: Open(self.gauge.clone()),
            gauge: self.gauge.clone(),
            latency: self.latency,
            fail_at: self.fail_at,
        }))
    }
}

/// Counts one writer open until it is dropped (closed or abandoned).
struct Open(Arc<Gauge>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

struct CountedWriter {
    inner: Box<dyn BlobWriter>,
    _open: Open,
    gauge: Arc<Gauge>,
    latency: Duration,
    fail_at: Option<usize>,
}

#[async_trait::async_trait]
impl BlobWriter for CountedWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.inner.write(data).await
    }

    async fn close(self: Box<Self>) -> Result<B3Digest> {
        tokio::time::sleep(self.latency).await;
        let n = self.gauge.closes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail_at == Some(n) {
            // not a status a client retries on: the error must come back
            return Err(Error::InvalidRequest(format!("{INJECTED} (close {n})")));
        }
        self.inner.close().await
    }
}

/// `store` with its blob service behind a [`Counting`] wrapper.
fn counted(store: &Store, latency: Duration, fail_at: Option<usize>) -> (Store, Arc<Gauge>) {
    let gauge = Arc::new(Gauge::default());
    let blob = Counting {
        inner: store.blob.clone(),
        gauge: gauge.clone(),
        latency,
        fail_at,
    };
    let s = Store {
        blob: Arc::new(blob),
        directory: store.directory.clone(),
        path_info: store.path_info.clone(),
    };
    (s, gauge)
}

/// A fresh embedded store under `dir`.
fn local_store(dir: &Path) -> Store {
    let a: Addr = format!("local://{}", dir.display()).parse().unwrap();
    Store::open(&a, &a, &a).unwrap()
}

/// Files under `dir` (recursively), none if it does not exist.
fn files_under(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.map(|e| {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            files_under(&e.path())
        } else {
            1
        }
    })
    .sum()
}

/// A tree of [`SMALL_FILES`] small files (some empty, some executable,
/// some repeated) in nested directories, a symlink, and one file larger
/// than what is read whole, so it is streamed.
fn sample_tree(parent: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = parent.join("sample-tree");
    for i in 0..SMALL_FILES {
        let dir = root
            .join(format!("d{}", i % 12))
            .join(format!("e{}", i % 5));
        std::fs::create_dir_all(&dir).unwrap();
        let len = match i % 7 {
            0 => 0,
            1 => 100 << 10,
            _ => (i * 331) % 9000,
        };
        let seed = if i % 11 == 0 { 1 } else { i as u64 };
        let f = dir.join(format!("f{i}"));
        std::fs::write(&f, pseudo_random(len, seed)).unwrap();
        if i % 13 == 0 {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let big = MAX_BUFFERED_BLOB as usize + 12345;
    std::fs::write(root.join("big"), pseudo_random(big, 99)).unwrap();
    std::os::unix::fs::symlink("d1/e1/f1", root.join("link")).unwrap();
    root
}

/// Real Nix's NAR of `path`.
fn nix_dump(path: &Path) -> Vec<u8> {
    require_tools(&[NIX_STORE]);
    let out = std::process::Command::new("nix-store")
        .env("NIX_REMOTE", "")
        .arg("--dump")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

async fn render(node: &Node, store: &Store) -> Vec<u8> {
    let mut out = Vec::new();
    tvix_virtiofsd::ingest::write_nar(&mut out, node, store)
        .await
        .unwrap();
    out
}

fn sha256(b: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(b).into()
}

/// Asserts what a gauge saw: uploads overlapped, within the bound, and
/// none is open any more.
fn assert_overlapped(what: &str, g: &Gauge, at_least: usize) {
    let peak = g.peak.load(Ordering::SeqCst);
    eprintln!("{what}: at most {peak} blob writers open at once");
    assert!(
        peak >= at_least,
        "{what}: at most {peak} blob writers were open at once (expected {at_least} or more)"
    );
    assert!(
        peak <= MAX_IN_FLIGHT,
        "{what}: {peak} blob writers open at once, over the bound of {MAX_IN_FLIGHT}"
    );
    assert_eq!(
        g.open.load(Ordering::SeqCst),
        0,
        "{what}: a writer is still open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_import_keeps_blob_uploads_in_flight_and_hashes_nix_stores_nar() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = sample_tree(tmp.path());
    let dump = nix_dump(&tree);
    let (store, gauge) = counted(
        &local_store(&tmp.path().join("store")),
        Duration::from_millis(20),
        None,
    );
    let t = Instant::now();
    let got = tvix_virtiofsd::ingest::tree::ingest_path(&tree, &store, &|_| {})
        .await
        .unwrap();
    eprintln!(
        "{} blobs at 20 ms each imported in {:?}",
        gauge.closes.load(Ordering::SeqCst),
        t.elapsed()
    );
    assert_overlapped("tree import", &gauge, 8);
    assert_eq!(got.nar_size, dump.len() as u64);
    assert_eq!(got.nar_sha256, sha256(&dump), "the NAR hash is not Nix's");
    // every blob and directory it refers to is stored
    assert!(render(&got.node, &store).await == dump);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nar_import_keeps_blob_uploads_in_flight_and_yields_the_trees_root() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = sample_tree(tmp.path());
    let dump = nix_dump(&tree);
    let (store, gauge) = counted(
        &local_store(&tmp.path().join("store")),
        Duration::from_millis(20),
        None,
    );
    let got = tvix_virtiofsd::ingest::ingest_nar(&dump[..], &store)
        .await
        .unwrap();
    assert_overlapped("NAR import", &gauge, 8);
    assert_eq!(got.nar_sha256, sha256(&dump));
    let from_tree = tvix_virtiofsd::ingest::tree::ingest_path(&tree, &Store::memory(), &|_| {})
        .await
        .unwrap();
    assert_eq!(got.node, from_tree.node);
    assert!(render(&got.node, &store).await == dump);
}

/// A failing blob upload: the import fails with that error in good time,
/// no writer is left open (no upload left running) once it returned, and
/// no directory was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upload_fails_the_import_with_its_error_and_stores_no_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = sample_tree(tmp.path());
    let dump = nix_dump(&tree);
    for (i, nar) in [false, true].into_iter().enumerate() {
        let what = if nar { "NAR import" } else { "tree import" };
        let dir = tmp.path().join(format!("store-{i}"));
        let (store, gauge) = counted(&local_store(&dir), Duration::from_millis(5), Some(60));
        let t = Instant::now();
        let r = tokio::time::timeout(PROMPT, async {
            if nar {
                tvix_virtiofsd::ingest::ingest_nar(&dump[..], &store).await
            } else {
                tvix_virtiofsd::ingest::tree::ingest_path(&tree, &store, &|_| {}).await
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: still running {PROMPT:?} after an upload failed"));
        let e = match r {
            Ok(_) => panic!("{what}: succeeded although an upload failed"),
            Err(e) => e.to_string(),
        };
        eprintln!("{what}: failed after {:?}: {e}", t.elapsed());
        assert!(e.contains(INJECTED), "{what}: another error: {e}");
        assert_eq!(
            gauge.open.load(Ordering::SeqCst),
            0,
            "{what}: an upload was still running after the import returned"
        );
        let closes = gauge.closes.load(Ordering::SeqCst);
        assert!(
            closes < SMALL_FILES,
            "{what}: went on uploading after the failure ({closes} closes)"
        );
        // give anything that was left behind a moment to show
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            gauge.closes.load(Ordering::SeqCst),
            closes,
            "{what}: uploads went on"
        );
        assert_eq!(
            files_under(&dir.join("directories")),
            0,
            "{what}: directories were stored"
        );
    }
}

/// The `import` command, a real process, against a store daemon served
/// here over the embedded store: its uploads overlap at the daemon, the
/// store path it prints is the one Nix's NAR names; when an upload fails it
/// exits with that error and publishes no path info.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_import_command_overlaps_uploads_to_a_daemon_and_publishes_nothing_when_one_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = sample_tree(tmp.path());
    let dump = nix_dump(&tree);
    let expected = make_source_path("sample-tree", &sha256(&dump), &[]).unwrap();
    for fail_at in [None, Some(60)] {
        let dir = tmp.path().join(format!("daemon-{}", fail_at.is_some()));
        std::fs::create_dir_all(&dir).unwrap();
        let backend = local_store(&dir.join("store"));
        let (served, gauge) = counted(&backend, Duration::from_millis(20), fail_at);
        let addr = common::serve_in_process(served, Some(&dir)).await;
        let out = tokio::time::timeout(
            PROMPT,
            tokio::process::Command::new(bin())
                .args(["--store", &addr, "import"])
                .arg(&tree)
                .output(),
        )
        .await
        .expect("the import command hangs")
        .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let published = backend.path_info.get(expected.digest()).await.unwrap();
        match fail_at {
            None => {
                assert!(out.status.success(), "{stderr}");
                assert_eq!(stdout.trim(), expected.to_absolute_path());
                assert_overlapped("import command", &gauge, 8);
                let info = published.expect("the path info was not published");
                assert!(render(&info.node, &backend).await == dump);
            }
            Some(_) => {
                assert!(!out.status.success(), "succeeded although an upload failed");
                assert!(stderr.contains(INJECTED), "another error: {stderr}");
                assert!(published.is_none(), "a path info was published");
                assert_eq!(files_under(&dir.join("store/directories")), 0);
            }
        }
    }
}

/// Against a real three-node Garage cluster, with no latency added: the
/// bucket's own round trips overlap, and the NAR read back is Nix's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_garage_cluster_blob_uploads_overlap() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = sample_tree(tmp.path());
    let dump = nix_dump(&tree);
    let garage = tokio::task::spawn_blocking(Garage::start).await.unwrap();
    for (k, v) in garage.env() {
        std::env::set_var(k, v);
    }
    let a: Addr = format!(
        "s3://{}/parallel?endpoint={}&region=garage",
        garage.bucket(),
        garage.endpoint(0)
    )
    .parse()
    .unwrap();
    let bucket = Store::open(&a, &a, &a).unwrap();
    let (store, gauge) = counted(&bucket, Duration::ZERO, None);
    let t = Instant::now();
    let got = tvix_virtiofsd::ingest::tree::ingest_path(&tree, &store, &|_| {})
        .await
        .unwrap();
    eprintln!(
        "{} blobs into Garage in {:?}",
        gauge.closes.load(Ordering::SeqCst),
        t.elapsed()
    );
    assert_overlapped("import into Garage", &gauge, 4);
    assert_eq!(got.nar_sha256, sha256(&dump));
    assert!(render(&got.node, &bucket).await == dump);
    drop(garage);
}
