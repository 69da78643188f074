//! Daemon-level load generator for a vhost-user virtio-fs backend.
//!
//! This program is the vhost-user *frontend* (the part QEMU plays): it
//! connects to the daemon's socket, hands it a memfd as guest memory, lays
//! out two split virtqueues in it (0: high priority, set up but unused;
//! 1: requests) and then speaks FUSE over queue 1, without any guest kernel
//! in between. It measures the daemon, not a TCG guest.
//!
//! Workload, per pass: INIT (first pass only), LOOKUP of each name from
//! `--paths` under the root, then for every directory OPENDIR, READDIRPLUS
//! until empty, RELEASEDIR; GETATTR of every entry; for regular files (at
//! most `--max-files`) OPEN, READ of `--read-size` chunks to the end,
//! RELEASE. Up to `--depth` requests are in flight at once. Pass 1 runs on
//! a freshly started daemon ("cold"), pass 2 on the same connection again
//! ("warm"). No FORGETs are sent: lookup counts only grow.
//!
//! Replies: READDIRPLUS asks for one page (4 KiB) like the Linux client;
//! each chain's writable part is exactly header + what was asked for.
//! Reported: per op kind count, ops/s (count / pass wall time) and p50/p99
//! latency from making the chain available to seeing it used (it includes
//! queueing inside the daemon at depth > 1); per pass, all ops/s and MiB/s
//! = file bytes READ / pass wall time (metadata ops included in the time).
//! `SUMMARY` lines on stderr are for bench/vufs-load.sh.
//!
//! `--rss NAME=PID` (repeatable) reads `RssAnon` from `/proc/PID/status`
//! after each pass, while the connection is still up (a vhost-user daemon
//! exits when its frontend goes), and reports it as `rss_NAME_kb=` in the
//! pass's `SUMMARY` (-1 when the process is gone). `--linger SECS` stays
//! connected and idle that long after the last pass and reads it again
//! (`LINGER` line): what the daemon holds at rest after the walk.
//!
//! Usage: cargo bench --bench vufs_load -- --socket S --paths FILE
//! [--depth N] [--read-size BYTES] [--max-files N] [--label TEXT]
//! [--passes N] [--poll] [--rss NAME=PID]... [--linger SECS]
//!
//! By default the generator sleeps on the call eventfd like a guest waits
//! for its interrupt, so its own wake-up latency is part of every
//! latency; `--poll` spins on the used ring instead (costs a CPU).
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use fuse_backend_rs::abi::fuse_abi::{
    Attr, AttrOut, Direntplus, EntryOut, FsOptions, GetattrIn, InHeader, InitIn, InitIn2, InitOut,
    Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn,
};
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read as _, Write as _};
use std::os::fd::RawFd;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MEM_SIZE: usize = 256 << 20;
const QUEUE_SIZE: u16 = 1024;
/// Guest-physical offsets of the two queues' rings (each below 64 KiB).
const QUEUE_BASE: [u64; 2] = [0, 0x1_0000];
const DESC_OFF: u64 = 0;
const AVAIL_OFF: u64 = 0x4000;
const USED_OFF: u64 = 0x5000;
/// Request buffers start here.
const BUF_BASE: u64 = 1 << 20;
/// Bytes for a request (header + args; LOOKUP names are at most 255 bytes).
const IN_SIZE: u64 = 4096;
/// READDIRPLUS reply size: one page, as the Linux FUSE client asks for.
const DIR_BUF: u64 = 4096;
/// Reply room for the fixed-size replies (entry, attr, open, init).
const SMALL_REPLY: u64 = 256;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const REQUEST_QUEUE: usize = 1;
const ROOT: u64 = 1;
const IN_HDR: usize = std::mem::size_of::<InHeader>();
const OUT_HDR: usize = std::mem::size_of::<OutHeader>();

