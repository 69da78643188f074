//! A forged store path must not become visible, nor be signed by the
//! daemon's binary cache key, whatever way it comes in: the store's one
//! write policy (`--trusted-public-keys`) holds for gRPC Puts and binary
//! cache uploads alike, a signature copied onto other contents does not
//! pass, each listener is writable only when its own flag says so, and a
//! daemon does not sign what strangers upload unless told to.
mod common;

use common::{cli_err, cli_ok, free_port, require_tools, wait_listening, Daemon};
use std::path::{Path, PathBuf};
use std::process::Command;
use tvix_virtiofsd::nix::path_info::{PathInfo, Signature};
use tvix_virtiofsd::nix::signing::{fingerprint, SecretKey};
use tvix_virtiofsd::nix::store_path::make_source_path;

const NIX_STORE: (&str, &str) = ("nix-store", "nix-bin");

/// A key pair made by real Nix: (secret key file, public key text).
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let (sk, pk) = (
        dir.join(format!("{name}.sk")),
        dir.join(format!("{name}.pk")),
    );
    let out = Command::new("nix-store")
        .env("NIX_REMOTE", "")
        .args(["--generate-binary-cache-key", name])
        .args([&sk, &pk])
        .output()
        .expect("run nix-store");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (sk, std::fs::read_to_string(pk).unwrap().trim().to_string())
}

/// A bodiless request's status code.
fn http_status(addr: &str, method: &str, path: &str) -> u16 {
    common::http_request(addr, method, path).0
}

/// What `path` ingests to (tree, NAR hash and size), in a throwaway store.
fn ingested(path: &Path) -> tvix_virtiofsd::ingest::Ingested {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = tvix_virtiofsd::store::Store::memory();
    rt.block_on(tvix_virtiofsd::ingest::tree::ingest_path(
        path,
        &store,
        &|_| {},
    ))
    .unwrap()
}

/// A directory with one file of `text`.
fn tree(dir: &Path, name: &str, text: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("greeting"), text).unwrap();
    d
}

struct Signed {
    daemon: Daemon,
    grpc: String,
    http: String,
    trusted_sk: PathBuf,
}

/// A daemon whose binary cache signs with its own key, trusting another,
/// with both a writable TCP gRPC listener and a writable binary cache.
fn signed_daemon(t: &Path, extra: &[&str]) -> Signed {
    std::fs::create_dir_all(t).unwrap();
    let (cache_sk, _) = keypair(t, "cache-1");
    let (trusted_sk, trusted) = keypair(t, "ci-1");
    let (grpc, http) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let store = format!("local://{}", t.join("store").display());
    let mut args = vec![
        "--http-listen",
        &http,
        "--signing-key",
        cache_sk.to_str().unwrap(),
        "--trusted-public-keys",
        &trusted,
    ];
    args.extend(extra);
    let daemon = Daemon::start_with(&store, &grpc, &args);
    wait_listening(&http);
    Signed {
        daemon,
        grpc: format!("grpc+http://{grpc}"),
        http,
        trusted_sk,
    }
}

