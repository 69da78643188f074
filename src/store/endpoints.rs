//! Several daemons of one store (`Addr::List`), as the failover backends
//! (`blob::failover`, `directory::failover`, `pathinfo::failover`) share
//! them: which daemon a call tries first, which failures move it to the
//! next, and when a daemon that failed is tried again.
//!
//! - A call tries the daemons that answer in their listed order, then
//!   (last resort) those that failed, each at most once, and ends with the
//!   first answer or the last daemon's error: it never loops.
//! - Only a fault of the daemon moves a call on ([`is_fault`]): the
//!   connection (refused, reset, unavailable) or a stall (no progress for
//!   [`Endpoints::stall`]). Anything that is an answer about the object
//!   (not found, a digest mismatch, a refused Put) is returned as it is.
//! - A daemon that failed is left out for a backoff (1 s, doubling up to
//!   [`MAX_BACKOFF`]); then the next call sends it a harmless probe in the
//!   background (a Stat of the all-zero digest) and it is back once that
//!   gets any answer. Calls never wait for a daemon known to be down unless
//!   every daemon is.
use crate::lock;
use crate::store::channel::WireChannel;
use crate::store::{Error, Result};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::Code;

/// First wait before a failed daemon is probed; doubled per failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait before a failed daemon is probed again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Whether an error is the daemon's fault rather than an answer about the
/// object: the call then moves to the next daemon. Transport failures,
/// stalls, and the statuses a daemon (or the connection to it) gives when
/// it cannot serve: UNAVAILABLE (refused, reset, its own upstream down),
/// UNKNOWN, INTERNAL and CANCELLED (a connection torn down mid-call),
/// DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (too busy), ABORTED. Not NOT_FOUND,
/// PERMISSION_DENIED, ALREADY_EXISTS, INVALID_ARGUMENT, UNIMPLEMENTED, nor
/// a digest or size mismatch or an invalid object: every daemon of one
/// store would say the same.
pub fn is_fault(e: &Error) -> bool {
    match e {
        Error::Timeout(_) | Error::Transport(_) => true,
        Error::Remote(s) => matches!(
            s.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::Cancelled
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
        ),
        _ => false,
    }
}

/// The daemons of one store and how each has been answering.
pub struct Endpoints {
    eps: Vec<Arc<Endpoint>>,
    stall: Duration,
}

struct Endpoint {
    /// Its address, for logs and errors.
    name: String,
    channel: WireChannel,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// Failures in a row; 0: up.
    failures: u32,
    /// When a down daemon may be probed again.
    retry_at: Option<Instant>,
    /// A probe is under way.
    probing: bool,
}

impl Endpoints {
    /// `channels` (name, channel), in the order they are preferred.
    /// `idle` is how long the store's callers wait for progress: each
    /// daemon gets its share of it ([`Endpoints::stall`]).
    pub fn new(channels: Vec<(String, WireChannel)>, idle: Duration) -> Result<Arc<Self>> {
        if channels.is_empty() {
            return Err(Error::InvalidAddress(
                String::new(),
                "a list of stores is empty".into(),
            ));
        }
        let stall = Self::stall_of(idle, channels.len());
        let eps = channels
            .into_iter()
            .map(|(name, channel)| {
                Arc::new(Endpoint {
                    name,
                    channel,
                    health: Mutex::default(),
                })
            })
            .collect();
        Ok(Arc::new(Self { eps, stall }))
    }

    /// [`Endpoints::stall`] of `n` daemons of a store whose callers wait
    /// `idle` for progress.
    pub fn stall_of(idle: Duration, n: usize) -> Duration {
        let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        (idle / n).max(Duration::from_millis(100))
    }

    /// How long a daemon may make no progress on a call before the call
    /// moves on: the store's idle timeout divided among the daemons, so
    /// that a caller waiting that long (the host cache, the view) sees the
    /// call fail over in time rather than time out itself.
    pub fn stall(&self) -> Duration {
        self.stall
    }

