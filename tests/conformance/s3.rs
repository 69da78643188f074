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
