//! The vhost-user virtio-fs device: serves the store view (`StoreFs`) to one
//! VMM (QEMU `vhost-user-fs-pci`, cloud-hypervisor `--fs`) over a unix
//! socket, with vhost-user-backend doing the protocol and a pool of worker
//! threads doing the FUSE requests.
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT): it is served on
//! its own vring thread, inline, so it never waits behind store fetches.
//! Queues 1..=N carry ordinary requests. Their vring thread serves a
//! request itself when the view can answer it without waiting for the
//! store (from memory or a local disk, as virtiofsd serves from its
//! thread), and hands it to the worker pool when it would wait (a remote
//! fetch), so one slow fetch stalls one worker, not the device. When more
//! requests are waiting and a worker is idle, it hands them out too, so a
//! deep queue uses every core.
mod fuse_init;
mod queue_poll;

use crate::host::socket::SocketError;
use crate::lock;
use crate::view::StoreFs;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use fuse_init::{grant_direct_io_mmap, peek_init, DIRECT_IO_ALLOW_MMAP, FUSE_INIT};
use queue_poll::PollWindow;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as ProtocolError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Length of the virtio-fs `tag` field in the device configuration space.
pub const TAG_LEN: usize = 36;
/// Most request queues: the vring threads' queue masks are 64-bit and
/// queue 0 is the high-priority queue.
pub const MAX_REQUEST_QUEUES: usize = 63;
/// Largest virtqueue the VMM may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// What `--print-capabilities` prints: the vhost-user backend conventions'
/// description for libvirt. No optional feature (migration, separate
/// options) is claimed because none is implemented.
pub const CAPABILITIES_JSON: &str = r#"{"type":"fs"}"#;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tag {0:?}: must be 1 to 36 bytes without NUL")]
    InvalidTag(String),
    #[error("{0} request queues: must be between 1 and {MAX_REQUEST_QUEUES}")]
    InvalidQueueCount(usize),
    // Causes are part of the message (not `source`), so `{:#}` does not
    // print them twice.
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
    #[error(transparent)]
    Socket(#[from] SocketError),
    // vhost_user_backend::Error is neither std::error::Error nor Sync,
    // so only its message is kept.
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// What the device offers the guest.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The name the guest mounts the file system by.
    pub tag: String,
    /// Request queues besides the high-priority queue.
    pub request_queues: usize,
    /// Worker threads serving the request queues.
    pub threads: usize,
    /// Longest a request queue's thread looks for the next request before
    /// it sleeps (adaptive, see [`queue_poll`]; zero: never).
    pub poll_max: Duration,
}

impl DeviceConfig {
    fn validate(&self) -> Result<(), Error> {
        check_tag(&self.tag)?;
        if self.request_queues == 0 || self.request_queues > MAX_REQUEST_QUEUES {
            return Err(Error::InvalidQueueCount(self.request_queues));
        }
        Ok(())
    }

    /// The virtio-fs configuration space: `tag` zero-padded to 36 bytes,
    /// then `num_request_queues` as le32.
    fn config_space(&self) -> Vec<u8> {
        let mut cfg = vec![0u8; TAG_LEN + 4];
        let tag = self.tag.as_bytes();
        let n = tag.len().min(TAG_LEN);
        cfg[..n].copy_from_slice(&tag[..n]);
        let queues = u32::try_from(self.request_queues).unwrap_or(u32::MAX);
        cfg[TAG_LEN..].copy_from_slice(&queues.to_le_bytes());
        cfg
    }
}

/// Checks a virtio-fs tag: the guest sees it as a NUL-padded 36-byte field.
pub fn check_tag(tag: &str) -> Result<(), Error> {
    if tag.is_empty() || tag.len() > TAG_LEN || tag.as_bytes().contains(&0) {
        return Err(Error::InvalidTag(tag.to_owned()));
    }
    Ok(())
}

type Mem = GuestMemoryMmap;
pub(crate) type FsServer = Server<Arc<StoreFs>>;

/// One descriptor chain on its way to a worker. It owns a reference to the
/// guest memory it was popped from, so a memory table update in between
/// cannot unmap its buffers.
struct Job {
    queue: usize,
    vring: VringRwLock,
    mem: Arc<Mem>,
    chain: DescriptorChain<Arc<Mem>>,
    /// The queue's count of chains handed to the pool, released when served.
    slots: Arc<Slots>,
    /// The guest had more chains queued behind this one when it was
    /// popped (see [`crate::view::inline::others_waiting`]).
    others_waiting: bool,
}

