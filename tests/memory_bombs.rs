//! Memory bombs against a real daemon: small uploads that expand into
//! gigabytes (an xz block declaring a 4 GiB dictionary, a zstd frame
//! declaring a 2 GiB window, a NAR of a million empty directories, NARs
//! whose declared lengths pass the size limit) and hostile listener input
//! (connections sending endless headers). Each request must get a clear
//! refusal, and the daemon's private memory (RssAnon, sampled from
//! /proc/PID/status while the input is fed) stays under [`RSS_ANON_BOUND`].
mod common;

use common::{free_port, status_bytes, wait_listening, Daemon};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The daemon's private memory while it is fed one hostile request: its
/// own baseline (~20 MiB), one upload's decoder and directory listings
/// (at most ~150 MiB, see `nar::ingest::MAX_DIRECTORY_BYTES`) and buffers.
const RSS_ANON_BOUND: u64 = 256 << 20;

/// A daemon with the binary cache open to uploads and metrics on TCP.
struct Cache {
    daemon: Daemon,
    http: String,
    metrics: String,
    _dir: tempfile::TempDir,
}

fn start(extra: &[&str]) -> Cache {
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let store = format!("local://{}", dir.path().join("store").display());
    let mut args = vec![
        "--http-listen",
        &http,
        "--http-writable",
        "--metrics-listen",
        &metrics,
    ];
    args.extend(extra);
    let daemon = Daemon::start_with(
        &store,
        &format!("unix:{}", dir.path().join("d.sock").display()),
        &args,
    );
    wait_listening(&http);
    wait_listening(&metrics);
    Cache {
        daemon,
        http,
        metrics,
        _dir: dir,
    }
}

/// Samples a process's RssAnon every few milliseconds until stopped;
/// answers the largest seen.
struct RssWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || loop {
            p.fetch_max(status_bytes(pid, "RssAnon"), Ordering::Relaxed);
            if s.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        });
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// PUTs `body` (with its Content-Length, or chunked when `chunked`),
/// writing on a thread of its own: a server may refuse before it has read
/// the body. Answers (status, body).
fn put(addr: &str, path: &str, body: Vec<u8>, chunked: bool) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = if chunked {
        format!("PUT {path} HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    } else {
        format!(
            "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
    };
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        if chunked {
            for c in body.chunks(64 << 10) {
                if write!(w, "{:x}\r\n", c.len()).is_err()
                    || w.write_all(c).is_err()
                    || w.write_all(b"\r\n").is_err()
                {
                    return;
                }
            }
            let _ = w.write_all(b"0\r\n\r\n");
        } else {
            let _ = w.write_all(&body);
        }
    });
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    // the answer, up to the close or a reset after it
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    common::parse_response(&resp)
}

/// Feeds one upload to a fresh daemon and checks the refusal and the
/// memory: answers the refusal's text.
fn bomb(name: &str, body: Vec<u8>, want: u16, extra: &[&str]) -> String {
    let c = start(extra);
    let pid = c.daemon.child.id();
    let watch = RssWatch::start(pid);
    let (status, text) = put(&c.http, &format!("/nar/{name}"), body, false);
    std::thread::sleep(Duration::from_millis(100));
    let peak = watch.peak();
    eprintln!(
        "{name}: {status} {}; peak RssAnon {} MiB, VmHWM {} MiB",
        text.trim(),
        peak >> 20,
        status_bytes(pid, "VmHWM") >> 20
    );
    assert_eq!(status, want, "{name}: {text}");
    assert!(
        peak < RSS_ANON_BOUND,
        "{name}: the daemon's RssAnon reached {} MiB (bound {} MiB)",
        peak >> 20,
        RSS_ANON_BOUND >> 20
    );
    // it still serves
    let mut s = std::net::TcpStream::connect(&c.http).unwrap();
    write!(
        s,
        "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    text
}

/// NAR strings: length, bytes, zero padding to 8.
fn s(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
    out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
}

/// A NAR of one directory holding `n` empty directories.
fn empty_dirs_nar(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 170 + 128);
    for t in ["nix-archive-1", "(", "type", "directory"] {
        s(&mut out, t.as_bytes());
    }
    for i in 0..n {
        s(&mut out, b"entry");
        s(&mut out, b"(");
        s(&mut out, b"name");
        s(&mut out, format!("{i:08}").as_bytes());
        s(&mut out, b"node");
        for t in ["(", "type", "directory", ")", ")"] {
            s(&mut out, t.as_bytes());
        }
    }
    s(&mut out, b")");
    out
}

/// A NAR of one regular file of `size` zero bytes.
fn zeros_nar(size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for t in ["nix-archive-1", "(", "type", "regular", "contents"] {
        s(&mut out, t.as_bytes());
    }
    out.extend_from_slice(&size.to_le_bytes());
    out.resize(out.len() + size as usize + (8 - size as usize % 8) % 8, 0);
    s(&mut out, b")");
    out
}

