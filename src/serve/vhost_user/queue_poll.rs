//! Adaptive polling of a request queue before its thread sleeps, as QEMU's
//! iothreads do (`poll-max-ns`). A guest that waits for each reply sends
//! its next request a few tens of microseconds after it: looking at the
//! ring for that long saves a sleep and a wake-up on our side, and with
//! EVENT_IDX (notifications off while we look) the guest's kick too. The
//! window grows while requests follow each other closely and drops to zero
//! as soon as one does not, so an idle or slow guest costs no spinning and
//! a busy one at most the window per request. It polls only after the
//! thread found a single request: a guest with many in flight is not
//! waiting on each reply.
use std::time::{Duration, Instant};

/// Where a growing window starts.
const FIRST_WINDOW: Duration = Duration::from_micros(4);

/// One queue's polling window.
#[derive(Debug)]
pub struct PollWindow {
    max: Duration,
    now: Duration,
    /// When the queue went empty and its thread went to sleep.
    slept_at: Option<Instant>,
}

impl PollWindow {
    /// A window of at most `max` (zero: never poll).
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            now: Duration::ZERO,
            slept_at: None,
        }
    }

    /// The queue is empty after the thread found `found` requests in it:
    /// looks for more with `ready` for the current window, if it found at
    /// most one (a guest with many in flight is not waiting on each reply,
    /// and a thread spinning meanwhile takes a core from it). True when
    /// more came in time; false when the thread should sleep until it is
    /// notified.
    pub fn spin(&mut self, found: usize, mut ready: impl FnMut() -> bool) -> bool {
        if found > 1 {
            return false;
        }
        let start = Instant::now();
        if !self.now.is_zero() {
            loop {
                if ready() {
                    return true;
                }
                if start.elapsed() >= self.now {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        self.slept_at = Some(start);
        false
    }

    /// The thread was notified: the window grows if the queue was empty
    /// for less than the longest window (a longer window would have caught
    /// the request), and drops to zero if it was empty longer.
    pub fn woke(&mut self) {
        let Some(at) = self.slept_at.take() else {
            return;
        };
        self.adjust(at.elapsed());
    }

    fn adjust(&mut self, empty_for: Duration) {
        if empty_for > self.max {
            self.now = Duration::ZERO;
        } else if empty_for > self.now {
            self.now = (self.now * 2).max(FIRST_WINDOW).min(self.max);
        }
    }

    /// The current window, for tests.
    #[cfg(test)]
    fn window(&self) -> Duration {
        self.now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_close_requests_and_drops_after_a_pause() {
        let max = Duration::from_micros(50);
        let mut w = PollWindow::new(max);
        assert!(!w.spin(1, || true), "a new window does not poll");
        for _ in 0..10 {
            w.adjust(Duration::from_micros(30));
        }
        let settled = w.window();
        assert!(
            settled >= Duration::from_micros(30) && settled < max,
            "close requests grow it until it covers them: {settled:?}"
        );
        w.adjust(Duration::from_micros(20));
        assert_eq!(w.window(), settled, "a request inside it changes nothing");
        w.adjust(Duration::from_micros(45));
        assert_eq!(w.window(), max, "never past the bound");
        w.adjust(Duration::from_millis(5));
        assert_eq!(w.window(), Duration::ZERO, "a pause ends polling");
        let mut never = PollWindow::new(Duration::ZERO);
        never.adjust(Duration::ZERO);
        assert_eq!(never.window(), Duration::ZERO, "zero disables it");
    }

    #[test]
    fn spinning_stops_at_the_window_or_when_ready() {
        let mut w = PollWindow::new(Duration::from_millis(20));
        for _ in 0..20 {
            w.adjust(Duration::from_millis(15));
        }
        let window = w.window();
        assert!(window >= Duration::from_millis(15));
        let mut looks = 0;
        assert!(w.spin(1, || {
            looks += 1;
            looks == 3
        }));
        assert_eq!(looks, 3);
        assert!(
            !w.spin(2, || panic!("looked")),
            "a thread that found several requests does not poll"
        );
        let start = Instant::now();
        assert!(!w.spin(1, || false));
        assert!(start.elapsed() >= window);
        std::thread::sleep(Duration::from_millis(10));
        w.woke();
        assert_eq!(w.window(), Duration::ZERO, "empty past the longest window");
    }
}
