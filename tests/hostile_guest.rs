//! A hostile guest against the real `virtiofs` daemon process, through the
//! vhost-user frontend the load generator uses (benches/common/frontend.rs:
//! guest memory, split virtqueues, QEMU's handshake): malformed descriptor
//! chains, wrong FUSE lengths and opcodes, unknown inodes and handles, INIT
//! twice, a huge READ, opens without release, a million lookups of store
//! paths that do not exist. The daemon answers every chain, writes nothing
//! outside the chains' writable buffers, keeps serving both queues, holds
//! at most `--max-handles`, and its private memory stays under 64 MiB.
mod common;
#[path = "../benches/common/frontend.rs"]
mod frontend;

use common::cli_ok;
use frontend::*;
use std::time::{Duration, Instant};
use tvix_virtiofsd::fuzz::{cstr, fuse_msg, read_in};

const IN_BUF: u64 = 0x20_0000;
const OUT_BUF: u64 = 0x30_0000;
const OUT_LEN: u32 = 0x1_0000;
/// Never handed to the daemon: must read back as it was written.
const CANARY: u64 = 0x80_0000;
const CANARY_LEN: usize = 1 << 20;

/// A descriptor: guest address, length, flags.
type Desc = (u64, u32, u16);

/// A chain of descriptors in slots 0.., made available on `q`; answers its
/// used length once the daemon returns it.
fn submit(mem: &GuestMem, q: &mut Queue, descs: &[Desc]) -> u32 {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let next = if i + 1 < descs.len() { i as u16 + 1 } else { 0 };
        q.set_desc(mem, i as u16, addr, len, flags, next).unwrap();
    }
    q.push(mem, 0).unwrap();
    q.kick.write(1).unwrap();
    wait_used(mem, q)
}

fn wait_used(mem: &GuestMem, q: &mut Queue) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut used = Vec::new();
    loop {
        q.pop_used(mem, &mut used).unwrap();
        if let Some(&(id, len)) = used.first() {
            assert_eq!(id, 0, "another head came back");
            return len;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never returned the chain"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A well-formed request: `msg` readable, 64 KiB writable; answers the
/// reply's error field (0 or -errno) and the reply.
fn request(mem: &GuestMem, q: &mut Queue, msg: &[u8]) -> (i32, Vec<u8>) {
    mem.write(IN_BUF, msg).unwrap();
    let len = submit(
        mem,
        q,
        &[
            (IN_BUF, msg.len() as u32, VIRTQ_DESC_F_NEXT),
            (OUT_BUF, OUT_LEN, VIRTQ_DESC_F_WRITE),
        ],
    );
    let mut reply = vec![0u8; len as usize];
    mem.read(OUT_BUF, &mut reply).unwrap();
    let err = if reply.len() >= 16 {
        i32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]])
    } else {
        i32::MIN
    };
    (err, reply)
}

fn rss_anon_kib(pid: u32) -> u64 {
    common::status_bytes(pid, "RssAnon") >> 10
}

const LOOKUPS: u64 = 1_000_000;
const BATCH: u64 = 256;
/// Where batched requests and replies go: 256 bytes each.
const BATCH_IN: u64 = 0x100_0000;
const BATCH_OUT: u64 = 0x110_0000;

/// LOOKUPs of `BATCH` absent store paths from `first` on, all made
/// available before one kick; each must answer ENOENT (or a negative entry).
fn lookup_batch(mem: &GuestMem, q: &mut Queue, first: u64) {
    for k in 0..BATCH {
        let i = first + k;
        let msg = fuse_msg(1, 10_000 + i, ROOT, &cstr(&format!("{i:0>32}-absent")));
        let (inp, out) = (BATCH_IN + 256 * k, BATCH_OUT + 256 * k);
        mem.write(inp, &msg).unwrap();
        let head = 2 * k as u16;
        q.set_desc(
            mem,
            head,
            inp,
            msg.len() as u32,
            VIRTQ_DESC_F_NEXT,
            head + 1,
        )
        .unwrap();
        q.set_desc(mem, head + 1, out, 256, VIRTQ_DESC_F_WRITE, 0)
            .unwrap();
        q.push(mem, head).unwrap();
    }
    q.kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut used = Vec::new();
    while (used.len() as u64) < BATCH {
        q.pop_used(mem, &mut used).unwrap();
        assert!(
            Instant::now() < deadline,
            "lookups from {first} not all answered"
        );
        std::thread::yield_now();
    }
    for &(head, len) in &used {
        let mut reply = [0u8; 16];
        assert!(len >= 16, "reply of {len} bytes");
        mem.read(BATCH_OUT + 256 * u64::from(head / 2), &mut reply)
            .unwrap();
        let e = i32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
        assert!(
            e == -libc::ENOENT || e == 0,
            "LOOKUP {}: {e}",
            first + u64::from(head / 2)
        );
    }
}

