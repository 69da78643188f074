//! Prometheus' text exposition format, the one the metrics endpoints
//! speak: families, counters and latency histograms rendered as lines.
//! Every layer that counts renders through these, so the format has one
//! home; serving it over HTTP is `serve::metrics`.
use std::fmt::Write;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 7] = [1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0];

/// A Prometheus histogram of durations, lock-free.
#[derive(Default)]
pub struct Histogram {
    count: std::sync::atomic::AtomicU64,
    sum_ns: std::sync::atomic::AtomicU64,
    /// Per bucket (not cumulative); the last is +Inf.
    buckets: [std::sync::atomic::AtomicU64; BUCKETS.len() + 1],
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The `_bucket`, `_sum` and `_count` lines of `name` with `labels`
    /// (`a="b",` form, or empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| format!("{b}"));
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let labels = match labels.trim_end_matches(',') {
            "" => String::new(),
            l => format!("{{{l}}}"),
        };
        let _ = writeln!(out, "{name}_sum{labels} {sum}");
        let _ = writeln!(out, "{name}_count{labels} {}", self.count());
    }
}

/// `# HELP` and `# TYPE` lines.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The gauge every daemon leads with: 1 while it serves.
pub fn up(out: &mut String) {
    family(out, "tvix_virtiofsd_up", "gauge", "The daemon is serving.");
    let _ = writeln!(out, "tvix_virtiofsd_up 1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(std::time::Duration::from_micros(5));
        h.observe(std::time::Duration::from_millis(5));
        h.observe(std::time::Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "op=\"read\",");
        assert!(
            out.contains("x_seconds_bucket{op=\"read\",le=\"0.00001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{op=\"read\",le=\"0.01\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{op=\"read\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{op=\"read\"} 3\n"), "{out}");
    }
}