    /// The daemons' channels, in their listed order.
    pub fn channels(&self) -> impl Iterator<Item = WireChannel> + '_ {
        self.eps.iter().map(|e| e.channel.clone())
    }

    /// How many daemons there are.
    pub fn len(&self) -> usize {
        self.eps.len()
    }

    /// Never: a list has at least one daemon.
    pub fn is_empty(&self) -> bool {
        self.eps.is_empty()
    }

    /// A daemon's address.
    pub fn name(&self, i: usize) -> &str {
        &self.eps[i].name
    }

    /// The order one call tries the daemons in (indices): those up in
    /// their listed order, then those down. A down daemon whose backoff is
    /// over gets a probe in the background (or, outside a runtime, counts
    /// as up).
    pub fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let mut up = Vec::with_capacity(self.eps.len());
        let mut down = Vec::new();
        for (i, ep) in self.eps.iter().enumerate() {
            let mut h = lock(&ep.health);
            if h.failures == 0 {
                up.push(i);
                continue;
            }
            if !h.probing && h.retry_at.is_none_or(|t| t <= now) {
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        h.probing = true;
                        rt.spawn(probe(ep.clone(), self.stall));
                    }
                    Err(_) => {
                        up.push(i);
                        continue;
                    }
                }
            }
            down.push(i);
        }
        up.extend(down);
        up
    }

    /// Daemon `i` answered (whatever it said).
    pub fn answered(&self, i: usize) {
        self.eps[i].answered();
    }

    /// Daemon `i` failed a call with `e` (a fault).
    pub fn failed(&self, i: usize, e: &Error) {
        self.eps[i].failed(e);
    }

    /// `f(i)` on the daemons in [`Endpoints::order`] until one answers;
    /// a fault moves on to the next, the last one's is returned.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut last = None;
        for i in self.order() {
            match f(i).await {
                Err(e) if is_fault(&e) => {
                    self.failed(i, &e);
                    last = Some(e);
                }
                r => {
                    self.answered(i);
                    return r;
                }
            }
        }
        Err(self.all_failed(last))
    }

    /// The error of a call that every daemon failed: the last one's.
    pub fn all_failed(&self, last: Option<Error>) -> Error {
        let e = last.unwrap_or_else(|| Error::Fetch("no store daemon to ask".into()));
        tracing::warn!(
            "every store daemon failed ({}); the last said: {e}",
            self.eps
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        e
    }

    /// `fut` (a call to daemon `i`), failed as a stall when it takes
    /// longer than [`Endpoints::stall`]: for calls whose answer is one
    /// small message, so that time without an answer is time without
    /// progress.
    pub async fn within<T>(
        &self,
        i: usize,
        what: impl std::fmt::Display,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout(self.stall, fut)
            .await
            .map_err(|_| self.stalled(i, what))?
    }

    /// The error of daemon `i` making no progress on `what`.
    pub fn stalled(&self, i: usize, what: impl std::fmt::Display) -> Error {
        Error::Timeout(format!(
            "{what}: no progress from store {} for {:?}",
            self.eps[i].name, self.stall
        ))
    }
}

impl Endpoint {
    fn answered(&self) {
        let mut h = lock(&self.health);
        if h.failures > 0 {
            tracing::info!("store {} answers again", self.name);
        }
        *h = Health::default();
    }

    fn failed(&self, e: &Error) {
        let now = Instant::now();
        let mut h = lock(&self.health);
        h.probing = false;
        // Calls that were under way when it failed say nothing new.
        if h.failures > 0 && h.retry_at.is_some_and(|t| now < t) {
            return;
        }
        h.failures = h.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (h.failures - 1).min(16))
            .min(MAX_BACKOFF);
        h.retry_at = Some(now + backoff);
        if h.failures == 1 {
            tracing::warn!(
                "store {} failed ({e}): calls go to the others, it is tried again in {backoff:?}",
                self.name
            );
        } else {
            tracing::debug!(
                "store {} still fails ({e}): tried again in {backoff:?}",
                self.name
            );
        }
    }
}

