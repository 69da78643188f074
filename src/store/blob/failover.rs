//! Blobs from several daemons of one store (see `store::endpoints`): a
//! gRPC client per daemon, a call moving to the next on a fault.
//!
//! - A checked read (`open_read`, `open_read_sized`) hands out nothing
//!   before the whole blob matched its digest, so one that fails midway is
//!   simply made again on the next daemon, from the beginning.
//! - A raw stream (`read_stream`, what the host cache fills from) has
//!   handed bytes out already: it resumes on the next daemon at the offset
//!   delivered. tvix's Read has no offset, so the next daemon's stream is
//!   read from its start and the bytes already delivered are skipped; the
//!   blob being content-addressed, they are the same bytes, and the
//!   caller's digest check covers the joined stream all the same.
//! - An upload is kept (in memory up to 4 MiB, then in an unnamed
//!   temporary file) while it streams to one daemon, and replayed whole to
//!   the next if that one fails: a Put of the same bytes is idempotent.
use super::grpc::GrpcBlobService;
use super::{BlobReader, BlobService, BlobWriter, ChunkStream};
use crate::castore::B3Digest;
use crate::store::channel::WireChannel;
use crate::store::endpoints::{is_fault, Endpoints};
use crate::store::{Error, Result};
use async_trait::async_trait;
use futures::StreamExt;
use std::io::{Read, Seek, Write};
use std::sync::Arc;

/// Uploads up to this size are kept in memory for a replay; larger ones
/// in a temporary file.
const KEEP_IN_MEMORY: usize = 4 << 20;
/// Size of the pieces a replay is written in.
const REPLAY_CHUNK: usize = 1 << 20;

#[derive(Clone)]
pub struct FailoverBlobService {
    eps: Arc<Endpoints>,
    clients: Arc<Vec<GrpcBlobService>>,
}

impl FailoverBlobService {
    /// A client per daemon, made by `make` from its channel; each gives up
    /// on a read after the daemons' stall limit.
    pub fn new(eps: Arc<Endpoints>, make: impl Fn(WireChannel) -> GrpcBlobService) -> Self {
        let stall = eps.stall();
        let clients = eps
            .channels()
            .map(|c| make(c).with_idle_timeout(stall))
            .collect();
        Self {
            eps,
            clients: Arc::new(clients),
        }
    }
}

#[async_trait]
impl BlobService for FailoverBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        let what = format!("blob {digest}");
        self.eps
            .call(|i| self.eps.within(i, &what, self.clients[i].has(digest)))
            .await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        self.eps.call(|i| self.clients[i].open_read(digest)).await
    }

    async fn open_read_sized(
        &self,
        digest: &B3Digest,
        size: u64,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        self.eps
            .call(|i| self.clients[i].open_read_sized(digest, size))
            .await
    }

    async fn read_stream(&self, digest: &B3Digest) -> Result<Option<ChunkStream>> {
        let order = self.eps.order();
        let what = format!("blob {digest}");
        let mut last = None;
        let mut opened = None;
        for (k, &i) in order.iter().enumerate() {
            match self
                .eps
                .within(i, &what, self.clients[i].read_stream(digest))
                .await
            {
                Err(e) if is_fault(&e) => {
                    self.eps.failed(i, &e);
                    last = Some(e);
                }
                Ok(Some(s)) => {
                    opened = Some((k, s));
                    break;
                }
                r => {
                    self.eps.answered(i);
                    return r;
                }
            }
        }
        let Some((k, stream)) = opened else {
            return Err(self.eps.all_failed(last));
        };
        let resumed = Resumed {
            eps: self.eps.clone(),
            clients: self.clients.clone(),
            digest: *digest,
            order,
            k,
        };
        Ok(Some(resumed.stream(stream)))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        let order = self.eps.order();
        let current = Some(self.clients[order[0]].open_write().await?);
        Ok(Box::new(FailoverWriter {
            eps: self.eps.clone(),
            clients: self.clients.clone(),
            order,
            k: 0,
            current,
            kept: Kept::Memory(Vec::new()),
            last: None,
        }))
    }
}

/// A raw blob stream that goes on at the next daemon where one fails.
struct Resumed {
    eps: Arc<Endpoints>,
    clients: Arc<Vec<GrpcBlobService>>,
    digest: B3Digest,
    /// The call's order of daemons, and the one streaming now.
    order: Vec<usize>,
    k: usize,
}

impl Resumed {
    fn stream(mut self, first: ChunkStream) -> ChunkStream {
        Box::pin(async_stream::try_stream! {
            let mut stream = first;
            let mut delivered = 0u64;
            // bytes of the current daemon's stream not to hand out again
            let mut skip = 0u64;
            let mut answered = false;
            loop {
                let i = self.order[self.k];
                let next = tokio::time::timeout(self.eps.stall(), stream.next()).await;
                let fault = match next {
                    Err(_) => self.eps.stalled(i, format!("blob {}", self.digest)),
                    Ok(None) if skip > 0 => Err(Error::Protocol(format!(
                        "store {} ended blob {} at {} bytes, before the {delivered} already read",
                        self.eps.name(i),
                        self.digest,
                        delivered - skip
                    )))?,
                    Ok(None) => {
                        self.eps.answered(i);
                        break;
                    }
                    Ok(Some(Err(e))) if is_fault(&e) => e,
                    Ok(Some(Err(e))) => Err(e)?,
                    Ok(Some(Ok(mut chunk))) => {
                        if !answered {
                            self.eps.answered(i);
                            answered = true;
                        }
                        if skip > 0 {
                            let n = skip.min(chunk.len() as u64);
                            skip -= n;
                            chunk = chunk.slice(n as usize..);
                        }
                        if !chunk.is_empty() {
                            delivered += chunk.len() as u64;
                            yield chunk;
                        }
                        continue;
                    }
                };
                self.eps.failed(i, &fault);
                stream = self.reopen(fault).await?;
                skip = delivered;
                answered = false;
                tracing::info!(
                    "blob {}: resuming at byte {delivered} from store {}",
                    self.digest,
                    self.eps.name(self.order[self.k])
                );
            }
        })
    }

