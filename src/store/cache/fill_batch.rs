//! A per-VM daemon's fills in batches: its guest misses many small files
//! at once (64 readers, or a directory's files asked ahead), and each was
//! one `FillBlob` call to the host daemon, a stream of its own on both
//! sides. Here misses go in `CacheService/FillBlobs` calls instead, as
//! many out at once as [`super::batch_slots`] lets go. The host still
//! fills each blob as its own flight and answers each as soon as it ends.
//! A host daemon without the call (an older one) is asked blob by blob.
use super::batch_slots::{self, Counts};
use crate::castore::B3Digest;
use crate::host::fd_pass::Inbox;
use crate::lock;
use crate::store::channel::WireChannel;
use crate::store::Error;
use crate::wire::cache as pb;
use crate::wire::cache::cache_service_client::CacheServiceClient;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Largest blob asked in a batch: a larger one's bytes dwarf its call.
pub(super) const BATCH_FILL_MAX: u64 = 256 << 10;
/// Blobs in one call (the host answers up to 64).
const BATCH_FILLS: usize = 32;
/// How a batch answered one blob.
pub(super) enum Answer {
    /// In the cache directory; on a tenant's connection, its file is the
    /// `fd_seq`-th descriptor passed (0 otherwise).
    Done {
        fd_seq: u64,
    },
    /// The store has no such blob.
    Missing,
    Failed(Error),
    /// Not answered in a batch (the host has no FillBlobs, or the call
    /// failed as a whole): ask for it alone.
    Alone,
}

/// The batches of one connection to the host daemon.
pub(super) struct FillBatches {
    client: CacheServiceClient<WireChannel>,
    idle: Duration,
    queue: Mutex<Queue>,
    /// The host answered UNIMPLEMENTED: everything is asked alone.
    off: AtomicBool,
    /// On a tenant's connection, where passed files arrive: one answered
    /// to an asker that went is taken and closed, not left there.
    inbox: Option<Arc<Inbox>>,
}

#[derive(Default)]
struct Queue {
    waiting: std::collections::VecDeque<Asked>,
    calls: Counts,
}

struct Asked {
    digest: B3Digest,
    size: u64,
    answer: oneshot::Sender<Answer>,
    /// Others who asked for the same blob before the call went out.
    also: Vec<oneshot::Sender<Answer>>,
}

fn stalled(idle: Duration) -> Error {
    Error::Timeout(format!(
        "a batch of fills: no answer from the host daemon for {idle:?}"
    ))
}