struct Args {
    socket: String,
    paths: String,
    depth: usize,
    read_size: u32,
    max_files: usize,
    label: String,
    passes: usize,
    poll: bool,
    /// (name, pid) whose RssAnon is read after each pass.
    rss: Vec<(String, u32)>,
    /// Seconds to stay connected, idle, after the last pass; the RssAnon
    /// of `rss` is read again at the end (what a daemon keeps at rest).
    linger: u64,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        socket: String::new(),
        paths: String::new(),
        depth: 1,
        read_size: 128 << 10,
        max_files: usize::MAX,
        label: "daemon".into(),
        passes: 2,
        poll: false,
        rss: Vec::new(),
        linger: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        // `cargo bench` appends `--bench`; ignore it.
        if k == "--bench" {
            continue;
        }
        let mut v = || it.next().ok_or_else(|| anyhow!("{k} needs a value"));
        match k.as_str() {
            "--socket" => a.socket = v()?,
            "--paths" => a.paths = v()?,
            "--depth" => a.depth = v()?.parse().context("--depth")?,
            "--read-size" => a.read_size = v()?.parse().context("--read-size")?,
            "--max-files" => a.max_files = v()?.parse().context("--max-files")?,
            "--label" => a.label = v()?,
            "--passes" => a.passes = v()?.parse().context("--passes")?,
            "--poll" => a.poll = true,
            "--linger" => a.linger = v()?.parse().context("--linger")?,
            "--rss" => {
                let v = v()?;
                let (name, pid) = v
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--rss wants NAME=PID, not {v:?}"))?;
                ensure!(
                    !name.is_empty() && !name.contains([' ', '=']),
                    "--rss: bad name {name:?}"
                );
                a.rss
                    .push((name.to_string(), pid.parse().context("--rss PID")?));
            }
            _ => bail!("unknown argument {k:?}"),
        }
    }
    ensure!(!a.socket.is_empty(), "--socket is required");
    ensure!(!a.paths.is_empty(), "--paths is required");
    ensure!(
        (1..=usize::from(QUEUE_SIZE / 2)).contains(&a.depth),
        "--depth must be 1..={}",
        QUEUE_SIZE / 2
    );
    ensure!(
        a.read_size > 0 && a.read_size <= 1 << 20,
        "--read-size must be 1..=1048576"
    );
    Ok(a)
}

/// The guest memory: a shared memfd mapping the daemon maps too.
struct GuestMem {
    ptr: *mut u8,
    len: usize,
    fd: OwnedFd,
}

