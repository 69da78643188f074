//! The daemon as a real process over unix sockets and loopback TCP: data
//! written through one client reads back identically through another, large
//! blobs and trees included; lifecycle (SIGTERM, socket activation,
//! read-only) and the standard health/reflection services.
mod common;

use common::{cli_ok, free_port, grpc_store, pseudo_random, Daemon};
use std::io::Write;
use std::path::Path;
use tokio::io::AsyncReadExt;
use tvix_virtiofsd::castore::B3Digest;

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(data))
}

/// narHash (SRI) and narSize from our `path-info --json`.
fn path_info_json(store: &str, path: &str) -> (String, u64) {
    let out = cli_ok(&["--store", store, "path-info", "--json", path]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    (
        v[0]["narHash"].as_str().unwrap().to_string(),
        v[0]["narSize"].as_u64().unwrap(),
    )
}

fn make_tree(root: &Path, files: usize) {
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i % 100));
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = std::fs::File::create(dir.join(format!("f{i:05}"))).unwrap();
        writeln!(f, "file number {i}").unwrap();
    }
}

/// Imports through a unix-socket client, reads back through a TCP client of a
/// second daemon on the same store: a 10,000-file tree and a 256 MiB file.
#[test]
fn write_via_unix_read_via_tcp() {
    let t0 = std::time::Instant::now();
    macro_rules! step {
        ($m:expr) => {
            eprintln!("[{:>6.1}s] {}", t0.elapsed().as_secs_f64(), $m)
        };
    }
    let tmp = tempfile::tempdir().unwrap();
    let store_url = format!("local://{}", tmp.path().join("store").display());
    let sock = tmp.path().join("d.sock");
    let unix = Daemon::start(&store_url, &format!("unix:{}", sock.display()), &[]);
    let port = free_port();
    let tcp = Daemon::start(&store_url, &format!("127.0.0.1:{port}"), &[]);

    let src = tmp.path().join("tree");
    make_tree(&src, 10_000);
    let big_dir = tmp.path().join("big");
    std::fs::create_dir(&big_dir).unwrap();
    // Above the 64 MiB message limit: the blob must stream in chunks.
    let big = pseudo_random(96 << 20, 7);
    std::fs::write(big_dir.join("blob"), &big).unwrap();

    step!("setup done");
    let out = cli_ok(&[
        "--store",
        &unix.addr,
        "import",
        src.to_str().unwrap(),
        big_dir.to_str().unwrap(),
    ]);
    let paths: Vec<String> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(paths.len(), 2);

    step!("imported via unix");
    // The same import into a separate embedded store is the reference.
    let reference = format!("local://{}", tmp.path().join("ref").display());
    let ref_out = cli_ok(&[
        "--store",
        &reference,
        "import",
        src.to_str().unwrap(),
        big_dir.to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8(ref_out)
            .unwrap()
            .lines()
            .collect::<Vec<_>>(),
        paths
    );

    step!("reference imported");
    for p in &paths {
        step!(p);
        let via_tcp = cli_ok(&["--store", &tcp.addr, "nar", p]);
        let local = cli_ok(&["--store", &reference, "nar", p]);
        assert_eq!(via_tcp.len(), local.len(), "{p}");
        assert!(
            via_tcp == local,
            "NAR of {p} differs between gRPC and embedded store"
        );
        let (hash, size) = path_info_json(&tcp.addr, p);
        assert_eq!(size, via_tcp.len() as u64);
        let (ref_hash, _) = path_info_json(&reference, p);
        assert_eq!(hash, ref_hash);
    }

    step!("nars compared");
    // The big blob itself, read with the library client over TCP, seekable.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = grpc_store(&tcp.addr);
        let digest = B3Digest::of(&big);
        let mut r = client
            .blob
            .open_read(&digest)
            .await
            .unwrap()
            .expect("blob present");
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), big.len());
        assert_eq!(sha256_hex(&back), sha256_hex(&big));
        use tokio::io::AsyncSeekExt;
        r.seek(std::io::SeekFrom::Start(80 << 20)).await.unwrap();
        let mut chunk = vec![0u8; 4096];
        r.read_exact(&mut chunk).await.unwrap();
        assert_eq!(&chunk[..], &big[80 << 20..(80 << 20) + 4096]);
    });

    assert!(unix.stop().success());
    assert!(!sock.exists(), "daemon left its socket behind");
    assert!(tcp.stop().success());
}