impl FillBatches {
    pub(super) fn new(
        client: CacheServiceClient<WireChannel>,
        idle: Duration,
        inbox: Option<Arc<Inbox>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            idle,
            queue: Mutex::default(),
            off: AtomicBool::new(false),
            inbox,
        })
    }

    /// Whether a fill of a blob of `size` goes in a batch.
    pub(super) fn takes(&self, size: Option<u64>) -> bool {
        size.is_some_and(|s| s <= BATCH_FILL_MAX) && !self.off.load(Relaxed)
    }

    /// Asks for `digest` in the next batch and waits for its answer. Must
    /// run on a runtime (batches are spawned).
    pub(super) async fn ask(self: &Arc<Self>, digest: B3Digest, size: u64) -> Answer {
        let (answer, rx) = oneshot::channel();
        {
            let mut q = lock(&self.queue);
            q.waiting.push_back(Asked {
                digest,
                size,
                answer,
                also: Vec::new(),
            });
            self.send(&mut q);
        }
        rx.await.unwrap_or(Answer::Alone)
    }

    /// Sends the waiting asks (up to a batch) as one call, if a call may
    /// go out now; asks whose askers went are dropped, and a digest asked
    /// twice is asked once (see [`Self::answer`]).
    fn send(self: &Arc<Self>, q: &mut Queue) {
        if !q.calls.may_send() {
            return;
        }
        let mut batch: Vec<Asked> = Vec::new();
        while batch.len() < BATCH_FILLS {
            let Some(a) = q.waiting.pop_front() else {
                break;
            };
            if a.answer.is_closed() {
                continue;
            }
            if let Some(b) = batch.iter_mut().find(|b| b.digest == a.digest) {
                b.also.push(a.answer);
                continue;
            }
            batch.push(a);
        }
        if batch.is_empty() {
            return;
        }
        let (this, back) = (self.clone(), self.clone());
        let run = async move { this.run(batch).await };
        batch_slots::spawn(&mut q.calls, run, move |r| {
            let mut q = lock(&back.queue);
            q.calls.give_back(r);
            back.send(&mut q);
        });
    }

    /// Gives `answer` to the first asker still waiting. Others who asked
    /// for the same blob get the same, but a passed file goes to one
    /// (they ask alone, as after a failure); a passed file nobody takes is
    /// closed.
    fn answer(&self, a: Asked, answer: Answer) {
        let other = match &answer {
            Answer::Done { fd_seq: 0 } => || Answer::Done { fd_seq: 0 },
            Answer::Missing => || Answer::Missing,
            _ => || Answer::Alone,
        };
        let mut left = Some(answer);
        for waiter in std::iter::once(a.answer).chain(a.also) {
            match left.take() {
                Some(answer) => left = waiter.send(answer).err(),
                None => drop(waiter.send(other())),
            }
        }
        if let (Some(Answer::Done { fd_seq }), Some(inbox)) = (left, &self.inbox) {
            if fd_seq > 0 {
                drop(inbox.take(fd_seq));
            }
        }
    }

    async fn run(&self, batch: Vec<Asked>) {
        let req = pb::FillBlobsRequest {
            blobs: batch
                .iter()
                .map(|a| pb::FillBlobRequest {
                    digest: a.digest.into(),
                    size: a.size,
                })
                .collect(),
        };
        let all = |batch: Vec<Asked>, answer: &dyn Fn() -> Answer| {
            for a in batch {
                self.answer(a, answer());
            }
        };
        let mut stream =
            match tokio::time::timeout(self.idle, self.client.clone().fill_blobs(req)).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                    if !self.off.swap(true, Relaxed) {
                        tracing::info!("the host daemon has no FillBlobs: filling blob by blob");
                    }
                    return all(batch, &|| Answer::Alone);
                }
                // asked alone, each gets its own answer (a scope refusing
                // one blob refuses the whole call)
                Ok(Err(s)) => {
                    tracing::debug!("a batch of fills: {}", s.message());
                    return all(batch, &|| Answer::Alone);
                }
                Err(_) => return all(batch, &|| Answer::Failed(stalled(self.idle))),
            };
        let mut slots: Vec<Option<Asked>> = batch.into_iter().map(Some).collect();
        let rest = loop {
            let done = match tokio::time::timeout(self.idle, stream.message()).await {
                Err(_) => break Some(stalled(self.idle)),
                Ok(Ok(Some(d))) => d,
                Ok(Ok(None)) => break None,
                Ok(Err(s)) => break Some(Error::from(s)),
            };
            if done.alive {
                continue;
            }
            let Some(a) = slots.get_mut(done.index as usize).and_then(Option::take) else {
                break Some(Error::Protocol(format!(
                    "the host daemon answered fill {} of a batch twice or unasked",
                    done.index
                )));
            };
            let answer = if done.done {
                Answer::Done {
                    fd_seq: done.fd_seq,
                }
            } else if done.missing {
                Answer::Missing
            } else {
                let code = tonic::Code::from(done.code);
                if code == tonic::Code::Ok {
                    Answer::Failed(Error::Protocol(format!(
                        "the host daemon's answer for blob {} says nothing",
                        a.digest
                    )))
                } else {
                    Answer::Failed(Error::from(tonic::Status::new(code, done.message)))
                }
            };
            self.answer(a, answer);
        };
        // the call ended early: what it did not answer is asked alone,
        // unless it ended in a timeout (asking again would wait as long)
        let timed_out = rest.as_ref().is_some_and(Error::is_timeout);
        if let Some(e) = &rest {
            tracing::debug!("a batch of fills ended early: {e}");
        }
        for a in slots.into_iter().flatten() {
            let answer = if timed_out {
                Answer::Failed(stalled(self.idle))
            } else {
                Answer::Alone
            };
            self.answer(a, answer);
        }
    }
}
