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
/// until its client takes them (or [`HOLD_LIMIT`] passes).
static PACKED: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
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
    tokio::spawn(produce(blobs, digests, tree, asks));
    let s = async_stream::try_stream! {
        loop {
            let (answer, next) = oneshot::channel();
            if ask.send(answer).await.is_err() {
                Err(Status::deadline_exceeded(format!(
                    "no piece was taken for {HOLD_LIMIT:?}"
                )))?;
            }
            match next.await {
                Ok(Some(piece)) => yield piece?,
                Ok(None) => break,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no piece was taken for {HOLD_LIMIT:?}"
                )))?,
            }
        }
    };
    Ok(Box::pin(s))
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
    // Blobs the store has in packs of the tree are read together first
    // (checked against their digests there); the rest one by one.
    // The room to read from packs is held until the call ends: what was
    // read from them waits in memory until the client takes it.
    let mut _reading = None;
    let packed = match tree {
        Some(t) if blobs.keeps_packs() => match PACKED.acquire().await {
            Ok(room) => {
                _reading = Some(room);
                blobs.read_packed(&t, &digests).await.unwrap_or_else(|e| {
                    tracing::warn!("ReadBlobs: the packs of tree {t}: {e}; reading blobs alone");
                    vec![None; digests.len()]
                })
            }
            Err(_) => return,
        },
        _ => vec![None; digests.len()],
    };
    let work: Vec<_> = digests.into_iter().zip(packed).enumerate().collect();
    let pieces = futures::stream::iter(work)
        .map(|(i, (d, p))| one(blobs.clone(), i as u32, d, p))
        .buffered(READS_AT_ONCE);
    let mut pieces = std::pin::pin!(pieces);
    let mut taken = None;
    loop {
        let answer = match tokio::time::timeout(HOLD_LIMIT, asks.recv()).await {
            Ok(Some(answer)) => answer,
            Ok(None) => return,
            Err(_) => {
                tracing::warn!(
                    "ReadBlobs: a client took no piece for {HOLD_LIMIT:?}; its call is ended"
                );
                return;
            }
        };
        drop(taken.take());
        let next = match pieces.next().await {
            Some(Ok((piece, held))) => {
                taken = Some(held);
                Some(Ok(piece))
            }
            other => other.map(|e| e.map(|(p, _)| p)),
        };
        let last = !matches!(next, Some(Ok(_)));
        let _ = answer.send(next);
        if last {
            return;
        }
    }
}

/// One piece, once there is room to hold it: from the packs' bytes when
/// they had it, read alone otherwise.
fn one(
    blobs: Arc<dyn BlobService>,
    index: u32,
    digest: B3Digest,
    packed: Option<bytes::Bytes>,
) -> futures::future::BoxFuture<'static, Result<(pb::BlobPiece, Held), Status>> {
    async move {
        let held = HELD
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let p = match packed {
            Some(data) => pb::BlobPiece {
                index,
                data,
                ..Default::default()
            },
            None => piece(blobs.as_ref(), index, &digest).await?,
        };
        Ok((p, held))
    }
    .boxed()
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
