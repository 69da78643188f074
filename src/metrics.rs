//! Prometheus text exposition over HTTP/1.1 (`GET /metrics`), the
//! convention fleets scrape. A transport edge like the gRPC server: it only
//! renders what the services count. Connections are bounded like every
//! listener's ([`crate::http_conn`]): a scraper needs one or two.
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
    Unix(tokio::net::UnixListener, crate::socket::SocketFile),
}

/// Binds `listen` and serves `render` on it until the runtime ends; the
/// socket file of a unix listener is created 0600 (stale ones replaced).
pub async fn serve(listen: &str, render: Render) -> anyhow::Result<()> {
    let listener = match listen.strip_prefix("unix:") {
        Some(p) => {
            let path = PathBuf::from(p);
            let (l, file) = crate::socket::bind_socket(&path, None)
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
    let gate = crate::http_conn::Gate::new("metrics", MAX_CONNECTIONS);
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

fn spawn_conn<S>(gate: &crate::http_conn::Gate, stream: S, render: Render)
where
    S: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + crate::http_conn::TryWrite
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
    let gate = crate::http_conn::Gate::new("metrics", MAX_CONNECTIONS);
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

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 7] = [1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0];

/// A Prometheus histogram of durations, lock-free.
#[derive(Default)]
pub struct Histogram {
    count: std::sync::atomic::AtomicU64,
    sum_ns: std::sync::atomic::AtomicU64,
    /// Per bucket (not cumulative); the last is +Inf.
    buckets: [std::sync::atomic::AtomicU64; BUCKETS.len() + 1],
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The `_bucket`, `_sum` and `_count` lines of `name` with `labels`
    /// (`a="b",` form, or empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Relaxed);
            let le = BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| format!("{b}"));
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let labels = match labels.trim_end_matches(',') {
            "" => String::new(),
            l => format!("{{{l}}}"),
        };
        let _ = writeln!(out, "{name}_sum{labels} {sum}");
        let _ = writeln!(out, "{name}_count{labels} {}", self.count());
    }
}

/// `# HELP` and `# TYPE` lines.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(std::time::Duration::from_micros(5));
        h.observe(std::time::Duration::from_millis(5));
        h.observe(std::time::Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "op=\"read\",");
        assert!(
            out.contains("x_seconds_bucket{op=\"read\",le=\"0.00001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{op=\"read\",le=\"0.01\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{op=\"read\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{op=\"read\"} 3\n"), "{out}");
    }
}
