//! The object storage backend (`s3://`) against a real three-node Garage
//! cluster (replication 3), one cluster for all cases of this binary, each
//! case under a key prefix of its own.
use crate::common::garage::Garage;
use std::sync::Mutex;
use tvix_virtiofsd::store::{Addr, Store};

/// The cluster, started by the first case and stopped when the test
/// binary exits (statics are never dropped: `atexit` does it).
static CLUSTER: Mutex<Option<Garage>> = Mutex::new(None);

extern "C" fn stop_cluster() {
    if let Ok(mut c) = CLUSTER.lock() {
        c.take();
    }
}

/// The address of a fresh prefix in the shared cluster, with the process
/// environment holding its credentials.
fn fresh_prefix() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut c = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if c.is_none() {
        let g = Garage::start();
        for (k, v) in g.env() {
            std::env::set_var(k, v);
        }
        // SAFETY: registers a plain function with no arguments.
        unsafe { libc::atexit(stop_cluster) };
        *c = Some(g);
    }
    let g = c.as_ref().expect("started above");
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "s3://{}/conformance-{n}?endpoint={}&region=garage",
        g.bucket(),
        g.endpoint(n % 3)
    )
}

async fn make_store() -> (Store, ()) {
    let addr: Addr = fresh_prefix().parse().expect("s3 address");
    let store = Store::open(&addr, &addr, &addr).expect("open the bucket");
    (store, ())
}

conformance_suite!(make_store);

mod by_leaves {
    //! Large blobs read at an offset cost one leaf, checked: the bytes
    //! that cross the wire are counted by a relay in front of a node.
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    use tvix_virtiofsd::store::blob::{put_bytes, read_to_vec};

    const MIB: usize = 1 << 20;

