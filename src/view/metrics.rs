//! What the view serves, counted for a fleet's Prometheus: FUSE requests
//! by opcode with their latency, the errno of each failed one, bytes read,
//! and the store calls the view waited for. Counting is lock-free on the
//! request path (one mutex for errnos, only on errors); every label set is
//! bounded (64 opcode slots, errnos below 4096).
use crate::wire::prometheus::{family, Histogram};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

const OPCODES: usize = 64;

pub struct ViewMetrics {
    requests: [Histogram; OPCODES],
    errors: Mutex<BTreeMap<i32, u64>>,
    read_bytes: AtomicU64,
    store_calls: Histogram,
    store_errors: AtomicU64,
}

impl Default for ViewMetrics {
    fn default() -> Self {
        Self {
            requests: std::array::from_fn(|_| Histogram::default()),
            errors: Default::default(),
            read_bytes: Default::default(),
            store_calls: Default::default(),
            store_errors: Default::default(),
        }
    }
}

impl ViewMetrics {
    /// One FUSE request answered: its opcode, the errno of its reply (0:
    /// success), how long it took, and the bytes of a READ's reply.
    pub fn request(&self, opcode: u32, errno: i32, took: Duration, read_bytes: u64) {
        let slot = usize::try_from(opcode)
            .ok()
            .filter(|&o| o < OPCODES)
            .unwrap_or(0);
        self.requests[slot].observe(took);
        if opcode == READ {
            self.read_bytes.fetch_add(read_bytes, Relaxed);
        }
        if errno != 0 {
            let e = if (1..4096).contains(&errno) {
                errno
            } else {
                -1
            };
            *self
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(e)
                .or_default() += 1;
        }
    }

    /// One call the view waited for on the store.
    pub fn store_call(&self, took: Duration, failed: bool) {
        self.store_calls.observe(took);
        if failed {
            self.store_errors.fetch_add(1, Relaxed);
        }
    }

    /// Requests answered so far, for tests.
    pub fn requests_total(&self) -> u64 {
        self.requests.iter().map(Histogram::count).sum()
    }

    /// The families, with the inode, handle and open blob gauges.
    pub fn render(&self, out: &mut String, inodes: usize, handles: usize, blobs: usize) {
        let name = "tvix_virtiofsd_fuse_request_seconds";
        family(
            out,
            name,
            "histogram",
            "FUSE requests answered, by opcode, and how long each took.",
        );
        for (op, h) in self.requests.iter().enumerate() {
            if h.count() > 0 {
                h.render(out, name, &format!("op=\"{}\",", op_name(op)));
            }
        }
        let name = "tvix_virtiofsd_fuse_errors_total";
        family(
            out,
            name,
            "counter",
            "FUSE requests answered with an error, by errno.",
        );
        for (e, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "{name}{{errno=\"{}\"}} {n}", errno_name(*e));
        }
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            family(out, name, kind, help);
            let _ = writeln!(out, "{name} {v}");
        };
        one(
            "tvix_virtiofsd_read_bytes_total",
            "counter",
            "File bytes served to the guest.",
            self.read_bytes.load(Relaxed),
        );
        one(
            "tvix_virtiofsd_store_errors_total",
            "counter",
            "Store calls of the view that failed.",
            self.store_errors.load(Relaxed),
        );
        one(
            "tvix_virtiofsd_inodes",
            "gauge",
            "Inodes the guest kernel holds.",
            inodes as u64,
        );
        one(
            "tvix_virtiofsd_handles",
            "gauge",
            "Open file and directory handles.",
            handles as u64,
        );
        one(
            "tvix_virtiofsd_open_blobs",
            "gauge",
            "Blobs held open for file handles (one per blob).",
            blobs as u64,
        );
        let name = "tvix_virtiofsd_store_call_seconds";
        family(out, name, "histogram", "Store calls the view waited for.");
        self.store_calls.render(out, name, "");
    }
}

const READ: u32 = 15;

/// FUSE opcode names (the kernel's, lower case); 0 stands for any other.
fn op_name(op: usize) -> &'static str {
    const NAMES: [&str; 53] = [
        "other",
        "lookup",
        "forget",
        "getattr",
        "setattr",
        "readlink",
        "symlink",
        "op7",
        "mknod",
        "mkdir",
        "unlink",
        "rmdir",
        "rename",
        "link",
        "open",
        "read",
        "write",
        "statfs",
        "release",
        "op19",
        "fsync",
        "setxattr",
        "getxattr",
        "listxattr",
        "removexattr",
        "flush",
        "init",
        "opendir",
        "readdir",
        "releasedir",
        "fsyncdir",
        "getlk",
        "setlk",
        "setlkw",
        "access",
        "create",
        "interrupt",
        "bmap",
        "destroy",
        "ioctl",
        "poll",
        "notify_reply",
        "batch_forget",
        "fallocate",
        "readdirplus",
        "rename2",
        "lseek",
        "copy_file_range",
        "setupmapping",
        "removemapping",
        "syncfs",
        "tmpfile",
        "statx",
    ];
    NAMES.get(op).copied().unwrap_or("other")
}

fn errno_name(e: i32) -> String {
    let known = [
        (libc::ENOENT, "ENOENT"),
        (libc::EIO, "EIO"),
        (libc::ETIMEDOUT, "ETIMEDOUT"),
        (libc::EROFS, "EROFS"),
        (libc::ENFILE, "ENFILE"),
        (libc::EBADF, "EBADF"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENODATA, "ENODATA"),
        (libc::ERANGE, "ERANGE"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::ELOOP, "ELOOP"),
        (libc::EAGAIN, "EAGAIN"),
        (libc::EACCES, "EACCES"),
        (libc::EPERM, "EPERM"),
        (libc::ENOTSUP, "ENOTSUP"),
    ];
    known
        .iter()
        .find(|(n, _)| *n == e)
        .map_or_else(|| format!("{e}"), |(_, s)| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_errors_render_by_label() {
        let m = ViewMetrics::default();
        m.request(1, libc::ENOENT, Duration::from_micros(3), 0);
        m.request(15, 0, Duration::from_micros(30), 4096);
        m.request(9999, 0, Duration::from_micros(30), 0);
        m.store_call(Duration::from_millis(2), true);
        let mut out = String::new();
        m.render(&mut out, 5, 2, 1);
        for want in [
            "tvix_virtiofsd_fuse_request_seconds_count{op=\"lookup\"} 1\n",
            "tvix_virtiofsd_fuse_request_seconds_count{op=\"read\"} 1\n",
            "tvix_virtiofsd_fuse_request_seconds_count{op=\"other\"} 1\n",
            "tvix_virtiofsd_fuse_errors_total{errno=\"ENOENT\"} 1\n",
            "tvix_virtiofsd_read_bytes_total 4096\n",
            "tvix_virtiofsd_store_errors_total 1\n",
            "tvix_virtiofsd_inodes 5\n",
            "tvix_virtiofsd_store_call_seconds_count 1\n",
        ] {
            assert!(out.contains(want), "no {want:?} in\n{out}");
        }
    }
}