/// Asks a down daemon something harmless: any answer (even "not found" or
/// "unimplemented") means it is back.
async fn probe(ep: Arc<Endpoint>, stall: Duration) {
    use crate::wire::castore::{blob_service_client::BlobServiceClient, StatBlobRequest};
    let req = StatBlobRequest {
        digest: bytes::Bytes::from_static(&[0; 32]),
        ..Default::default()
    };
    let mut client = BlobServiceClient::new(ep.channel.clone());
    let outcome: Result<()> = match tokio::time::timeout(stall, client.stat(req)).await {
        Err(_) => Err(Error::Timeout(format!("probe: no answer for {stall:?}"))),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(s.into()),
    };
    match outcome {
        Err(e) if is_fault(&e) => ep.failed(&e),
        _ => ep.answered(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code) -> Error {
        tonic::Status::new(code, "x").into()
    }

    #[test]
    fn only_faults_of_the_daemon_fail_over() {
        for c in [
            Code::Unavailable,
            Code::Unknown,
            Code::Cancelled,
            Code::Internal,
        ] {
            assert!(is_fault(&status(c)), "{c:?}");
        }
        assert!(is_fault(&Error::Timeout("stall".into())));
        for c in [
            Code::NotFound,
            Code::PermissionDenied,
            Code::AlreadyExists,
            Code::InvalidArgument,
            Code::Unimplemented,
        ] {
            assert!(!is_fault(&status(c)), "{c:?}");
        }
        let d = crate::castore::B3Digest::from(blake3::hash(b""));
        assert!(!is_fault(&Error::DigestMismatch {
            expected: d,
            actual: d
        }));
        assert!(!is_fault(&Error::Conflict("x".into())));
        assert!(!is_fault(&Error::NotFound("x".into())));
    }

    #[tokio::test]
    async fn a_failed_daemon_goes_last_and_comes_back_after_its_backoff() {
        // nothing listens there: probes fail at once
        let dead = |n: &str| {
            let p = std::path::PathBuf::from(format!("/nonexistent/{n}.sock"));
            let ch = crate::store::channel::connect_unix(p, Default::default()).unwrap();
            (n.to_string(), ch)
        };
        let eps = Endpoints::new(vec![dead("a"), dead("b")], Duration::from_secs(4)).unwrap();
        assert_eq!(eps.stall(), Duration::from_secs(2));
        assert_eq!(eps.order(), [0, 1]);
        eps.failed(0, &status(Code::Unavailable));
        assert_eq!(eps.order(), [1, 0], "the failed one is the last resort");
        // a second failure of a call started before counts once
        eps.failed(0, &status(Code::Unavailable));
        assert_eq!(lock(&eps.eps[0].health).failures, 1);
        eps.answered(1);
        let left = lock(&eps.eps[0].health).retry_at.unwrap() - Instant::now();
        assert!(
            left <= FIRST_BACKOFF && left > FIRST_BACKOFF / 2,
            "{left:?}"
        );
        lock(&eps.eps[0].health).retry_at = Some(Instant::now());
        // due: a probe starts, the daemon stays last until it answers
        assert_eq!(eps.order(), [1, 0]);
        assert!(lock(&eps.eps[0].health).probing);
        eps.answered(0);
        assert_eq!(eps.order(), [0, 1], "back in its place once it answers");
        // backoff doubles, bounded
        for _ in 0..10 {
            let h = &eps.eps[0];
            lock(&h.health).retry_at = None;
            h.failed(&status(Code::Unavailable));
        }
        let left = lock(&eps.eps[0].health).retry_at.unwrap() - Instant::now();
        assert!(left <= MAX_BACKOFF && left > MAX_BACKOFF / 2, "{left:?}");
    }
}
