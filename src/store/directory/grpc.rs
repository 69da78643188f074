//! Directory client for a remote tvix-store. Every received directory is
//! validated, checked against the digest that named it, and (recursively)
//! against the order and size rules of `castore::graph`. A single Get can
//! be watched for progress byte by byte ([`DirectoryService::get_watched`]).
use super::DirectoryService;
use crate::castore::{B3Digest, Directory, RootFirst, ValidatedGraph};
use crate::store::channel::WireChannel;
use crate::store::channel::MAX_MESSAGE_SIZE;
use crate::store::{Error, Result};
use crate::wire::castore as pb;
use crate::wire::castore::directory_service_client::DirectoryServiceClient;
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::codegen::http;
use tonic::Code;

#[derive(Clone)]
pub struct GrpcDirectoryService {
    client: DirectoryServiceClient<WireChannel>,
    /// For calls whose progress is watched ([`Watched`]).
    channel: WireChannel,
}

/// How often a watched Get looks whether bytes arrived, as a share of its
/// idle limit: often enough that those waiting on it (with the same limit)
/// hear of the progress in time.
const WATCH_TICKS: u32 = 4;

impl GrpcDirectoryService {
    pub fn new(channel: WireChannel) -> Self {
        Self {
            client: DirectoryServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
            channel,
        }
    }

    /// A Get; with `received`, the answer's bytes are counted into it as
    /// they arrive.
    async fn call(
        &self,
        digest: &B3Digest,
        recursive: bool,
        received: Option<Arc<AtomicU64>>,
    ) -> Result<Option<tonic::Streaming<pb::Directory>>> {
        let answer = match received {
            None => self.client.clone().get(request(digest, recursive)).await,
            Some(received) => {
                DirectoryServiceClient::new(Watched {
                    inner: self.channel.clone(),
                    received,
                })
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .get(request(digest, recursive))
                .await
            }
        };
        match answer {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// A Get whose answer's bytes are counted into `received` as they
    /// arrive.
    async fn get_counted(
        &self,
        digest: &B3Digest,
        received: Arc<AtomicU64>,
    ) -> Result<Option<Directory>> {
        let Some(stream) = self.call(digest, false, Some(received)).await? else {
            return Ok(None);
        };
        one_directory(stream, digest).await
    }

    /// The tree below `root`, checked as it arrives; see `get_recursive`.
    fn recursive(
        &self,
        root: B3Digest,
        received: Option<Arc<AtomicU64>>,
    ) -> BoxStream<'_, Result<Directory>> {
        Box::pin(async_stream::try_stream! {
            let Some(mut stream) = self.call(&root, true, received).await? else {
                return;
            };
            let mut order = RootFirst::new(root);
            loop {
                let msg = if order.is_empty() {
                    stream.message().await.or_else(not_found_is_none)?
                } else {
                    stream.message().await?
                };
                let Some(msg) = msg else { break };
                let dir = Directory::try_from(msg)?;
                order.add(&dir).inspect_err(|e| {
                    tracing::error!(%root, "remote store sent a bad directory tree: {e}")
                })?;
                yield dir;
            }
            if !order.is_empty() {
                order.finish()?;
            }
        })
    }
}

fn request(digest: &B3Digest, recursive: bool) -> pb::GetDirectoryRequest {
    pb::GetDirectoryRequest {
        by_what: Some(pb::get_directory_request::ByWhat::Digest((*digest).into())),
        recursive,
    }
}

/// The one directory a Get (not recursive) answers, checked against the
/// digest asked for.
async fn one_directory(
    mut stream: tonic::Streaming<pb::Directory>,
    digest: &B3Digest,
) -> Result<Option<Directory>> {
    let Some(msg) = stream.message().await.or_else(not_found_is_none)? else {
        return Ok(None); // tvix answers an unknown digest with an empty stream
    };
    // Read to the end (a stream dropped early is reset, and h2 allows
    // only so many resets); a second directory is a protocol violation.
    if stream.message().await?.is_some() {
        return Err(Error::Protocol(format!(
            "Get of directory {digest} (not recursive) answered more than one directory"
        )));
    }
    let dir = Directory::try_from(msg)?;
    let actual = dir.digest();
    if actual != *digest {
        tracing::error!(expected = %digest, %actual, "remote store sent a wrong directory");
        return Err(Error::DigestMismatch {
            expected: *digest,
            actual,
        });
    }
    Ok(Some(dir))
}

/// The store's channel, counting the bytes of each answer's body as they
/// arrive: a single Directory message (a million entries are some 55 MB)
/// shows no progress otherwise until it is whole.
#[derive(Clone)]
struct Watched {
    inner: WireChannel,
    received: Arc<AtomicU64>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Request<tonic::body::Body>> for Watched {
    type Response = http::Response<Counted>;
    type Error = BoxError;
    type Future =
        futures::future::BoxFuture<'static, std::result::Result<Self::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let answer = self.inner.call(req);
        let received = self.received.clone();
        Box::pin(async move {
            let r = answer.await?;
            Ok(r.map(|inner| Counted { inner, received }))
        })
    }
}

/// An answer's body that counts its data bytes.
struct Counted {
    inner: tonic::body::Body,
    received: Arc<AtomicU64>,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Self::Data>, Self::Error>>>
    {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn not_found_is_none(s: tonic::Status) -> Result<Option<pb::Directory>> {
    if s.code() == Code::NotFound {
        Ok(None)
    } else {
        Err(s.into())
    }
}

#[async_trait]
impl DirectoryService for GrpcDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        let Some(stream) = self.call(digest, false, None).await? else {
            return Ok(None);
        };
        one_directory(stream, digest).await
    }