#[test]
fn an_unsigned_grpc_upload_is_refused_when_keys_are_trusted() {
    require_tools(&[NIX_STORE]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = signed_daemon(t, &["--writable", "--http-writable"]);
    let evil = tree(t, "hello", "not what you think\n");

    let err = cli_err(&["--store", &d.grpc, "import", evil.to_str().unwrap()]);
    assert!(
        err.contains("no valid signature by a trusted key"),
        "unexpected refusal: {err}"
    );
    // nothing visible: the binary cache has no narinfo to sign
    let info = ingested(&evil);
    let path = make_source_path("hello", &info.nar_sha256, &[]).unwrap();
    let hash = &path.to_basename()[..32];
    assert_eq!(
        http_status(&d.http, "GET", &format!("/{hash}.narinfo")),
        404
    );

    // the same path signed by the trusted key gets in, through gRPC too,
    // and is then served (and signed by the cache)
    let out = cli_ok(&[
        "--store",
        &d.grpc,
        "import",
        "--signing-key",
        d.trusted_sk.to_str().unwrap(),
        evil.to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        path.to_absolute_path()
    );
    assert_eq!(
        http_status(&d.http, "GET", &format!("/{hash}.narinfo")),
        200
    );
    drop(d.daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_signature_copied_onto_other_contents_is_refused() {
    require_tools(&[NIX_STORE]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().to_path_buf();
    let d = tokio::task::spawn_blocking({
        let t = t.clone();
        move || signed_daemon(&t, &["--writable"])
    })
    .await
    .unwrap();
    let store = common::grpc_store(&d.grpc);
    let key = SecretKey::parse(&std::fs::read_to_string(&d.trusted_sk).unwrap()).unwrap();

    // the genuine path: its NAR hash and size, signed by the trusted key
    // (as a public narinfo would carry it), never uploaded here
    let genuine = tree(&t, "genuine", "the real package\n");
    let g = tvix_virtiofsd::ingest::tree::ingest_path(
        &genuine,
        &tvix_virtiofsd::store::Store::memory(),
        &|_| {},
    )
    .await
    .unwrap();
    let path = make_source_path("hello", &g.nar_sha256, &[]).unwrap();
    let sig = key.signature(&fingerprint(&path, &g.nar_sha256, g.nar_size, &[]));

    // other contents uploaded, the genuine signature copied onto them
    let forged = tree(&t, "forged", "something else entirely\n");
    let f = tvix_virtiofsd::ingest::tree::ingest_path(&forged, &store, &|_| {})
        .await
        .unwrap();
    let mut info = PathInfo::bare(path.clone(), f.node.clone());
    info.nar_sha256 = g.nar_sha256;
    info.nar_size = g.nar_size;
    info.signatures = vec![Signature {
        name: key.name.clone(),
        data: bytes::Bytes::copy_from_slice(&sig),
    }];
    let err = store.path_info.put(info.clone()).await.unwrap_err();
    assert!(
        err.to_string().contains("renders to another NAR"),
        "unexpected: {err}"
    );
    assert!(store.path_info.get(path.digest()).await.unwrap().is_none());

    // a genuinely signed path whose reference is not in the store is
    // refused: a closure gets in whole or not at all, whatever the way in
    let absent = tvix_virtiofsd::nix::store_path::StorePath::from_basename(&format!(
        "{}-absent",
        "1".repeat(32)
    ))
    .unwrap();
    let with_ref = make_source_path("with-ref", &g.nar_sha256, &[]).unwrap();
    let mut dangling = PathInfo::bare(with_ref.clone(), f.node.clone());
    dangling.nar_sha256 = g.nar_sha256;
    dangling.nar_size = g.nar_size;
    dangling.references = vec![absent.clone()];
    dangling.signatures = vec![Signature {
        name: key.name.clone(),
        data: bytes::Bytes::copy_from_slice(&key.signature(&fingerprint(
            &with_ref,
            &g.nar_sha256,
            g.nar_size,
            &[absent],
        ))),
    }];
    let err = store.path_info.put(dangling).await.unwrap_err();
    assert!(
        err.to_string().contains("is not in the store"),
        "unexpected: {err}"
    );

    // the genuine contents with the same signature are admitted
    let g2 = tvix_virtiofsd::ingest::tree::ingest_path(&genuine, &store, &|_| {})
        .await
        .unwrap();
    info.node = g2.node;
    store.path_info.put(info).await.unwrap();
    assert!(store.path_info.get(path.digest()).await.unwrap().is_some());
}

#[test]
fn each_listener_is_writable_only_by_its_own_flag() {
    require_tools(&[NIX_STORE]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dir = tree(t, "x", "x\n");

    // binary cache uploads open: gRPC over TCP stays read-only
    let d = signed_daemon(&t.join("a"), &["--http-writable"]);
    let err = cli_err(&["--store", &d.grpc, "import", dir.to_str().unwrap()]);
    assert!(err.contains("read-only"), "unexpected: {err}");
    drop(d.daemon);

    // gRPC Puts open: the binary cache refuses uploads
    let d = signed_daemon(&t.join("b"), &["--writable"]);
    assert_eq!(http_status(&d.http, "PUT", "/nar/x.nar"), 403);
    drop(d.daemon);
}

#[test]
fn a_daemon_does_not_sign_strangers_uploads_unless_told_to() {
    require_tools(&[NIX_STORE]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (sk, _) = keypair(t, "cache-1");
    let http = format!("127.0.0.1:{}", free_port());
    let base = [
        "--store",
        &format!("local://{}", t.join("store").display()),
        "daemon",
        "--listen",
        "none",
        "--min-free-space",
        "16M",
        "--http-listen",
        &http,
        "--http-writable",
        "--signing-key",
        sk.to_str().unwrap(),
    ]
    .map(String::from);
    let out = Command::new(common::bin()).args(&base).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--trusted-public-keys") && err.contains("--sign-unverified-uploads"),
        "unexpected: {err}"
    );

    // said explicitly, it serves
    let mut child = Command::new(common::bin())
        .args(&base)
        .arg("--sign-unverified-uploads")
        .spawn()
        .unwrap();
    wait_listening(&http);
    assert_eq!(http_status(&http, "GET", "/nix-cache-info"), 200);
    let _ = child.kill();
    let _ = child.wait();
}
