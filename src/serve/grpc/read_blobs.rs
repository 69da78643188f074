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
const READS_AT_ONCE: usize = 8;

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
    let s = futures::stream::iter(digests.into_iter().enumerate())
        .map(move |(i, d)| {
            let blobs = blobs.clone();
            async move { piece(blobs.as_ref(), i as u32, &d).await }
        })
        .buffered(READS_AT_ONCE);
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
