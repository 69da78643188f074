//! The device without a VMM: the pool's bound per queue, the configuration
//! space, tags, and chains through a mock request queue and the pool.
use super::*;

#[test]
fn a_queue_holds_at_most_its_size_in_the_pool() {
    let s = Slots::default();
    assert!(s.take(2));
    assert!(s.take(2));
    assert!(!s.take(2), "a third chain of a queue of 2");
    assert!(
        s.full.load(Ordering::SeqCst),
        "the worker must wake the queue"
    );
    assert_eq!(s.in_flight.load(Ordering::SeqCst), 2);
    // a worker frees one (without a vring here: the count and the flag)
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    assert!(s.full.swap(false, Ordering::SeqCst));
    assert!(s.take(2));
    assert!(!s.take(2));
}

fn config(tag: &str, queues: usize) -> DeviceConfig {
    DeviceConfig {
        tag: tag.into(),
        request_queues: queues,
        threads: 1,
        poll_max: Duration::from_micros(50),
    }
}

#[test]
fn config_space_layout() {
    let cfg = config("nix-store", 3).config_space();
    assert_eq!(cfg.len(), 40);
    assert_eq!(&cfg[..9], b"nix-store");
    assert!(cfg[9..36].iter().all(|&b| b == 0));
    assert_eq!(&cfg[36..], &3u32.to_le_bytes());
}

#[test]
fn tags() {
    assert!(check_tag("nix-store").is_ok());
    assert!(check_tag(&"a".repeat(36)).is_ok());
    assert!(check_tag(&"a".repeat(37)).is_err());
    assert!(check_tag("").is_err());
    assert!(check_tag("a\0b").is_err());
    assert!(config("x", 0).validate().is_err());
    assert!(config("x", 64).validate().is_err());
    assert!(config("x", 63).validate().is_ok());
}

/// Three chains through the request queue and the pool: INIT gets its
/// reply length, FORGET 0 (no reply), a chain pointing outside guest
/// memory 0; all three come back on the used ring.
#[test]
fn request_queue_round_trip() {
    use crate::store::Store;
    use crate::view::FsConfig;
    use fuse_backend_rs::abi::fuse_abi::{ForgetIn, InHeader, InitIn, Opcode};
    use std::collections::HashMap;
    use std::time::{Duration, Instant};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{ByteValued, Bytes, GuestAddress};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fs = Arc::new(StoreFs::new(
        Store::memory(),
        rt.handle().clone(),
        FsConfig {
            list_root: false,
            store_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    ));
    let atomic = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap(),
    );
    let mem = atomic.memory();
    let vq = MockSplitQueue::new(&*mem, 16);

    let header = |opcode: Opcode, body: usize, unique: u64| InHeader {
        len: (std::mem::size_of::<InHeader>() + body) as u32,
        opcode: opcode as u32,
        unique,
        nodeid: 1,
        ..Default::default()
    };
    let init_in = InitIn {
        major: 7,
        minor: 33,
        max_readahead: 0x20000,
        flags: 0,
    };
    let mut init = header(Opcode::Init, std::mem::size_of::<InitIn>(), 1)
        .as_slice()
        .to_vec();
    init.extend_from_slice(init_in.as_slice());
    let mut forget = header(Opcode::Forget, std::mem::size_of::<ForgetIn>(), 2)
        .as_slice()
        .to_vec();
    forget.extend_from_slice(ForgetIn { nlookup: 1 }.as_slice());
    mem.write_slice(&init, GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&forget, GuestAddress(0x11_0000)).unwrap();

    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let descs: Vec<RawDescriptor> = [
        Descriptor::new(0x10_0000, init.len() as u32, next, 1),
        Descriptor::new(0x20_0000, 0x1000, write, 0),
        Descriptor::new(0x11_0000, forget.len() as u32, next, 3),
        Descriptor::new(0x21_0000, 0x1000, write, 0),
        // outside guest memory
        Descriptor::new(0x8000_0000, 64, 0, 0),
    ]
    .into_iter()
    .map(RawDescriptor::from)
    .collect();
    vq.add_desc_chains(&descs, 0).unwrap();

    let vring = VringRwLock::new(atomic.clone(), 16).unwrap();
    vring.set_queue_size(16);
    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);

    let backend = FsBackend::new(fs.clone(), config("nix-store", 1), atomic.clone()).unwrap();
    assert_eq!(backend.num_queues(), 2);
    assert_eq!(backend.queues_per_thread(), vec![0b1, 0b10]);
    let four = FsBackend::new(
        fs,
        config("nix-store", 4),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    assert_eq!(
        four.queues_per_thread(),
        vec![0b1, 0b10, 0b100, 0b1000, 0b10000],
        "a thread per request queue"
    );
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 1)
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while vq.used().idx().load() < 3 {
        assert!(Instant::now() < deadline, "chains not returned");
        std::thread::sleep(Duration::from_millis(10));
    }
    let used: HashMap<u32, u32> = (0..3)
        .map(|i| {
            let e = vq.used().ring().ref_at(i).unwrap().load();
            (e.id(), e.len())
        })
        .collect();
    // OutHeader (16) + InitOut (64)
    assert_eq!(used.get(&0), Some(&80));
    assert_eq!(used.get(&2), Some(&0));
    assert_eq!(used.get(&4), Some(&0));
}
