//! Blob client for a remote tvix-store. Every blob read is checked against
//! its digest before the first byte is handed out: the stream is spooled to
//! memory (small blobs) or an unnamed file (large ones) while
//! hashing, so a lying server yields an error, never wrong bytes.
use super::spool::Checking;
use super::{BlobReader, BlobService, BlobWriter};
use crate::castore::B3Digest;
use crate::store::channel::WireChannel;
use crate::store::channel::MAX_MESSAGE_SIZE;
use crate::store::{Error, Result};
use crate::wire::castore::blob_service_client::BlobServiceClient;
use crate::wire::castore::{BlobChunk, ReadBlobRequest, StatBlobRequest};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Code;

/// Size of the chunks we upload.
const CHUNK: usize = 1 << 20;
/// Default for [`GrpcBlobService::with_idle_timeout`].
const DEFAULT_IDLE: Duration = Duration::from_secs(30);

fn stalled(digest: &B3Digest, idle: Duration) -> Error {
    Error::Timeout(format!(
        "blob {digest}: no data from the store for {idle:?}"
    ))
}

#[derive(Clone)]
pub struct GrpcBlobService {
    client: BlobServiceClient<WireChannel>,
    /// Spool large blobs into memory files rather than the temp directory
    /// (inside the sandbox there is no writable directory).
    memfd_spool: bool,
    /// Longest wait for the answer or the next chunk of a Read: a transfer
    /// may take as long as it keeps moving.
    idle: Duration,
}

impl GrpcBlobService {
    pub fn new(channel: WireChannel) -> Self {
        Self {
            client: BlobServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
            memfd_spool: false,
            idle: DEFAULT_IDLE,
        }
    }

    /// How long a Read may stall (no answer, no chunk) before it fails.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// The Read call's raw chunk stream; `None` when the blob is unknown.
    async fn read_call(&self, digest: &B3Digest) -> Result<Option<tonic::Streaming<BlobChunk>>> {
        let req = ReadBlobRequest {
            digest: (*digest).into(),
        };
        let mut client = self.client.clone();
        match tokio::time::timeout(self.idle, client.read(req)).await {
            Err(_) => Err(stalled(digest, self.idle)),
            Ok(Ok(r)) => Ok(Some(r.into_inner())),
            Ok(Err(s)) if s.code() == Code::NotFound => Ok(None),
            Ok(Err(s)) => Err(s.into()),
        }
    }

    /// Fetches and checks a blob, stopping past `limit` bytes.
    async fn fetch(
        &self,
        digest: &B3Digest,
        limit: Option<u64>,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        let Some(mut stream) = self.read_call(digest).await? else {
            return Ok(None);
        };
        let mut checking = Checking::new(*digest, limit, self.memfd_spool);
        let mut first = true;
        loop {
            let msg = tokio::time::timeout(self.idle, stream.message())
                .await
                .map_err(|_| stalled(digest, self.idle))?;
            match msg {
                Ok(Some(chunk)) => checking.push(&chunk.data)?,
                Ok(None) => break,
                Err(s) if first && s.code() == Code::NotFound => return Ok(None),
                Err(s) => return Err(s.into()),
            }
            first = false;
        }
        Ok(Some(checking.finish("the remote store")?))
    }

    /// Large blobs are spooled into memory files (memfd), not the temp directory.
    pub fn with_memfd_spool(mut self) -> Self {
        self.memfd_spool = true;
        self
    }
}

#[async_trait]
impl BlobService for GrpcBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        let req = StatBlobRequest {
            digest: (*digest).into(),
            ..Default::default()
        };
        match self.client.clone().stat(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(s.into()),
        }
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        self.fetch(digest, None).await
    }

    async fn open_read_sized(
        &self,
        digest: &B3Digest,
        size: u64,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        self.fetch(digest, Some(size)).await
    }

    async fn read_stream(&self, digest: &B3Digest) -> Result<Option<super::ChunkStream>> {
        use futures::StreamExt;
        let Some(stream) = self.read_call(digest).await? else {
            return Ok(None);
        };
        Ok(Some(Box::pin(
            stream.map(|m| m.map(|c| c.data).map_err(Error::from)),
        )))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        let (tx, rx) = mpsc::channel::<BlobChunk>(4);
        let mut client = self.client.clone();
        let call = tokio::spawn(async move {
            client
                .put(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
        });
        Ok(Box::new(GrpcWriter {
            tx: Some(tx),
            call: Some(call),
            hasher: blake3::Hasher::new(),
            buf: BytesMut::new(),
        }))
    }
}

struct GrpcWriter {
    tx: Option<mpsc::Sender<BlobChunk>>,
    /// `None` once awaited (closed) or abandoned (dropped).
    call: Option<JoinHandle<Result<crate::wire::castore::PutBlobResponse, tonic::Status>>>,
    hasher: blake3::Hasher,
    buf: BytesMut,
}

impl GrpcWriter {
    async fn send(&mut self, data: Bytes) -> Result<()> {
        let Some(tx) = &self.tx else {
            return Err(Error::Protocol("blob upload already failed".into()));
        };
        if tx.send(BlobChunk { data }).await.is_err() {
            // The call ended early; its status says why.
            self.tx = None;
            let Some(call) = self.call.take() else {
                return Err(Error::Protocol("blob upload already failed".into()));
            };
            return Err(match call.await {
                Ok(Err(s)) => s.into(),
                Ok(Ok(_)) => Error::Protocol("server closed the blob upload early".into()),
                Err(e) => std::io::Error::other(e).into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for GrpcWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.hasher.update(data);
        self.buf.extend_from_slice(data);
        while self.buf.len() >= CHUNK {
            let chunk = self.buf.split_to(CHUNK).freeze();
            self.send(chunk).await?;
        }
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<B3Digest> {
        if !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            self.send(chunk).await?;
        }
        self.tx = None;
        let call = self
            .call
            .take()
            .ok_or_else(|| Error::Protocol("blob upload already failed".into()))?;
        let resp = call.await.map_err(std::io::Error::other)??;
        let expected = B3Digest::from(self.hasher.finalize());
        let got = B3Digest::try_from(&resp.digest[..])
            .map_err(|e| Error::Protocol(format!("Put answered a bad digest: {e}")))?;
        if got != expected {
            return Err(Error::DigestMismatch {
                expected,
                actual: got,
            });
        }
        Ok(expected)
    }
}

/// How long an abandoned upload's stream is held open for the transport
/// to reset it (see `Drop for GrpcWriter`).
const ABANDON_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Drop for GrpcWriter {
    fn drop(&mut self) {
        // Not closed: reset the call instead of ending the stream, so the
        // server does not store a truncated blob. The stream must not end
        // before the transport has reset it: hyper learns of the aborted
        // call on its own task and only then drops the request body (our
        // receiver). Ending it sooner sends a clean end of stream, and the
        // server stores the prefix (seen under load in the conformance
        // suite). So the sender is kept until the receiver is gone, or, if
        // the transport never lets go, for at most `ABANDON_WAIT`.
        if let (Some(tx), Some(call)) = (self.tx.take(), self.call.take()) {
            call.abort();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = call.await;
                    if tokio::time::timeout(ABANDON_WAIT, tx.closed())
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            "an abandoned blob upload was not reset within {ABANDON_WAIT:?}; \
                             ending it (the server may keep its prefix as a blob of its own)"
                        );
                    }
                    drop(tx);
                });
            }
        }
    }
}
