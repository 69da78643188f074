//! What the cache did, for operators (Prometheus text, a log line at exit)
//! and tests.
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The three kinds of object a cache holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Blob = 0,
    Directory = 1,
    PathInfo = 2,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Blob, Kind::Directory, Kind::PathInfo];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Directory => "directory",
            Kind::PathInfo => "path_info",
        }
    }
}

/// Counters; all monotonic except the gauges noted.
#[derive(Debug, Default)]
pub struct CacheStats {
    hits: [AtomicU64; 3],
    misses: [AtomicU64; 3],
    /// Blob bytes that came from the remote (filler) or were streamed from
    /// the store because it could not fill (reader).
    pub fetched_bytes: AtomicU64,
    /// Gauge: fetches under way.
    pub fills_in_flight: AtomicU64,
    /// Fetches started.
    pub fills: AtomicU64,
    /// Fetches that ended in an error (not counting absent objects).
    pub fill_errors: AtomicU64,
    /// Misses that joined a fetch already under way instead of starting one.
    pub dedup_waits: AtomicU64,
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
    /// Gauge: bytes of objects in the cache directory (filler only).
    pub used_bytes: AtomicU64,
    /// Gauge: the size bound (filler only).
    pub max_bytes: AtomicU64,
    /// Readers: misses the filler was asked to fill.
    pub fill_requests: AtomicU64,
    /// Readers: of those, asked ahead of the guest's reads (it read their
    /// directory's files in order).
    pub fills_ahead: AtomicU64,
    /// Filler: store paths prefetched (their trees walked).
    pub prefetch_paths: AtomicU64,
    /// Filler: blobs and bytes fetched by prefetch.
    pub prefetched_blobs: AtomicU64,
    pub prefetched_bytes: AtomicU64,
    /// Filler: prefetched blobs a VM then read (or joined while fetched).
    pub prefetch_hits: AtomicU64,
    pub prefetch_hit_bytes: AtomicU64,
    /// Filler: prefetched bytes evicted before any VM read them.
    pub prefetch_wasted_bytes: AtomicU64,
    /// Filler: prefetch walks stopped at the bound of unread bytes.
    pub prefetch_stopped: AtomicU64,
    /// Filler: prefetch walks stopped because their VM went.
    pub prefetch_cancelled: AtomicU64,
    /// Filler: batches of small blobs asked of the remote in one call.
    pub prefetch_batches: AtomicU64,
    /// Filler over a Nix binary cache: store paths read in (their NARs
    /// checked and moved into the cache), the NAR bytes as the cache
    /// carried them (compressed), lookups the cache had no narinfo for,
    /// and paths refused (signature, NarHash, NarSize, malformed).
    pub upstream_paths: AtomicU64,
    pub upstream_carried_bytes: AtomicU64,
    pub upstream_absent: AtomicU64,
    pub upstream_refused: AtomicU64,
    /// Of the paths read in, those read again for an evicted object.
    pub upstream_refetches: AtomicU64,
}

impl CacheStats {
    pub fn hit(&self, k: Kind) {
        self.hits[k as usize].fetch_add(1, Relaxed);
    }

    pub fn miss(&self, k: Kind) {
        self.misses[k as usize].fetch_add(1, Relaxed);
    }

    pub fn hits(&self, k: Kind) -> u64 {
        self.hits[k as usize].load(Relaxed)
    }

    pub fn misses(&self, k: Kind) -> u64 {
        self.misses[k as usize].load(Relaxed)
    }