fn zstd(data: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut out = Vec::new();
        let mut w = async_compression::tokio::write::ZstdEncoder::with_quality(
            &mut out,
            async_compression::Level::Fastest,
        );
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
        out
    })
}

fn xz(data: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut out = Vec::new();
        let mut w = async_compression::tokio::write::XzEncoder::with_quality(
            &mut out,
            async_compression::Level::Fastest,
        );
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
        out
    })
}

/// CRC-32 (IEEE), as xz headers carry it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// `packed` (an xz stream of one block, LZMA2) with the block header
/// declaring a dictionary of 4 GiB instead: still a valid stream, which
/// an unbounded decoder allocates for.
fn with_4gib_dictionary(mut packed: Vec<u8>) -> Vec<u8> {
    // stream header (12 bytes), then the block header: its size, flags
    // (no sizes, one filter), filter id 0x21 (LZMA2), 1 byte of
    // properties (the dictionary size), padding, CRC-32
    let size = (usize::from(packed[12]) + 1) * 4;
    assert_eq!(&packed[13..16], &[0x00, 0x21, 0x01], "block header layout");
    packed[16] = 40; // 4 GiB - 1
    let crc = crc32(&packed[12..12 + size - 4]);
    packed[12 + size - 4..12 + size].copy_from_slice(&crc.to_le_bytes());
    packed
}

#[test]
fn an_xz_upload_declaring_a_4_gib_dictionary_is_refused_with_413_within_the_memory_bound() {
    // 512 MiB of zeros: a 4 GiB dictionary decoder touches as much as it
    // writes, ~80 KB on the wire
    let packed = with_4gib_dictionary(xz(&zeros_nar(512 << 20)));
    eprintln!("xz bomb: {} KiB", packed.len() >> 10);
    let why = bomb(
        "0000000000000000000000000000000000000000000000000000.nar.xz",
        packed,
        413,
        &[],
    );
    assert!(why.contains("memory"), "{why}");
}

#[test]
fn a_zstd_upload_declaring_a_2_gib_window_is_refused_with_413() {
    let mut packed = zstd(&zeros_nar(1 << 20));
    assert_eq!(packed[4] & 0x20, 0, "single-segment frame");
    packed[5] = 21 << 3; // window 2^31
    let why = bomb(
        "0000000000000000000000000000000000000000000000000001.nar.zst",
        packed,
        413,
        &[],
    );
    assert!(why.contains("memory"), "{why}");
}

#[test]
fn a_zstd_nar_of_a_million_and_a_half_empty_directories_is_refused_with_413_within_the_memory_bound(
) {
    let packed = zstd(&empty_dirs_nar(1_500_000));
    eprintln!("directory bomb: {} KiB", packed.len() >> 10);
    let why = bomb(
        "0000000000000000000000000000000000000000000000000002.nar.zst",
        packed,
        413,
        &[],
    );
    assert!(why.contains("directory listings"), "{why}");
}

#[test]
fn a_nar_larger_than_max_nar_size_is_refused_with_413_however_it_arrives() {
    let c = start(&["--max-nar-size", "8M"]);
    let name = "/nar/0000000000000000000000000000000000000000000000000003";
    let big = zeros_nar(16 << 20);
    let pid = c.daemon.child.id();
    let watch = RssWatch::start(pid);
    // declared by Content-Length: refused before a byte is read
    let (status, why) = put(&c.http, &format!("{name}.nar"), big.clone(), false);
    assert_eq!(status, 413, "{why}");
    assert!(why.contains("--max-nar-size"), "{why}");
    // chunked: refused on the file's declared size
    let (status, why) = put(&c.http, &format!("{name}.nar"), big.clone(), true);
    assert_eq!(status, 413, "{why}");
    // compressed, 16 KiB expanding to 16 MiB
    let (status, why) = put(&c.http, &format!("{name}.nar.zst"), zstd(&big), false);
    assert_eq!(status, 413, "{why}");
    // many files, each within the limit, together over it
    let mut nar = Vec::new();
    for t in ["nix-archive-1", "(", "type", "directory"] {
        s(&mut nar, t.as_bytes());
    }
    for i in 0..4 {
        for t in ["entry", "(", "name"] {
            s(&mut nar, t.as_bytes());
        }
        s(&mut nar, format!("f{i}").as_bytes());
        s(&mut nar, b"node");
        let file = zeros_nar(3 << 20);
        nar.extend_from_slice(&file[24..]); // without the magic
        s(&mut nar, b")");
    }
    s(&mut nar, b")");
    let (status, why) = put(&c.http, &format!("{name}.nar.xz"), xz(&nar), false);
    assert_eq!(status, 413, "{why}");
    assert!(why.contains("larger than"), "{why}");
    let peak = watch.peak();
    assert!(peak < RSS_ANON_BOUND, "RssAnon {} MiB", peak >> 20);
    // a NAR within the limit still goes in
    let (status, why) = put(&c.http, &format!("{name}.nar"), zeros_nar(1 << 20), false);
    assert_eq!(status, 200, "{why}");
}

