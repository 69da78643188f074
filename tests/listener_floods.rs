//! Floods of the HTTP listeners a local user can reach (the binary cache,
//! the metrics): hundreds of half-sent requests must not take the
//! daemon's descriptors (each listener holds a bounded number of
//! connections and answers the rest 503), half-sent requests are closed
//! after the header timeout, and the daemon answers good requests again;
//! NAR renders (GET /nar, CalculateNAR) are bounded too, a request beyond
//! the bound waiting, then refused with a clear status.
mod common;

use common::{cli_ok, free_port, http_request, pseudo_random, Daemon};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The binary cache's default connection bound (`--http-max-connections`).
const HTTP_CONNECTIONS: usize = 256;
/// The metrics listener's connection bound.
const METRICS_CONNECTIONS: usize = 32;
/// How long a client has to send a request's header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors a daemon may open besides the connections it holds
/// (store files, the runtime's, a connection being refused).
const SLACK: usize = 24;

struct Setup {
    daemon: Daemon,
    http: String,
    metrics: String,
    grpc: String,
    dir: tempfile::TempDir,
}

fn start(before: impl FnOnce(&str)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("local://{}", dir.path().join("store").display());
    before(&store);
    let http = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let grpc = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start_with(
        &store,
        &grpc,
        &["--http-listen", &http, "--metrics-listen", &metrics],
    );
    for a in [&http, &metrics] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(a).is_err() {
            assert!(Instant::now() < deadline, "nothing on {a}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Setup {
        daemon,
        http,
        metrics,
        grpc,
        dir,
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `n` connections to `addr`, each with the start of a request and no end.
fn half_sent(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let mut s = TcpStream::connect(addr).ok()?;
            let _ = s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            Some(s)
        })
        .collect()
}

/// Whether the daemon closed `s` (after answering or not) within `wait`.
fn closed(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Floods `target` with `n` half-sent requests; checks the descriptors,
/// the refusal, the timeout and the recovery. `other` is a listener of
/// the same daemon that must answer meanwhile.
fn flood(setup: &Setup, target: &str, path: &str, limit: usize, n: usize, other: (&str, &str)) {
    let pid = setup.daemon.child.id();
    let base = fds(pid);
    let started = Instant::now();
    let mut held = half_sent(target, n);
    assert_eq!(held.len(), n, "connections refused at connect");
    std::thread::sleep(Duration::from_millis(500));
    let during = fds(pid);
    eprintln!("{target}: {n} half-sent requests: {base} descriptors before, {during} during");
    assert!(
        during <= base + limit + SLACK,
        "{during} descriptors with {n} half-sent requests (was {base}, at most {limit} connections)"
    );
    // over the limit: a clear refusal, not a hang
    let (status, body) = http_request(target, "GET", path);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many connections"), "{body}");
    // another listener of the daemon is not affected
    let (status, body) = http_request(other.0, "GET", other.1);
    assert_eq!(status, 200, "{body}");
    // after the header timeout every half-sent request is closed
    let until = started + HEADER_TIMEOUT + Duration::from_secs(5);
    let mut open = 0;
    for s in held.iter_mut() {
        if !closed(s, until.saturating_duration_since(Instant::now())) {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "half-sent requests still open after the header timeout"
    );
    drop(held);
    let (status, body) = http_request(target, "GET", path);
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(200));
    let after = fds(pid);
    assert!(
        after <= base + 4,
        "{after} descriptors after the flood, {base} before"
    );
}

#[test]
fn a_binary_cache_flooded_with_half_sent_requests_keeps_its_descriptors_and_recovers() {
    let s = start(|_| {});
    let other = (s.metrics.clone(), "/metrics");
    flood(
        &s,
        &s.http,
        "/nix-cache-info",
        HTTP_CONNECTIONS,
        HTTP_CONNECTIONS + 150,
        (&other.0, other.1),
    );
}

#[test]
fn a_metrics_listener_flooded_with_half_sent_requests_keeps_its_descriptors_and_recovers() {
    let s = start(|_| {});
    let other = (s.http.clone(), "/nix-cache-info");
    flood(
        &s,
        &s.metrics,
        "/metrics",
        METRICS_CONNECTIONS,
        METRICS_CONNECTIONS + 100,
        (&other.0, other.1),
    );
}

#[test]
fn nar_renders_past_the_bound_wait_then_are_refused_with_503_and_resource_exhausted() {
    let mut path = String::new();
    let s = start(|store| {
        // larger than what socket buffers take in: a render whose reader
        // stops holds its turn
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big");
        std::fs::write(&f, pseudo_random(48 << 20, 7)).unwrap();
        let out = cli_ok(&["--store", store, "import", f.to_str().unwrap()]);
        path = String::from_utf8(out).unwrap().trim().to_string();
    });
    let hash = &path["/nix/store/".len()..][..32];
    let nar = format!("/nar/{hash}.nar");
    // the default --max-nar-renders is 4: four readers that stop reading
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(&s.http).unwrap();
        write!(c, "GET {nar} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut first = [0u8; 12];
        c.read_exact(&mut first).unwrap();
        assert_eq!(&first[9..12], b"200");
        held.push(c);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let grpc = s.grpc.clone();
    let sp = tvix_virtiofsd::nix::store_path::StorePath::from_absolute_path(&path).unwrap();
    let calculated = rt.spawn(async move {
        let store = common::grpc_store(&format!("grpc+http://{grpc}"));
        let info = store.path_info.get(sp.digest()).await.unwrap().unwrap();
        let ch = tvix_virtiofsd::store::channel::connect_tcp(
            &grpc,
            tvix_virtiofsd::store::channel::Wire::Detect,
        )
        .unwrap();
        let svc = tvix_virtiofsd::store::pathinfo::grpc::GrpcPathInfoService::new(ch);
        svc.calculate_nar(&info.node).await
    });
    let t = Instant::now();
    let (status, body) = http_request(&s.http, "GET", &nar);
    eprintln!(
        "fifth render: {status} after {:?}: {}",
        t.elapsed(),
        body.trim()
    );
    assert_eq!(status, 503, "a fifth render ran beside four");
    assert!(body.contains("render a NAR"), "{body}");
    let err = rt.block_on(calculated).unwrap().unwrap_err();
    assert!(
        err.to_string().contains("RESOURCE_EXHAUSTED") || err.to_string().contains("resource"),
        "{err}"
    );
    // a reader that leaves gives its turn back
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = TcpStream::connect(&s.http).unwrap();
        write!(
            c,
            "GET {nar} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut first = [0u8; 12];
        c.read_exact(&mut first).unwrap();
        if &first[9..12] == b"200" {
            break;
        }
        assert!(Instant::now() < deadline, "no render turn came back");
    }
    drop(s.dir);
}