impl GuestMem {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: the name is a valid NUL-terminated string.
        let raw = unsafe { libc::memfd_create(c"vufs-load-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: memfd_create just returned this fd, nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error()).context("ftruncate");
        }
        // SAFETY: a fresh shared mapping of our own memfd; no Rust object
        // aliases it, and it is unmapped only in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap");
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            fd,
        })
    }

    fn check(&self, gpa: u64, len: usize) -> Result<usize> {
        let start = usize::try_from(gpa)?;
        ensure!(
            start.checked_add(len).is_some_and(|e| e <= self.len),
            "guest access {gpa:#x}+{len} out of bounds"
        );
        Ok(start)
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let start = self.check(gpa, data.len())?;
        // SAFETY: bounds checked above; the daemon only writes buffers we
        // have handed it, never the ones we write here.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(start), data.len()) };
        Ok(())
    }

    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<()> {
        let start = self.check(gpa, out.len())?;
        // SAFETY: bounds checked above; the buffer was returned to us on
        // the used ring, so the daemon no longer writes it.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(start), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// A ring index field shared with the daemon.
    fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16> {
        let start = self.check(gpa, 2)?;
        ensure!(start % 2 == 0, "unaligned ring index at {gpa:#x}");
        // SAFETY: in bounds, aligned, and the mapping lives as long as self;
        // the daemon accesses these fields atomically too.
        Ok(unsafe { &*self.ptr.add(start).cast::<AtomicU16>() })
    }

    fn host_addr(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from our successful mmap.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn obj<T: ByteValued + Default>(b: &[u8]) -> Result<T> {
    let mut t = T::default();
    let n = std::mem::size_of::<T>();
    let src = b
        .get(..n)
        .ok_or_else(|| anyhow!("reply too short: {} < {n} bytes", b.len()))?;
    t.as_mut_slice().copy_from_slice(src);
    Ok(t)
}

/// One split virtqueue, driver side.
struct Queue {
    base: u64,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl Queue {
    fn set_desc(
        &self,
        mem: &GuestMem,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        mem.write(self.base + DESC_OFF + 16 * u64::from(i), &d)
    }

    /// Makes `head` available (kicks are batched by the caller).
    fn push(&mut self, mem: &GuestMem, head: u16) -> Result<()> {
        let slot = u64::from(self.next_avail % QUEUE_SIZE);
        mem.write(self.base + AVAIL_OFF + 4 + 2 * slot, &head.to_le_bytes())?;
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        mem.atomic_u16(self.base + AVAIL_OFF + 2)?
            .store(self.next_avail.to_le(), Ordering::Release);
        Ok(())
    }

    /// Used elements not seen yet, as (head, written length).
    fn pop_used(&mut self, mem: &GuestMem, out: &mut Vec<(u32, u32)>) -> Result<()> {
        let used = u16::from_le(
            mem.atomic_u16(self.base + USED_OFF + 2)?
                .load(Ordering::Acquire),
        );
        fence(Ordering::Acquire);
        while self.last_used != used {
            let slot = u64::from(self.last_used % QUEUE_SIZE);
            let mut e = [0u8; 8];
            mem.read(self.base + USED_OFF + 4 + 8 * slot, &mut e)?;
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            out.push((id, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(())
    }
}

/// vhost-user requests this frontend sends (numbers from the vhost-user
/// specification).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const MSG_VERSION: u32 = 0x1;
const MSG_REPLY: u32 = 0x4;
const MSG_NEED_REPLY: u32 = 0x8;

/// The vhost-user control connection, frontend side. (The `vhost` crate's
/// `Frontend` needs its `vhost-user-frontend` feature, which this crate
/// does not enable; the few messages needed are encoded here.)
struct VuConn {
    sock: UnixStream,
    reply_ack: bool,
}

impl VuConn {
    fn send(&mut self, req: u32, body: &[u8], fds: &[RawFd]) -> Result<()> {
        let needs_ack =
            self.reply_ack && !matches!(req, GET_FEATURES | GET_PROTOCOL_FEATURES | GET_QUEUE_NUM);
        let flags = MSG_VERSION | if needs_ack { MSG_NEED_REPLY } else { 0 };
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&req.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        if fds.is_empty() {
            self.sock.write_all(&msg)?;
        } else {
            let n = self
                .sock
                .send_with_fds(&[msg.as_slice()], fds)
                .map_err(|e| anyhow!("sendmsg: {e}"))?;
            ensure!(n == msg.len(), "short sendmsg: {n} of {}", msg.len());
        }
        if needs_ack {
            let ack = self.reply(req)?;
            ensure!(ack == 0, "request {req}: backend answered {ack}");
        }
        Ok(())
    }

    /// Reads a u64 reply to `req`.
    fn reply(&mut self, req: u32) -> Result<u64> {
        let mut h = [0u8; 12];
        self.sock
            .read_exact(&mut h)
            .with_context(|| format!("reply to request {req}"))?;
        let code = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let flags = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let size = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        ensure!(
            code == req && flags & MSG_REPLY != 0 && size == 8,
            "bad reply to request {req}: {code} {flags:#x} {size}"
        );
        let mut b = [0u8; 8];
        self.sock.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn get_u64(&mut self, req: u32) -> Result<u64> {
        self.send(req, &[], &[])?;
        self.reply(req)
    }

    fn vring_state(&mut self, req: u32, index: u32, num: u32) -> Result<()> {
        let mut b = index.to_le_bytes().to_vec();
        b.extend_from_slice(&num.to_le_bytes());
        self.send(req, &b, &[])
    }
}

fn le64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Connects and sets the device up the way QEMU does for vhost-user-fs.
fn setup(socket: &str, mem: &GuestMem) -> Result<(VuConn, Vec<Queue>)> {
    let sock = UnixStream::connect(socket).with_context(|| format!("connect {socket}"))?;
    let mut c = VuConn {
        sock,
        reply_ack: false,
    };
    let offered = c.get_u64(GET_FEATURES).context("GET_FEATURES")?;
    let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    ensure!(
        offered & VIRTIO_F_VERSION_1 != 0,
        "backend lacks VIRTIO_F_VERSION_1"
    );
    ensure!(
        offered & proto != 0,
        "backend lacks VHOST_USER_F_PROTOCOL_FEATURES"
    );
    let pf = VhostUserProtocolFeatures::from_bits_truncate(
        c.get_u64(GET_PROTOCOL_FEATURES)
            .context("GET_PROTOCOL_FEATURES")?,
    );
    ensure!(
        pf.contains(VhostUserProtocolFeatures::MQ),
        "backend lacks MQ"
    );
    let want = pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
    c.send(SET_PROTOCOL_FEATURES, &want.bits().to_le_bytes(), &[])
        .context("SET_PROTOCOL_FEATURES")?;
    c.reply_ack = want.contains(VhostUserProtocolFeatures::REPLY_ACK);
    let nq = c.get_u64(GET_QUEUE_NUM).context("GET_QUEUE_NUM")?;
    ensure!(nq >= 2, "backend has {nq} queues, need 2");
    c.send(SET_OWNER, &[], &[]).context("SET_OWNER")?;
    c.send(
        SET_FEATURES,
        &(VIRTIO_F_VERSION_1 | proto).to_le_bytes(),
        &[],
    )
    .context("SET_FEATURES")?;
    // One region: guest-physical 0.., backed by the memfd from offset 0.
    let mut table = 1u32.to_le_bytes().to_vec();
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend(le64s(&[0, mem.len as u64, mem.ptr as u64, 0]));
    c.send(SET_MEM_TABLE, &table, &[mem.fd.as_raw_fd()])
        .context("SET_MEM_TABLE")?;
    let mut queues = Vec::new();
    for (i, base) in QUEUE_BASE.iter().enumerate() {
        let q = Queue {
            base: *base,
            next_avail: 0,
            last_used: 0,
            kick: EventFd::new(EFD_NONBLOCK).context("eventfd")?,
            call: EventFd::new(0).context("eventfd")?,
        };
        let i = i as u32;
        c.vring_state(SET_VRING_NUM, i, QUEUE_SIZE.into())
            .context("SET_VRING_NUM")?;
        c.vring_state(SET_VRING_BASE, i, 0)
            .context("SET_VRING_BASE")?;
        // index, flags, then desc/used/avail/log addresses: vhost-user ring
        // addresses are frontend virtual addresses.
        let mut addr = i.to_le_bytes().to_vec();
        addr.extend_from_slice(&0u32.to_le_bytes());
        addr.extend(le64s(&[
            mem.host_addr(q.base + DESC_OFF),
            mem.host_addr(q.base + USED_OFF),
            mem.host_addr(q.base + AVAIL_OFF),
            0,
        ]));
        c.send(SET_VRING_ADDR, &addr, &[])
            .context("SET_VRING_ADDR")?;
        c.send(
            SET_VRING_CALL,
            &u64::from(i).to_le_bytes(),
            &[q.call.as_raw_fd()],
        )
        .context("SET_VRING_CALL")?;
        c.send(
            SET_VRING_KICK,
            &u64::from(i).to_le_bytes(),
            &[q.kick.as_raw_fd()],
        )
        .context("SET_VRING_KICK")?;
        c.vring_state(SET_VRING_ENABLE, i, 1)
            .context("SET_VRING_ENABLE")?;
        queues.push(q);
    }
    Ok((c, queues))
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Op {
    Init,
    Lookup,
    Getattr,
    Opendir,
    Readdirplus,
    Releasedir,
    Open,
    Read,
    Release,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Init => "INIT",
            Op::Lookup => "LOOKUP",
            Op::Getattr => "GETATTR",
            Op::Opendir => "OPENDIR",
            Op::Readdirplus => "READDIRPLUS",
            Op::Releasedir => "RELEASEDIR",
            Op::Open => "OPEN",
            Op::Read => "READ",
            Op::Release => "RELEASE",
        }
    }

    fn opcode(self) -> Opcode {
        match self {
            Op::Init => Opcode::Init,
            Op::Lookup => Opcode::Lookup,
            Op::Getattr => Opcode::Getattr,
            Op::Opendir => Opcode::Opendir,
            Op::Readdirplus => Opcode::Readdirplus,
            Op::Releasedir => Opcode::Releasedir,
            Op::Open => Opcode::Open,
            Op::Read => Opcode::Read,
            Op::Release => Opcode::Release,
        }
    }
}

/// A unit of work with at most one request in flight.
#[derive(Debug)]
enum Job {
    Init,
    Lookup(Vec<u8>),
    Getattr(u64),
    Dir {
        node: u64,
        fh: Option<u64>,
        off: u64,
        done: bool,
    },
    File {
        node: u64,
        size: u64,
        fh: Option<u64>,
        off: u64,
        done: bool,
    },
}

const S_IFMT: u32 = libc::S_IFMT;

impl Job {
    fn from_attr(node: u64, attr: &Attr) -> Option<Job> {
        match attr.mode & S_IFMT {
            libc::S_IFDIR => Some(Job::Dir {
                node,
                fh: None,
                off: 0,
                done: false,
            }),
            libc::S_IFREG => Some(Job::File {
                node,
                size: attr.size,
                fh: None,
                off: 0,
                done: false,
            }),
            _ => None,
        }
    }

    /// The next request: (op, nodeid, args).
    fn request(&self, read_size: u32) -> (Op, u64, Vec<u8>) {
        match self {
            Job::Init => {
                let flags = FsOptions::ASYNC_READ
                    | FsOptions::DO_READDIRPLUS
                    | FsOptions::BIG_WRITES
                    | FsOptions::MAX_PAGES
                    | FsOptions::INIT_EXT;
                let bits = flags.bits();
                let init = InitIn {
                    major: 7,
                    minor: 33,
                    max_readahead: 128 << 10,
                    flags: bits as u32,
                };
                let init2 = InitIn2 {
                    flags2: (bits >> 32) as u32,
                    unused: [0; 11],
                };
                let mut a = init.as_slice().to_vec();
                a.extend_from_slice(init2.as_slice());
                (Op::Init, 0, a)
            }
            Job::Lookup(name) => {
                let mut a = name.clone();
                a.push(0);
                (Op::Lookup, ROOT, a)
            }
            Job::Getattr(node) => (Op::Getattr, *node, GetattrIn::default().as_slice().to_vec()),
            Job::Dir { node, fh: None, .. } => {
                let o = OpenIn {
                    flags: libc::O_RDONLY as u32 | libc::O_DIRECTORY as u32,
                    fuse_flags: 0,
                };
                (Op::Opendir, *node, o.as_slice().to_vec())
            }
            Job::Dir {
                node,
                fh: Some(fh),
                off,
                done: false,
            } => {
                let r = ReadIn {
                    fh: *fh,
                    offset: *off,
                    size: DIR_BUF as u32,
                    ..Default::default()
                };
                (Op::Readdirplus, *node, r.as_slice().to_vec())
            }
            Job::Dir {
                node,
                fh: Some(fh),
                done: true,
                ..
            } => {
                let r = ReleaseIn {
                    fh: *fh,
                    flags: libc::O_RDONLY as u32,
                    ..Default::default()
                };
                (Op::Releasedir, *node, r.as_slice().to_vec())
            }
            Job::File { node, fh: None, .. } => {
                let o = OpenIn {
                    flags: libc::O_RDONLY as u32,
                    fuse_flags: 0,
                };
                (Op::Open, *node, o.as_slice().to_vec())
            }
            Job::File {
                node,
                fh: Some(fh),
                off,
                done: false,
                ..
            } => {
                let r = ReadIn {
                    fh: *fh,
                    offset: *off,
                    size: read_size,
                    flags: libc::O_RDONLY as u32,
                    ..Default::default()
                };
                (Op::Read, *node, r.as_slice().to_vec())
            }
            Job::File {
                node,
                fh: Some(fh),
                done: true,
                ..
            } => {
                let r = ReleaseIn {
                    fh: *fh,
                    flags: libc::O_RDONLY as u32,
                    ..Default::default()
                };
                (Op::Release, *node, r.as_slice().to_vec())
            }
        }
    }
}

/// What the pass collects.
#[derive(Default)]
struct Stats {
    lat: BTreeMap<Op, Vec<u64>>,
    bytes_read: u64,
    entries: u64,
    files: usize,
    wall: Duration,
}

struct Slot {
    job: Job,
    op: Op,
    unique: u64,
    out_len: u64,
    start: Instant,
}

struct Runner<'a> {
    mem: &'a GuestMem,
    q: &'a mut Queue,
    args: &'a Args,
    unique: u64,
    slot_size: u64,
}

impl Runner<'_> {
    fn in_gpa(&self, slot: usize) -> u64 {
        BUF_BASE + slot as u64 * self.slot_size
    }

    /// Runs `jobs` to completion with up to `depth` requests in flight.
    fn run(&mut self, jobs: Vec<Job>, depth: usize, stats: &mut Stats) -> Result<()> {
        let mut ready: VecDeque<Job> = jobs.into();
        let mut slots: Vec<Option<Slot>> = (0..depth).map(|_| None).collect();
        let mut free: Vec<usize> = (0..depth).rev().collect();
        let mut used = Vec::new();
        let t0 = Instant::now();
        loop {
            let mut pushed = false;
            while let (Some(_), false) = (ready.front(), free.is_empty()) {
                let (Some(job), Some(s)) = (ready.pop_front(), free.pop()) else {
                    break;
                };
                self.unique += 1;
                let (op, node, args) = job.request(self.args.read_size);
                let hdr = InHeader {
                    len: (IN_HDR + args.len()) as u32,
                    opcode: op.opcode() as u32,
                    unique: self.unique,
                    nodeid: node,
                    ..Default::default()
                };
                let in_gpa = self.in_gpa(s);
                self.mem.write(in_gpa, hdr.as_slice())?;
                self.mem.write(in_gpa + IN_HDR as u64, &args)?;
                let d = (2 * s) as u16;
                self.q
                    .set_desc(self.mem, d, in_gpa, hdr.len, VIRTQ_DESC_F_NEXT, d + 1)?;
                // The writable part is exactly header + the payload asked
                // for, as the Linux client sizes it: virtiofsd reads
                // into the whole buffer and fails a READ with EIO when
                // the file has more data than asked for.
                let payload = match op {
                    Op::Read => u64::from(self.args.read_size),
                    Op::Readdirplus => DIR_BUF,
                    _ => SMALL_REPLY,
                };
                let out_len = OUT_HDR as u64 + payload;
                self.q.set_desc(
                    self.mem,
                    d + 1,
                    in_gpa + IN_SIZE,
                    out_len as u32,
                    VIRTQ_DESC_F_WRITE,
                    0,
                )?;
                slots[s] = Some(Slot {
                    job,
                    op,
                    unique: self.unique,
                    out_len,
                    start: Instant::now(),
                });
                self.q.push(self.mem, d)?;
                pushed = true;
            }
            if pushed {
                self.q.kick.write(1).context("kick")?;
            }
            if free.len() == depth {
                break;
            }
            used.clear();
            self.q.pop_used(self.mem, &mut used)?;
            if used.is_empty() {
                if self.args.poll {
                    std::hint::spin_loop();
                } else {
                    // Blocks until the daemon signals; a stale count only
                    // causes one extra look at the used ring.
                    self.q.call.read().context("waiting for the call eventfd")?;
                }
                continue;
            }
            let now = Instant::now();
            for &(id, len) in &used {
                ensure!(
                    id % 2 == 0 && (id / 2) < depth as u32,
                    "daemon returned unknown head {id}"
                );
                let s = (id / 2) as usize;
                let slot = slots[s]
                    .take()
                    .ok_or_else(|| anyhow!("head {id} returned twice"))?;
                free.push(s);
                stats
                    .lat
                    .entry(slot.op)
                    .or_default()
                    .push((now - slot.start).as_nanos() as u64);
                let len = len as usize;
                ensure!(
                    len >= OUT_HDR && len as u64 <= slot.out_len,
                    "{}: used length {len}",
                    slot.op.name()
                );
                let mut reply = vec![0u8; len];
                self.mem.read(self.in_gpa(s) + IN_SIZE, &mut reply)?;
                let oh: OutHeader = obj(&reply)?;
                ensure!(
                    oh.unique == slot.unique,
                    "{}: reply for unique {} to request {}",
                    slot.op.name(),
                    oh.unique,
                    slot.unique
                );
                ensure!(
                    oh.len as usize == len,
                    "{}: header length {} != used length {len}",
                    slot.op.name(),
                    oh.len
                );
                if oh.error != 0 {
                    bail!(
                        "{} {:?}: {}",
                        slot.op.name(),
                        slot.job,
                        std::io::Error::from_raw_os_error(-oh.error)
                    );
                }
                let (next, spawned) = self.complete(slot.job, &reply[OUT_HDR..], stats)?;
                if let Some(n) = next {
                    ready.push_front(n);
                }
                ready.extend(spawned);
            }
        }
        stats.wall += t0.elapsed();
        Ok(())
    }

    /// Digests a reply body: the job's next step and any new jobs.
    fn complete(
        &self,
        job: Job,
        body: &[u8],
        stats: &mut Stats,
    ) -> Result<(Option<Job>, Vec<Job>)> {
        let mut spawn = Vec::new();
        let child = |node: u64, attr: &Attr, stats: &mut Stats, spawn: &mut Vec<Job>| {
            spawn.push(Job::Getattr(node));
            match Job::from_attr(node, attr) {
                Some(Job::File { .. }) if stats.files >= self.args.max_files => {}
                Some(j) => {
                    if matches!(j, Job::File { .. }) {
                        stats.files += 1;
                    }
                    spawn.push(j);
                }
                None => {}
            }
        };
        let next = match job {
            Job::Init => {
                let out: InitOut = obj(body)?;
                ensure!(out.major == 7, "INIT: major {}", out.major);
                None
            }
            Job::Lookup(_) => {
                let e: EntryOut = obj(body)?;
                ensure!(e.nodeid != 0, "LOOKUP: negative entry");
                child(e.nodeid, &e.attr, stats, &mut spawn);
                None
            }
            Job::Getattr(_) => {
                let _: AttrOut = obj(body)?;
                None
            }
            Job::Dir { node, fh: None, .. } => {
                let o: OpenOut = obj(body)?;
                Some(Job::Dir {
                    node,
                    fh: Some(o.fh),
                    off: 0,
                    done: false,
                })
            }
            Job::Dir {
                node,
                fh: Some(fh),
                off,
                done: false,
            } => {
                let mut rest = body;
                let mut off = off;
                let mut any = false;
                let hdr = std::mem::size_of::<Direntplus>();
                while !rest.is_empty() {
                    let d: Direntplus = obj(rest)?;
                    let namelen = d.dirent.namelen as usize;
                    let name = rest
                        .get(hdr..hdr + namelen)
                        .ok_or_else(|| anyhow!("READDIRPLUS: entry name past the reply"))?;
                    let rec = (hdr + namelen).next_multiple_of(8);
                    rest = rest.get(rec..).unwrap_or(&[]);
                    any = true;
                    off = d.dirent.off;
                    stats.entries += 1;
                    if name == b"." || name == b".." || d.entry_out.nodeid == 0 {
                        continue;
                    }
                    child(d.entry_out.nodeid, &d.entry_out.attr, stats, &mut spawn);
                }
                Some(Job::Dir {
                    node,
                    fh: Some(fh),
                    off,
                    done: !any,
                })
            }
            Job::Dir { done: true, .. } => None,
            Job::File {
                node,
                size,
                fh: None,
                ..
            } => {
                let o: OpenOut = obj(body)?;
                Some(Job::File {
                    node,
                    size,
                    fh: Some(o.fh),
                    off: 0,
                    done: size == 0,
                })
            }
            Job::File {
                node,
                size,
                fh: Some(fh),
                off,
                done: false,
            } => {
                ensure!(
                    body.len() <= self.args.read_size as usize,
                    "READ: {} bytes > asked",
                    body.len()
                );
                stats.bytes_read += body.len() as u64;
                let off = off + body.len() as u64;
                let done = body.is_empty() || off >= size;
                Some(Job::File {
                    node,
                    size,
                    fh: Some(fh),
                    off,
                    done,
                })
            }
            Job::File { done: true, .. } => None,
        };
        Ok((next, spawn))
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// `RssAnon` of a process in KiB, or None when it is gone.
fn rss_anon_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let names: Vec<Vec<u8>> = std::fs::read_to_string(&args.paths)
        .with_context(|| format!("reading {}", args.paths))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect();
    ensure!(!names.is_empty(), "{}: no names", args.paths);
    let mem = GuestMem::new(MEM_SIZE)?;
    let out_size = (u64::from(args.read_size).max(DIR_BUF) + OUT_HDR as u64).next_multiple_of(4096);
    let slot_size = IN_SIZE + out_size;
    ensure!(
        BUF_BASE + slot_size * args.depth as u64 <= MEM_SIZE as u64,
        "depth {} x {slot_size} bytes does not fit guest memory",
        args.depth
    );
    let (_conn, mut queues) = setup(&args.socket, &mem)?;
    let q = queues
        .get_mut(REQUEST_QUEUE)
        .ok_or_else(|| anyhow!("no request queue"))?;
    let mut r = Runner {
        mem: &mem,
        q,
        args: &args,
        unique: 0,
        slot_size,
    };
    r.run(vec![Job::Init], 1, &mut Stats::default())?;

    println!(
        "\n### {}: depth {}, read size {} KiB, max files {}, completions by {}\n",
        args.label,
        args.depth,
        args.read_size >> 10,
        if args.max_files == usize::MAX {
            "all".to_string()
        } else {
            args.max_files.to_string()
        },
        if args.poll { "polling" } else { "call eventfd" }
    );
    println!("| pass | op | count | ops/s | p50 µs | p99 µs |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    let mut summaries = Vec::new();
    for pass in 0..args.passes {
        let pname = if pass == 0 {
            "cold".to_string()
        } else {
            format!(
                "warm{}",
                if args.passes > 2 {
                    pass.to_string()
                } else {
                    String::new()
                }
            )
        };
        let mut st = Stats::default();
        let jobs = names.iter().cloned().map(Job::Lookup).collect();
        r.run(jobs, args.depth, &mut st)?;
        let secs = st.wall.as_secs_f64().max(1e-9);
        let mut total = 0usize;
        let mut all = Vec::new();
        for (op, lat) in st.lat.iter_mut() {
            lat.sort_unstable();
            total += lat.len();
            all.extend_from_slice(lat);
            println!(
                "| {pname} | {} | {} | {:.0} | {:.1} | {:.1} |",
                op.name(),
                lat.len(),
                lat.len() as f64 / secs,
                pct(lat, 0.5),
                pct(lat, 0.99)
            );
        }
        all.sort_unstable();
        let mib = st.bytes_read as f64 / (1 << 20) as f64;
        println!(
            "| {pname} | **all** ({} entries, {} files, {:.1} MiB in {:.2} s = {:.1} MiB/s) | {total} | {:.0} | {:.1} | {:.1} |",
            st.entries,
            st.files,
            mib,
            secs,
            mib / secs,
            total as f64 / secs,
            pct(&all, 0.5),
            pct(&all, 0.99)
        );
        let mut rss = String::new();
        for (name, pid) in &args.rss {
            let kb = rss_anon_kb(*pid);
            if kb.is_none() {
                eprintln!("vufs_load: cannot read RssAnon of {name} (pid {pid}): gone?");
            }
            rss.push_str(&format!(" rss_{name}_kb={}", kb.map_or(-1, |k| k as i64)));
        }
        if !rss.is_empty() {
            println!("| {pname} | RssAnon kB after the pass:{rss} | | | | |");
        }
        let read = st.lat.get(&Op::Read).map(Vec::as_slice).unwrap_or(&[]);
        summaries.push(format!(
            "SUMMARY label={} depth={} pass={pname} ops_per_s={:.0} mib_per_s={:.1} read_p50_us={:.1} read_p99_us={:.1} all_p50_us={:.1} all_p99_us={:.1} ops={total} secs={secs:.3}{rss}",
            args.label.replace(' ', "_"),
            args.depth,
            total as f64 / secs,
            mib / secs,
            pct(read, 0.5),
            pct(read, 0.99),
            pct(&all, 0.5),
            pct(&all, 0.99),
        ));
    }
    if args.linger > 0 {
        std::thread::sleep(std::time::Duration::from_secs(args.linger));
        let rss: Vec<String> = args
            .rss
            .iter()
            .map(|(name, pid)| {
                let kb = rss_anon_kb(*pid).map_or(-1, |k| k as i64);
                format!("rss_{name}_kb={kb}")
            })
            .collect();
        summaries.push(format!(
            "LINGER label={} secs={} {}",
            args.label.replace(' ', "_"),
            args.linger,
            rss.join(" ")
        ));
    }
    println!();
    for s in summaries {
        eprintln!("{s}");
    }
    Ok(())
}