#[test]
fn hostile_nar_structure_is_refused_as_malformed_within_the_memory_bound() {
    let c = start(&[]);
    let pid = c.daemon.child.id();
    let watch = RssWatch::start(pid);
    let name = "/nar/0000000000000000000000000000000000000000000000000004.nar";
    // a string declaring 2^63 bytes
    let mut nar = Vec::new();
    s(&mut nar, b"nix-archive-1");
    nar.extend_from_slice(&(1u64 << 63).to_le_bytes());
    let (status, why) = put(&c.http, name, nar, false);
    assert_eq!(status, 400, "{why}");
    // a file declaring 1 TiB, then ending
    let mut nar = Vec::new();
    for t in ["nix-archive-1", "(", "type", "regular", "contents"] {
        s(&mut nar, t.as_bytes());
    }
    nar.extend_from_slice(&(1u64 << 40).to_le_bytes());
    nar.extend_from_slice(&[0u8; 4096]);
    let (status, why) = put(&c.http, name, nar, false);
    assert!(status == 400 || status == 413, "{status} {why}");
    // directories nested past the depth limit
    let mut nar = Vec::new();
    s(&mut nar, b"nix-archive-1");
    for _ in 0..3000 {
        for t in ["(", "type", "directory", "entry", "(", "name", "d", "node"] {
            s(&mut nar, t.as_bytes());
        }
    }
    let (status, why) = put(&c.http, name, nar, false);
    assert_eq!(status, 400, "{why}");
    assert!(why.contains("nested too deeply"), "{why}");
    let peak = watch.peak();
    assert!(peak < RSS_ANON_BOUND, "RssAnon {} MiB", peak >> 20);
}

#[test]
fn listeners_fed_endless_headers_stay_within_the_memory_bound() {
    let c = start(&[]);
    let pid = c.daemon.child.id();
    let watch = RssWatch::start(pid);
    // each connection sends a header that never ends, as much as it can
    let mut head = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..20_000 {
        head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "y".repeat(40)).as_bytes());
    }
    let mut held = Vec::new();
    for addr in [&c.http, &c.metrics] {
        for _ in 0..300 {
            let Ok(mut s) = std::net::TcpStream::connect(addr) else {
                continue;
            };
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let _ = s.write_all(&head);
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let peak = watch.peak();
    eprintln!("endless headers: peak RssAnon {} MiB", peak >> 20);
    assert!(peak < RSS_ANON_BOUND, "RssAnon {} MiB", peak >> 20);
    drop(held);
}

#[test]
fn the_xz_bomb_is_a_valid_stream_with_only_its_dictionary_changed() {
    let nar = zeros_nar(4096);
    let packed = with_4gib_dictionary(xz(&nar));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let out = rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        async_compression::tokio::bufread::XzDecoder::new(&packed[..])
            .read_to_end(&mut out)
            .await
            .map(|_| out)
    });
    assert_eq!(out.unwrap(), nar);
}

#[test]
fn import_nar_of_an_xz_file_declaring_a_4_gib_dictionary_fails_within_the_memory_bound() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let nar = zeros_nar(512 << 20);
    let sha = sha2::Sha256::digest(&nar);
    let path = format!("/nix/store/{}-bomb", "a".repeat(32));
    let json = format!(
        r#"[{{"path":"{path}","narHash":"sha256-{}","narSize":{},"references":[]}}]"#,
        data_encoding::BASE64.encode(&sha),
        nar.len()
    );
    let (json_file, nar_file) = (dir.path().join("p.json"), dir.path().join("b.nar.xz"));
    std::fs::write(&json_file, json).unwrap();
    std::fs::write(&nar_file, with_4gib_dictionary(xz(&nar))).unwrap();
    drop(nar);
    let store = format!("local://{}", dir.path().join("store").display());
    let child = std::process::Command::new(common::bin())
        .args(["--store", &store, "import-nar", "--path-info"])
        .arg(&json_file)
        .arg(format!("{path}={}", nar_file.display()))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let watch = RssWatch::start(child.id());
    let out = child.wait_with_output().unwrap();
    let peak = watch.peak();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the bomb was imported");
    assert!(err.contains("memory"), "{err}");
    assert!(peak < RSS_ANON_BOUND, "RssAnon {} MiB", peak >> 20);
}