    /// The counters in the Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP tvix_virtiofsd_cache_{name} {help}");
            let _ = writeln!(out, "# TYPE tvix_virtiofsd_cache_{name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "tvix_virtiofsd_cache_{name}{labels} {v}");
            }
        };
        let by_kind = |a: &[AtomicU64; 3]| -> Vec<(String, u64)> {
            Kind::ALL
                .iter()
                .map(|k| {
                    (
                        format!("{{kind=\"{}\"}}", k.name()),
                        a[*k as usize].load(Relaxed),
                    )
                })
                .collect()
        };
        let one = |a: &AtomicU64| vec![(String::new(), a.load(Relaxed))];
        family(
            "hits_total",
            "counter",
            "Objects served from the cache directory.",
            &by_kind(&self.hits),
        );
        family(
            "misses_total",
            "counter",
            "Objects not in the cache directory when asked for.",
            &by_kind(&self.misses),
        );
        family(
            "fetched_bytes_total",
            "counter",
            "Blob bytes fetched from the remote store.",
            &one(&self.fetched_bytes),
        );
        family(
            "fills_total",
            "counter",
            "Fetches from the remote store started.",
            &one(&self.fills),
        );
        family(
            "fills_in_flight",
            "gauge",
            "Fetches from the remote store under way.",
            &one(&self.fills_in_flight),
        );
        family(
            "fill_errors_total",
            "counter",
            "Fetches that failed (remote errors, corrupt or oversized objects, timeouts).",
            &one(&self.fill_errors),
        );
        family(
            "dedup_waits_total",
            "counter",
            "Misses that waited for a fetch already under way instead of fetching again.",
            &one(&self.dedup_waits),
        );
        family(
            "evictions_total",
            "counter",
            "Objects evicted to stay within the size bound.",
            &one(&self.evictions),
        );
        family(
            "evicted_bytes_total",
            "counter",
            "Bytes evicted to stay within the size bound.",
            &one(&self.evicted_bytes),
        );
        family(
            "used_bytes",
            "gauge",
            "Bytes of objects in the cache directory.",
            &one(&self.used_bytes),
        );
        family(
            "max_bytes",
            "gauge",
            "The cache's size bound.",
            &one(&self.max_bytes),
        );
        family(
            "fill_requests_total",
            "counter",
            "Misses a reader asked the filling daemon to fill.",
            &one(&self.fill_requests),
        );
        family(
            "fills_ahead_total",
            "counter",
            "Fills a reader asked ahead of the guest's reads (files read in listed order).",
            &one(&self.fills_ahead),
        );
        family(
            "prefetch_paths_total",
            "counter",
            "Store paths whose trees prefetch walked.",
            &one(&self.prefetch_paths),
        );
        family(
            "prefetched_blobs_total",
            "counter",
            "Blobs fetched by prefetch, ahead of any VM asking.",
            &one(&self.prefetched_blobs),
        );
        family(
            "prefetched_bytes_total",
            "counter",
            "Blob bytes fetched by prefetch.",
            &one(&self.prefetched_bytes),
        );
        family(
            "prefetch_hits_total",
            "counter",
            "Prefetched blobs a VM then read (or joined while they were fetched).",
            &one(&self.prefetch_hits),
        );
        family(
            "prefetch_hit_bytes_total",
            "counter",
            "Bytes of prefetched blobs a VM then read.",
            &one(&self.prefetch_hit_bytes),
        );
        family(
            "prefetch_wasted_bytes_total",
            "counter",
            "Prefetched bytes evicted before any VM read them.",
            &one(&self.prefetch_wasted_bytes),
        );
        family(
            "prefetch_stopped_total",
            "counter",
            "Prefetch walks stopped because half the cache was prefetched and not yet read.",
            &one(&self.prefetch_stopped),
        );
        family(
            "prefetch_cancelled_total",
            "counter",
            "Prefetch walks stopped because the VM they were for went.",
            &one(&self.prefetch_cancelled),
        );
        family(
            "prefetch_batches_total",
            "counter",
            "Batches of small blobs prefetch asked of the remote in one ReadBlobs call.",
            &one(&self.prefetch_batches),
        );
        family(
            "upstream_paths_total",
            "counter",
            "Store paths read in from a Nix binary cache upstream (NAR checked, moved into the cache).",
            &one(&self.upstream_paths),
        );
        family(
            "upstream_carried_bytes_total",
            "counter",
            "NAR bytes as a Nix binary cache upstream carried them (compressed).",
            &one(&self.upstream_carried_bytes),
        );
        family(
            "upstream_absent_total",
            "counter",
            "Lookups a Nix binary cache upstream had no narinfo for.",
            &one(&self.upstream_absent),
        );
        family(
            "upstream_refused_total",
            "counter",
            "Store paths refused from a Nix binary cache upstream (signature, NarHash, NarSize, malformed).",
            &one(&self.upstream_refused),
        );
        family(
            "upstream_refetches_total",
            "counter",
            "Store paths read in again from a Nix binary cache upstream for an evicted object.",
            &one(&self.upstream_refetches),
        );
        out
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        let kinds = |a: &[AtomicU64; 3]| {
            Kind::ALL
                .iter()
                .map(|k| format!("{} {}", a[*k as usize].load(Relaxed), k.name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "hits: {}; misses: {}; fill requests {} ({} ahead); fetches {} ({} failed, {} waits joined one \
             under way); {} bytes fetched; {} evictions ({} bytes); prefetched {} blobs ({} bytes, \
             {} read, {} bytes wasted)",
            kinds(&self.hits),
            kinds(&self.misses),
            self.fill_requests.load(Relaxed),
            self.fills_ahead.load(Relaxed),
            self.fills.load(Relaxed),
            self.fill_errors.load(Relaxed),
            self.dedup_waits.load(Relaxed),
            self.fetched_bytes.load(Relaxed),
            self.evictions.load(Relaxed),
            self.evicted_bytes.load(Relaxed),
            self.prefetched_blobs.load(Relaxed),
            self.prefetched_bytes.load(Relaxed),
            self.prefetch_hits.load(Relaxed),
            self.prefetch_wasted_bytes.load(Relaxed),
        )
    }
}
