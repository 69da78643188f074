//! Fuzz targets: each takes arbitrary bytes, as a hostile guest, store or
//! file would send them, and must neither panic nor hang nor break the
//! property it states. `fuzz/` drives them with libFuzzer
//! (`bench/fuzz.sh`); `tests/fuzz_regressions.rs` replays the inputs kept
//! under `fuzz/regressions/` and a bounded pass of mutations in
//! `cargo test`.
use crate::castore::graph::{LeavesFirst, RootFirst};
use crate::castore::Directory;
use crate::nix::path_info::PathInfo;
use crate::serve::vhost_user::{handle_chain, FsServer};
use crate::store::Store;
use crate::view::{FsConfig, StoreFs};
use crate::wire::{castore as cpb, store as spb};
use prost::Message;
use std::sync::{Arc, OnceLock};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

/// A fuzz target: arbitrary bytes in, a panic when a property breaks.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/` and the regression test know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("fuse_request", fuse_request),
    ("descriptor_chains", descriptor_chains),
    ("directory", directory),
    ("directory_graph", directory_graph),
    ("path_info", path_info),
    ("nar", nar),
    ("nar_upload", nar_upload),
    ("narinfo", narinfo),
    ("binary_cache_http", binary_cache_http),
    ("path_info_json", path_info_json),
    ("cache_service", cache_service),
];

/// A runtime and a store with a few paths (a file, a directory with a file,
/// a symlink), made once per process.
struct Fixture {
    rt: tokio::runtime::Runtime,
    store: Store,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("fuzz fixture: no runtime: {e}"),
        };
        let store = Store::memory();
        if let Err(e) = rt.block_on(fill(&store)) {
            panic!("fuzz fixture: {e}");
        }
        Fixture { rt, store }
    })
}

/// Names of the fixture's store paths (seeds look them up).
pub const FIXTURE_PATHS: [&str; 3] = [
    "00000000000000000000000000000000-file",
    "11111111111111111111111111111111-tree",
    "22222222222222222222222222222222-link",
];

async fn fill(store: &Store) -> crate::store::Result<()> {
    use crate::castore::Node;
    use crate::nix::store_path::StorePath;
    let blob = crate::store::blob::put_bytes(store.blob.as_ref(), b"hello, fuzzer\n").await?;
    let file = Node::File {
        digest: blob,
        size: 14,
        executable: false,
    };
    let mut dir = Directory::new();
    dir.add("bin".into(), file.clone())?;
    dir.add(
        "lib".into(),
        Node::Symlink {
            target: "bin".into(),
        },
    )?;
    let tree = Node::Directory {
        digest: dir.digest(),
        size: dir.size(),
    };
    crate::store::directory::put_one(store.directory.as_ref(), dir).await?;
    let link = Node::Symlink {
        target: "/nix/store/00000000000000000000000000000000-file".into(),
    };
    for (name, node) in FIXTURE_PATHS.iter().zip([file, tree, link]) {
        let store_path = StorePath::from_basename(name)
            .map_err(|e| crate::store::Error::InvalidRequest(e.to_string()))?;
        store
            .path_info
            .put(PathInfo::bare(store_path, node))
            .await?;
    }
    Ok(())
}

fn server() -> FsServer {
    let f = fixture();
    let fs = StoreFs::new(
        f.store.clone(),
        f.rt.handle().clone(),
        FsConfig {
            list_root: true,
            store_timeout: std::time::Duration::from_secs(5),
            max_handles: 64,
            ..Default::default()
        },
    );
    FsServer::new(Arc::new(fs))
}

const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
/// The used ring of a 16-entry queue: flags, idx, 16 elements, avail_event.
const USED_RING_LEN: u64 = 4 + 8 * QUEUE_SIZE as u64 + 2;
const MEM_SIZE: usize = 0x1_0000;
/// Most chains served per input (a guest can make the ring look endless).
const MAX_CHAINS: usize = 64;

