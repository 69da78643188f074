//! `CacheService/ReadBlobs`: many small blobs in one call, so that a host
//! daemon filling its cache ahead of VMs over a link of milliseconds pays
//! one round trip per batch instead of one per file. Served by every
//! daemon of ours from its store (a bucket, the embedded store, a host
//! cache); the asker checks every blob against its digest. A call that
//! names the tree its blobs are from is answered from that tree's packs
//! where the store keeps them (a bucket): a few ranged GETs, not one each.
use crate::castore::B3Digest;
use crate::store::blob::BlobService;
use crate::wire::cache as pb;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// Most digests one call may ask for.
pub const MAX_DIGESTS: usize = 64;
/// Largest blob answered in a batch; a larger one is asked alone.
pub const MAX_BLOB: u64 = 1 << 20;
/// Blobs read at once for one call.
const READS_AT_ONCE: usize = 4;
/// Blobs held in memory, read and not yet taken by the transport, across
/// all calls of the process (each up to [`MAX_BLOB`]): 32 MiB. More calls
/// wait for room; a call holds it at most [`HOLD_LIMIT`] without a piece
/// taken.
const HELD_BLOBS: usize = 32;
static HELD: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HELD_BLOBS);
/// Calls reading from packs at once, each holding at most 4 MiB of them
/// until its client takes them (or the call is ended): a host cache keeps
/// a dozen batches in flight over a bucket's latency.
static PACKED: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(16);
/// How long a call waits for room to read from packs before it reads its
/// blobs alone.
const PACKED_WAIT: Duration = Duration::from_secs(2);
/// How long one call may last, however steadily its client takes pieces:
/// a client taking one piece every few seconds holds its room no longer.
const CALL_LIMIT: Duration = Duration::from_secs(60);
/// How long a call may leave a piece untaken before it is ended and its
/// room given back: a host daemon takes 1 MiB in far less.
const HOLD_LIMIT: Duration = Duration::from_secs(10);

pub type PieceStream = BoxStream<'static, Result<pb::BlobPiece, Status>>;

