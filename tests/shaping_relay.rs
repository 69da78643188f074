//! The benchmarks' shaping relay (benches/common/relay.rs) over real
//! loopback sockets: its delay is really there on every round trip and
//! is a pipeline (bulk throughput is not one delay per chunk), its
//! bandwidth cap holds, a half close passes through with the data before
//! it, a new connection pays a round trip for its handshake, many connections at once each pay the round trip once, and an
//! upstream that refuses closes the client's connection.
#[path = "../benches/common/relay.rs"]
mod relay;

use relay::{Relay, Shape};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const LOCAL: (Ipv4Addr, u16) = (Ipv4Addr::LOCALHOST, 0);

/// Echoes every connection until its EOF, then half-closes.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind(LOCAL).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.set_nodelay(true).unwrap();
                let (mut r, mut w) = s.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Reads every connection to its EOF, then answers the byte count (u64).
async fn sink_server() -> SocketAddr {
    let l = TcpListener::bind(LOCAL).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let n = tokio::io::copy(&mut s, &mut tokio::io::sink())
                    .await
                    .unwrap();
                s.write_all(&n.to_le_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    addr
}

async fn relay_to(upstream: SocketAddr, rtt_ms: f64, mbit: f64) -> Relay {
    let shape = Shape::from_ms_mbit(rtt_ms, mbit).unwrap();
    Relay::start(LOCAL.into(), upstream.to_string(), shape)
        .await
        .unwrap()
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// `n` request/response round trips of 100 bytes each on a new
/// connection; the first one's time includes connecting.
async fn round_trips(addr: SocketAddr, n: usize) -> Vec<Duration> {
    let mut t = Instant::now();
    let mut s = connect(addr).await;
    let mut times = Vec::new();
    let mut buf = [0u8; 100];
    for i in 0..n {
        let msg = [i as u8; 100];
        if i > 0 {
            t = Instant::now();
        }
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        times.push(t.elapsed());
        assert_eq!(buf, msg);
    }
    times
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_round_trip_pays_the_rtt() {
    let echo = echo_server().await;
    let slow = relay_to(echo, 10.0, 0.0).await;
    let mut times = round_trips(slow.addr, 21).await;
    // The first one includes connecting.
    let first = times.remove(0);
    assert!(
        first >= Duration::from_millis(20),
        "the first round trip, right after connecting, took {first:?} < 2 RTT"
    );
    let min = times.iter().min().copied().unwrap();
    let med = median(times.clone());
    eprintln!("10 ms relay: round trips min {min:?}, median {med:?}");
    assert!(
        min >= Duration::from_millis(10),
        "a round trip took {min:?} < 10 ms: {times:?}"
    );
    assert!(
        med < Duration::from_millis(18),
        "median round trip {med:?}: {times:?}"
    );
    assert_eq!(slow.stats.up_bytes.load(Ordering::Relaxed), 2100);
    assert_eq!(slow.stats.down_bytes.load(Ordering::Relaxed), 2100);

    // 1 ms: a timer that wakes on whole milliseconds (tokio's) would add
    // 1 to 2 ms here.
    let near = relay_to(echo, 1.0, 0.0).await;
    let mut times = round_trips(near.addr, 21).await;
    times.remove(0);
    let min = times.iter().min().copied().unwrap();
    let med = median(times.clone());
    eprintln!("1 ms relay: round trips min {min:?}, median {med:?}");
    assert!(
        min >= Duration::from_millis(1),
        "a round trip took {min:?} < 1 ms: {times:?}"
    );
    assert!(
        med < Duration::from_micros(2500),
        "median round trip at 1 ms {med:?}: {times:?}"
    );

    let fast = relay_to(echo, 0.0, 0.0).await;
    let times = round_trips(fast.addr, 20).await;
    let med = median(times.clone());
    eprintln!("0 ms relay: median round trip {med:?}");
    assert!(
        med < Duration::from_millis(3),
        "median round trip at 0 ms {med:?}: {times:?}"
    );
}

/// Sends `bytes` through `addr` to the sink, half-closes, waits for the
/// count: the time it took.
async fn send_to_sink(addr: SocketAddr, bytes: usize) -> Duration {
    let mut s = connect(addr).await;
    let chunk = vec![0x5au8; 256 << 10];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    s.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.unwrap();
    let took = t.elapsed();
    assert_eq!(u64::from_le_bytes(count), bytes as u64);
    assert_eq!(s.read(&mut count).await.unwrap(), 0, "EOF after the count");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delay_is_a_pipeline() {
    let sink = sink_server().await;
    let r = relay_to(sink, 10.0, 0.0).await;
    const BYTES: usize = 32 << 20;
    let took = send_to_sink(r.addr, BYTES).await;
    // One 5 ms sleep per read of at most 64 KiB would take at least
    // 512 x 5 ms = 2.56 s.
    let serialized = Duration::from_millis(5) * (BYTES / relay::CHUNK) as u32;
    eprintln!("32 MiB at 10 ms RTT: {took:?}");
    assert!(
        took < Duration::from_millis(1500),
        "32 MiB at 10 ms RTT took {took:?} (one delay per chunk: {serialized:?})"
    );
    assert_eq!(r.stats.up_bytes.load(Ordering::Relaxed), BYTES as u64);
    assert_eq!(r.stats.down_bytes.load(Ordering::Relaxed), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_cap_holds() {
    let sink = sink_server().await;
    let r = relay_to(sink, 0.0, 100.0).await;
    const BYTES: usize = 8 << 20;
    let took = send_to_sink(r.addr, BYTES).await;
    // 8 MiB at 12.5 MB/s: 0.67 s (less the 2 ms burst).
    eprintln!("8 MiB at 100 Mbit/s: {took:?}");
    assert!(
        took >= Duration::from_millis(600),
        "8 MiB at 100 Mbit/s took only {took:?}"
    );
    assert!(
        took < Duration::from_millis(2000),
        "8 MiB at 100 Mbit/s took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_passes_through_after_the_data() {
    let echo = echo_server().await;
    let r = relay_to(echo, 10.0, 0.0).await;
    let s = connect(r.addr).await;
    let (mut rd, mut wr) = s.into_split();
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.shutdown().await.unwrap();
        wr // kept open for reading until the end
    });
    let mut back = Vec::new();
    rd.read_to_end(&mut back).await.unwrap();
    let _wr = writer.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_once() {
    let echo = echo_server().await;
    let r = relay_to(echo, 10.0, 0.0).await;
    let t = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|_| tokio::spawn(round_trips(r.addr, 5)))
        .collect();
    for task in tasks {
        for rt in task.await.unwrap() {
            assert!(rt >= Duration::from_millis(10), "a round trip took {rt:?}");
        }
    }
    let took = t.elapsed();
    eprintln!("64 connections x 5 round trips at 10 ms RTT: {took:?}");
    // A handshake and 5 round trips each, all connections at once: about
    // 60 ms, not 64 times that.
    assert!(took < Duration::from_millis(1000), "took {took:?}");
    assert_eq!(r.stats.connections.load(Ordering::Relaxed), 64);
    assert_eq!(r.stats.up_bytes.load(Ordering::Relaxed), 64 * 5 * 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_closes_the_client() {
    // A port that was just free: nothing listens there.
    let l = TcpListener::bind(LOCAL).await.unwrap();
    let gone = l.local_addr().unwrap();
    drop(l);
    let r = relay_to(gone, 10.0, 0.0).await;
    let mut s = connect(r.addr).await;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the relay closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(r.stats.errors.load(Ordering::Relaxed), 1);
    assert_eq!(r.stats.connections.load(Ordering::Relaxed), 0);
}