/// Serves every chain the memory image's request queue offers, and checks
/// that nothing was written outside the chains' writable descriptors and
/// the used ring. Answers the used lengths and the memory afterwards.
fn serve_image(image: &[u8], server: &FsServer) -> (Vec<u32>, Vec<u8>) {
    let mut used = Vec::new();
    let mem = match GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) {
        Ok(m) => Arc::new(m),
        Err(e) => panic!("guest memory: {e}"),
    };
    let n = image.len().min(MEM_SIZE);
    let mut before = vec![0u8; MEM_SIZE];
    before[..n].copy_from_slice(&image[..n]);
    if mem.write_slice(&before, GuestAddress(0)).is_err() {
        return (used, before);
    }
    let Ok(mut q) = Queue::new(QUEUE_SIZE) else {
        return (used, before);
    };
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_ready(true);
    if !q.is_valid(&*mem) {
        return (used, before);
    }
    let mut writable: Vec<(u64, u64)> = vec![(USED_RING, USED_RING + USED_RING_LEN)];
    for _ in 0..MAX_CHAINS {
        let Some(chain) = q.pop_descriptor_chain(mem.clone()) else {
            break;
        };
        let head = chain.head_index();
        for d in chain.clone().take(usize::from(QUEUE_SIZE) * 2) {
            if d.is_write_only() {
                let start = d.addr().0;
                writable.push((start, start.saturating_add(u64::from(d.len()))));
            }
        }
        let len = handle_chain(server, &mem, chain, 1, true).len;
        let _ = q.add_used(&*mem, head, len);
        used.push(len);
    }
    let mut after = vec![0u8; MEM_SIZE];
    if mem.read_slice(&mut after, GuestAddress(0)).is_err() {
        return (used, before);
    }
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        let at = i as u64;
        if a != b && !writable.iter().any(|&(s, e)| (s..e).contains(&at)) {
            panic!("byte {at:#x} written outside the chains' writable buffers");
        }
    }
    (used, after)
}

/// Raw guest memory: the descriptor table, rings and buffers all come from
/// the input (descriptor table at 0, available ring at 0x100, used ring at
/// 0x200, 16 entries).
pub fn descriptor_chains(data: &[u8]) {
    serve_image(data, &server());
}

/// FUSE requests as a guest kernel would send them: the input is a series
/// of messages, each preceded by its length (u16, little-endian), served
/// in order on one connection after an INIT, each on a well-formed chain
/// (one readable buffer, one writable of 8 KiB).
pub fn fuse_request(data: &[u8]) {
    fuse_session(data);
}

/// What `fuse_request` runs; answers each message's reply (INIT's first).
pub fn fuse_session(data: &[u8]) -> Vec<Vec<u8>> {
    let server = server();
    let mut msgs: Vec<Vec<u8>> = vec![init_message()];
    let mut rest = data;
    while rest.len() >= 2 && msgs.len() < 12 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = n.min(body.len());
        msgs.push(body[..take].to_vec());
        rest = &body[take..];
    }
    // One chain per message, served one image at a time so that each sees
    // the state the ones before left.
    let mut replies = Vec::new();
    for m in msgs {
        let (used, mem) = serve_image(&chain_image(&m), &server);
        let len = used.first().map_or(0, |&n| n as usize).min(0x2000);
        replies.push(mem[0x8000..0x8000 + len].to_vec());
    }
    replies
}

