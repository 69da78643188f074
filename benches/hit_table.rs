//! What a cache reader's looked-at table costs per hit: `LookedAt::due`
//! (the lock-free table) against the sharded, locked set it replaced
//! (`BoundedSet<u64>::insert` with the same bound and age limit), on a
//! warm pass's pattern: every key already held, asked again and again in
//! walk order, by one thread and by two at once (a reader's workers).
//!
//! Usage: cargo bench --bench hit_table [-- KEYS CALLS ROUNDS]
//! (defaults 30000 keys, as many as the benchmark tree's files and
//! directories; 20,000,000 calls per thread; the median of 5 rounds).
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tvix_virtiofsd::store::cache::looked_at::LookedAt;
use tvix_virtiofsd::view::bounded_set::BoundedSet;

const BOUND: usize = 65_536;
const RECHECK: Duration = Duration::from_secs(300);

fn keys(n: usize) -> Vec<u64> {
    (0..n as u64)
        .map(|i| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&blake3::hash(&i.to_le_bytes()).as_bytes()[..8]);
            u64::from_le_bytes(b)
        })
        .collect()
}

/// Nanoseconds per call, `threads` threads each making `calls` calls.
fn per_call(
    threads: usize,
    calls: usize,
    keys: &Arc<Vec<u64>>,
    f: Arc<dyn Fn(u64) -> bool + Send + Sync>,
) -> f64 {
    // Every key held once before timing: a warm pass.
    for &k in keys.iter() {
        f(k);
    }
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (keys, f) = (keys.clone(), f.clone());
            std::thread::spawn(move || {
                let mut due = 0usize;
                let n = keys.len();
                for i in 0..calls {
                    // Threads walk from different places, as workers do.
                    due += usize::from(f(keys[(i + t * n / 2) % n]));
                }
                black_box(due)
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    start.elapsed().as_nanos() as f64 / calls as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .filter(|a| !a.starts_with('-'))
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (n, calls, rounds) = (arg(1, 30_000), arg(2, 20_000_000), arg(3, 5));
    let keys = Arc::new(keys(n));
    println!("{n} keys held, {calls} calls per thread, median of {rounds} rounds");
    println!();
    println!("| table | threads | ns per hit (per thread) |");
    println!("| --- | ---: | ---: |");
    for threads in [1, 2] {
        let locked = median(
            (0..rounds)
                .map(|_| {
                    let s = Arc::new(BoundedSet::<u64>::new(BOUND, Some(RECHECK)));
                    per_call(threads, calls, &keys, Arc::new(move |k| s.insert(k)))
                })
                .collect(),
        );
        let free = median(
            (0..rounds)
                .map(|_| {
                    let t = Arc::new(LookedAt::new(BOUND, RECHECK));
                    per_call(threads, calls, &keys, Arc::new(move |k| t.due(k)))
                })
                .collect(),
        );
        println!("| BoundedSet (before) | {threads} | {locked:.1} |");
        println!("| LookedAt | {threads} | {free:.1} |");
    }
}
