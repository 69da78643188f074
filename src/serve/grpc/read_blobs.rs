//! `CacheService/ReadBlobs`: many small blobs in one call, so that a host
//! daemon filling its cache ahead of VMs over a link of milliseconds pays
//! one round trip per batch instead of one per file. Served by every
//! daemon of ours from its store (a bucket, the embedded store, a host
//! cache); the asker checks every blob against its digest.
use crate::castore::B3Digest;
use crate::store::blob::BlobService;
use crate::wire::cache as pb;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tonic::Status;

/// Most digests one call may ask for.
pub const MAX_DIGESTS: usize = 64;
/// Largest blob answered in a batch; a larger one is asked alone.
pub const MAX_BLOB: u64 = 1 << 20;
/// Blobs read at once for one call.
const READS_AT_ONCE: usize = 4;
/// Blobs held in memory, read and not yet taken by the transport, across
/// all calls of the process (each up to [`MAX_BLOB`]): what clients that
/// ask and never read can pin, 32 MiB. More calls wait for room.
const HELD_BLOBS: usize = 32;
static HELD: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HELD_BLOBS);

pub type PieceStream = BoxStream<'static, Result<pb::BlobPiece, Status>>;

/// The answer to a ReadBlobs of `digests` from `blobs`.
pub fn serve(
    blobs: Arc<dyn BlobService>,
    digests: Vec<bytes::Bytes>,
) -> Result<PieceStream, Status> {
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
    let pieces = futures::stream::iter(digests.into_iter().enumerate())
        .map(move |(i, d)| {
            let blobs = blobs.clone();
            async move {
                let held = HELD
                    .acquire()
                    .await
                    .map_err(|_| Status::unavailable("shutting down"))?;
                Ok::<_, Status>((piece(blobs.as_ref(), i as u32, &d).await?, held))
            }
        })
        .buffered(READS_AT_ONCE);
    // A piece's room is given back when the transport asks for the next:
    // it has taken the piece by then.
    let s = async_stream::try_stream! {
        let mut pieces = std::pin::pin!(pieces);
        let mut last = None;
        while let Some(next) = pieces.next().await {
            let (piece, held) = next?;
            drop(last.replace(held));
            yield piece;
        }
        drop(last);
    };
    Ok(Box::pin(s))
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