/// The sandboxed process that serves the guest: the daemon's child.
fn serving_pid(daemon: &std::process::Child) -> u32 {
    let pid = daemon.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        if let Some(kid) = kids.split_whitespace().next() {
            return kid.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "the daemon never forked");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_socket(sock: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The inode LOOKUP answers for `name` below the root.
fn lookup(mem: &GuestMem, q: &mut Queue, name: &str) -> u64 {
    let (e, reply) = request(mem, q, &fuse_msg(1, 2, ROOT, &cstr(name)));
    assert_eq!(e, 0, "LOOKUP {name}");
    u64::from_le_bytes(reply[16..24].try_into().unwrap())
}

/// Imports `data` as a file and answers its store path's name.
fn import(store: &str, dir: &std::path::Path, file: &str, data: &[u8]) -> String {
    let f = dir.join(file);
    std::fs::write(&f, data).unwrap();
    let path =
        String::from_utf8(cli_ok(&["--store", store, "import", f.to_str().unwrap()])).unwrap();
    path.trim().strip_prefix("/nix/store/").unwrap().to_string()
}

/// Descriptors of the spooled remote blobs a process holds.
fn spooled_blobs(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains("memfd:tvix-blob"))
        .count()
}

/// Many handles on one remote file (no host cache, so each open blob is
/// fetched into this process) hold one copy of it, not one per handle: a
/// 2 MiB blob held in memory and a 6 MiB one spooled to a memory file,
/// each opened 200 times and read through every handle.
#[test]
fn handles_on_one_remote_blob_share_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("local://{}", dir.path().join("store").display());
    let small_data = common::pseudo_random(2 << 20, 1);
    let large_data = common::pseudo_random(6 << 20, 2);
    let small = import(&store, dir.path(), "small", &small_data);
    let large = import(&store, dir.path(), "large", &large_data);
    let grpc = dir.path().join("store.sock");
    let remote = common::Daemon::start(&store, &format!("unix:{}", grpc.display()), &[]);
    let sock = dir.path().join("vfs.sock");
    let log = dir.path().join("daemon.log");
    let mut daemon = common::spawn_virtiofs(&remote.addr, &sock, &log, &["--max-handles", "1000"]);
    wait_socket(&sock);
    let mem = GuestMem::new(MEM_SIZE).unwrap();
    let (conn, mut queues) = setup(sock.to_str().unwrap(), &mem).unwrap();
    let serving = serving_pid(&daemon);
    let mut q = queues.remove(REQUEST_QUEUE);
    let (e, _) = request(&mem, &mut q, &tvix_virtiofsd::fuzz::init_message());
    assert_eq!(e, 0, "INIT");
    let before = rss_anon_kib(serving);
    for (name, data) in [(&small, &small_data), (&large, &large_data)] {
        let ino = lookup(&mem, &mut q, name);
        for i in 0..200u64 {
            let (e, reply) = request(&mem, &mut q, &fuse_msg(14, 100 + i, ino, &[0u8; 8]));
            assert_eq!(e, 0, "OPEN {name}");
            let fh = u64::from_le_bytes(reply[16..24].try_into().unwrap());
            let at = (i * 4093) as usize % (data.len() - 4096);
            let (e, reply) = request(
                &mem,
                &mut q,
                &fuse_msg(15, 1000 + i, ino, &read_in(fh, at as u64, 4096)),
            );
            assert_eq!(e, 0, "READ {name}");
            assert!(reply[16..] == data[at..at + 4096], "{name} at {at}");
        }
    }
    let grown = rss_anon_kib(serving).saturating_sub(before);
    let spooled = spooled_blobs(serving);
    eprintln!(
        "400 handles on two remote blobs: RssAnon grew {grown} KiB, {spooled} spooled blob(s)"
    );
    assert_eq!(spooled, 1, "the 6 MiB blob is spooled once");
    assert!(grown < 32 << 10, "RssAnon grew {grown} KiB");
    drop(conn);
    let status = common::vm::wait_exit(&mut daemon, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

#[test]
fn a_hostile_guest_gets_errors_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("local://{}", dir.path().join("store").display());
    let f = dir.path().join("hello");
    std::fs::write(&f, b"hello, guest\n").unwrap();
    let path = String::from_utf8(cli_ok(&["--store", &store, "import", f.to_str().unwrap()]))
        .unwrap()
        .trim()
        .to_string();
    let name = path.strip_prefix("/nix/store/").unwrap().to_string();
    let sock = dir.path().join("vfs.sock");
    let log = dir.path().join("daemon.log");
    let mut daemon = common::spawn_virtiofs(
        &store,
        &sock,
        &log,
        &["--max-handles", "1000", "--thread-pool-size", "4"],
    );
    wait_socket(&sock);
    let mem = GuestMem::new(MEM_SIZE).unwrap();
    let canary: Vec<u8> = (0..CANARY_LEN).map(|i| (i * 7 + 3) as u8).collect();
    mem.write(CANARY, &canary).unwrap();
    let (conn, mut queues) = setup(sock.to_str().unwrap(), &mem).unwrap();
    let serving = serving_pid(&daemon);
    let mut q = queues.remove(REQUEST_QUEUE);
    let mut hiprio = queues.remove(0);

    // Requests before INIT, then INIT twice.
    let (e, _) = request(&mem, &mut q, &fuse_msg(3, 1, ROOT, &[0u8; 16]));
    assert!(e <= 0, "GETATTR before INIT: {e}");
    for _ in 0..2 {
        let (e, _) = request(&mem, &mut q, &tvix_virtiofsd::fuzz::init_message());
        assert_eq!(e, 0, "INIT");
    }

    // Malformed chains: each comes back (length 0), nothing else happens.
    let lookup = fuse_msg(1, 2, ROOT, &cstr(&name));
    mem.write(IN_BUF, &lookup).unwrap();
    let n = lookup.len() as u32;
    let (r, w, nx) = (0u16, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT);
    let cases: Vec<(&str, Vec<Desc>)> = vec![
        (
            "beyond guest memory",
            vec![(MEM_SIZE as u64 + 4096, n, nx), (OUT_BUF, OUT_LEN, w)],
        ),
        (
            "a wrapping address",
            vec![(u64::MAX - 8, n, nx), (OUT_BUF, OUT_LEN, w)],
        ),
        ("zero lengths", vec![(IN_BUF, 0, nx), (OUT_BUF, 0, w)]),
        (
            "no writable buffer",
            vec![(IN_BUF, n, nx), (OUT_BUF, OUT_LEN, r)],
        ),
        (
            "writable before readable",
            vec![(OUT_BUF, OUT_LEN, w | nx), (IN_BUF, n, r)],
        ),
        (
            "a header cut short",
            vec![(IN_BUF, 20, nx), (OUT_BUF, OUT_LEN, w)],
        ),
    ];
    for (what, descs) in &cases {
        let len = submit(&mem, &mut q, descs);
        assert!(len <= OUT_LEN, "{what}: used length {len}");
    }
    // a loop: the second descriptor points back at the first
    q.set_desc(&mem, 0, IN_BUF, n, nx, 1).unwrap();
    q.set_desc(&mem, 1, OUT_BUF, OUT_LEN, w | nx, 0).unwrap();
    q.push(&mem, 0).unwrap();
    q.kick.write(1).unwrap();
    assert!(wait_used(&mem, &mut q) <= OUT_LEN, "a loop");
    // a chain longer than the queue: QUEUE_SIZE + 1 linked descriptors
    for i in 0..QUEUE_SIZE {
        q.set_desc(&mem, i, IN_BUF, 1, nx, (i + 1) % QUEUE_SIZE)
            .unwrap();
    }
    q.push(&mem, 0).unwrap();
    q.kick.write(1).unwrap();
    wait_used(&mem, &mut q);

    // Wrong FUSE lengths and opcodes, unknown inodes and handles.
    let mut long = lookup.clone();
    long[0..4].copy_from_slice(&4096u32.to_le_bytes());
    let (e, _) = request(&mem, &mut q, &long);
    assert!(e < 0, "header longer than the buffer: {e}");
    let (e, _) = request(&mem, &mut q, &fuse_msg(9999, 3, ROOT, &[]));
    assert_eq!(e, -libc::ENOSYS, "unknown opcode");
    let (e, _) = request(&mem, &mut q, &fuse_msg(3, 4, 777_777, &[0u8; 16]));
    assert_eq!(e, -libc::ENOENT, "unknown inode");
    let (e, _) = request(
        &mem,
        &mut q,
        &fuse_msg(15, 5, ROOT, &read_in(424_242, 0, u32::MAX)),
    );
    assert!(e < 0, "READ of an unknown handle, u32::MAX bytes: {e}");

    // The real file still reads, then a huge READ of it is cut to the file.
    let (e, reply) = request(&mem, &mut q, &lookup);
    assert_eq!(e, 0, "LOOKUP");
    let ino = u64::from_le_bytes(reply[16..24].try_into().unwrap());
    let (e, reply) = request(&mem, &mut q, &fuse_msg(14, 6, ino, &[0u8; 8]));
    assert_eq!(e, 0, "OPEN");
    let fh = u64::from_le_bytes(reply[16..24].try_into().unwrap());
    let (e, reply) = request(
        &mem,
        &mut q,
        &fuse_msg(15, 7, ino, &read_in(fh, 0, u32::MAX)),
    );
    assert_eq!(e, 0, "READ");
    assert_eq!(&reply[16..], b"hello, guest\n");

    // Opens without release: the bound holds (ENFILE), memory does not grow.
    let mut refused = 0;
    for i in 0..1100u64 {
        let (e, _) = request(&mem, &mut q, &fuse_msg(14, 100 + i, ino, &[0u8; 8]));
        match e {
            0 => {}
            e if e == -libc::ENFILE => refused += 1,
            e => panic!("OPEN: {e}"),
        }
    }
    assert_eq!(refused, 101, "1,000 handles at most (one was open already)");

    // A million lookups of distinct store paths that do not exist (each a
    // store query), 256 chains in flight at a time.
    let t0 = Instant::now();
    for batch in 0..LOOKUPS / BATCH {
        lookup_batch(&mem, &mut q, batch * BATCH);
    }
    eprintln!("{LOOKUPS} absent lookups in {:?}", t0.elapsed());
    let rss = rss_anon_kib(serving);
    assert!(rss < 64 << 10, "the serving process holds {rss} KiB");

    // Both queues still serve, and nothing was written outside the chains.
    let (e, _) = request(&mem, &mut hiprio, &fuse_msg(3, 99, ino, &[0u8; 16]));
    assert_eq!(e, 0, "GETATTR on the high-priority queue");
    let (e, _) = request(&mem, &mut q, &fuse_msg(3, 98, ino, &[0u8; 16]));
    assert_eq!(e, 0, "GETATTR on the request queue");
    let mut after = vec![0u8; CANARY_LEN];
    mem.read(CANARY, &mut after).unwrap();
    assert!(after == canary, "guest memory outside every chain changed");
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon died");
    eprintln!("serving process RssAnon after the hostile guest: {rss} KiB");

    drop(conn);
    let status = common::vm::wait_exit(&mut daemon, Duration::from_secs(20)).unwrap_or_else(|| {
        panic!(
            "daemon still running; log:\n{}",
            std::fs::read_to_string(&log).unwrap()
        )
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {text}");
    // the chains outside guest memory were refused as unreadable (the
    // others parse as FUSE and get an error or an empty answer)
    let refused = text
        .lines()
        .filter(|l| l.contains("descriptor chain") && l.contains("unreadable"))
        .count();
    assert!(refused >= 2, "{text}");
}

/// An INIT offering `flags` (low half in `flags`, high half in `flags2`).
fn init_offering(flags: u64) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&7u32.to_le_bytes());
    body.extend_from_slice(&39u32.to_le_bytes());
    body.extend_from_slice(&0x20000u32.to_le_bytes());
    body.extend_from_slice(&(flags as u32).to_le_bytes());
    body.extend_from_slice(&((flags >> 32) as u32).to_le_bytes());
    body.resize(64, 0);
    fuse_msg(26, 1, 0, &body)
}

/// Under `--cache never` the daemon grants FUSE_DIRECT_IO_ALLOW_MMAP (FUSE
/// 7.39) to a guest kernel that offers it, so shared mappings of direct-I/O
/// files work there; not under `--cache always`, nor to a guest that did
/// not offer it.
#[test]
fn direct_io_mmap_is_granted_where_offered() {
    const INIT_EXT: u64 = 1 << 30;
    const ALLOW_MMAP: u64 = 1 << 36;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("local://{}", dir.path().join("store").display());
    for (policy, offer, granted) in [
        ("never", INIT_EXT | ALLOW_MMAP, true),
        ("never", INIT_EXT, false),
        ("always", INIT_EXT | ALLOW_MMAP, false),
    ] {
        let sock = dir.path().join(format!("{policy}-{offer}.sock"));
        let log = dir.path().join(format!("{policy}-{offer}.log"));
        let mut daemon = common::spawn_virtiofs(&store, &sock, &log, &["--cache", policy]);
        wait_socket(&sock);
        let mem = GuestMem::new(MEM_SIZE).unwrap();
        let (conn, mut queues) = setup(sock.to_str().unwrap(), &mem).unwrap();
        let mut q = queues.remove(REQUEST_QUEUE);
        let (e, reply) = request(&mem, &mut q, &init_offering(offer));
        assert_eq!(e, 0, "INIT");
        let word = |at: usize| u32::from_le_bytes(reply[at..at + 4].try_into().unwrap());
        let (flags, flags2) = (word(16 + 12), word(16 + 32));
        let got = u64::from(flags) & INIT_EXT != 0 && u64::from(flags2) << 32 & ALLOW_MMAP != 0;
        assert_eq!(
            got, granted,
            "--cache {policy}, offered {offer:#x}: flags {flags:#x} {flags2:#x}"
        );
        drop(conn);
        let st = common::vm::wait_exit(&mut daemon, Duration::from_secs(20));
        assert!(
            st.is_some_and(|s| s.success()),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
    }
}