    /// The blob's stream from the next daemon of the call that opens it;
    /// the last fault when none is left.
    async fn reopen(&mut self, mut fault: Error) -> Result<ChunkStream> {
        while self.k + 1 < self.order.len() {
            self.k += 1;
            let i = self.order[self.k];
            let what = format!("blob {}", self.digest);
            match self
                .eps
                .within(i, &what, self.clients[i].read_stream(&self.digest))
                .await
            {
                Ok(Some(s)) => return Ok(s),
                Ok(None) => {
                    self.eps.answered(i);
                    return Err(Error::NotFound(format!(
                        "blob {} (store {} lacks it, another sent part of it)",
                        self.digest,
                        self.eps.name(i)
                    )));
                }
                Err(e) if is_fault(&e) => {
                    self.eps.failed(i, &e);
                    fault = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(self.eps.all_failed(Some(fault)))
    }
}

/// What an upload wrote so far, for a replay.
enum Kept {
    Memory(Vec<u8>),
    File(std::fs::File),
}

impl Kept {
    fn push(&mut self, data: &[u8]) -> std::io::Result<()> {
        if let Kept::Memory(buf) = self {
            if buf.len() + data.len() <= KEEP_IN_MEMORY {
                buf.extend_from_slice(data);
                return Ok(());
            }
            let mut f = tempfile::tempfile()?;
            f.write_all(buf)?;
            *self = Kept::File(f);
        }
        if let Kept::File(f) = self {
            f.write_all(data)?;
        }
        Ok(())
    }

    /// Writes it all to `w`.
    async fn replay(&mut self, w: &mut dyn BlobWriter) -> Result<()> {
        match self {
            Kept::Memory(buf) => {
                for piece in buf.chunks(REPLAY_CHUNK) {
                    w.write(piece).await?;
                }
            }
            Kept::File(f) => {
                f.rewind()?;
                let mut piece = vec![0; REPLAY_CHUNK];
                loop {
                    let n = f.read(&mut piece)?;
                    if n == 0 {
                        break;
                    }
                    w.write(&piece[..n]).await?;
                }
                f.seek(std::io::SeekFrom::End(0))?;
            }
        }
        Ok(())
    }
}

/// An upload to one daemon, moved whole to the next if that one fails.
struct FailoverWriter {
    eps: Arc<Endpoints>,
    clients: Arc<Vec<GrpcBlobService>>,
    order: Vec<usize>,
    k: usize,
    /// The upload to `order[k]`; `None` once it failed.
    current: Option<Box<dyn BlobWriter>>,
    kept: Kept,
    last: Option<Error>,
}

impl FailoverWriter {
    /// The upload to the current daemon failed with `e`: a fault is kept
    /// for a replay at close, anything else is the answer.
    fn fail(&mut self, e: Error) -> Result<()> {
        self.current = None;
        if !is_fault(&e) {
            return Err(e);
        }
        self.eps.failed(self.order[self.k], &e);
        self.last = Some(e);
        Ok(())
    }

    /// The whole blob to the next daemons, until one takes it.
    async fn replay(&mut self) -> Result<B3Digest> {
        while self.k + 1 < self.order.len() {
            self.k += 1;
            let i = self.order[self.k];
            tracing::info!(
                "blob upload: sending it again to store {}",
                self.eps.name(i)
            );
            let attempt = async {
                let mut w = self.clients[i].open_write().await?;
                self.kept.replay(&mut *w).await?;
                w.close().await
            };
            match attempt.await {
                Ok(d) => {
                    self.eps.answered(i);
                    return Ok(d);
                }
                Err(e) => self.fail(e)?,
            }
        }
        Err(self.eps.all_failed(self.last.take()))
    }
}

#[async_trait]
impl BlobWriter for FailoverWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.kept.push(data)?;
        let Some(w) = &mut self.current else {
            return Ok(()); // sent at close, to the next daemon
        };
        let i = self.order[self.k];
        let sent = tokio::time::timeout(self.eps.stall(), w.write(data)).await;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => self.fail(e),
            Err(_) => self.fail(self.eps.stalled(i, "blob upload")),
        }
    }

    async fn close(mut self: Box<Self>) -> Result<B3Digest> {
        if let Some(w) = self.current.take() {
            let i = self.order[self.k];
            match w.close().await {
                Ok(d) => {
                    self.eps.answered(i);
                    return Ok(d);
                }
                Err(e) => self.fail(e)?,
            }
        }
        self.replay().await
    }
}
