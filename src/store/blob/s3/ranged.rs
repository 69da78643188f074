//! Reading a large blob from the bucket at the offsets asked for: one
//! ranged GET per 1 MiB leaf, each checked against the blob's leaf list
//! (see [`crate::castore::leaves`]) before any of its bytes is handed out;
//! an answer with another range, or a body past the range's length, is
//! refused as it comes.
//! Why: a guest that reads one page of a 500 MiB file should wait for one
//! leaf, not the whole object. A reader that moves forward leaf after leaf
//! has the next one fetched while it reads this one; a reader that jumps
//! fetches only what it lands on. At most three leaves (the one read, the
//! one coming, the one ahead) are held per reader.
use super::super::{BlobReader, Shared};
use crate::castore::{B3Digest, Leaves};
use crate::store::bucket::Bucket;
use crate::store::{Error, Result};
use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::{GetOptions, ObjectStore};
use std::future::Future;
use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};
use tokio::task::JoinHandle;

/// What every fetch of one blob's leaves needs.
struct Source {
    bucket: Bucket,
    key: Key,
    digest: B3Digest,
    leaves: Leaves,
}

impl Source {
    /// Fetches leaf `i` and checks it.
    async fn leaf(&self, i: u64) -> Result<Bytes> {
        let r = self.leaves.range(i);
        let what = format!("leaf {i} of blob {}", self.digest);
        let b = &self.bucket;
        // the answer's range is checked to be the one asked for, its body
        // taken no further than that range's length
        let opts = GetOptions::new().with_range(Some(r.clone()));
        let got = b
            .within(&what, b.store.get_opts(&self.key, opts))
            .await?
            .ok_or_else(|| Error::NotFound(format!("{what}: the object is gone")))?;
        let got = b.bounded_bytes(&what, got).await?;
        if !self.leaves.check(i, &got) {
            tracing::error!(
                digest = %self.digest, leaf = i,
                "the bucket holds other bytes in leaf {i} of blob {} (bytes {}..{}, {} read)",
                self.digest, r.start, r.end, got.len()
            );
            return Err(Error::Bucket(format!(
                "{what}: other bytes than the blob's (bytes {}..{})",
                r.start, r.end
            )));
        }
        Ok(got)
    }
}

type Fetch = JoinHandle<Result<Bytes>>;

pub(super) struct Ranged {
    src: Arc<Source>,
    pos: u64,
    /// The checked leaf at hand.
    have: Option<(u64, Bytes)>,
    /// The leaf being fetched for the reader now.
    fetching: Option<(u64, Fetch)>,
    /// The leaf after the one at hand, fetched while it is read.
    ahead: Option<(u64, Fetch)>,
    /// Where a seek begun goes.
    seeking: Option<u64>,
}

impl Ranged {
    pub(super) fn new(bucket: Bucket, key: Key, digest: B3Digest, leaves: Leaves) -> Self {
        Self {
            src: Arc::new(Source {
                bucket,
                key,
                digest,
                leaves,
            }),
            pos: 0,
            have: None,
            fetching: None,
            ahead: None,
            seeking: None,
        }
    }

    /// Fetches leaf `i` on the runtime, so it moves while the reader is
    /// not polled.
    fn spawn(&self, i: u64) -> std::io::Result<Fetch> {
        let rt = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        let src = self.src.clone();
        Ok(rt.spawn(async move { src.leaf(i).await }))
    }

    /// Starts fetching leaf `i` for the reader (taking it from the one
    /// ahead when that is it).
    fn want(&mut self, i: u64) -> std::io::Result<()> {
        if self.fetching.as_ref().is_some_and(|(j, _)| *j == i) {
            return Ok(());
        }
        if let Some((_, old)) = self.fetching.take() {
            old.abort();
        }
        match self.ahead.take() {
            Some((j, f)) if j == i => self.fetching = Some((j, f)),
            other => {
                if let Some((_, f)) = other {
                    f.abort();
                }
                self.fetching = Some((i, self.spawn(i)?));
            }
        }
        Ok(())
    }
}

fn io_error(e: Error) -> std::io::Error {
    let kind = match e {
        Error::Timeout(_) => std::io::ErrorKind::TimedOut,
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e.to_string())
}

impl AsyncRead for Ranged {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let size = this.src.leaves.size();
        if this.pos >= size || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let i = this.pos / crate::castore::LEAF;
        loop {
            if let Some((j, bytes)) = &this.have {
                if *j == i {
                    let at = (this.pos - this.src.leaves.range(i).start) as usize;
                    let n = buf.remaining().min(bytes.len().saturating_sub(at));
                    buf.put_slice(&bytes[at..at + n]);
                    this.pos += n as u64;
                    return Poll::Ready(Ok(()));
                }
            }
            this.want(i)?;
            let Some((_, fetch)) = &mut this.fetching else {
                return Poll::Ready(Err(std::io::Error::other("no fetch under way")));
            };
            let got = ready!(Pin::new(fetch).poll(cx));
            this.fetching = None;
            let bytes = match got {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => return Poll::Ready(Err(io_error(e))),
                Err(e) => return Poll::Ready(Err(std::io::Error::other(e))),
            };
            // moving forward leaf after leaf: fetch the next one meanwhile
            let prev = this.have.as_ref().map(|(j, _)| *j);
            let forward = i == 0 || prev == Some(i - 1);
            this.have = Some((i, bytes));
            if forward && i + 1 < this.src.leaves.len() && this.ahead.is_none() {
                this.ahead = Some((i + 1, this.spawn(i + 1)?));
            }
        }
    }
}

impl AsyncSeek for Ranged {
    fn start_seek(mut self: Pin<&mut Self>, pos: SeekFrom) -> std::io::Result<()> {
        let size = self.src.leaves.size() as i128;
        let to = match pos {
            SeekFrom::Start(n) => n as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
            SeekFrom::End(d) => size + d as i128,
        };
        let to = u64::try_from(to).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
        })?;
        self.seeking = Some(to);
        Ok(())
    }

    fn poll_complete(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        if let Some(to) = self.seeking.take() {
            self.pos = to;
        }
        Poll::Ready(Ok(self.pos))
    }
}

impl BlobReader for Ranged {
    fn into_shared(self: Box<Self>) -> Shared {
        Shared::Stream(self)
    }

    fn checks_itself(&self) -> Option<u64> {
        Some(self.src.leaves.size())
    }
}

impl Drop for Ranged {
    fn drop(&mut self) {
        for (_, f) in self.fetching.take().into_iter().chain(self.ahead.take()) {
            f.abort();
        }
    }
}