    /// Gives up only when no byte of the answer arrived for `idle`: an
    /// honest store sending a directory of a million entries slowly is
    /// waited for as long as it keeps sending.
    async fn get_watched(
        &self,
        digest: &B3Digest,
        idle: Duration,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Option<Directory>> {
        let received = Arc::new(AtomicU64::new(0));
        let answer = self.get_counted(digest, received.clone());
        tokio::pin!(answer);
        let tick = idle / WATCH_TICKS;
        let mut seen = 0u64;
        let mut since = tokio::time::Instant::now();
        loop {
            if let Ok(r) = tokio::time::timeout(tick, &mut answer).await {
                return r;
            }
            let now = received.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                since = tokio::time::Instant::now();
                progress(now);
            } else if since.elapsed() >= idle {
                return Err(Error::Timeout(format!(
                    "directory {digest}: no data from the store for {idle:?} ({seen} bytes \
                     received)"
                )));
            }
        }
    }

    fn get_recursive(&self, root: B3Digest) -> BoxStream<'_, Result<Directory>> {
        self.recursive(root, None)
    }

    fn get_recursive_watched(
        &self,
        root: B3Digest,
        received: Arc<AtomicU64>,
    ) -> BoxStream<'_, Result<Directory>> {
        self.recursive(root, Some(received))
    }

    async fn put_graph(&self, graph: ValidatedGraph) -> Result<B3Digest> {
        let root = graph
            .root()
            .ok_or_else(|| Error::InvalidRequest("empty directory graph".into()))?;
        let msgs: Vec<pb::Directory> = graph.dirs.iter().map(|(_, d)| d.to_proto()).collect();
        let resp = self
            .client
            .clone()
            .put(futures::stream::iter(msgs))
            .await?
            .into_inner();
        let got = B3Digest::try_from(&resp.root_digest[..])
            .map_err(|e| Error::Protocol(format!("Put answered a bad root digest: {e}")))?;
        if got != root {
            return Err(Error::DigestMismatch {
                expected: root,
                actual: got,
            });
        }
        Ok(root)
    }
}
