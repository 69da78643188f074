//! The FUSE INIT reply patch: FUSE_DIRECT_IO_ALLOW_MMAP is granted where
//! the guest offers it. fuse-backend-rs 0.14 drops INIT flags it does not
//! know, so neither it nor the view can see the offer or grant it; only the
//! transport holds the raw request before the server parses it and the
//! reply in guest memory after it is written, before the guest is given it.
use super::Mem;
use std::io;
use std::sync::Arc;
use virtio_queue::DescriptorChain;

pub(super) const FUSE_INIT: u32 = 26;
/// Offsets in fuse_init_in of `flags` and `flags2`, and in fuse_init_out
/// (after the 16-byte reply header) of `flags` and `flags2`.
const INIT_IN_FLAGS: usize = 12;
const INIT_IN_FLAGS2: usize = 16;
const INIT_OUT_FLAGS: u64 = 16 + 12;
const INIT_OUT_FLAGS2: u64 = 16 + 32;
const FUSE_INIT_EXT: u64 = 1 << 30;
/// FUSE 7.39 (Linux 6.6): mmap of files opened with direct I/O.
pub(super) const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;

/// The opcode of the request `r` reads (0 if it is too short) and, for
/// INIT, the flags the guest offers.
pub(super) fn peek_init(mut r: impl io::Read) -> (u32, u64) {
    let mut h = [0u8; 40 + INIT_IN_FLAGS2 + 4];
    let n = read_up_to(&mut r, &mut h);
    let word = |at: usize| {
        h.get(at..at + 4)
            .filter(|_| at + 4 <= n)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let flags = u64::from(word(40 + INIT_IN_FLAGS)) | (u64::from(word(40 + INIT_IN_FLAGS2)) << 32);
    (word(4), flags)
}

/// Reads until `buf` is full or the readable part of the chain ends.
fn read_up_to(r: &mut impl io::Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// Adds FUSE_DIRECT_IO_ALLOW_MMAP to an INIT reply written into guest
/// memory, so shared mappings of direct-I/O files (`--cache never`,
/// `metadata`) work where the guest kernel offers it. fuse-backend-rs 0.14
/// drops INIT flags it does not know, so it can neither see the offer nor
/// grant it; the reply is amended after it is written, before the guest
/// sees it.
pub(super) fn grant_direct_io_mmap(mem: &Mem, chain: DescriptorChain<Arc<Mem>>, len: u32) {
    use vm_memory::{Bytes, GuestAddress};
    if u64::from(len) < INIT_OUT_FLAGS2 + 4 {
        return;
    }
    // The writable part may be split (the kernel gives the reply header
    // and the reply its own buffers): find where an offset into it lives.
    let writable: Vec<_> = chain.into_iter().filter(|d| d.is_write_only()).collect();
    let at = |off: u64| -> Option<GuestAddress> {
        let mut start = 0u64;
        for d in &writable {
            let end = start + u64::from(d.len());
            if off + 4 <= end && off >= start {
                return Some(GuestAddress(d.addr().0.checked_add(off - start)?));
            }
            start = end;
        }
        None
    };
    let (Some(fa), Some(f2a)) = (at(INIT_OUT_FLAGS), at(INIT_OUT_FLAGS2)) else {
        return;
    };
    let (Ok(flags), Ok(flags2)) = (mem.read_obj::<u32>(fa), mem.read_obj::<u32>(f2a)) else {
        return;
    };
    let flags = u32::from_le(flags) | FUSE_INIT_EXT as u32;
    let flags2 = u32::from_le(flags2) | (DIRECT_IO_ALLOW_MMAP >> 32) as u32;
    if mem.write_obj(flags.to_le(), fa).is_ok() && mem.write_obj(flags2.to_le(), f2a).is_ok() {
        tracing::info!(
            "FUSE INIT: granted DIRECT_IO_ALLOW_MMAP (shared mappings of direct-I/O files)"
        );
    }
}
