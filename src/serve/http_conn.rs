//! HTTP/1.1 connections on listeners any local user (or the network) can
//! reach: the binary cache and the metrics. Each listener holds at most a
//! set number of connections (one more is answered 503 and closed at
//! once), a request's header must arrive within [`HEADER_TIMEOUT`] (an idle
//! keep-alive connection waits under the same clock), and a connection
//! whose reads and writes make no progress for [`IDLE_TIMEOUT`] is closed.
//! Without these, one user holding a few hundred half-sent requests took
//! every descriptor the daemon had.
use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Time a client has to send a request's header, from the connection's
/// start or the end of its previous request: a human typing into telnet
/// is slower, no HTTP client is.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a connection may go with neither a read nor a write moving a byte
/// while it waits on the peer (a stalled upload, a client that stopped
/// reading a NAR): well above a store's own progress timeout.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Most bytes a connection buffers while it reads (a request's header
/// must fit): with every connection of a listener sending an endless
/// header, the listener holds at most its connection limit times this.
/// Nix's requests carry well under 1 KiB of header.
pub const MAX_BUFFER: usize = 64 << 10;

/// The answer to a connection over the limit, written without waiting.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\
Content-Type: text/plain\r\nRetry-After: 5\r\nContent-Length: 42\r\n\r\n\
too many connections to this listener now\n";

/// The connections of one listener.
pub struct Gate {
    what: &'static str,
    permits: Arc<Semaphore>,
    max: usize,
    header_timeout: Duration,
    idle_timeout: Duration,
}

/// A stream a refusal can be written to without blocking.
pub trait TryWrite {
    fn try_write_now(&self, buf: &[u8]) -> std::io::Result<usize>;
}

impl TryWrite for tokio::net::TcpStream {
    fn try_write_now(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.try_write(buf)
    }
}

impl TryWrite for tokio::net::UnixStream {
    fn try_write_now(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.try_write(buf)
    }
}

impl Gate {
    /// At most `max` connections at once for the listener named `what`
    /// (in logs).
    pub fn new(what: &'static str, max: usize) -> Self {
        Self {
            what,
            permits: Arc::new(Semaphore::new(max)),
            max,
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }

    /// Serves `stream` with `svc` on a task of its own, or, when the
    /// listener is full, answers 503 and closes it.
    pub fn serve<S, F, Fut, B>(&self, stream: S, svc: F)
    where
        S: AsyncRead + AsyncWrite + TryWrite + Unpin + Send + 'static,
        F: Fn(Request<Incoming>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Response<B>> + Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!(
                "{}: {} connections open, the most allowed: refusing one",
                self.what,
                self.max
            );
            let _ = stream.try_write_now(BUSY);
            return;
        };
        let (what, header, idle) = (self.what, self.header_timeout, self.idle_timeout);
        tokio::spawn(serve_one(stream, svc, permit, what, header, idle));
    }
}

async fn serve_one<S, F, Fut, B>(
    stream: S,
    svc: F,
    permit: OwnedSemaphorePermit,
    what: &'static str,
    header: Duration,
    idle: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _permit = permit;
    let svc = hyper::service::service_fn(move |req| {
        let f = svc(req);
        async move { Ok::<_, std::convert::Infallible>(f.await) }
    });
    let io = hyper_util::rt::TokioIo::new(Idle::new(stream, idle));
    if let Err(e) = builder()
        .header_read_timeout(header)
        .serve_connection(io, svc)
        .await
    {
        tracing::debug!("{what} connection: {e}");
    }
}

/// The HTTP/1.1 settings of every listener: the header timeout (which
/// needs the timer) and the read buffer bound.
pub fn builder() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUFFER);
    b
}

/// A stream that fails with `TimedOut` once it has waited `idle` on the
/// peer without a byte moving either way.
struct Idle<S> {
    inner: S,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl<S> Idle<S> {
    fn new(inner: S, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            armed: false,
        }
    }

    /// Bytes moved: the clock starts again at the next wait.
    fn moved(&mut self) {
        self.armed = false;
    }

    /// The inner stream is waiting on the peer: pending until the clock
    /// runs out, then an error.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        if !self.armed {
            self.armed = true;
            let at = tokio::time::Instant::now() + self.idle;
            self.deadline.as_mut().reset(at);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no progress for {} s", self.idle.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => self.waiting(cx),
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(r)
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.waiting(cx),
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.waiting(cx),
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.waiting(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_stream_that_waits_too_long_fails_and_one_that_moves_does_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Idle::new(a, Duration::from_millis(300));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 8];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return Ok(got),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err((e, got)),
                }
            }
        });
        // a byte every 150 ms keeps it alive past its 300 ms
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            b.write_all(b"x").await.unwrap();
        }
        // then silence
        let (e, got) = reader.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(got, b"xxxx");
        drop(b);
    }
}