/// The answer to a ReadBlobs from `blobs`.
pub fn serve(
    blobs: Arc<dyn BlobService>,
    req: pb::ReadBlobsRequest,
) -> Result<PieceStream, Status> {
    let pb::ReadBlobsRequest { digests, tree } = req;
    if digests.len() > MAX_DIGESTS {
        return Err(Status::invalid_argument(format!(
            "{} digests, more than {MAX_DIGESTS}",
            digests.len()
        )));
    }
    let digests = digests
        .iter()
        .map(|d| B3Digest::try_from(&d[..]).map_err(|e| Status::invalid_argument(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let tree = match &tree[..] {
        [] => None,
        t => Some(B3Digest::try_from(t).map_err(|e| Status::invalid_argument(e.to_string()))?),
    };
    // The pieces are read by a task of their own, which holds every room
    // they take and hands a piece over only when the transport asks for
    // the next (it has taken the one before by then). A client that asks
    // for nothing more for HOLD_LIMIT ends its call and gives its room
    // back: otherwise a few calls never read would hold all of it and
    // every other client's batches would wait behind them.
    let (ask, asks) = mpsc::channel::<Answer>(1);
    let producer = AbortOnDrop(tokio::spawn(produce(blobs, digests, tree, asks)).abort_handle());
    let s = async_stream::try_stream! {
        let _producer = producer;
        loop {
            let (answer, next) = oneshot::channel();
            if ask.send(answer).await.is_err() {
                Err(ended())?;
            }
            match next.await {
                Ok(Some(piece)) => yield piece?,
                Ok(None) => break,
                Err(_) => Err(ended())?,
            }
        }
    };
    Ok(Box::pin(s))
}

/// What a client whose call was ended under it gets.
fn ended() -> Status {
    Status::deadline_exceeded(format!(
        "the call was ended: no piece taken for {HOLD_LIMIT:?}, or longer than {CALL_LIMIT:?}"
    ))
}

/// Where the producer puts the next piece (`None`: there are no more).
type Answer = oneshot::Sender<Option<Result<pb::BlobPiece, Status>>>;
type Held = tokio::sync::SemaphorePermit<'static>;

/// Reads the pieces of one call and answers each ask with the next.
async fn produce(
    blobs: Arc<dyn BlobService>,
    digests: Vec<B3Digest>,
    tree: Option<B3Digest>,
    mut asks: mpsc::Receiver<Answer>,
) {
    let deadline = tokio::time::Instant::now() + CALL_LIMIT;
    // Blobs the store has in packs of the tree are read together first
    // (checked against their digests there); the rest one by one. The
    // room to read from packs is held until the packed pieces are taken;
    // a call that finds none free soon reads its blobs alone.
    let mut reading = None;
    let packed = match tree {
        Some(t) if blobs.keeps_packs() && !digests.is_empty() => {
            match tokio::time::timeout(PACKED_WAIT, PACKED.acquire()).await {
                Ok(Ok(room)) => {
                    reading = Some(room);
                    blobs.read_packed(&t, &digests).await.unwrap_or_else(|e| {
                        tracing::warn!(
                            "ReadBlobs: the packs of tree {t}: {e}; reading blobs alone"
                        );
                        vec![None; digests.len()]
                    })
                }
                _ => vec![None; digests.len()],
            }
        }
        _ => vec![None; digests.len()],
    };
    let mut packed_left = packed.iter().filter(|p| p.is_some()).count();
    if packed_left == 0 {
        reading = None;
    }
    let work: Vec<_> = digests.into_iter().zip(packed).enumerate().collect();
    let pieces = futures::stream::iter(work)
        .map(|(i, (d, p))| one(blobs.clone(), i as u32, d, p))
        .buffered(READS_AT_ONCE);
    let mut pieces = std::pin::pin!(pieces);
    let mut taken = None;
    loop {
        let wait = HOLD_LIMIT.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let answer = match tokio::time::timeout(wait, asks.recv()).await {
            Ok(Some(answer)) => answer,
            Ok(None) => return,
            Err(_) => {
                tracing::debug!(
                    "ReadBlobs: a client took no piece for {wait:?} (or its call passed {CALL_LIMIT:?}); the call is ended"
                );
                return;
            }
        };
        drop(taken.take());
        let next = match pieces.next().await {
            Some(Ok((piece, held, from_pack))) => {
                taken = Some(held);
                if from_pack {
                    packed_left -= 1;
                    if packed_left == 0 {
                        reading = None;
                    }
                }
                Some(Ok(piece))
            }
            Some(Err(e)) => Some(Err(e)),
            None => None,
        };
        let last = !matches!(next, Some(Ok(_)));
        let _ = answer.send(next);
        if last {
            drop(reading);
            return;
        }
    }
}

/// One piece, once there is room to hold it: from the packs' bytes when
/// they had it (true), read alone otherwise.
fn one(
    blobs: Arc<dyn BlobService>,
    index: u32,
    digest: B3Digest,
    packed: Option<bytes::Bytes>,
) -> futures::future::BoxFuture<'static, Result<(pb::BlobPiece, Held, bool), Status>> {
    async move {
        let held = HELD
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        Ok(match packed {
            Some(data) => (
                pb::BlobPiece {
                    index,
                    data,
                    ..Default::default()
                },
                held,
                true,
            ),
            None => (piece(blobs.as_ref(), index, &digest).await?, held, false),
        })
    }
    .boxed()
}

/// Aborts the call's producer when its answer stream is dropped (the
/// client went, or reset the call): nothing is read for nobody.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn piece(
    blobs: &dyn BlobService,
    index: u32,
    digest: &B3Digest,
) -> Result<pb::BlobPiece, Status> {
    let mut p = pb::BlobPiece {
        index,
        ..Default::default()
    };
    let Some(reader) = blobs.open_read(digest).await.map_err(Status::from)? else {
        p.missing = true;
        return Ok(p);
    };
    let mut data = Vec::new();
    reader
        .take(MAX_BLOB + 1)
        .read_to_end(&mut data)
        .await
        .map_err(|e| Status::internal(format!("reading blob {digest}: {e}")))?;
    if data.len() as u64 > MAX_BLOB {
        p.too_large = true;
    } else {
        p.data = data.into();
    }
    Ok(p)
}
