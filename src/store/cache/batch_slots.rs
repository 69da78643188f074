//! How many batches of misses go out at once, for both kinds: the host's
//! misses to the remote (`ReadBlobs`, [`super::batch`]) and a per-VM
//! daemon's to the host (`FillBlobs`, [`super::fill_batch`]). A batch is
//! sent while fewer than [`OUT`] are out and fewer than [`RUNNING`] run;
//! misses that come meanwhile wait for the next one, so a guest reading
//! one file at a time pays nothing and 64 at once pay a few calls. A batch
//! counts as out for [`OUT_AT_MOST`] at most: one blob a remote trickles
//! must not hold back every miss behind its batch.
use std::future::Future;
use std::time::Duration;

/// Batches out at once.
const OUT: usize = 4;
/// Batches running at once however long they take (those past
/// [`OUT_AT_MOST`] included).
const RUNNING: usize = 16;
/// How long a batch counts as out.
const OUT_AT_MOST: Duration = Duration::from_millis(100);

/// A queue's batches out and running.
#[derive(Default)]
pub(super) struct Counts {
    out: usize,
    running: usize,
}

/// What a batch gives back: its place among those out, those running.
pub(super) struct Release {
    out: bool,
    end: bool,
}

impl Counts {
    pub(super) fn may_send(&self) -> bool {
        self.out < OUT && self.running < RUNNING
    }

    pub(super) fn give_back(&mut self, r: Release) {
        if r.out {
            self.out -= 1;
        }
        if r.end {
            self.running -= 1;
        }
    }
}

/// Runs `batch` on the current runtime as one of `counts` (which must
/// [`Counts::may_send`]); `give_back` is called, with the queue's lock
/// not held, when the batch stops counting as out and when it ends, also
/// if its task panics or is dropped: it gives the places back and sends
/// the next batch. False, and nothing taken, when there is no runtime (a
/// batch ending at shutdown).
pub(super) fn spawn<B, G>(counts: &mut Counts, batch: B, give_back: G) -> bool
where
    B: Future<Output = ()> + Send + 'static,
    G: Fn(Release) + Send + 'static,
{
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    counts.out += 1;
    counts.running += 1;
    let mut guard = Guard {
        out: true,
        give_back,
    };
    rt.spawn(async move {
        tokio::pin!(batch);
        tokio::select! {
            _ = &mut batch => return,
            _ = tokio::time::sleep(OUT_AT_MOST) => guard.release_out(),
        }
        batch.await;
    });
    true
}

struct Guard<G: Fn(Release)> {
    out: bool,
    give_back: G,
}

impl<G: Fn(Release)> Guard<G> {
    fn release_out(&mut self) {
        if std::mem::take(&mut self.out) {
            (self.give_back)(Release {
                out: true,
                end: false,
            });
        }
    }
}

impl<G: Fn(Release)> Drop for Guard<G> {
    fn drop(&mut self) {
        (self.give_back)(Release {
            out: std::mem::take(&mut self.out),
            end: true,
        });
    }
}
