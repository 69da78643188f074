//! `CacheService/FillBlobs`: FillBlob for many small blobs in one call, so
//! that a per-VM daemon whose guest misses 64 files at once makes a few
//! calls to the host daemon, not 64 streams each costing both sides. Every
//! blob is still its own flight (one fetch however many ask; the host's
//! misses go on to the remote in batches of their own) and is answered as
//! soon as it ends. Bounded: 64 distinct blobs a call, 4,096 across the
//! calls being answered.
use super::store::digest_arg;
use crate::castore::B3Digest;
use crate::store::cache::flights::{Outcome, Progress};
use crate::store::cache::Cache;
use crate::wire::cache as pb;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::Status;

/// Most blobs one call may ask for.
pub const MAX_FILLS: usize = 64;
/// Blobs of all FillBlobs calls being answered at once: a call starts a
/// fill per blob whether or not its client reads the answers, so calls
/// beyond this are refused (UNAVAILABLE: the client asks blob by blob,
/// one stream a fill, as the listener's stream bounds allow).
const BATCHED_FILLS: usize = 4096;
static BATCHED: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BATCHED_FILLS);

pub type DoneStream = BoxStream<'static, Result<pb::FillDone, Status>>;

/// The blobs a FillBlobs names, each with the size its directory gives.
pub fn blobs_of(req: &pb::FillBlobsRequest) -> Result<Vec<(B3Digest, Option<u64>)>, Status> {
    if req.blobs.len() > MAX_FILLS {
        return Err(Status::invalid_argument(format!(
            "{} blobs, more than {MAX_FILLS}",
            req.blobs.len()
        )));
    }
    let blobs = req
        .blobs
        .iter()
        .map(|b| Ok((digest_arg(&b.digest)?, (b.size > 0).then_some(b.size))))
        .collect::<Result<Vec<_>, Status>>()?;
    let mut seen = std::collections::HashSet::with_capacity(blobs.len());
    if let Some((d, _)) = blobs.iter().find(|(d, _)| !seen.insert(*d)) {
        return Err(Status::invalid_argument(format!(
            "blob {d} asked twice in one call"
        )));
    }
    Ok(blobs)
}

/// Starts (or joins) the fill of each of `blobs` and answers each as its
/// fill ends; while none ends but bytes move, a sign of life at most
/// every [`super::cache::FILL_PROGRESS_EVERY`].
pub fn serve(cache: &Arc<Cache>, blobs: &[(B3Digest, Option<u64>)]) -> Result<DoneStream, Status> {
    let n = u32::try_from(blobs.len()).unwrap_or(u32::MAX);
    let held = BATCHED.try_acquire_many(n).map_err(|_| {
        Status::unavailable(format!(
            "{BATCHED_FILLS} blobs of batched fills are being answered already: ask alone"
        ))
    })?;
    let rxs = blobs
        .iter()
        .map(|&(digest, size)| cache.fill_blob(digest, size))
        .collect::<Result<Vec<_>, _>>()?;
    let watched = rxs.clone();
    let mut ends: FuturesUnordered<_> = rxs
        .into_iter()
        .enumerate()
        .map(|(i, rx)| end_of(i as u32, rx))
        .collect();
    let s = async_stream::stream! {
        let _held = held;
        let mut tick = tokio::time::interval(super::cache::FILL_PROGRESS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut moved = bytes(&watched);
        while !ends.is_empty() {
            tokio::select! {
                Some(done) = ends.next() => yield Ok(done),
                _ = tick.tick() => {
                    let now = bytes(&watched);
                    if now != moved {
                        moved = now;
                        yield Ok(pb::FillDone { alive: true, ..Default::default() });
                    }
                }
            }
        }
    };
    Ok(Box::pin(s))
}

fn bytes(rxs: &[watch::Receiver<Progress>]) -> u64 {
    rxs.iter()
        .map(|rx| rx.borrow().bytes)
        .fold(0, u64::wrapping_add)
}

async fn end_of(index: u32, mut rx: watch::Receiver<Progress>) -> pb::FillDone {
    let outcome = loop {
        if let Some(o) = rx.borrow_and_update().outcome.clone() {
            break o;
        }
        if rx.changed().await.is_err() {
            break Outcome::failed(&crate::store::Error::Fetch(
                "the fill ended without an outcome".into(),
            ));
        }
    };
    let mut done = pb::FillDone {
        index,
        ..Default::default()
    };
    match outcome.into_result() {
        Ok(true) => done.done = true,
        Ok(false) => done.missing = true,
        Err(e) => {
            let s = Status::from(e);
            done.code = match s.code() {
                tonic::Code::Ok => tonic::Code::Internal as i32,
                c => c as i32,
            };
            done.message = s.message().to_owned();
        }
    }
    done
}