    /// Relays TCP to `upstream` (`http://HOST:PORT`); answers its own
    /// `http://` address and the count of bytes sent back to clients.
    async fn counting_relay(upstream: &str) -> (String, Arc<AtomicU64>) {
        let up = upstream.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicU64::new(0));
        let count = down.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&up).await else {
                    continue;
                };
                let count = count.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let to_server = async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        let _ = sw.shutdown().await;
                    };
                    let to_client = async move {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            count.fetch_add(n as u64, Ordering::Relaxed);
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(to_server, to_client);
                });
            }
        });
        (format!("http://{addr}"), down)
    }

    /// A curl request to node 0 of the shared cluster.
    fn s3(method: &str, key: &str, body: &[u8]) -> u16 {
        let c = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref()
            .expect("cluster started")
            .s3(0, method, key, body)
            .0
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_at_an_offset_fetches_one_checked_leaf_and_other_bytes_fail_it() {
        let direct = fresh_prefix();
        let (prefix, endpoint) = {
            let rest = direct.trim_start_matches("s3://tvix/");
            let (prefix, query) = rest.split_once('?').unwrap();
            let ep = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("endpoint="))
                .unwrap();
            (prefix.to_string(), ep.to_string())
        };
        let (relay, down) = counting_relay(&endpoint).await;
        let addr: Addr = format!("s3://tvix/{prefix}?endpoint={relay}&region=garage")
            .parse()
            .unwrap();
        let store = Store::open(&addr, &addr, &addr).unwrap();
        let data: Vec<u8> = (0..24 * MIB + 7)
            .map(|i| (i * 31 + i / 4099) as u8)
            .collect();
        let digest = put_bytes(store.blob.as_ref(), &data).await.unwrap();
        let size = data.len() as u64;

        // one page far into the blob: one leaf (and the leaf list) comes
        let before = down.load(Ordering::Relaxed);
        let mut r = store
            .blob
            .open_read_sized(&digest, size)
            .await
            .unwrap()
            .unwrap();
        let off = 17 * MIB + 4093;
        r.seek(std::io::SeekFrom::Start(off as u64)).await.unwrap();
        let mut page = vec![0u8; 4096];
        r.read_exact(&mut page).await.unwrap();
        assert!(page == data[off..off + 4096], "the page differs");
        drop(r);
        let fetched = down.load(Ordering::Relaxed) - before;
        assert!(
            fetched < 2 * MIB as u64,
            "reading one page of a {size}-byte blob fetched {fetched} bytes"
        );

        // all of it, forward, with the size unknown beforehand
        assert!(
            read_to_vec(store.blob.as_ref(), &digest)
                .await
                .unwrap()
                .unwrap()
                == data
        );

        // someone overwrites the blob with other bytes of the same length:
        // the leaf read fails, naming it, and hands out nothing
        let key = format!("{prefix}/blobs/{}", digest.to_hex());
        let mut other = data.clone();
        other[17 * MIB + 100] ^= 0xff;
        assert_eq!(s3("PUT", &key, &other), 200);
        let mut r = store
            .blob
            .open_read_sized(&digest, size)
            .await
            .unwrap()
            .unwrap();
        r.seek(std::io::SeekFrom::Start(off as u64)).await.unwrap();
        let e = r.read_exact(&mut page).await.unwrap_err();
        assert!(e.to_string().contains("other bytes"), "{e}");
        // a leaf before the damage still reads, checked
        r.seek(std::io::SeekFrom::Start(5)).await.unwrap();
        r.read_exact(&mut page).await.unwrap();
        assert!(page == data[5..5 + 4096]);
        drop(r);
        // truncated: the object's size no longer agrees with the list, so
        // it is read whole and fails its digest; by leaves (size known
        // from a directory), the leaves past the end fail
        assert_eq!(s3("PUT", &key, &data[..20 * MIB]), 200);
        let e = store.blob.open_read(&digest).await.err();
        assert!(
            e.as_ref()
                .is_some_and(|e| e.to_string().contains("digest mismatch")),
            "{e:?}"
        );
        let mut r = store
            .blob
            .open_read_sized(&digest, size)
            .await
            .unwrap()
            .unwrap();
        r.seek(std::io::SeekFrom::Start(19 * MIB as u64))
            .await
            .unwrap();
        r.read_exact(&mut page).await.unwrap();
        assert!(page == data[19 * MIB..19 * MIB + 4096]);
        r.seek(std::io::SeekFrom::Start(22 * MIB as u64))
            .await
            .unwrap();
        assert!(r.read_exact(&mut page).await.is_err(), "read past the end");
        drop(r);

        // the blob back, its leaf list damaged: read whole, still checked
        assert_eq!(s3("PUT", &key, &data), 200);
        let list_key = format!("{prefix}/leaves/{}", digest.to_hex());
        assert_eq!(s3("PUT", &list_key, &[7u8; 8 + 25 * 32]), 200);
        let before = down.load(Ordering::Relaxed);
        let mut r = store
            .blob
            .open_read_sized(&digest, size)
            .await
            .unwrap()
            .unwrap();
        r.seek(std::io::SeekFrom::Start(off as u64)).await.unwrap();
        r.read_exact(&mut page).await.unwrap();
        assert!(page == data[off..off + 4096]);
        let fetched = down.load(Ordering::Relaxed) - before;
        assert!(fetched > size, "a bad list was trusted: {fetched} bytes");
        // and with the bytes damaged as well, nothing wrong comes out
        assert_eq!(s3("PUT", &key, &other), 200);
        assert!(store
            .blob
            .open_read_sized(&digest, size)
            .await
            .is_err_and(|e| e.to_string().contains("digest mismatch")));
    }
}

mod lying_server {
    //! A server that speaks S3 but lies (what Garage never does): bodies
    //! longer than the length they declare, ranges other than the one
    //! asked for. Each read fails, having taken no more than the declared
    //! bytes, and hands out nothing.
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    use tvix_virtiofsd::castore::{B3Digest, LeafHasher};
    use tvix_virtiofsd::store::blob::s3::S3BlobService;
    use tvix_virtiofsd::store::blob::BlobService;
    use tvix_virtiofsd::store::bucket::{Bucket, BucketAddr};
    use tvix_virtiofsd::store::pathinfo::s3::S3PathInfoService;
    use tvix_virtiofsd::store::PathInfoService;

