//! The vhost-user frontend (the part QEMU plays) that the load generator
//! and the hostile-guest tests drive: a memfd as guest memory, split
//! virtqueues laid out in it (the high-priority queue and one or more
//! request queues), the handshake QEMU does for vhost-user-fs.
//! Shared through `#[path]` (a benches/ subdirectory is not a target).
#![allow(dead_code)]
use anyhow::{anyhow, ensure, Context as _, Result};
use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use std::io::{Read as _, Write as _};
use std::os::fd::RawFd;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const MEM_SIZE: usize = 256 << 20;
pub const QUEUE_SIZE: u16 = 1024;
/// Guest-physical room of one queue's rings: queue `i` starts at
/// `i * QUEUE_STRIDE` (its rings end below 64 KiB).
pub const QUEUE_STRIDE: u64 = 0x1_0000;
pub const DESC_OFF: u64 = 0;
pub const AVAIL_OFF: u64 = 0x4000;
pub const USED_OFF: u64 = 0x5000;
/// Request buffers start here.
pub const BUF_BASE: u64 = 1 << 20;
/// Most request queues whose rings fit below `BUF_BASE` (besides queue 0).
pub const MAX_REQUEST_QUEUES: usize = (BUF_BASE / QUEUE_STRIDE) as usize - 1;
/// Bytes for a request (header + args; LOOKUP names are at most 255 bytes).
pub const IN_SIZE: u64 = 4096;
/// READDIRPLUS reply size: one page, as the Linux FUSE client asks for.
pub const DIR_BUF: u64 = 4096;
/// Reply room for the fixed-size replies (entry, attr, open, init).
pub const SMALL_REPLY: u64 = 256;
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const REQUEST_QUEUE: usize = 1;
pub const ROOT: u64 = 1;
pub const IN_HDR: usize = std::mem::size_of::<InHeader>();
pub const OUT_HDR: usize = std::mem::size_of::<OutHeader>();

/// The guest memory: a shared memfd mapping the daemon maps too.
pub struct GuestMem {
    pub ptr: *mut u8,
    pub len: usize,
    pub fd: OwnedFd,
}

impl GuestMem {
    pub fn new(len: usize) -> Result<Self> {
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

    pub fn check(&self, gpa: u64, len: usize) -> Result<usize> {
        let start = usize::try_from(gpa)?;
        ensure!(
            start.checked_add(len).is_some_and(|e| e <= self.len),
            "guest access {gpa:#x}+{len} out of bounds"
        );
        Ok(start)
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let start = self.check(gpa, data.len())?;
        // SAFETY: bounds checked above; the daemon only writes buffers we
        // have handed it, never the ones we write here.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(start), data.len()) };
        Ok(())
    }

    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<()> {
        let start = self.check(gpa, out.len())?;
        // SAFETY: bounds checked above; the buffer was returned to us on
        // the used ring, so the daemon no longer writes it.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(start), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// A ring index field shared with the daemon.
    pub fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16> {
        let start = self.check(gpa, 2)?;
        ensure!(start % 2 == 0, "unaligned ring index at {gpa:#x}");
        // SAFETY: in bounds, aligned, and the mapping lives as long as self;
        // the daemon accesses these fields atomically too.
        Ok(unsafe { &*self.ptr.add(start).cast::<AtomicU16>() })
    }

    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from our successful mmap.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub fn obj<T: ByteValued + Default>(b: &[u8]) -> Result<T> {
    let mut t = T::default();
    let n = std::mem::size_of::<T>();
    let src = b
        .get(..n)
        .ok_or_else(|| anyhow!("reply too short: {} < {n} bytes", b.len()))?;
    t.as_mut_slice().copy_from_slice(src);
    Ok(t)
}

/// One split virtqueue, driver side.
pub struct Queue {
    pub base: u64,
    pub next_avail: u16,
    pub last_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl Queue {
    pub fn set_desc(
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
    pub fn push(&mut self, mem: &GuestMem, head: u16) -> Result<()> {
        let slot = u64::from(self.next_avail % QUEUE_SIZE);
        mem.write(self.base + AVAIL_OFF + 4 + 2 * slot, &head.to_le_bytes())?;
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        mem.atomic_u16(self.base + AVAIL_OFF + 2)?
            .store(self.next_avail.to_le(), Ordering::Release);
        Ok(())
    }

    /// Used elements not seen yet, as (head, written length).
    pub fn pop_used(&mut self, mem: &GuestMem, out: &mut Vec<(u32, u32)>) -> Result<()> {
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
pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const MSG_VERSION: u32 = 0x1;
pub const MSG_REPLY: u32 = 0x4;
pub const MSG_NEED_REPLY: u32 = 0x8;

/// The vhost-user control connection, frontend side. (The `vhost` crate's
/// `Frontend` needs its `vhost-user-frontend` feature, which this crate
/// does not enable; the few messages needed are encoded here.)
pub struct VuConn {
    pub sock: UnixStream,
    pub reply_ack: bool,
}

impl VuConn {
    pub fn send(&mut self, req: u32, body: &[u8], fds: &[RawFd]) -> Result<()> {
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
    pub fn reply(&mut self, req: u32) -> Result<u64> {
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

    pub fn get_u64(&mut self, req: u32) -> Result<u64> {
        self.send(req, &[], &[])?;
        self.reply(req)
    }

    pub fn vring_state(&mut self, req: u32, index: u32, num: u32) -> Result<()> {
        let mut b = index.to_le_bytes().to_vec();
        b.extend_from_slice(&num.to_le_bytes());
        self.send(req, &b, &[])
    }
}

pub fn le64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Connects and sets the device up the way QEMU does for vhost-user-fs,
/// with one request queue: queues 0 (high priority) and 1.
pub fn setup(socket: &str, mem: &GuestMem) -> Result<(VuConn, Vec<Queue>)> {
    setup_queues(socket, mem, 1)
}

/// As `setup`, with `request_queues` request queues (1..=`request_queues`,
/// each its own rings and kick/call eventfds); the backend must offer them.
pub fn setup_queues(
    socket: &str,
    mem: &GuestMem,
    request_queues: usize,
) -> Result<(VuConn, Vec<Queue>)> {
    ensure!(
        (1..=MAX_REQUEST_QUEUES).contains(&request_queues),
        "{request_queues} request queues: must be 1..={MAX_REQUEST_QUEUES}"
    );
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
    let need = 1 + request_queues as u64;
    ensure!(
        nq >= need,
        "backend offers {nq} queues (GET_QUEUE_NUM), need {need}: the high-priority queue and \
         {request_queues} request queue(s){}",
        if request_queues > 1 {
            format!(" (tvix-virtiofsd: start `virtiofs` with --request-queues {request_queues})")
        } else {
            String::new()
        }
    );
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
    for i in 0..=request_queues {
        let q = Queue {
            base: i as u64 * QUEUE_STRIDE,
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
