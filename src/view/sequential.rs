//! Tells when a guest reads a directory's files in their listed order (a
//! `cat *`, a `tar`, a find over a tree), so the view can have the next
//! files' data read ahead, as the kernel reads ahead within one file. One
//! file opened tells nothing: the window opens at the second file in
//! order, grows while the order holds, and closes when it breaks. A few
//! directories are followed at once (a find descends into subdirectories
//! between the files of their parent); the rest are forgotten.
use std::ops::Range;
use std::sync::Mutex;

/// Directories followed at once.
const TRACKED: usize = 16;
/// How far past the last file a read may land and still be "in order":
/// the listing's subdirectories and symlinks are skipped, and concurrent
/// reads arrive a little out of order.
const GAP: usize = 8;
/// Files read ahead when the order is first seen.
const FIRST_WINDOW: usize = 2;

#[derive(Clone, Copy)]
struct Run {
    dir: u64,
    /// The furthest position opened.
    last: usize,
    /// Opens in order so far (0: none yet).
    streak: u32,
    /// Positions below this were already asked for.
    ahead_to: usize,
}

pub struct Sequential {
    runs: Mutex<Runs>,
    /// The window's bound, in files (0: never read ahead).
    max: usize,
}

#[derive(Default)]
struct Runs {
    slots: [Option<Run>; TRACKED],
    /// The slot a new directory takes (round robin).
    next: usize,
}

impl Sequential {
    pub fn new(max: usize) -> Self {
        Self {
            runs: Mutex::default(),
            max,
        }
    }

    /// The guest opened the file at `pos` in the listing of `dir` for the
    /// first time: answers the positions to read ahead (often none).
    pub fn opened(&self, dir: u64, pos: usize) -> Range<usize> {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        let runs = &mut *runs;
        let found = runs.slots.iter_mut().flatten().find(|r| r.dir == dir);
        let Some(run) = found else {
            let i = runs.next;
            runs.next = (i + 1) % TRACKED;
            runs.slots[i] = Some(Run {
                dir,
                last: pos,
                streak: 0,
                ahead_to: pos.saturating_add(1),
            });
            return 0..0;
        };
        if pos > run.last && pos - run.last <= GAP {
            run.streak = run.streak.saturating_add(1);
            run.last = pos;
        } else if pos <= run.last && run.last - pos < GAP {
            // Out of order by a little (concurrent reads): still in order.
        } else {
            *run = Run {
                dir,
                last: pos,
                streak: 0,
                ahead_to: pos.saturating_add(1),
            };
            return 0..0;
        }
        if run.streak == 0 || self.max == 0 {
            return 0..0;
        }
        let shift = (run.streak - 1).min(usize::BITS - 1);
        let window = FIRST_WINDOW.saturating_mul(1 << shift).min(self.max);
        let end = run.last.saturating_add(1).saturating_add(window);
        let start = run.ahead_to.max(run.last.saturating_add(1));
        run.ahead_to = run.ahead_to.max(end);
        start..end.max(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_WINDOW: usize = 16;

    #[test]
    fn one_file_reads_nothing_ahead_two_in_order_do() {
        let s = Sequential::new(MAX_WINDOW);
        assert!(s.opened(7, 10).is_empty());
        assert_eq!(s.opened(7, 11), 12..14);
    }

    #[test]
    fn the_window_grows_to_its_bound_and_asks_each_file_once() {
        let s = Sequential::new(MAX_WINDOW);
        s.opened(1, 0);
        let mut asked = vec![];
        for pos in 1..200 {
            let r = s.opened(1, pos);
            assert!(r.len() <= MAX_WINDOW);
            assert!(r.end <= pos + 1 + MAX_WINDOW);
            asked.extend(r);
        }
        let mut dedup = asked.clone();
        dedup.dedup();
        assert_eq!(asked, dedup, "a position asked twice");
        assert_eq!(asked.first(), Some(&2));
        // Far enough ahead by the end: the bound, not less.
        assert_eq!(asked.last(), Some(&(199 + MAX_WINDOW)));
    }

    #[test]
    fn a_jump_or_a_step_back_closes_the_window() {
        let s = Sequential::new(MAX_WINDOW);
        s.opened(1, 0);
        assert!(!s.opened(1, 1).is_empty());
        assert!(s.opened(1, 100).is_empty(), "a jump is not in order");
        assert!(s.opened(1, 50).is_empty(), "nor a step far back");
        assert_eq!(s.opened(1, 52), 53..55, "in order again from there");
    }

    #[test]
    fn skipped_entries_and_interleaved_directories_keep_the_order() {
        let s = Sequential::new(MAX_WINDOW);
        s.opened(1, 0);
        s.opened(2, 0); // a subdirectory's files in between
        assert_eq!(s.opened(2, 1), 2..4);
        assert!(
            !s.opened(1, 3).is_empty(),
            "entries 1 and 2 were directories"
        );
    }

    #[test]
    fn a_bound_of_zero_reads_nothing_ahead() {
        let s = Sequential::new(0);
        assert!((0..100).all(|pos| s.opened(1, pos).is_empty()));
    }

    #[test]
    fn only_a_bounded_number_of_directories_are_followed() {
        let s = Sequential::new(MAX_WINDOW);
        for dir in 0..(TRACKED as u64 * 3) {
            s.opened(dir, 0);
        }
        // The first directory was forgotten: its next file starts anew.
        assert!(s.opened(0, 1).is_empty());
        let runs = s.runs.lock().unwrap();
        assert_eq!(runs.slots.iter().flatten().count(), TRACKED);
    }
}
