//! Requests per second a store serves: many concurrent blob reads against
//! one or several store daemons over gRPC (the calls a host cache makes
//! when it fills misses), or against a store opened in this process (an
//! `s3://` bucket read directly: what the bucket gives without a daemon).
//!
//! The blobs are those of every store path of the store named by
//! `--list` (read in-process, not timed): each file's digest once, in the
//! order of their digests (so neither the tree's order nor its
//! directories' locality helps). Request `i` reads blob `i mod n` from
//! target `i mod T` (the targets take turns), on that target's connection
//! `(i / T) mod K`; `--concurrency` requests are in flight at once in all.
//! A gRPC read is a `BlobService/Read` whose stream is drained (the bytes
//! are counted, not checked: the daemon checked them against their
//! digest before its first byte); an in-process read opens the blob
//! (which the store checks) and reads it to its end. Before the clock
//! starts each connection reads one blob, so connecting is not timed.
//!
//! `--op tree` instead reads the tree of every store path once per target
//! (a recursive `DirectoryService/Get`, drained), one at a time: how long
//! a host cache waits for the directories of a store path it has none of.
//! An in-process target walks the tree itself: with `--concurrency 1`
//! through the store's own recursive walk, with more as a breadth-first
//! walk of single-directory gets with that many in flight (answered in
//! the same order): what a store walking its tree concurrently would give.
//!
//! Reported on stdout, one `SUMMARY` line: requests, seconds, requests/s,
//! MiB/s, latency p50/p90/p99/max in µs (from the call to the end of its
//! answer), errors, and the CPU time each `--cpu NAME=PID` used while the
//! clock ran (user + system; the same NAME given several times sums its
//! processes: e.g. the three nodes of a Garage cluster), and this
//! process's own (`cpu_client_ms`).
//!
//! Usage: cargo bench --bench store_load -- --list ADDR --target ADDR
//! [--target ADDR]... [--op read|tree] [--concurrency N] [--requests N]
//! [--connections K] [--label TEXT] [--cpu NAME=PID]...
//! ADDR: grpc+unix:///PATH, grpc+http://HOST:PORT, or any store address
//! this crate opens (s3://..., local://...), read in-process.
use anyhow::{anyhow, bail, Context as _, Result};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;
use tvix_virtiofsd::castore::{B3Digest, Node};
use tvix_virtiofsd::store::channel::{self, Wire, WireChannel};
use tvix_virtiofsd::store::{Addr, Store};
use tvix_virtiofsd::wire::castore as cpb;

struct Args {
    list: String,
    targets: Vec<String>,
    op: String,
    concurrency: usize,
    requests: Option<usize>,
    connections: usize,
    label: String,
    cpu: Vec<(String, u32)>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        list: String::new(),
        targets: Vec::new(),
        op: "read".into(),
        concurrency: 64,
        requests: None,
        connections: 1,
        label: "store".into(),
        cpu: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--bench" {
            continue; // cargo bench passes it
        }
        let mut v = || it.next().ok_or_else(|| anyhow!("{k} needs a value"));
        match k.as_str() {
            "--list" => a.list = v()?,
            "--target" => a.targets.push(v()?),
            "--op" => a.op = v()?,
            "--concurrency" => a.concurrency = v()?.parse()?,
            "--requests" => a.requests = Some(v()?.parse()?),
            "--connections" => a.connections = v()?.parse()?,
            "--label" => a.label = v()?,
            "--cpu" => {
                let s = v()?;
                let (n, p) = s
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--cpu NAME=PID, not {s}"))?;
                a.cpu.push((n.into(), p.parse()?));
            }
            _ => bail!("unknown argument {k}"),
        }
    }
    if a.list.is_empty() || a.targets.is_empty() {
        bail!("usage: store_load --list ADDR --target ADDR [--target ADDR]... [--op read|tree] [--concurrency N] [--requests N] [--connections K] [--label TEXT] [--cpu NAME=PID]...");
    }
    if !matches!(a.op.as_str(), "read" | "tree") {
        bail!("--op read or tree, not {}", a.op);
    }
    a.concurrency = a.concurrency.max(1);
    a.connections = a.connections.max(1);
    Ok(a)
}

fn open_store(addr: &str) -> Result<Store> {
    let a: Addr = addr.parse().with_context(|| format!("address {addr}"))?;
    Store::open(&a, &a, &a).with_context(|| format!("opening {addr}"))
}

/// Where requests go.
enum Target {
    Grpc(Vec<WireChannel>),
    InProcess(Store),
}

