//! What the clients of one gRPC listener can make the daemon hold: a
//! read-only listener is reachable by every local user (TCP) or every
//! per-VM daemon (the host cache's socket), so none of them may grow it
//! without a bound.
//!
//! - **Connections**: at most [`GrpcBounds::connections`] at once; past it a
//!   new one is closed as soon as it is accepted (descriptors stay free
//!   for the clients already served). One that sends no byte within
//!   [`FIRST_BYTE_WITHIN`] is closed, so half-open connections cannot
//!   hold those places.
//! - **Request bytes**: a unary request is tiny in honest use, so its body
//!   is cut at [`unary_cap`] and all unary bodies in flight share
//!   [`UNARY_BYTES_IN_FLIGHT`]; without that, tonic buffers an unfinished
//!   message of up to the 64 MiB message limit per stream, and a client
//!   with many streams and connections held gigabytes.
//! - **Unread bytes**: HTTP/2 flow control stops a client once it has sent
//!   [`WINDOW`] bytes on a connection that the daemon has not consumed, so
//!   what connections can park in the daemon is at most their number
//!   times that window (set here, not left to library defaults).
use crate::store::channel::tvix_path;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;
use tonic::Status;

/// A connection must send its first byte (the HTTP/2 preface) within this.
pub const FIRST_BYTE_WITHIN: Duration = Duration::from_secs(10);
/// Default connections at once per listener: a host's per-VM daemons hold
/// one or two each.
pub const DEFAULT_CONNECTIONS: usize = 1024;
/// Streams one connection may have open: a per-VM daemon's worker pool
/// and read-ahead stay well below it.
pub const STREAMS_PER_CONNECTION: u32 = 128;
/// Bytes of unfinished unary request bodies the daemon holds at once,
/// across all connections.
pub const UNARY_BYTES_IN_FLIGHT: usize = 64 << 20;
/// HTTP/2 receive windows, per stream and per connection: what a client
/// can have sent that the daemon has not consumed yet.
pub const WINDOW: u32 = 1 << 20;

/// The largest body a unary request to `path` (a tvix method path) may
/// have; `None` for the streaming uploads, which the daemon reads as they
/// come (one message at a time, within the message limit).
pub fn unary_cap(path: &str) -> Option<u64> {
    match path {
        "/tvix.castore.v1.BlobService/Put" | "/tvix.castore.v1.DirectoryService/Put" => None,
        // references and signatures of one path: thousands at most
        "/tvix.store.v1.PathInfoService/Put" => Some(4 << 20),
        // a reader's report: at most 8,192 digests of 32 bytes
        "/tvix_virtiofsd.cache.v1.CacheService/Touch" => Some(1 << 20),
        // a digest, a node, a name: bytes, not kilobytes
        _ => Some(64 << 10),
    }
}

/// The bounds of one daemon's gRPC listeners.
#[derive(Clone)]
pub struct GrpcBounds {
    pub connections: usize,
    unary_bytes: Arc<Semaphore>,
}

impl GrpcBounds {
    pub fn new(connections: usize) -> Self {
        Self {
            connections: connections.max(1),
            unary_bytes: Arc::new(Semaphore::new(UNARY_BYTES_IN_FLIGHT)),
        }
    }

    /// A tonic server builder with the per-connection HTTP/2 bounds.
    pub fn builder(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(STREAMS_PER_CONNECTION)
            .initial_stream_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .http2_max_header_list_size(16 << 10)
            // a peer that stopped answering is let go
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
    }

    /// For `MapRequestLayer`, after the wire names are mapped: caps each
    /// unary request's body and charges it to the shared budget.
    pub fn cap_bodies(
        &self,
    ) -> impl Fn(http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> + Clone {
        let budget = self.unary_bytes.clone();
        move |req| {
            let path = req.uri().path();
            let path = tvix_path(path).unwrap_or_else(|| path.to_string());
            let Some(cap) = unary_cap(&path) else {
                return req;
            };
            let budget = budget.clone();
            req.map(|b| {
                tonic::body::Body::new(Capped {
                    inner: b,
                    left: cap,
                    cap,
                    budget,
                    held: None,
                })
            })
        }
    }

    /// `incoming` with at most `connections` open at once, each closed if
    /// it sends nothing within [`FIRST_BYTE_WITHIN`].
    pub fn limit<S, IO>(
        &self,
        incoming: S,
        listener: String,
    ) -> impl futures::Stream<Item = std::io::Result<Limited<IO>>>
    where
        S: futures::Stream<Item = std::io::Result<IO>>,
    {
        use futures::StreamExt;
        let slots = Arc::new(Semaphore::new(self.connections));
        let max = self.connections;
        let mut warned = false;
        incoming.filter_map(move |r| {
            let out = match r {
                Err(e) => Some(Err(e)),
                Ok(io) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        warned = false;
                        Some(Ok(Limited {
                            io,
                            _slot: permit,
                            first_byte: Some(Box::pin(tokio::time::sleep(FIRST_BYTE_WITHIN))),
                        }))
                    }
                    Err(_) => {
                        if !warned {
                            tracing::warn!(
                                "{listener}: {max} connections open (--max-connections): \
                                 closing new ones until some end"
                            );
                            warned = true;
                        }
                        drop(io);
                        None
                    }
                },
            };
            std::future::ready(out)
        })
    }
}

/// A request body cut at `cap` bytes, its bytes charged to `budget` until
/// it is dropped.
struct Capped {
    inner: tonic::body::Body,
    left: u64,
    cap: u64,
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
}

impl http_body::Body for Capped {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        let frame = match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(f)) => f,
            other => return Poll::Ready(other),
        };
        let Some(data) = frame.data_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let n = data.len() as u64;
        if n > self.left {
            let cap = self.cap;
            return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                "request body larger than the {cap} bytes this method takes"
            )))));
        }
        self.left -= n;
        // n <= cap <= 4 MiB, so it fits the semaphore's u32
        let more = match self.budget.clone().try_acquire_many_owned(n as u32) {
            Ok(p) => p,
            Err(_) => {
                return Poll::Ready(Some(Err(Status::resource_exhausted(
                    "the daemon holds too many unfinished requests; try again",
                ))))
            }
        };
        match &mut self.held {
            Some(h) => h.merge(more),
            None => self.held = Some(more),
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An accepted connection holding its place among the listener's.
pub struct Limited<IO> {
    io: IO,
    _slot: OwnedSemaphorePermit,
    /// Until the first byte arrives.
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if self.first_byte.is_some() {
            if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                self.first_byte = None;
            } else if let Some(t) = &mut self.first_byte {
                if t.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request within the first-byte limit",
                    )));
                }
            }
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