/// Chains of one request queue waiting for or held by a worker. A guest
/// can put the same head on the available ring again and again without
/// waiting for it, so what the pool holds is bounded by the queue's size:
/// past it the vring thread stops popping, and the worker that frees a
/// slot wakes it again (through the queue's kick eventfd).
#[derive(Default)]
struct Slots {
    in_flight: AtomicUsize,
    /// Chains popped from this queue, ever: which queues a guest used.
    popped: AtomicU64,
    /// The vring thread stopped popping for want of a slot.
    full: AtomicBool,
}

impl Slots {
    /// Takes a slot for one more chain, or says the queue must wait: the
    /// flag is raised before the count is read again, so a worker that
    /// frees a slot meanwhile either is seen here or sees the flag.
    fn take(&self, limit: usize) -> bool {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) < limit {
            return true;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.full.store(true, Ordering::SeqCst);
        if self.in_flight.load(Ordering::SeqCst) < limit {
            self.full.store(false, Ordering::SeqCst);
            return self.take(limit);
        }
        false
    }

    /// Gives a slot back; wakes the vring thread if it was waiting.
    fn give(&self, vring: &VringRwLock) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.full.swap(false, Ordering::SeqCst) {
            kick(vring);
        }
    }
}

/// Wakes the vring thread of `vring` as a guest notification would.
fn kick(vring: &VringRwLock) {
    let state = vring.get_ref();
    let Some(k) = state.get_kick() else { return };
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to the queue's kick
    // eventfd, which the vring state keeps open while we hold its lock.
    let n = unsafe { libc::write(k.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n != 8 {
        tracing::warn!(
            "cannot wake the queue's thread: {}",
            io::Error::last_os_error()
        );
    }
}

/// Workers the pool keeps however idle it is.
const MIN_WORKERS: usize = 2;
/// A worker beyond those idle this long exits.
const WORKER_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// The worker pool: grows while requests wait for the store and no
/// worker is free, up to its size, and shrinks again when idle, so an idle
/// daemon (most of a host's many) keeps few threads.
struct Pool {
    server: Arc<FsServer>,
    fs: Arc<StoreFs>,
    rx: Mutex<Receiver<Job>>,
    /// Workers waiting for a job.
    idle: AtomicUsize,
    alive: AtomicUsize,
    max: usize,
}

impl Pool {
    /// Starts one more worker, unless the pool is full.
    fn grow(self: &Arc<Self>) -> Result<(), Error> {
        let n = self.alive.fetch_add(1, Ordering::AcqRel);
        if n >= self.max {
            self.alive.fetch_sub(1, Ordering::AcqRel);
            return Ok(());
        }
        let pool = self.clone();
        std::thread::Builder::new()
            .name(format!("virtiofs-{n}"))
            .spawn(move || pool.work())
            .map(drop)
            .map_err(|e| {
                self.alive.fetch_sub(1, Ordering::AcqRel);
                Error::Thread(e)
            })
    }

    /// A worker: serves chains until it has been idle too long (and the
    /// pool has more than its minimum) or the backend goes away.
    fn work(&self) {
        loop {
            self.idle.fetch_add(1, Ordering::AcqRel);
            let job = lock(&self.rx).recv_timeout(WORKER_IDLE);
            self.idle.fetch_sub(1, Ordering::AcqRel);
            match job {
                Ok(job) => serve(&self.server, &self.fs, job),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let alive = self.alive.load(Ordering::Acquire);
                    if alive > MIN_WORKERS
                        && self
                            .alive
                            .compare_exchange(alive, alive - 1, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                    {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.alive.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
            }
        }
    }
}

/// The virtio-fs backend given to `VhostUserDaemon`.
pub struct FsBackend {
    server: Arc<FsServer>,
    fs: Arc<StoreFs>,
    pool: Arc<Pool>,
    config: DeviceConfig,
    config_space: Vec<u8>,
    mem: RwLock<GuestMemoryAtomic<Mem>>,
    event_idx: AtomicBool,
    /// A vring thread could not get an exit event: the daemon must then
    /// not be dropped, as that joins the vring threads.
    no_exit_event: AtomicBool,
    jobs: Sender<Job>,
    /// Per queue (index = queue number).
    slots: Vec<Arc<Slots>>,
    /// Per queue (index = queue number; the high-priority queue never polls).
    polls: Vec<Mutex<PollWindow>>,
}

impl FsBackend {
    /// Starts the worker pool; `mem` is the memory the daemon updates.
    fn new(
        fs: Arc<StoreFs>,
        config: DeviceConfig,
        mem: GuestMemoryAtomic<Mem>,
    ) -> Result<Self, Error> {
        config.validate()?;
        let server = Arc::new(Server::new(fs.clone()));
        let (jobs, rx) = mpsc::channel::<Job>();
        let pool = Arc::new(Pool {
            server: server.clone(),
            fs: fs.clone(),
            rx: Mutex::new(rx),
            idle: AtomicUsize::new(0),
            alive: AtomicUsize::new(0),
            max: config.threads.max(1),
        });
        for _ in 0..MIN_WORKERS.min(pool.max) {
            pool.grow()?;
        }
        let slots = (0..=config.request_queues)
            .map(|_| Arc::new(Slots::default()))
            .collect();
        let polls = (0..=config.request_queues)
            .map(|q| {
                let max = if q == 0 {
                    Duration::ZERO
                } else {
                    config.poll_max
                };
                Mutex::new(PollWindow::new(max))
            })
            .collect();
        Ok(Self {
            server,
            fs,
            pool,
            config_space: config.config_space(),
            config,
            mem: RwLock::new(mem),
            event_idx: AtomicBool::new(false),
            no_exit_event: AtomicBool::new(false),
            jobs,
            slots,
            polls,
        })
    }

    fn memory(&self) -> Arc<Mem> {
        let mem = self.mem.read().unwrap_or_else(|e| e.into_inner());
        mem.memory().into_inner()
    }

    /// Pops every available chain of `vring` and serves it: inline for the
    /// high-priority queue; for request queues inline unless it would wait
    /// for the store, or others are waiting and a worker is idle. Answers
    /// how many chains it popped, or None when it stopped because the pool
    /// holds a queue's worth of this queue's chains (a worker wakes the
    /// queue when one is served).
    fn drain(&self, vring: &VringRwLock, queue: usize) -> Option<usize> {
        let mem = self.memory();
        let Some(slots) = self.slots.get(queue).cloned() else {
            tracing::warn!("queue {queue}: no such queue");
            return None;
        };
        let limit = usize::from(vring.get_ref().get_queue().size()).max(1);
        let mut popped = 0;
        loop {
            if queue != 0 && !slots.take(limit) {
                return None;
            }
            // The write guard is a temporary of this statement: it must be
            // released before the chain is served, which locks the vring again.
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                if queue != 0 {
                    slots.in_flight.fetch_sub(1, Ordering::SeqCst);
                }
                return Some(popped);
            };
            popped += 1;
            slots.popped.fetch_add(1, Ordering::Relaxed);
            let more = queue != 0 && more_available(vring, &mem);
            let job = Job {
                queue,
                vring: vring.clone(),
                mem: mem.clone(),
                chain,
                slots: slots.clone(),
                others_waiting: more,
            };
            if queue == 0 {
                serve_here(&self.server, &self.fs, job);
                continue;
            }
            if more && self.pool.idle.load(Ordering::Acquire) > 0 {
                self.to_pool(job);
                continue;
            }
            let head = job.chain.head_index();
            let (served, deferred) = crate::view::inline::with_others_waiting(more, || {
                self.fs.attempt_inline(|| {
                    let mmap = self.fs.direct_io();
                    handle_chain(&self.server, &job.mem, job.chain.clone(), queue, mmap)
                })
            });
            if deferred {
                self.to_pool(job);
            } else {
                served.record(&self.fs);
                complete(&job.vring, head, served.len, queue);
                slots.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn to_pool(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            // Only possible if every worker is gone: still answer.
            serve_here(&self.server, &self.fs, job);
            return;
        }
        if self.pool.idle.load(Ordering::Acquire) == 0 {
            if let Err(e) = self.pool.grow() {
                tracing::warn!("worker pool: {e}");
            }
        }
    }
}

/// Whether the guest has made more chains available than were popped.
fn more_available(vring: &VringRwLock, mem: &Mem) -> bool {
    let state = vring.get_ref();
    let q = state.get_queue();
    q.avail_idx(mem, Ordering::Acquire)
        .map(|idx| idx.0 != q.next_avail())
        .unwrap_or(false)
}

/// Serves one chain on a worker, returns it to the guest and frees its slot.
fn serve(server: &FsServer, fs: &StoreFs, job: Job) {
    let head = job.chain.head_index();
    let served = crate::view::inline::with_others_waiting(job.others_waiting, || {
        handle_chain(server, &job.mem, job.chain, job.queue, fs.direct_io())
    });
    served.record(fs);
    complete(&job.vring, head, served.len, job.queue);
    job.slots.give(&job.vring);
}

/// Serves one chain on the vring thread itself: its slot (request queues)
/// is freed without waking the thread that is running it.
fn serve_here(server: &FsServer, fs: &StoreFs, job: Job) {
    let head = job.chain.head_index();
    let served = handle_chain(server, &job.mem, job.chain, job.queue, fs.direct_io());
    served.record(fs);
    complete(&job.vring, head, served.len, job.queue);
    if job.queue != 0 {
        job.slots.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs one FUSE request; returns the bytes written into the chain's
/// writable part, 0 when the chain is unusable or the request failed, so
/// the descriptor always goes back to the guest.
pub(crate) fn handle_chain(
    server: &FsServer,
    mem: &Mem,
    chain: DescriptorChain<Arc<Mem>>,
    queue: usize,
    direct_io_mmap: bool,
) -> Served {
    let t0 = std::time::Instant::now();
    let head = chain.head_index();
    let unusable = Served {
        len: 0,
        opcode: 0,
        errno: 0,
        took: std::time::Duration::ZERO,
    };
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("queue {queue}: descriptor chain {head}: unreadable: {e}");
            return unusable;
        }
    };
    // The header's opcode and, for INIT, the flags the guest offers, read
    // from a copy of the cursor.
    let (opcode, offered) = peek_init(reader.clone());
    let writer = match VirtioFsWriter::new(mem, chain.clone()) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("queue {queue}: descriptor chain {head}: unwritable: {e}");
            return unusable;
        }
    };
    // A panic would be a bug in one request; it must not take a worker
    // (or, for the high-priority queue, a vring thread) down.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        server.handle_message(reader, writer.into(), None, None)
    }));
    let len = match r {
        Ok(Ok(n)) => u32::try_from(n).unwrap_or_else(|_| {
            tracing::warn!("queue {queue}: reply of {n} bytes does not fit a used length");
            0
        }),
        Ok(Err(e)) => {
            tracing::debug!("queue {queue}: FUSE request: {e}");
            0
        }
        Err(_) => {
            tracing::error!("BUG: a virtio-fs request handler panicked");
            0
        }
    };
    let errno = if len >= 16 {
        reply_errno(mem, chain.clone())
    } else {
        0
    };
    if opcode == FUSE_INIT {
        tracing::debug!(
            "FUSE INIT: offered {offered:#x}, reply {len} bytes, errno {errno}, direct I/O {direct_io_mmap}"
        );
    }
    if opcode == FUSE_INIT && errno == 0 && direct_io_mmap && offered & DIRECT_IO_ALLOW_MMAP != 0 {
        grant_direct_io_mmap(mem, chain, len);
    }
    Served {
        len,
        opcode,
        errno,
        took: t0.elapsed(),
    }
}