    const MIB: usize = 1 << 20;
    /// Bytes a lying answer goes on with past what it declares.
    const FLOOD: u64 = 256 << 20;
    /// What a refused answer may have cost: what it declares, and the
    /// socket buffers between the two ends.
    const MOST_SENT: u64 = 24 << 20;

    /// An answer: status line and headers (no blank line), the body, and
    /// how many bytes more follow in chunks, unannounced, when the head
    /// says `Transfer-Encoding: chunked`.
    struct Answer {
        head: String,
        body: Vec<u8>,
        flood: u64,
    }

    fn answer(head: &str, body: &[u8], flood: u64) -> Answer {
        Answer {
            head: head.into(),
            body: body.into(),
            flood,
        }
    }

    fn not_found() -> Answer {
        answer("HTTP/1.1 404 Not Found\r\nContent-Length: 0", b"", 0)
    }

    type Answerer = dyn Fn(&str, Option<(u64, u64)>) -> Answer + Send + Sync;
    /// An answer to a ranged GET of `data` for bytes `a..=b`.
    type Lie = fn(&[u8], u64, u64) -> Answer;

    /// Serves `answerer(path, range asked for)` for every request; answers
    /// its `http://` address and the count of body bytes it got sent.
    async fn serve(answerer: Arc<Answerer>) -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let count = sent.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (answerer, count) = (answerer.clone(), count.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // one request head (GETs and HEADs carry no body)
                        let mut byte = [0u8; 4096];
                        let end = loop {
                            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break p + 4;
                            }
                            match conn.read(&mut byte).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&byte[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end);
                        let path = head.split(' ').nth(1).unwrap_or("").to_string();
                        let range = head.lines().find_map(|l| {
                            let v = l.to_ascii_lowercase();
                            let r = v.strip_prefix("range: bytes=")?.to_string();
                            let (a, b) = r.trim().split_once('-')?;
                            Some((a.parse().ok()?, b.parse().ok()?))
                        });
                        let a = answerer(&path, range);
                        let chunked = a.head.to_ascii_lowercase().contains("chunked");
                        let mut out = format!("{}\r\n\r\n", a.head).into_bytes();
                        if chunked {
                            out.extend_from_slice(format!("{:x}\r\n", a.body.len()).as_bytes());
                            out.extend_from_slice(&a.body);
                            out.extend_from_slice(b"\r\n");
                        } else {
                            out.extend_from_slice(&a.body);
                        }
                        if conn.write_all(&out).await.is_err() {
                            return;
                        }
                        count.fetch_add(a.body.len() as u64, Ordering::Relaxed);
                        if !chunked {
                            continue;
                        }
                        let piece = vec![0x5a; 64 << 10];
                        let mut left = a.flood;
                        while left > 0 {
                            let n = left.min(piece.len() as u64) as usize;
                            let mut c = format!("{n:x}\r\n").into_bytes();
                            c.extend_from_slice(&piece[..n]);
                            c.extend_from_slice(b"\r\n");
                            if conn.write_all(&c).await.is_err() {
                                return;
                            }
                            count.fetch_add(n as u64, Ordering::Relaxed);
                            left -= n as u64;
                        }
                        if a.flood > 0 {
                            // never ends: wait for the client to hang up
                            while matches!(conn.read(&mut byte).await, Ok(n) if n > 0) {}
                            return;
                        }
                        if conn.write_all(b"0\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), sent)
    }

    /// A client of the server at `endpoint` (any credentials do).
    fn bucket(endpoint: &str) -> Bucket {
        {
            // the Garage cases set the real ones under this lock
            let _c = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
            if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
                std::env::set_var("AWS_ACCESS_KEY_ID", "liar");
                std::env::set_var("AWS_SECRET_ACCESS_KEY", "liar");
            }
        }
        let a = BucketAddr::parse(&format!("tvix/p?endpoint={endpoint}&region=garage")).unwrap();
        Bucket::open(&a, Duration::from_secs(2)).unwrap()
    }

