//! Daemon-level load generator for a vhost-user virtio-fs backend.
//!
//! This program is the vhost-user *frontend* (the part QEMU plays): it
//! connects to the daemon's socket, hands it a memfd as guest memory, lays
//! out split virtqueues in it (0: high priority, set up but unused;
//! 1..=`--queues`: requests) and then speaks FUSE over the request queues,
//! without any guest kernel in between. It measures the daemon, not a TCG
//! guest.
//!
//! With `--queues N` (default 1; the daemon must offer N request queues:
//! tvix-virtiofsd `virtiofs --request-queues N`) the in-flight requests are
//! spread the way Linux 6.11+ spreads FUSE requests over virtio-fs request
//! queues: by the CPU the request is issued on. Each of the `--depth`
//! request slots stands for one guest thread with one request outstanding,
//! and thread `s` runs on vCPU `s % N`, so slot `s` always uses queue
//! `1 + s % N` (a thread's successive requests stay on its vCPU's queue,
//! as a guest's do while the scheduler leaves it there). Not round-robin
//! per request: at depth 1 a guest's one walking thread uses one queue, not
//! all of them in turn. Completions are collected from every queue.
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
//! Reported: per op kind count, ops/s (count / pass wall time) and p50/p99/max
//! latency from making the chain available to seeing it used (it includes
//! queueing inside the daemon at depth > 1); per pass, all ops/s and MiB/s
//! = file bytes READ / pass wall time (metadata ops included in the time).
//! `SUMMARY` lines on stderr are for bench/vufs-load.sh.
//!
//! `--rss NAME=PID` (repeatable) reads `RssAnon` from `/proc/PID/status`
//! after each pass, while the connection is still up (a vhost-user daemon
//! exits when its frontend goes), and reports it as `rss_NAME_kb=` in the
//! pass's `SUMMARY` (-1 when the process is gone), and the CPU time it
//! used during the pass (user + system, all threads) as `cpu_NAME_ms=`. `--linger SECS` stays
//! connected and idle that long after the last pass and reads it again
//! (`LINGER` line): what the daemon holds at rest after the walk.
//!
//! Usage: cargo bench --bench vufs_load -- --socket S --paths FILE
//! [--depth N] [--read-size BYTES] [--max-files N] [--label TEXT]
//! [--passes N] [--poll] [--queues N] [--rss NAME=PID]... [--linger SECS]
//!
//! By default the generator sleeps on the call eventfd like a guest waits
//! for its interrupt (on all request queues' call eventfds at once, with
//! poll(2), when there are several), so its own wake-up latency is part of
//! every latency; `--poll` spins on the used rings instead (costs a CPU).
//! With several queues the table gets a row per pass with the requests
//! completed on each queue, and `SUMMARY` a `queue_ops=` field (comma
//! separated, queue 1 first).
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use fuse_backend_rs::abi::fuse_abi::{
    Attr, AttrOut, Direntplus, EntryOut, FsOptions, GetattrIn, InHeader, InitIn, InitIn2, InitOut,
    Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn,
};
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};
use vm_memory::ByteValued;

#[path = "common/frontend.rs"]
mod frontend;
use frontend::*;

struct Args {
    socket: String,
    paths: String,
    depth: usize,
    read_size: u32,
    max_files: usize,
    label: String,
    passes: usize,
    poll: bool,
    /// Request queues (1..=queues) the requests are spread over.
    queues: usize,
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
        queues: 1,
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
            "--queues" => a.queues = v()?.parse().context("--queues")?,
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
    ensure!(
        (1..=MAX_REQUEST_QUEUES).contains(&a.queues),
        "--queues must be 1..={MAX_REQUEST_QUEUES}"
    );
    Ok(a)
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
    /// Requests completed per request queue (index 0: queue 1).
    per_queue: Vec<u64>,
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
    /// The request queues, queue 1 first.
    qs: &'a mut [Queue],
    args: &'a Args,
    unique: u64,
    slot_size: u64,
}