impl Target {
    fn new(addr: &str, connections: usize) -> Result<Self> {
        let a: Addr = addr.parse().with_context(|| format!("address {addr}"))?;
        Ok(match a {
            Addr::GrpcUnix(p, _) => Target::Grpc(
                (0..connections)
                    .map(|_| channel::connect_unix(p.clone(), Wire::Tvix))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Addr::GrpcHttp(hp, _) => Target::Grpc(
                (0..connections)
                    .map(|_| channel::connect_tcp(&hp, Wire::Tvix))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            _ => Target::InProcess(open_store(addr)?),
        })
    }

    fn connections(&self) -> usize {
        match self {
            Target::Grpc(c) => c.len(),
            Target::InProcess(_) => 1,
        }
    }

    /// Reads one blob to its end; answers its bytes.
    async fn read(&self, conn: usize, digest: &B3Digest) -> Result<u64> {
        match self {
            Target::Grpc(chans) => {
                let mut client = cpb::blob_service_client::BlobServiceClient::new(
                    chans[conn % chans.len()].clone(),
                )
                .max_decoding_message_size(64 << 20);
                let mut s = client
                    .read(cpb::ReadBlobRequest {
                        digest: bytes::Bytes::copy_from_slice(digest.as_bytes()),
                    })
                    .await?
                    .into_inner();
                let mut n = 0u64;
                while let Some(c) = s.message().await? {
                    n += c.data.len() as u64;
                }
                Ok(n)
            }
            Target::InProcess(store) => {
                let mut r = store
                    .blob
                    .open_read(digest)
                    .await?
                    .ok_or_else(|| anyhow!("blob {digest}: not found"))?;
                Ok(tokio::io::copy(&mut r, &mut tokio::io::sink()).await?)
            }
        }
    }

    /// Reads the tree below `root` to its end; answers its directories.
    async fn tree(&self, root: &B3Digest, concurrency: usize) -> Result<u64> {
        match self {
            Target::Grpc(chans) => {
                let mut client =
                    cpb::directory_service_client::DirectoryServiceClient::new(chans[0].clone())
                        .max_decoding_message_size(64 << 20);
                let mut s = client
                    .get(cpb::GetDirectoryRequest {
                        by_what: Some(cpb::get_directory_request::ByWhat::Digest(
                            bytes::Bytes::copy_from_slice(root.as_bytes()),
                        )),
                        recursive: true,
                    })
                    .await?
                    .into_inner();
                let mut n = 0u64;
                while s.message().await?.is_some() {
                    n += 1;
                }
                Ok(n)
            }
            Target::InProcess(store) if concurrency <= 1 => {
                let mut s = store.directory.get_recursive(*root);
                let mut n = 0u64;
                while let Some(d) = s.next().await {
                    d?;
                    n += 1;
                }
                Ok(n)
            }
            Target::InProcess(store) => {
                // breadth-first, `concurrency` gets in flight, in order
                let mut queue = std::collections::VecDeque::from([*root]);
                let mut seen = std::collections::HashSet::from([*root]);
                let mut inflight = futures::stream::FuturesOrdered::new();
                let mut n = 0u64;
                loop {
                    while inflight.len() < concurrency {
                        let Some(d) = queue.pop_front() else { break };
                        let svc = store.directory.clone();
                        inflight.push_back(async move { (d, svc.get(&d).await) });
                    }
                    let Some((d, got)) = inflight.next().await else {
                        break;
                    };
                    let dir = got?.ok_or_else(|| anyhow!("directory {d}: not found"))?;
                    for (_, child, _) in dir.child_directories() {
                        if seen.insert(child) {
                            queue.push_back(child);
                        }
                    }
                    n += 1;
                }
                Ok(n)
            }
        }
    }
}

/// Every blob of the store's paths (digest, size), by digest, and the
/// roots of the directory trees.
async fn enumerate(store: &Store) -> Result<(Vec<(B3Digest, u64)>, Vec<B3Digest>)> {
    let mut blobs = BTreeMap::new();
    let mut roots = Vec::new();
    let mut infos = store.path_info.list();
    while let Some(info) = infos.next().await {
        match info?.node {
            Node::File { digest, size, .. } => {
                blobs.insert(digest, size);
            }
            Node::Directory { digest, .. } => roots.push(digest),
            _ => {}
        }
    }
    for root in &roots {
        let mut dirs = store.directory.get_recursive(*root);
        while let Some(d) = dirs.next().await {
            for (_, node) in d?.entries() {
                if let Node::File { digest, size, .. } = node {
                    blobs.insert(*digest, *size);
                }
            }
        }
    }
    Ok((blobs.into_iter().collect(), roots))
}

fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: u64 = f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()?
        .max(1);
    Some(ticks * 1000 / hz)
}

/// CPU ms per name, summed over its processes.
fn cpu_by_name(cpu: &[(String, u32)]) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for (name, pid) in cpu {
        let v = cpu_ms(*pid).map_or(i64::MIN / 4, |v| v as i64);
        *out.entry(name.clone()).or_insert(0) += v;
    }
    out
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let list = open_store(&args.list)?;
    let t0 = Instant::now();
    let (blobs, roots) = enumerate(&list).await?;
    eprintln!(
        "store_load: {} blobs ({:.1} MiB), {} trees, listed from {} in {:.2} s",
        blobs.len(),
        blobs.iter().map(|b| b.1).sum::<u64>() as f64 / 1048576.0,
        roots.len(),
        args.list,
        t0.elapsed().as_secs_f64()
    );
    if blobs.is_empty() {
        bail!("{}: no blobs", args.list);
    }
    let targets: Vec<Target> = args
        .targets
        .iter()
        .map(|t| Target::new(t, args.connections))
        .collect::<Result<_>>()?;
    let targets = Arc::new(targets);
    // Connect each connection (and let the first call of each be slow).
    for t in targets.iter() {
        for c in 0..t.connections() {
            t.read(c, &blobs[0].0).await.context("first read")?;
        }
    }
    let ntargets = targets.len();
    let blobs = Arc::new(blobs);
    let mut cpu_args = args.cpu.clone();
    cpu_args.push(("client".into(), std::process::id()));
    let cpu0 = cpu_by_name(&cpu_args);
    let started = Instant::now();
    let (requests, lat, bytes, errors) = if args.op == "read" {
        let requests = args.requests.unwrap_or(blobs.len());
        let next = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency.min(requests) {
            let (targets, blobs, next, bytes, errors) = (
                targets.clone(),
                blobs.clone(),
                next.clone(),
                bytes.clone(),
                errors.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= requests {
                        break;
                    }
                    let (digest, size) = blobs[i % blobs.len()];
                    let t = &targets[i % ntargets];
                    let began = Instant::now();
                    match t.read(i / ntargets, &digest).await {
                        Ok(n) if n == size => {
                            bytes.fetch_add(n, Relaxed);
                        }
                        Ok(n) => {
                            if errors.fetch_add(1, Relaxed) < 5 {
                                eprintln!("store_load: blob {digest}: {n} bytes, expected {size}");
                            }
                        }
                        Err(e) => {
                            if errors.fetch_add(1, Relaxed) < 5 {
                                eprintln!("store_load: blob {digest}: {e:#}");
                            }
                        }
                    }
                    lat.push(began.elapsed().as_micros() as u64);
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await?);
        }
        (requests, lat, bytes.load(Relaxed), errors.load(Relaxed))
    } else {
        let mut lat = Vec::new();
        let mut errors = 0;
        let mut dirs = 0;
        for t in targets.iter() {
            for root in &roots {
                let began = Instant::now();
                match t.tree(root, args.concurrency).await {
                    Ok(n) => dirs += n,
                    Err(e) => {
                        errors += 1;
                        eprintln!("store_load: tree {root}: {e:#}");
                    }
                }
                lat.push(began.elapsed().as_micros() as u64);
            }
        }
        eprintln!("store_load: {dirs} directories in all");
        (lat.len(), lat, 0, errors)
    };
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let cpu1 = cpu_by_name(&cpu_args);
    let mut lat = lat;
    lat.sort_unstable();
    let mut cpu = String::new();
    for (name, before) in &cpu0 {
        let used = cpu1.get(name).map_or(-1, |after| {
            if *after < 0 || *before < 0 {
                -1
            } else {
                after - before
            }
        });
        cpu.push_str(&format!(" cpu_{name}_ms={used}"));
    }
    println!(
        "SUMMARY label={} op={} targets={} connections={} concurrency={} requests={requests} secs={secs:.3} req_per_s={:.0} mib_per_s={:.1} p50_us={} p90_us={} p99_us={} max_us={} errors={errors}{cpu}",
        args.label.replace(' ', "_"),
        args.op,
        ntargets,
        args.connections,
        args.concurrency,
        requests as f64 / secs,
        bytes as f64 / 1048576.0 / secs,
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(0),
    );
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}