    /// A large blob (read by leaves) and its leaf list object.
    fn large_blob() -> (Vec<u8>, B3Digest, Vec<u8>) {
        let data: Vec<u8> = (0..5 * MIB + 3).map(|i| (i * 13 + i / 777) as u8).collect();
        let mut h = LeafHasher::default();
        h.update(&data);
        let (digest, leaves) = h.finish();
        let leaves = leaves.unwrap();
        let mut list = leaves.size().to_le_bytes().to_vec();
        list.extend_from_slice(&leaves.encode());
        (data, digest, list)
    }

    fn ok(len: usize) -> String {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}")
    }

    fn assert_cut(what: &str, sent: &AtomicU64) {
        let sent = sent.load(Ordering::Relaxed);
        assert!(
            sent < MOST_SENT,
            "{what}: {} MiB taken from a body that declared less",
            sent >> 20
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bodies_longer_than_they_declare_are_cut_at_their_length() {
        // a small blob, read whole
        let small = b"a small blob".repeat(100);
        let digest = B3Digest::from(blake3::hash(&small));
        let body = small.clone();
        let (ep, sent) = serve(Arc::new(move |_, _| {
            let head = format!("{}\r\nTransfer-Encoding: chunked", ok(body.len()));
            answer(&head, &body, FLOOD)
        }))
        .await;
        let blobs = S3BlobService::new(bucket(&ep));
        assert!(blobs.open_read(&digest).await.is_err());
        assert_cut("a small blob", &sent);
        sent.store(0, Ordering::Relaxed);
        let mut s = blobs.read_stream(&digest).await.unwrap().unwrap();
        let mut n = 0;
        let e = loop {
            match futures::StreamExt::next(&mut s).await {
                Some(Ok(c)) => n += c.len(),
                Some(Err(e)) => break e,
                None => panic!("the stream ended after {n} bytes"),
            }
        };
        assert!(n <= small.len(), "{n} bytes handed out ({e})");
        drop(s);
        assert_cut("a small blob's stream", &sent);

        // a leaf of a large one
        let (data, digest, list) = large_blob();
        let size = data.len() as u64;
        let (ep, sent) = serve(Arc::new(move |path, range| {
            if path.contains("/leaves/") {
                return answer(&ok(list.len()), &list, 0);
            }
            let Some((a, b)) = range else {
                return not_found();
            };
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{size}\r\n\
                 Content-Length: {}\r\nTransfer-Encoding: chunked",
                b - a + 1
            );
            answer(&head, &data[a as usize..=b as usize], FLOOD)
        }))
        .await;
        let blobs = S3BlobService::new(bucket(&ep));
        let mut r = blobs.open_read_sized(&digest, size).await.unwrap().unwrap();
        let mut page = vec![0u8; 4096];
        assert!(r.read_exact(&mut page).await.is_err());
        drop(r);
        assert_cut("a leaf", &sent);

        // a leaf list
        let (data, digest, list) = large_blob();
        let (ep, sent) = serve(Arc::new(move |path, _| {
            if path.contains("/leaves/") {
                let head = format!("{}\r\nTransfer-Encoding: chunked", ok(list.len()));
                return answer(&head, &list, FLOOD);
            }
            not_found()
        }))
        .await;
        let blobs = S3BlobService::new(bucket(&ep));
        let _ = blobs.open_read_sized(&digest, data.len() as u64).await;
        assert_cut("a leaf list", &sent);

        // a path info
        let (ep, sent) = serve(Arc::new(move |_, _| {
            let head = format!("{}\r\nTransfer-Encoding: chunked", ok(100));
            answer(&head, &[0; 100], FLOOD)
        }))
        .await;
        let infos = S3PathInfoService::new(bucket(&ep));
        assert!(infos.get(&[1; 20]).await.is_err());
        assert_cut("a path info", &sent);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_range_other_than_the_one_asked_for_fails_the_read() {
        let (data, digest, list) = large_blob();
        let size = data.len() as u64;
        let bad: [Lie; 4] = [
            // the whole object, as a server that ignores Range does
            |d, _, _| answer(&ok(d.len()), d, 0),
            // the leaf after the one asked for
            |d, a, b| {
                let (a, b) = (a + MIB as u64, b + MIB as u64);
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\n\
                     Content-Length: {}",
                    d.len(),
                    b - a + 1
                );
                answer(&head, &d[a as usize..=b as usize], 0)
            },
            // the range asked for, with other bytes
            |d, a, b| {
                let mut body = d[a as usize..=b as usize].to_vec();
                body[4096] ^= 1;
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\n\
                     Content-Length: {}",
                    d.len(),
                    body.len()
                );
                answer(&head, &body, 0)
            },
            // a range whose end overflows
            |_, a, _| {
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{}/{}\r\n\
                     Content-Length: 0",
                    u64::MAX,
                    u64::MAX
                );
                answer(&head, b"", 0)
            },
        ];
        for (k, lie) in bad.into_iter().enumerate() {
            let (data, list) = (data.clone(), list.clone());
            let (ep, _) = serve(Arc::new(move |path, range| {
                if path.contains("/leaves/") {
                    return answer(&ok(list.len()), &list, 0);
                }
                match range {
                    Some((a, b)) => lie(&data, a, b),
                    None => not_found(),
                }
            }))
            .await;
            let blobs = S3BlobService::new(bucket(&ep));
            let mut r = blobs.open_read_sized(&digest, size).await.unwrap().unwrap();
            r.seek(std::io::SeekFrom::Start(MIB as u64 + 5))
                .await
                .unwrap();
            let mut page = vec![0u8; 8192];
            assert!(
                r.read_exact(&mut page).await.is_err(),
                "lie {k}: a page was served"
            );
        }
    }
}