/// An INIT request (FUSE 7.33), as Linux sends it first.
pub fn init_message() -> Vec<u8> {
    let mut m = Vec::with_capacity(104);
    let len: u32 = 40 + 64;
    m.extend_from_slice(&len.to_le_bytes());
    m.extend_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
    m.extend_from_slice(&1u64.to_le_bytes()); // unique
    m.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    m.extend_from_slice(&7u32.to_le_bytes());
    m.extend_from_slice(&33u32.to_le_bytes());
    m.extend_from_slice(&0x20000u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.resize(len as usize, 0);
    m
}

/// Guest memory with one available chain: `msg` readable at 0x1000, 8 KiB
/// writable at 0x8000.
fn chain_image(msg: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; MEM_SIZE];
    let msg = &msg[..msg.len().min(0x7000)];
    img[0x1000..0x1000 + msg.len()].copy_from_slice(msg);
    let desc = |i: usize, addr: u64, len: u32, flags: u16, next: u16, img: &mut Vec<u8>| {
        let o = DESC_TABLE as usize + 16 * i;
        img[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        img[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
        img[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
        img[o + 14..o + 16].copy_from_slice(&next.to_le_bytes());
    };
    // VRING_DESC_F_NEXT = 1, VRING_DESC_F_WRITE = 2
    desc(0, 0x1000, msg.len() as u32, 1, 1, &mut img);
    desc(1, 0x8000, 0x2000, 2, 0, &mut img);
    let a = AVAIL_RING as usize;
    img[a + 2..a + 4].copy_from_slice(&1u16.to_le_bytes()); // idx
    img[a + 4..a + 6].copy_from_slice(&0u16.to_le_bytes()); // ring[0] = head 0
    img
}

/// A directory from a store: accepted ones re-encode to themselves.
pub fn directory(data: &[u8]) {
    let Ok(pb) = cpb::Directory::decode(data) else {
        return;
    };
    let Ok(dir) = Directory::try_from(pb) else {
        return;
    };
    let again = cpb::Directory::decode(dir.encode().as_slice())
        .ok()
        .and_then(|p| Directory::try_from(p).ok());
    assert_eq!(again.as_ref(), Some(&dir), "re-encoding changed it");
    assert_eq!(again.map(|d| d.digest()), Some(dir.digest()));
}

/// A stream of directories (u16 length before each), as a recursive Get or
/// a Put would carry them: through both graph checks, never a panic.
pub fn directory_graph(data: &[u8]) {
    let mut dirs = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && dirs.len() < 256 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = n.min(body.len());
        if let Some(d) = cpb::Directory::decode(&body[..take])
            .ok()
            .and_then(|p| Directory::try_from(p).ok())
        {
            dirs.push(d);
        }
        rest = &body[take..];
    }
    let mut leaves = LeavesFirst::new();
    for d in &dirs {
        if leaves.add(d.clone()).is_err() {
            break;
        }
    }
    let _ = leaves.finish();
    if let Some(first) = dirs.first() {
        let mut root = RootFirst::new(first.digest());
        for d in &dirs {
            if root.add(d).is_err() {
                break;
            }
        }
        let _ = root.finish();
    }
}

/// A path info from a store: accepted ones re-encode to themselves.
pub fn path_info(data: &[u8]) {
    let Ok(pb) = spb::PathInfo::decode(data) else {
        return;
    };
    let Ok(info) = PathInfo::try_from(pb) else {
        return;
    };
    let again = PathInfo::try_from(info.to_proto());
    assert_eq!(again.ok().as_ref(), Some(&info), "re-encoding changed it");
}

/// A NAR (import-nar, a binary cache): one that is accepted renders back
/// byte for byte, with the size and hash recorded while reading it.
pub fn nar(data: &[u8]) {
    let f = fixture();
    let store = Store::memory();
    let got = f.rt.block_on(crate::ingest::nar::ingest_nar(data, &store));
    let Ok(ingested) = got else {
        return;
    };
    let mut out = Vec::new();
    let rendered = f.rt.block_on(crate::ingest::render::write_nar(
        &mut out,
        &ingested.node,
        &store,
    ));
    assert!(
        rendered.is_ok(),
        "an accepted NAR does not render: {rendered:?}"
    );
    assert_eq!(out.len() as u64, ingested.nar_size);
    assert!(data.starts_with(&out), "the NAR renders differently");
    use sha2::Digest;
    assert_eq!(
        <[u8; 32]>::from(sha2::Sha256::digest(&out)),
        ingested.nar_sha256
    );
}

/// `nix path-info --json` output (copy, import-nar): never a panic.
pub fn path_info_json(data: &[u8]) {
    let _ = crate::nix::path_info_json::parse_path_info_json(data);
}

/// Limits the upload targets run under: small, so that a bomb is cut
/// short fast (the limits themselves are what is under test).
fn upload_limits() -> crate::ingest::nar::Limits {
    crate::ingest::nar::Limits {
        nar_size: 1 << 20,
        directory_bytes: 1 << 20,
        ..Default::default()
    }
}

/// A NAR upload as the binary cache takes it: the first byte picks the
/// compression (none, xz, zstd), the rest is the body, decompressed with
/// bounded memory and ingested within small limits. One that is accepted
/// renders back to as many bytes, with the hash recorded while reading.
pub fn nar_upload(data: &[u8]) {
    use crate::nar::Compression;
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let c = match kind % 3 {
        0 => Compression::None,
        1 => Compression::Xz,
        _ => Compression::Zstd,
    };
    let f = fixture();
    let store = Store::memory();
    let input = crate::nar::decode::decoder(c, std::io::Cursor::new(body.to_vec()));
    let got = f.rt.block_on(crate::ingest::nar::ingest_nar_within(
        input,
        &store,
        &upload_limits(),
    ));
    let Ok(ingested) = got else {
        return;
    };
    assert!(ingested.nar_size <= upload_limits().nar_size);
    let mut out = Vec::new();
    let rendered = f.rt.block_on(crate::ingest::render::write_nar(
        &mut out,
        &ingested.node,
        &store,
    ));
    assert!(rendered.is_ok(), "an accepted upload does not render");
    assert_eq!(out.len() as u64, ingested.nar_size);
    use sha2::Digest;
    assert_eq!(
        <[u8; 32]>::from(sha2::Sha256::digest(&out)),
        ingested.nar_sha256
    );
}

/// A `.narinfo` as an uploader sends it: one that parses renders to a
/// text that parses to the same rendering.
pub fn narinfo(data: &[u8]) {
    use crate::nix::narinfo::NarInfo;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(n) = NarInfo::parse(text) else {
        return;
    };
    let once = n.render();
    let again = NarInfo::parse(&once).map(|m| m.render());
    assert_eq!(
        again.ok().as_deref(),
        Some(once.as_str()),
        "not a fixed point"
    );
}

/// Raw bytes on a connection to the binary cache (writable, signing, over
/// a store with the fixture's paths): requests of any method, URL, header
/// and body, uploads included. Every connection ends with well-formed
/// answers and no server error but a refusal for load or room.
pub fn binary_cache_http(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture();
    let out = f.rt.block_on(async {
        let store = Store::memory();
        if let Err(e) = fill(&store).await {
            panic!("fuzz fixture: {e}");
        }
        let cache = Arc::new(crate::serve::binary_cache::BinaryCache::new(
            store,
            crate::serve::binary_cache::Options {
                writable: true,
                signer: Some(fuzz_key()),
                policy: crate::ingest::write_policy::WritePolicy::new(vec![]),
                priority: 30,
                min_free: None,
                nar_urls: None,
                limits: crate::serve::binary_cache::Limits {
                    max_connections: 1,
                    max_nar_size: 1 << 20,
                    renders: Arc::new(tokio::sync::Semaphore::new(1)),
                },
            },
        ));
        let (client, server) = tokio::io::duplex(1 << 16);
        let svc = hyper::service::service_fn(move |req| {
            let cache = cache.clone();
            async move { Ok::<_, std::convert::Infallible>(cache.handle(req).await) }
        });
        let conn = crate::serve::http_conn::builder()
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
        let (mut rd, mut wr) = tokio::io::split(client);
        let talk = async move {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        let work = async {
            let (_, out) = tokio::join!(conn, talk);
            out
        };
        match tokio::time::timeout(std::time::Duration::from_secs(8), work).await {
            Ok(out) => out,
            Err(_) => panic!("the connection did not end"),
        }
    });
    // the first answer (if any) starts with a status line, and is no
    // server error other than 503 (busy) and 507 (no room); what follows
    // it is not parsed (bodies may quote the request)
    if out.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(&out);
    // HTTP/1.0 requests are answered in kind
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|t| t.get(..3));
    let Some(code) = code.filter(|c| c.bytes().all(|b| b.is_ascii_digit())) else {
        panic!("not an HTTP answer: {:?}", text.get(..64));
    };
    if code.starts_with('5') {
        assert!(
            code == "503" || code == "507",
            "answered {}",
            text.lines().take(12).collect::<Vec<_>>().join(" | ")
        );
    }
}

/// The fuzz binary cache's signing key (a fixed test key).
fn fuzz_key() -> crate::nix::signing::SecretKey {
    let seed = [7u8; 32];
    let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    let mut both = seed.to_vec();
    both.extend_from_slice(public.as_bytes());
    let text = format!("fuzz-1:{}", data_encoding::BASE64.encode(&both));
    match crate::nix::signing::SecretKey::parse(&text) {
        Ok(k) => k,
        Err(e) => panic!("fuzz key: {e}"),
    }
}

/// A FUSE request: header (40 bytes) and body.
pub fn fuse_msg(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(40 + body.len());
    m.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
    m.extend_from_slice(&opcode.to_le_bytes());
    m.extend_from_slice(&unique.to_le_bytes());
    m.extend_from_slice(&nodeid.to_le_bytes());
    m.extend_from_slice(&[0u8; 16]);
    m.extend_from_slice(body);
    m
}

pub fn cstr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

/// A READ-shaped body (READ, READDIR, READDIRPLUS): fh, offset, size.
pub fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&fh.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&[0u8; 20]);
    b
}

