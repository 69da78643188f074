//! A shaping TCP relay for the benchmarks: each accepted connection is
//! joined to a new one to an upstream address, and each direction delays
//! every byte by half the round trip asked for and, optionally, caps its
//! bandwidth. This kernel has no netem, and the benchmarks' remote store is
//! on loopback (~0.1 ms round trip): the relay puts it 1 or 10 ms away.
//!
//! Per direction, a reader stamps each chunk it reads (up to 64 KiB) with
//! `now + delay` and queues it; a writer sleeps until the stamp, paces by
//! the bandwidth cap (a token bucket), then writes. So the delay is a
//! pipeline, not a sleep per read: throughput is bounded by the bytes in
//! flight (`IN_FLIGHT` per direction, which also bounds memory and
//! back-pressures a fast sender). Writers sleep on a timerfd: tokio's timer
//! wakes on whole milliseconds, up to 1 ms late each way, which would make
//! a 1 ms round trip 2 to 3. A new connection's handshake costs a round
//! trip, as on a real link. An EOF is delayed like data, then passed on as
//! a half close; an error on either side closes both. Shared through
//! `#[path]` by the `relay` bench (a CLI) and tests/shaping_relay.rs.
#![allow(dead_code)]
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest chunk one read takes.
pub const CHUNK: usize = 64 << 10;
/// Bytes read but not yet written, per direction of a connection: at most
/// this much (plus the read buffer) is held, and at a one-way delay D a
/// direction carries at most `IN_FLIGHT / D` (1.6 GiB/s at 5 ms).
pub const IN_FLIGHT: usize = 8 << 20;
/// Chunks queued per direction (a second bound, for tiny reads).
const QUEUE: usize = 1024;
/// Largest write at a time under a bandwidth cap, so pacing stays smooth.
const PACE_SLICE: usize = 16 << 10;

/// How a link is shaped.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shape {
    /// Round trip added: each direction delays by half of it.
    pub rtt: Duration,
    /// Bytes per second per direction; 0 is unlimited.
    pub bytes_per_sec: u64,
}

impl Shape {
    /// From a round trip in milliseconds and a bandwidth in Mbit/s (0: no
    /// cap); None for negative or non-finite values.
    pub fn from_ms_mbit(rtt_ms: f64, mbit: f64) -> Option<Shape> {
        if !(rtt_ms.is_finite() && mbit.is_finite() && rtt_ms >= 0.0 && mbit >= 0.0) {
            return None;
        }
        Some(Shape {
            rtt: Duration::from_secs_f64(rtt_ms / 1000.0),
            bytes_per_sec: (mbit * 1e6 / 8.0).round() as u64,
        })
    }
    fn one_way(&self) -> Duration {
        self.rtt / 2
    }
}

/// Counters, shared with the relay's tasks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted (and not refused by the upstream).
    pub connections: AtomicU64,
    /// Connections still open.
    pub open: AtomicU64,
    /// Bytes written to the upstream (client to upstream).
    pub up_bytes: AtomicU64,
    /// Bytes written back to clients (upstream to client).
    pub down_bytes: AtomicU64,
    /// Connections that ended on an error (either side, or the upstream's
    /// connect).
    pub errors: AtomicU64,
}

impl Stats {
    pub fn line(&self) -> String {
        format!(
            "connections={} open={} errors={} up_bytes={} down_bytes={}",
            self.connections.load(Ordering::Relaxed),
            self.open.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.up_bytes.load(Ordering::Relaxed),
            self.down_bytes.load(Ordering::Relaxed),
        )
    }
}

/// A running relay; dropping it stops it and closes its connections.
pub struct Relay {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Listens on `listen` (port 0: any) and relays every connection to
    /// `upstream` (`host:port`, resolved per connection), shaped by `shape`.
    pub async fn start(listen: SocketAddr, upstream: String, shape: Shape) -> io::Result<Relay> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(accept_loop(listener, upstream, shape, stats.clone()));
        Ok(Relay { addr, stats, task })
    }

    /// Runs until the accept loop ends (it does not, short of a panic).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