mod listing {
    //! The listing of path infos holds each object to the key it is under,
    //! as a get does, and one bad object costs its own entry only.
    use super::*;
    use futures::TryStreamExt;
    use tvix_virtiofsd::castore::Node;
    use tvix_virtiofsd::nix::path_info::PathInfo;
    use tvix_virtiofsd::nix::store_path::StorePath;

    fn s3(method: &str, key: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let c = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref()
            .expect("cluster started")
            .s3(0, method, key, body)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_path_info_under_another_key_or_undecodable_is_left_out_of_the_list() {
        let addr = fresh_prefix();
        let prefix = addr
            .trim_start_matches("s3://tvix/")
            .split_once('?')
            .unwrap()
            .0
            .to_string();
        let store = Store::open(
            &addr.parse().unwrap(),
            &addr.parse().unwrap(),
            &addr.parse().unwrap(),
        )
        .unwrap();
        let info = PathInfo {
            store_path: StorePath::new([3; 20], "listed").unwrap(),
            node: Node::Symlink {
                target: "/somewhere".into(),
            },
            references: vec![],
            nar_size: 1000,
            nar_sha256: [3; 32],
            signatures: vec![],
            deriver: None,
            ca: None,
        };
        store.path_info.put(info.clone()).await.unwrap();
        let hash = |b: u8| tvix_virtiofsd::nix::nixbase32::encode(&[b; 20]);
        let (status, bytes) = s3("GET", &format!("{prefix}/pathinfo/{}", hash(3)), b"");
        assert_eq!(status, 200);
        // the same object under another path's key, and garbage
        for (key, body) in [
            (hash(4), &bytes[..]),
            (hash(5), &b"not a path info"[..]),
            ("not-a-hash".to_string(), &bytes[..]),
        ] {
            assert_eq!(s3("PUT", &format!("{prefix}/pathinfo/{key}"), body).0, 200);
        }
        assert!(store.path_info.get(&[4; 20]).await.is_err());
        let listed: Vec<PathInfo> = store.path_info.list().try_collect().await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed[0].same_contents(&info));
    }
}