impl Runner<'_> {
    fn in_gpa(&self, slot: usize) -> u64 {
        BUF_BASE + slot as u64 * self.slot_size
    }

    /// The request queue (index into `qs`) slot `slot` uses: its guest
    /// thread's vCPU's (see the module comment).
    fn queue_of(&self, slot: usize) -> usize {
        slot % self.qs.len()
    }

    /// Blocks until some request queue's call eventfd is signalled and
    /// clears the signalled ones. A stale count only causes one extra look
    /// at the used rings.
    fn wait_calls(&self) -> Result<()> {
        if let [q] = &*self.qs {
            q.call.read().context("waiting for the call eventfd")?;
            return Ok(());
        }
        let mut fds: Vec<libc::pollfd> = self
            .qs
            .iter()
            .map(|q| libc::pollfd {
                fd: q.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        loop {
            // SAFETY: fds is a valid array of fds.len() pollfds that
            // outlives the call; the eventfds are open (owned by qs).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("poll on the call eventfds");
            }
        }
        for (q, p) in self.qs.iter().zip(&fds) {
            ensure!(
                p.revents & (libc::POLLERR | libc::POLLNVAL) == 0,
                "poll: call eventfd {}: revents {:#x}",
                p.fd,
                p.revents
            );
            if p.revents & libc::POLLIN != 0 {
                // Readable: this read does not block (only we read it).
                q.call.read().context("reading a call eventfd")?;
            }
        }
        Ok(())
    }

    /// Runs `jobs` to completion with up to `depth` requests in flight.
    fn run(&mut self, jobs: Vec<Job>, depth: usize, stats: &mut Stats) -> Result<()> {
        let mut ready: VecDeque<Job> = jobs.into();
        let mut slots: Vec<Option<Slot>> = (0..depth).map(|_| None).collect();
        let mut free: Vec<usize> = (0..depth).rev().collect();
        let mut used = Vec::new();
        let mut pushed = vec![false; self.qs.len()];
        let mut first = 0;
        if stats.per_queue.len() < self.qs.len() {
            stats.per_queue.resize(self.qs.len(), 0);
        }
        let t0 = Instant::now();
        loop {
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
                // Slot s owns descriptors 2s and 2s + 1 of its queue's
                // table (depth <= QUEUE_SIZE / 2).
                let qi = self.queue_of(s);
                let d = (2 * s) as u16;
                self.qs[qi].set_desc(self.mem, d, in_gpa, hdr.len, VIRTQ_DESC_F_NEXT, d + 1)?;
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
                self.qs[qi].set_desc(
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
                self.qs[qi].push(self.mem, d)?;
                pushed[qi] = true;
            }
            for (q, p) in self.qs.iter().zip(pushed.iter_mut()) {
                if std::mem::take(p) {
                    q.kick.write(1).context("kick")?;
                }
            }
            if free.len() == depth {
                break;
            }
            // Each round starts at the next queue: the slots freed last are
            // reused first, and a fixed order would favour the last queue's
            // whenever fewer jobs are ready than slots are free.
            let n = self.qs.len();
            first = (first + 1) % n;
            let mut any = false;
            for qi in (0..n).map(|k| (first + k) % n) {
                used.clear();
                self.qs[qi].pop_used(self.mem, &mut used)?;
                any |= !used.is_empty();
                self.collect(qi, &used, depth, &mut slots, &mut free, &mut ready, stats)?;
            }
            if !any {
                if self.args.poll {
                    std::hint::spin_loop();
                } else {
                    // Blocks until the daemon signals.
                    self.wait_calls()?;
                }
            }
        }
        stats.wall += t0.elapsed();
        Ok(())
    }

    /// Digests the chains `used` the daemon returned on request queue `qi`
    /// (index into `qs`): frees their slots, queues the jobs' next steps.
    #[allow(clippy::too_many_arguments)]
    fn collect(
        &self,
        qi: usize,
        used: &[(u32, u32)],
        depth: usize,
        slots: &mut [Option<Slot>],
        free: &mut Vec<usize>,
        ready: &mut VecDeque<Job>,
        stats: &mut Stats,
    ) -> Result<()> {
        if used.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        for &(id, len) in used {
            ensure!(
                id % 2 == 0 && (id / 2) < depth as u32 && self.queue_of((id / 2) as usize) == qi,
                "daemon returned unknown head {id} on queue {}",
                qi + 1
            );
            stats.per_queue[qi] += 1;
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

/// CPU time (user + system, all threads) a process has used, in ms, or
/// None when it is gone.
fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th, stime the 13th.
    let mut f = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: u64 = f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()?
        .max(1);
    Some(ticks * 1000 / hz)
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
    let (_conn, mut queues) = setup_queues(&args.socket, &mem, args.queues)?;
    let qs = queues
        .get_mut(REQUEST_QUEUE..)
        .filter(|qs| qs.len() == args.queues)
        .ok_or_else(|| anyhow!("no request queues"))?;
    let mut r = Runner {
        mem: &mem,
        qs,
        args: &args,
        unique: 0,
        slot_size,
    };
    r.run(vec![Job::Init], 1, &mut Stats::default())?;

    println!(
        "\n### {}: depth {}, read size {} KiB, max files {}, completions by {}{}\n",
        args.label,
        args.depth,
        args.read_size >> 10,
        if args.max_files == usize::MAX {
            "all".to_string()
        } else {
            args.max_files.to_string()
        },
        if args.poll { "polling" } else { "call eventfd" },
        // One queue: the header as before this option existed.
        if args.queues > 1 {
            format!(", {} request queues", args.queues)
        } else {
            String::new()
        }
    );
    println!("| pass | op | count | ops/s | p50 µs | p99 µs | max µs |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
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
        let cpu0: Vec<Option<u64>> = args.rss.iter().map(|(_, pid)| cpu_ms(*pid)).collect();
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
                "| {pname} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} |",
                op.name(),
                lat.len(),
                lat.len() as f64 / secs,
                pct(lat, 0.5),
                pct(lat, 0.99),
                pct(lat, 1.0)
            );
        }
        all.sort_unstable();
        let mib = st.bytes_read as f64 / (1 << 20) as f64;
        println!(
            "| {pname} | **all** ({} entries, {} files, {:.1} MiB in {:.2} s = {:.1} MiB/s) | {total} | {:.0} | {:.1} | {:.1} | {:.1} |",
            st.entries,
            st.files,
            mib,
            secs,
            mib / secs,
            total as f64 / secs,
            pct(&all, 0.5),
            pct(&all, 0.99),
            pct(&all, 1.0)
        );
        let mut rss = String::new();
        for (name, pid) in &args.rss {
            let kb = rss_anon_kb(*pid);
            if kb.is_none() {
                eprintln!("vufs_load: cannot read RssAnon of {name} (pid {pid}): gone?");
            }
            rss.push_str(&format!(" rss_{name}_kb={}", kb.map_or(-1, |k| k as i64)));
        }
        for ((name, pid), before) in args.rss.iter().zip(&cpu0) {
            let used = before.zip(cpu_ms(*pid)).map(|(a, b)| b.saturating_sub(a));
            rss.push_str(&format!(
                " cpu_{name}_ms={}",
                used.map_or(-1, |ms| ms as i64)
            ));
        }
        if !rss.is_empty() {
            println!("| {pname} | RssAnon kB after the pass, CPU ms during it:{rss} | | | | | |");
        }
        let mut queue_ops = String::new();
        if args.queues > 1 {
            let counts: Vec<String> = st.per_queue.iter().map(u64::to_string).collect();
            let rows: Vec<String> = counts
                .iter()
                .enumerate()
                .map(|(i, n)| format!("queue {}: {n}", i + 1))
                .collect();
            println!(
                "| {pname} | requests completed per queue: {} | | | | | |",
                rows.join(", ")
            );
            queue_ops = format!(" queue_ops={}", counts.join(","));
        }
        let read = st.lat.get(&Op::Read).map(Vec::as_slice).unwrap_or(&[]);
        summaries.push(format!(
            "SUMMARY label={} depth={} pass={pname} ops_per_s={:.0} mib_per_s={:.1} read_p50_us={:.1} read_p99_us={:.1} all_p50_us={:.1} all_p99_us={:.1} all_max_us={:.1} ops={total} secs={secs:.3}{rss}{queue_ops}",
            args.label.replace(' ', "_"),
            args.depth,
            total as f64 / secs,
            mib / secs,
            pct(read, 0.5),
            pct(read, 0.99),
            pct(&all, 0.5),
            pct(&all, 0.99),
            pct(&all, 1.0),
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