async fn accept_loop(listener: TcpListener, upstream: String, shape: Shape, stats: Arc<Stats>) {
    // The connections' tasks live in the set: when this task is aborted,
    // the set is dropped and aborts them all.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: wait rather than spin.
                eprintln!("relay: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (upstream, stats) = (upstream.clone(), stats.clone());
        let accepted = Instant::now();
        conns.spawn(async move {
            let server = match TcpStream::connect(&upstream).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("relay: {peer}: connecting to {upstream}: {e}");
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            stats.connections.fetch_add(1, Ordering::Relaxed);
            stats.open.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = relay_connection(client, server, shape, accepted, &stats).await {
                eprintln!("relay: {peer}: {e}; connection closed");
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Both directions of one connection; returns when both have ended (each
/// after a half close), or at the first error (then both sockets close).
/// The client's connect returned at once (the kernel answered it here), where
/// on a real link it takes a round trip: nothing arrives before it could
/// have there, the client's first bytes one RTT and a half after it
/// connected (`accepted`), the upstream's one RTT after.
async fn relay_connection(
    client: TcpStream,
    server: TcpStream,
    shape: Shape,
    accepted: Instant,
    stats: &Stats,
) -> io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let (up_tx, up_rx) = mpsc::channel(QUEUE);
    let (down_tx, down_rx) = mpsc::channel(QUEUE);
    let up_budget = Arc::new(Semaphore::new(IN_FLIGHT));
    let down_budget = Arc::new(Semaphore::new(IN_FLIGHT));
    tokio::try_join!(
        read_side(
            client_r,
            up_tx,
            shape.one_way(),
            accepted + shape.rtt + shape.one_way(),
            up_budget,
            "client"
        ),
        write_side(
            server_w,
            up_rx,
            shape.bytes_per_sec,
            &stats.up_bytes,
            "upstream"
        ),
        read_side(
            server_r,
            down_tx,
            shape.one_way(),
            accepted + shape.rtt,
            down_budget,
            "upstream"
        ),
        write_side(
            client_w,
            down_rx,
            shape.bytes_per_sec,
            &stats.down_bytes,
            "client"
        ),
    )?;
    Ok(())
}

/// What a reader hands its writer: data, or the sender's EOF, each due at
/// its stamp.
enum Item {
    Data(Instant, Vec<u8>, OwnedSemaphorePermit),
    Eof(Instant),
}

fn context(side: &str, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {side}: {e}"))
}

async fn read_side(
    mut r: impl AsyncRead + Unpin,
    tx: mpsc::Sender<Item>,
    delay: Duration,
    not_before: Instant,
    budget: Arc<Semaphore>,
    side: &str,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r
            .read(&mut buf)
            .await
            .map_err(|e| context(side, "reading from", e))?;
        let due = (Instant::now() + delay).max(not_before);
        if n == 0 {
            // The writer may be gone already (it failed): then so is the
            // connection, and try_join reports its error.
            let _ = tx.send(Item::Eof(due)).await;
            return Ok(());
        }
        // A copy of what was read, not the whole buffer: the budget counts
        // bytes, and tiny reads must not each hold 64 KiB.
        let chunk = buf[..n].to_vec();
        let permit = budget
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .map_err(|_| io::Error::other("relay budget closed"))?;
        if tx.send(Item::Data(due, chunk, permit)).await.is_err() {
            return Ok(());
        }
    }
}

async fn write_side(
    mut w: impl AsyncWrite + Unpin,
    mut rx: mpsc::Receiver<Item>,
    bytes_per_sec: u64,
    counter: &AtomicU64,
    side: &str,
) -> io::Result<()> {
    let mut bucket = Bucket::new(bytes_per_sec);
    let mut timer = Timer::default();
    while let Some(item) = rx.recv().await {
        match item {
            Item::Data(due, buf, permit) => {
                timer.sleep_until(due).await?;
                let step = if bytes_per_sec == 0 {
                    buf.len()
                } else {
                    PACE_SLICE
                };
                for slice in buf.chunks(step) {
                    timer.sleep_until(bucket.take(slice.len())).await?;
                    w.write_all(slice)
                        .await
                        .map_err(|e| context(side, "writing to", e))?;
                    counter.fetch_add(slice.len() as u64, Ordering::Relaxed);
                }
                drop(permit);
            }
            Item::Eof(due) => {
                timer.sleep_until(due).await?;
                w.shutdown()
                    .await
                    .map_err(|e| context(side, "half-closing", e))?;
                return Ok(());
            }
        }
    }
    // The reader ended without an EOF: it failed, and try_join has the
    // error.
    Ok(())
}

/// Sleeps to within tens of microseconds of a deadline (the timer slack),
/// on a timerfd the tokio reactor watches; made at the first sleep.
#[derive(Default)]
struct Timer(Option<AsyncFd<OwnedFd>>);

impl Timer {
    async fn sleep_until(&mut self, t: Instant) -> io::Result<()> {
        loop {
            let now = Instant::now();
            if t <= now {
                return Ok(());
            }
            let fd = match &mut self.0 {
                Some(fd) => fd,
                // SAFETY: the AsyncFd owns the OwnedFd: it stays open and
                // the same until the AsyncFd is dropped.
                None => self.0.insert(unsafe {
                    AsyncFd::register_with_interest(timerfd()?, Interest::READABLE)?
                }),
            };
            let left = t - now;
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: left.as_secs() as libc::time_t,
                    tv_nsec: left.subsec_nanos() as libc::c_long,
                },
            };
            // SAFETY: a timerfd we own; `spec` outlives the call; no old
            // value is asked for. Arming also clears earlier expirations.
            if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0
            {
                return Err(io::Error::last_os_error());
            }
            let mut ready = fd.readable().await?;
            let mut expirations = [0u8; 8];
            // WouldBlock: the readiness was an earlier expiration's; the
            // loop arms the timer again. Otherwise it expired.
            let _ = ready.try_io(|fd| {
                // SAFETY: reads at most 8 bytes into an 8-byte buffer.
                let n = unsafe {
                    libc::read(
                        fd.as_raw_fd(),
                        expirations.as_mut_ptr().cast(),
                        expirations.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
        }
    }
}

fn timerfd() -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; it returns a new descriptor or -1.
    let raw = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: timerfd_create just returned it; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A token bucket as a virtual clock: `free` is when the link has sent
/// everything so far. It may lag `now` by at most `burst` (the bucket's
/// size, 2 ms of the rate), which also makes up for wake-ups that come
/// late.
struct Bucket {
    bytes_per_sec: u64,
    burst: Duration,
    free: Instant,
}

impl Bucket {
    fn new(bytes_per_sec: u64) -> Bucket {
        Bucket {
            bytes_per_sec,
            burst: Duration::from_millis(2),
            free: Instant::now(),
        }
    }
    /// When `n` more bytes may go out (now when there is no cap).
    fn take(&mut self, n: usize) -> Instant {
        let now = Instant::now();
        if self.bytes_per_sec == 0 {
            return now;
        }
        let earliest = now.checked_sub(self.burst).unwrap_or(now);
        self.free =
            self.free.max(earliest) + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        self.free
    }
}