/// Length-prefixed (u16) messages, as `fuse_request` and `directory_graph`
/// read them.
fn framed(msgs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        let n = u16::try_from(m.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&m[..usize::from(n)]);
    }
    out
}

/// Seeds of the upload targets from one fixture path and its NAR: the
/// NAR plain, xz and zstd; its narinfo; with `http`, requests for it and
/// uploads of it (for one path only: each costs a connection).
fn upload_seeds(
    out: &mut Vec<(&'static str, Vec<u8>)>,
    path: &crate::nix::store_path::StorePath,
    nar: &[u8],
    http: bool,
) {
    use tokio::io::AsyncWriteExt;
    let f = fixture();
    let packed = |c: u8| -> Vec<u8> {
        f.rt.block_on(async {
            let mut v = Vec::new();
            let done = match c {
                1 => {
                    let mut w = async_compression::tokio::write::XzEncoder::new(&mut v);
                    let r = w.write_all(nar).await;
                    r.and(w.shutdown().await)
                }
                _ => {
                    let mut w = async_compression::tokio::write::ZstdEncoder::new(&mut v);
                    let r = w.write_all(nar).await;
                    r.and(w.shutdown().await)
                }
            };
            if let Err(e) = done {
                panic!("fuzz seeds: compressing: {e}");
            }
            v
        })
    };
    let mut plain = vec![0u8];
    plain.extend_from_slice(nar);
    out.push(("nar_upload", plain));
    for c in [1u8, 2] {
        let mut v = vec![c];
        v.extend_from_slice(&packed(c));
        out.push(("nar_upload", v));
    }
    use sha2::Digest;
    let sha: [u8; 32] = sha2::Sha256::digest(nar).into();
    let hash = path.to_basename();
    let hash = hash.get(..32).unwrap_or_default();
    let narinfo = format!(
        "StorePath: {}\nURL: nar/{hash}.nar.zst\nCompression: zstd\nNarHash: sha256:{}\n\
         NarSize: {}\nReferences: {}\nSig: fuzz-1:{}\n",
        path.to_absolute_path(),
        crate::nix::nixbase32::encode(&sha),
        nar.len(),
        path.to_basename(),
        data_encoding::BASE64.encode(&[1u8; 64]),
    );
    out.push(("narinfo", narinfo.clone().into_bytes()));
    if !http {
        return;
    }
    let get = |m: &str, p: &str| format!("{m} {p} HTTP/1.1\r\nHost: fuzz\r\n\r\n").into_bytes();
    out.push(("binary_cache_http", get("GET", "/nix-cache-info")));
    let mut both = get("HEAD", &format!("/{hash}.narinfo"));
    both.extend(get("GET", &format!("/{hash}.narinfo")));
    out.push(("binary_cache_http", both));
    out.push(("binary_cache_http", get("GET", &format!("/nar/{hash}.nar"))));
    out.push((
        "binary_cache_http",
        get("GET", &format!("/nar/{hash}.nar.zst")),
    ));
    // an upload: the NAR (zstd), then its narinfo, on one connection
    let zst = packed(2);
    let mut up = format!(
        "PUT /nar/{hash}.nar.zst HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {}\r\n\r\n",
        zst.len()
    )
    .into_bytes();
    up.extend_from_slice(&zst);
    up.extend(
        format!(
            "PUT /{hash}.narinfo HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {}\r\n\r\n{narinfo}",
            narinfo.len()
        )
        .into_bytes(),
    );
    out.push(("binary_cache_http", up));
    // the NAR chunked, uncompressed
    let mut chunked =
        format!("PUT /nar/{hash}.nar HTTP/1.1\r\nHost: fuzz\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for c in nar.chunks(100) {
        chunked.extend(format!("{:x}\r\n", c.len()).into_bytes());
        chunked.extend_from_slice(c);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    out.push(("binary_cache_http", chunked));
}

/// Well-formed inputs for each target, the starting corpus: requests that
/// reach the fixture's files, directories, symlinks and xattrs; a NAR, a
/// directory graph, path infos and JSON as the store and Nix write them.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    // FUSE opcodes
    const LOOKUP: u32 = 1;
    const FORGET: u32 = 2;
    const GETATTR: u32 = 3;
    const READLINK: u32 = 5;
    const OPEN: u32 = 14;
    const READ: u32 = 15;
    const STATFS: u32 = 17;
    const RELEASE: u32 = 18;
    const GETXATTR: u32 = 22;
    const LISTXATTR: u32 = 23;
    const OPENDIR: u32 = 27;
    const READDIR: u32 = 28;
    const RELEASEDIR: u32 = 29;
    const READDIRPLUS: u32 = 44;
    let [file, tree, link] = FIXTURE_PATHS;
    let open_in = [0u8; 8].to_vec();
    let mut xattr = 256u32.to_le_bytes().to_vec();
    xattr.extend_from_slice(&[0u8; 4]);
    let mut getxattr = xattr.clone();
    getxattr.extend_from_slice(&cstr("user.tvix.castore.directory.digest"));
    let read_file = vec![
        fuse_msg(LOOKUP, 2, 1, &cstr(file)),
        fuse_msg(GETATTR, 3, 2, &[0u8; 16]),
        fuse_msg(OPEN, 4, 2, &open_in),
        fuse_msg(READ, 5, 2, &read_in(1, 0, 4096)),
        fuse_msg(
            RELEASE,
            6,
            2,
            &[
                1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ),
        fuse_msg(FORGET, 7, 2, &1u64.to_le_bytes()),
    ];
    let walk_tree = vec![
        fuse_msg(LOOKUP, 2, 1, &cstr(tree)),
        fuse_msg(LOOKUP, 3, 2, &cstr("lib")),
        fuse_msg(READLINK, 4, 3, &[]),
        fuse_msg(OPENDIR, 5, 2, &open_in),
        fuse_msg(READDIRPLUS, 6, 2, &read_in(1, 0, 4096)),
        fuse_msg(GETXATTR, 7, 2, &getxattr),
        fuse_msg(LISTXATTR, 8, 2, &xattr),
        fuse_msg(
            RELEASEDIR,
            9,
            2,
            &[
                1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ),
    ];
    let root = vec![
        fuse_msg(OPENDIR, 2, 1, &open_in),
        fuse_msg(READDIR, 3, 1, &read_in(1, 0, 4096)),
        fuse_msg(LOOKUP, 4, 1, &cstr(link)),
        fuse_msg(STATFS, 5, 1, &[]),
    ];
    let mut out = vec![
        ("fuse_request", framed(&read_file)),
        ("fuse_request", framed(&walk_tree)),
        ("fuse_request", framed(&root)),
    ];
    for m in [&read_file[0], &walk_tree[0], &init_message()] {
        let mut img = chain_image(m);
        while img.last() == Some(&0) {
            img.pop();
        }
        out.push(("descriptor_chains", img));
    }

    let f = fixture();
    let fixture_infos: Vec<PathInfo> = FIXTURE_PATHS
        .iter()
        .filter_map(|name| {
            let sp = crate::nix::store_path::StorePath::from_basename(name).ok()?;
            f.rt.block_on(f.store.path_info.get(sp.digest()))
                .ok()
                .flatten()
        })
        .collect();
    for info in &fixture_infos {
        let mut nar = Vec::new();
        if f.rt
            .block_on(crate::ingest::write_nar(&mut nar, &info.node, &f.store))
            .is_ok()
        {
            let http = matches!(info.node, crate::castore::Node::Directory { .. });
            upload_seeds(&mut out, &info.store_path, &nar, http);
            out.push(("nar", nar));
        }
        if let crate::castore::Node::Directory { digest, .. } = &info.node {
            if let Ok(Some(d)) = f.rt.block_on(f.store.directory.get(digest)) {
                out.push(("directory", d.encode()));
                let mut parent = Directory::new();
                let node = crate::castore::Node::Directory {
                    digest: d.digest(),
                    size: d.size(),
                };
                if parent.add("sub".into(), node).is_ok() {
                    out.push(("directory_graph", framed(&[d.encode(), parent.encode()])));
                    out.push(("directory_graph", framed(&[parent.encode(), d.encode()])));
                }
            }
        }
        let mut rich = info.clone();
        rich.references = vec![info.store_path.clone()];
        rich.nar_size = 4096;
        rich.nar_sha256 = [7; 32];
        rich.signatures = vec![crate::nix::path_info::Signature {
            name: "cache.example.org-1".into(),
            data: vec![1u8; 64].into(),
        }];
        out.push(("path_info", rich.to_proto().encode_to_vec()));
    }
    out.push((
        "path_info_json",
        br#"[{"path":"/nix/store/00000000000000000000000000000000-file","narHash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","narSize":112,"references":[],"deriver":null,"signatures":["cache.example.org-1:AAAA"],"ca":"fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"}]"#.to_vec(),
    ));
    out.push((
        "path_info_json",
        br#"{"/nix/store/11111111111111111111111111111111-tree":{"narHash":"sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s","narSize":8,"references":["/nix/store/00000000000000000000000000000000-file"]}}"#.to_vec(),
    ));
    out.extend(cache_service_seeds());
    out
}

/// The host cache's filler for [`cache_service`]: a cache directory of
/// [`CACHE_FUZZ_MAX`] bytes in front of a memory remote holding two
/// resident blobs (filled at start) and one more that may be filled;
/// together they take well under the bound, so nothing may ever be evicted.
struct CacheFixture {
    server: crate::serve::grpc::CacheServer,
    cache: Arc<crate::store::cache::Cache>,
    resident: [crate::castore::B3Digest; 2],
    fillable: (crate::castore::B3Digest, u64),
}

/// The fuzzed filler's size bound, in bytes.
const CACHE_FUZZ_MAX: u64 = 256 << 10;
/// Most messages one input sends: each is a round trip to the filler.
const CACHE_FUZZ_MESSAGES: usize = 16;

/// The blobs the fuzzed filler's remote holds: two of 64 KiB, one of 4 KiB.
fn cache_fuzz_blobs() -> [Vec<u8>; 3] {
    [vec![1u8; 64 << 10], vec![2u8; 64 << 10], vec![3u8; 4 << 10]]
}

/// The cache directory of this process's fixture, under the temporary
/// directory and named by pid; directories of processes gone are removed
/// (a fuzzing run starts many).
fn cache_fuzz_dir() -> std::path::PathBuf {
    const PREFIX: &str = "tvix-virtiofsd-fuzz-cache-";
    let tmp = std::env::temp_dir();
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
                continue;
            };
            if !std::path::Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    tmp.join(format!("{PREFIX}{}", std::process::id()))
}

fn cache_fixture() -> &'static CacheFixture {
    static F: OnceLock<CacheFixture> = OnceLock::new();
    F.get_or_init(|| {
        use crate::store::cache::{Cache, CacheOptions, Role};
        let f = fixture();
        let remote = Store::memory();
        let blobs = cache_fuzz_blobs();
        let made = f.rt.block_on(async {
            let mut digests = Vec::new();
            for b in &blobs {
                digests.push(crate::store::blob::put_bytes(remote.blob.as_ref(), b).await?);
            }
            let opts = CacheOptions {
                dir: cache_fuzz_dir(),
                max_bytes: CACHE_FUZZ_MAX,
                role: Role::Filler,
            };
            let cache = Cache::open(&opts, remote, None, std::time::Duration::from_secs(2))?;
            Ok::<_, crate::store::Error>((digests, cache))
        });
        let (digests, cache) = match made {
            Ok(m) => m,
            Err(e) => panic!("cache fuzz fixture: {e}"),
        };
        let server = crate::serve::grpc::CacheServer::new(cache.clone());
        let fx = CacheFixture {
            server,
            cache,
            resident: [digests[0], digests[1]],
            fillable: (digests[2], blobs[2].len() as u64),
        };
        for (d, b) in fx.resident.iter().zip(&blobs) {
            let req = crate::wire::cache::FillBlobRequest {
                digest: (*d).into(),
                size: b.len() as u64,
            };
            if let Err(e) = f.rt.block_on(cache_fuzz_fill(&fx.server, req)) {
                panic!("cache fuzz fixture: filling a resident blob: {e}");
            }
        }
        fx
    })
}

/// One FillBlob through the service, its progress stream read to the end.
async fn cache_fuzz_fill(
    server: &crate::serve::grpc::CacheServer,
    req: crate::wire::cache::FillBlobRequest,
) -> Result<(), tonic::Status> {
    use crate::wire::cache::cache_service_server::CacheService;
    use futures::StreamExt;
    let mut s = server
        .fill_blob(tonic::Request::new(req))
        .await?
        .into_inner();
    while let Some(p) = s.next().await {
        p?;
    }
    Ok(())
}

/// One FillBlobs through the service, its answers read to the end; each
/// blob is answered once.
async fn cache_fuzz_fills(
    server: &crate::serve::grpc::CacheServer,
    req: crate::wire::cache::FillBlobsRequest,
) -> Result<(), tonic::Status> {
    use crate::wire::cache::cache_service_server::CacheService;
    use futures::StreamExt;
    let asked = req.blobs.len();
    let mut s = server
        .fill_blobs(tonic::Request::new(req))
        .await?
        .into_inner();
    let mut answered = vec![false; asked];
    while let Some(a) = s.next().await {
        let a = a?;
        if a.alive {
            continue;
        }
        let slot = answered.get_mut(a.index as usize);
        assert!(
            slot.as_ref().is_some_and(|s| !**s),
            "blob {} answered twice or unasked",
            a.index
        );
        if let Some(s) = slot {
            *s = true;
        }
    }
    assert!(
        answered.iter().all(|a| *a),
        "a blob of the batch went unanswered"
    );
    Ok(())
}

/// The host cache's own service as a compromised per-VM daemon would call
/// it: frames of a kind byte (0 mod 4: FillBlob, 2 mod 4: FillBlobs, odd:
/// Touch), a u16 length
/// and the message, decoded and sent to a filler. Whatever they say (sizes
/// that lie, digests of missing blobs, garbage keys), nothing panics, no
/// object is evicted (what the remote holds fits the cache many times
/// over) and the space in use stays within the bound.
pub fn cache_service(data: &[u8]) {
    use crate::store::cache::space::cost;
    use crate::wire::cache::cache_service_server::CacheService;
    use crate::wire::cache::{FillBlobRequest, FillBlobsRequest, TouchRequest};
    use std::sync::atomic::Ordering::Relaxed;
    let f = fixture();
    let fx = cache_fixture();
    let mut rest = data;
    let mut sent = 0;
    while rest.len() >= 3 && sent < CACHE_FUZZ_MESSAGES {
        let kind = rest[0];
        let n = usize::from(u16::from_le_bytes([rest[1], rest[2]]));
        let body = &rest[3..];
        let take = n.min(body.len());
        let msg = &body[..take];
        rest = &body[take..];
        sent += 1;
        if kind.is_multiple_of(4) {
            if let Ok(req) = FillBlobRequest::decode(msg) {
                let _ = f.rt.block_on(cache_fuzz_fill(&fx.server, req));
            }
        } else if kind % 4 == 2 {
            if let Ok(req) = FillBlobsRequest::decode(msg) {
                let _ = f.rt.block_on(cache_fuzz_fills(&fx.server, req));
            }
        } else if let Ok(req) = TouchRequest::decode(msg) {
            let _ = f.rt.block_on(fx.server.touch(tonic::Request::new(req)));
        }
    }
    let stats = fx.cache.stats();
    assert_eq!(stats.evictions.load(Relaxed), 0, "a fill evicted objects");
    let used = stats.used_bytes.load(Relaxed);
    assert!(
        used <= CACHE_FUZZ_MAX,
        "{used} bytes used of {CACHE_FUZZ_MAX}"
    );
    let most: u64 = cache_fuzz_blobs()
        .iter()
        .map(|b| cost(b.len() as u64))
        .sum();
    assert!(
        used <= most,
        "{used} bytes used, more than the remote holds"
    );
    for d in &fx.resident {
        let hex = d.to_hex();
        let path = fx.cache.dir().join("blobs").join(&hex[..2]).join(&hex);
        assert!(path.exists(), "resident blob {d} is gone");
    }
}

/// Seeds for [`cache_service`]: the fillable blob with its size, a missing
/// blob declaring most of the cache, a missing one declaring more than
/// the cache, and Touches of the residents and of garbage.
fn cache_service_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::wire::cache::{FillBlobRequest, FillBlobsRequest, TouchRequest};
    let fx = cache_fixture();
    let frame = |kind: u8, m: Vec<u8>| {
        let mut out = vec![kind];
        out.extend_from_slice(&framed(&[m]));
        out
    };
    let fill = |digest: &[u8], size: u64| {
        frame(
            0,
            FillBlobRequest {
                digest: bytes::Bytes::copy_from_slice(digest),
                size,
            }
            .encode_to_vec(),
        )
    };
    let (c, c_size) = fx.fillable;
    let touch = frame(
        1,
        TouchRequest {
            blobs: fx.resident.iter().map(|d| (*d).into()).collect(),
            directories: vec![vec![0xaa; 32].into(), vec![1, 2, 3].into()],
            path_infos: vec![vec![0x55; 20].into()],
            fresh_blobs: vec![vec![0x66; 32].into()],
        }
        .encode_to_vec(),
    );
    let mut missing = vec![0x77u8; 32];
    missing[0] = 0;
    let fills = frame(
        2,
        FillBlobsRequest {
            blobs: vec![
                FillBlobRequest {
                    digest: bytes::Bytes::copy_from_slice(c.as_bytes()),
                    size: c_size,
                },
                FillBlobRequest {
                    digest: bytes::Bytes::copy_from_slice(&missing),
                    size: 3,
                },
                FillBlobRequest {
                    digest: bytes::Bytes::copy_from_slice(&missing),
                    size: CACHE_FUZZ_MAX * 4,
                },
            ],
        }
        .encode_to_vec(),
    );
    let mut all = fill(c.as_bytes(), c_size);
    all.extend(fill(&missing, CACHE_FUZZ_MAX - 4096));
    all.extend(touch.clone());
    vec![
        ("cache_service", fill(c.as_bytes(), c_size)),
        ("cache_service", fill(&missing, CACHE_FUZZ_MAX - 4096)),
        ("cache_service", fill(&missing, CACHE_FUZZ_MAX * 4)),
        ("cache_service", touch),
        ("cache_service", fills),
        ("cache_service", all),
    ]
}