/// `--read-only` refuses uploads with PERMISSION_DENIED and still serves reads.
#[test]
fn read_only_refuses_puts() {
    let tmp = tempfile::tempdir().unwrap();
    let store_url = format!("local://{}", tmp.path().join("store").display());
    let f = tmp.path().join("hello");
    std::fs::write(&f, b"hello").unwrap();
    let out = cli_ok(&["--store", &store_url, "import", f.to_str().unwrap()]);
    let path = String::from_utf8(out).unwrap().trim().to_string();
    let sock = tmp.path().join("ro.sock");
    let d = Daemon::start(
        &store_url,
        &format!("unix:{}", sock.display()),
        &["--read-only"],
    );
    let nar = cli_ok(&["--store", &d.addr, "nar", &path]);
    assert!(nar.windows(5).any(|w| w == b"hello"));
    let g = tmp.path().join("other");
    std::fs::write(&g, b"other").unwrap();
    let err = common::cli_err(&["--store", &d.addr, "import", g.to_str().unwrap()]);
    assert!(err.contains("read-only"), "{err}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = grpc_store(&d.addr);
        let err = tvix_virtiofsd::store::blob::put_bytes(c.blob.as_ref(), b"x")
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("PermissionDenied") || err.to_string().contains("read-only"),
            "{err}"
        );
    });
    assert!(d.stop().success());
}

/// A store path never changes once it exists. The default daemon on TCP
/// refuses writes; a writable one (a unix socket, 0600) accepts the same
/// contents again but refuses `import-nar` of other contents under an
/// existing path's name, and the path keeps serving its own NAR.
#[test]
fn store_paths_never_change() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let store_url = format!("local://{}", tmp.path().join("store").display());
    let hello = tmp.path().join("hello");
    std::fs::write(&hello, b"hello").unwrap();
    let out = cli_ok(&["--store", &store_url, "import", hello.to_str().unwrap()]);
    let path = String::from_utf8(out).unwrap().trim().to_string();

    // The NAR of other contents, described as if it were `path`.
    let other_url = format!("local://{}", tmp.path().join("other-store").display());
    let other = tmp.path().join("other");
    std::fs::write(&other, b"other contents").unwrap();
    let out = cli_ok(&["--store", &other_url, "import", other.to_str().unwrap()]);
    let other_path = String::from_utf8(out).unwrap().trim().to_string();
    let nar_file = tmp.path().join("other.nar");
    std::fs::write(
        &nar_file,
        cli_ok(&["--store", &other_url, "nar", &other_path]),
    )
    .unwrap();
    let info = cli_ok(&["--store", &other_url, "path-info", "--json", &other_path]);
    let mut info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    info[0]["path"] = serde_json::Value::String(path.clone());
    let info_file = tmp.path().join("forged.json");
    std::fs::write(&info_file, serde_json::to_vec(&info).unwrap()).unwrap();
    let forged = format!("{path}={}", nar_file.display());
    let import_nar = |addr: &str| {
        common::cli_err(&[
            "--store",
            addr,
            "import-nar",
            "--path-info",
            info_file.to_str().unwrap(),
            &forged,
        ])
    };

    let tcp = Daemon::start_with(&store_url, &format!("127.0.0.1:{}", free_port()), &[]);
    let err = import_nar(&tcp.addr);
    assert!(err.contains("read-only"), "{err}");
    assert!(tcp.stop().success());

    let sock = tmp.path().join("rw.sock");
    let unix = Daemon::start(&store_url, &format!("unix:{}", sock.display()), &[]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let err = import_nar(&unix.addr);
    assert!(err.contains("never changes"), "{err}");
    let nar = cli_ok(&["--store", &unix.addr, "nar", &path]);
    assert!(nar.windows(5).any(|w| w == b"hello"), "the path changed");
    assert!(!nar.windows(5).any(|w| w == b"other"), "the path changed");
    // The same contents again: accepted, same path.
    let again = cli_ok(&["--store", &unix.addr, "import", hello.to_str().unwrap()]);
    assert_eq!(String::from_utf8(again).unwrap().trim(), path);
    assert!(unix.stop().success());

    // Through the store directly (no daemon) the rule holds too.
    let err = import_nar(&store_url);
    assert!(err.contains("never changes"), "{err}");
}

