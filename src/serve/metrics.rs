//! Prometheus text exposition over HTTP/1.1 (`GET /metrics`), the
//! convention fleets scrape. A transport edge like the gRPC server: it only
//! renders what the services count. Connections are bounded like every
//! listener's ([`crate::serve::http_conn`]): a scraper needs one or two.
use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::path::PathBuf;
use std::sync::Arc;

/// Connections one metrics listener holds at once.
const MAX_CONNECTIONS: usize = 32;

/// Renders the current metrics as Prometheus text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Where metrics are served: `HOST:PORT` or `unix:PATH`.
enum Listener {
    Tcp(tokio::net::TcpListener),
    /// The socket file is removed when the listener goes.
    Unix(tokio::net::UnixListener, crate::host::socket::SocketFile),
}

/// Binds `listen` and serves `render` on it until the runtime ends; the
/// socket file of a unix listener is created 0600 (stale ones replaced).
pub async fn serve(listen: &str, render: Render) -> anyhow::Result<()> {
    let listener = match listen.strip_prefix("unix:") {
        Some(p) => {
            let path = PathBuf::from(p);
            let (l, file) = crate::host::socket::bind_socket(&path, None)
                .with_context(|| format!("metrics socket {}", path.display()))?;
            l.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(l)?, file)
        }
        None => Listener::Tcp(
            tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding metrics on {listen}"))?,
        ),
    };
    match &listener {
        Listener::Tcp(l) => tracing::info!("metrics on http://{}/metrics", l.local_addr()?),
        Listener::Unix(_, f) => tracing::info!("metrics on unix:{}", f.path().display()),
    }
    let gate = crate::serve::http_conn::Gate::new("metrics", MAX_CONNECTIONS);
    tokio::spawn(async move {
        loop {
            let accepted = match &listener {
                Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
                Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
            };
            match accepted {
                Ok(Conn::Tcp(s)) => spawn_conn(&gate, s, render.clone()),
                Ok(Conn::Unix(s)) => spawn_conn(&gate, s, render.clone()),
                Err(e) => {
                    tracing::warn!("metrics: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

fn spawn_conn<S>(gate: &crate::serve::http_conn::Gate, stream: S, render: Render)
where
    S: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + crate::serve::http_conn::TryWrite
        + Unpin
        + Send
        + 'static,
{
    gate.serve(stream, move |req: Request<hyper::body::Incoming>| {
        let answer = respond(&req, &render);
        async move { answer }
    });
}

fn respond<B>(req: &Request<B>, render: &Render) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (StatusCode::OK, render()),
        (&Method::GET | &Method::HEAD, _) => (StatusCode::NOT_FOUND, "try /metrics\n".into()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// Serves `render` on a unix socket bound (and made non-blocking) earlier,
/// before a sandbox that may not bind one: accepting, reading and writing
/// are all it needs then.
pub fn serve_bound(
    listener: std::os::unix::net::UnixListener,
    render: Render,
) -> anyhow::Result<()> {
    let l = tokio::net::UnixListener::from_std(listener)?;
    let gate = crate::serve::http_conn::Gate::new("metrics", MAX_CONNECTIONS);
    tokio::spawn(async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => spawn_conn(&gate, s, render.clone()),
                Err(e) => {
                    tracing::warn!("metrics: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}