/// One chain served: the used length, and what the metrics count.
pub(crate) struct Served {
    pub len: u32,
    opcode: u32,
    errno: i32,
    took: std::time::Duration,
}

impl Served {
    fn record(&self, fs: &StoreFs) {
        if self.opcode != 0 {
            let data = u64::from(self.len.saturating_sub(16));
            fs.metrics()
                .request(self.opcode, self.errno, self.took, data);
        }
    }
}

/// The errno of the reply the server wrote (its header's error field, a
/// negative errno, at the start of the first writable descriptor).
fn reply_errno(mem: &Mem, chain: DescriptorChain<Arc<Mem>>) -> i32 {
    use vm_memory::Bytes;
    let Some(d) = chain.into_iter().find(|d| d.is_write_only()) else {
        return 0;
    };
    let mut h = [0u8; 8];
    if d.len() < 8 || mem.read_slice(&mut h, d.addr()).is_err() {
        return 0;
    }
    i32::from_le_bytes([h[4], h[5], h[6], h[7]]).saturating_neg()
}

/// Puts a served chain on the used ring and notifies the guest if it asked
/// to be (EVENT_IDX) or always (without it). `add_used` and
/// `needs_notification` run under one lock so concurrent workers cannot
/// miss a notification.
fn complete(vring: &VringRwLock, head: u16, len: u32, queue: usize) {
    let mut state = vring.get_mut();
    if !state.get_queue().ready() {
        // The VMM stopped the queue while the request ran.
        tracing::debug!("queue {queue}: stopped; dropping the reply to chain {head}");
        return;
    }
    if let Err(e) = state.add_used(head, len) {
        tracing::warn!("queue {queue}: cannot return chain {head}: {e}");
        return;
    }
    let notify = state.needs_notification().unwrap_or_else(|e| {
        tracing::warn!("queue {queue}: reading used_event: {e}");
        true
    });
    if notify {
        if let Err(e) = state.signal_used_queue() {
            tracing::warn!("queue {queue}: cannot notify the guest: {e}");
        }
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1 + self.config.request_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // REPLY_ACK is added by the vhost crate itself.
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // An out-of-range read gets an empty answer, which the vhost crate
        // reports to the VMM as a failure.
        let start = offset as usize;
        start
            .checked_add(size as usize)
            .and_then(|end| self.config_space.get(start..end))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The virtio-fs configuration space is read-only: writes are
        // ignored, as a device does. An error here would end the vhost-user
        // connection, and with it the daemon.
        tracing::debug!("ignoring a {}-byte config write at {offset}", buf.len());
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Dropping the daemon joins its vring threads after signalling
        // these: without them, returning after a disconnect would hang.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!("vring thread {thread_index}: no exit event: {e}");
                self.no_exit_event.store(true, Ordering::Release);
                None
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // Thread 0: the high-priority queue; thread N: request queue N, so
        // a guest that spreads its requests over queues (one per vCPU) is
        // served by as many threads, besides the worker pool.
        std::iter::once(1)
            .chain((1..=self.config.request_queues).map(|q| 1u64 << q))
            .collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned here stop the vring thread for good, so problems
        // with one queue or chain are logged instead.
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            tracing::warn!("vring thread {thread_id}: unexpected event {device_event}");
            return Ok(());
        };
        // Each thread has one vring (`queues_per_thread`): thread N's is
        // queue N.
        if index != 0 {
            tracing::warn!("vring thread {thread_id}: unexpected event {device_event}");
            return Ok(());
        }
        let queue = thread_id;
        let Some(poll) = self.polls.get(queue) else {
            tracing::warn!("queue {queue}: no such queue");
            return Ok(());
        };
        let mut poll = lock(poll);
        poll.woke();
        let more = || more_available(vring, &self.memory());
        if !self.event_idx.load(Ordering::Acquire) {
            while self.drain(vring, queue).is_some_and(|n| poll.spin(n, more)) {}
            return Ok(());
        }
        // (A drain that stopped for want of slots is resumed by the worker
        // that frees one, through the kick eventfd.)
        // EVENT_IDX: no kicks while draining or polling; re-arm, and drain
        // again if the guest added chains in between.
        loop {
            if let Err(e) = vring.disable_notification() {
                tracing::warn!("queue {queue}: disabling notifications: {e}");
            }
            let Some(popped) = self.drain(vring, queue) else {
                break;
            };
            if poll.spin(popped, more) {
                continue;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!("queue {queue}: enabling notifications: {e}");
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Serves `fs` to the one VMM that connects to `listener`, until it
/// disconnects (`Ok`) or the vhost-user conversation fails. Blocks.
pub fn serve_one(
    fs: Arc<StoreFs>,
    config: DeviceConfig,
    listener: UnixListener,
) -> Result<(), Error> {
    // An inherited socket may be non-blocking; the daemon's accept loop
    // would then spin.
    listener
        .set_nonblocking(false)
        .map_err(|e| SocketError::BadFd {
            fd: listener.as_raw_fd(),
            reason: e.to_string(),
        })?;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(FsBackend::new(fs, config, mem.clone())?);
    let mut daemon = VhostUserDaemon::new("tvix-virtiofsd".to_owned(), backend.clone(), mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    let mut listener = Listener::from(listener);
    let result = daemon
        .start(&mut listener)
        .map_err(|e| Error::Daemon(e.to_string()))
        .and_then(|()| {
            tracing::info!("VMM connected");
            match daemon.wait() {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    ProtocolError::Disconnected | ProtocolError::PartialMessage,
                )) => {
                    tracing::info!("VMM disconnected");
                    Ok(())
                }
                Err(e) => Err(Error::Daemon(e.to_string())),
            }
        });
    let per_queue: Vec<String> = backend
        .slots
        .iter()
        .enumerate()
        .skip(1)
        .map(|(q, s)| format!("queue {q}: {}", s.popped.load(Ordering::Relaxed)))
        .collect();
    tracing::info!(
        "requests served per request queue: {}",
        per_queue.join(", ")
    );
    if backend.no_exit_event.load(Ordering::Acquire) {
        // Dropping would join a vring thread that cannot be told to stop;
        // the process is about to exit anyway.
        std::mem::forget(daemon);
    }
    result
}

#[cfg(test)]
mod tests;