/// A writable daemon bounds what one client makes it hold or write: a
/// directory Put of more directories than allowed, and any upload while
/// the disk is short of the room kept free, get RESOURCE_EXHAUSTED and
/// store nothing.
#[test]
fn uploads_are_bounded() {
    use tvix_virtiofsd::castore::{Directory, LeavesFirst, Node};
    let tmp = tempfile::tempdir().unwrap();
    let store_url = format!("local://{}", tmp.path().join("store").display());
    let sock = tmp.path().join("full.sock");
    // more room kept free than any disk has
    let d = Daemon::start(
        &store_url,
        &format!("unix:{}", sock.display()),
        &["--min-free-space", "1000000T"],
    );
    let f = tmp.path().join("file");
    std::fs::write(&f, pseudo_random(1 << 20, 3)).unwrap();
    let err = common::cli_err(&["--store", &d.addr, "import", f.to_str().unwrap()]);
    assert!(err.contains("kept free"), "{err}");
    let blobs = tmp.path().join("store/blobs");
    let stored = std::fs::read_dir(&blobs)
        .map(|r| r.flatten().filter(|e| e.path().is_file()).count())
        .unwrap_or(0);
    assert_eq!(stored, 0, "nothing is stored");
    assert!(d.stop().success());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let backend = tvix_virtiofsd::store::Store::memory();
        let addr = common::serve_in_process_with(
            backend.clone(),
            None,
            tvix_virtiofsd::serve::grpc::Limits {
                put_directories: 10,
                ..Default::default()
            },
        )
        .await;
        let client = grpc_store(&addr);
        let mut dirs = vec![Directory::new()];
        for _ in 0..10 {
            let below = dirs.last().unwrap();
            let node = Node::Directory {
                digest: below.digest(),
                size: below.size(),
            };
            let mut d = Directory::new();
            d.add("d".into(), node).unwrap();
            dirs.push(d);
        }
        let root = dirs.last().unwrap().digest();
        let mut g = LeavesFirst::new();
        for d in dirs {
            g.add(d).unwrap();
        }
        let err = client
            .directory
            .put_graph(g.finish().unwrap())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("at most 10 directories"), "{err}");
        assert!(backend.directory.get(&root).await.unwrap().is_none());
    });
}

/// The standard health service answers SERVING for each store service, and
/// reflection lists them.
#[test]
fn health_and_reflection() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = Daemon::start("memory://", &format!("127.0.0.1:{port}"), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut h = HealthClient::new(ch.clone());
        for svc in [
            "tvix.castore.v1.BlobService",
            "tvix.castore.v1.DirectoryService",
            "tvix.store.v1.PathInfoService",
        ] {
            let r = h
                .check(HealthCheckRequest {
                    service: svc.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.status, 1, "{svc} not SERVING");
        }
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut refl = ServerReflectionClient::new(ch);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = refl
            .server_reflection_info(futures::stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected reflection answer");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for svc in [
            "tvix.castore.v1.BlobService",
            "tvix.store.v1.PathInfoService",
        ] {
            assert!(names.iter().any(|n| n == svc), "{names:?}");
        }
    });
    drop(tmp);
    assert!(d.stop().success());
}

/// systemd socket activation: the daemon serves the socket passed as fd 3
/// with LISTEN_PID/LISTEN_FDS and ignores --listen.
#[test]
fn socket_activation() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"",
        common::bin().to_str().unwrap(),
        "--store",
        "memory://",
        "daemon",
        "--listen",
        "127.0.0.1:1",
    ]);
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it explicitly then.
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) >= 0
            } else {
                libc::dup2(fd, 3) >= 0
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(listener);
    let d = Daemon {
        child,
        addr: format!("grpc+unix://{}", sock.display()),
    };
    let f = tmp.path().join("x");
    std::fs::write(&f, b"activated").unwrap();
    let out = cli_ok(&["--store", &d.addr, "import", f.to_str().unwrap()]);
    assert!(String::from_utf8(out).unwrap().starts_with("/nix/store/"));
    assert!(d.stop().success());
}
