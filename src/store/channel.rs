//! gRPC channels to a remote store over loopback/remote TCP or a unix
//! socket, speaking tvix's service names or snix's.
use crate::store::{Error, Result};
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint, Uri};

/// Largest message accepted from a remote store (a Directory of a few
/// hundred thousand entries); bigger ones are refused, not buffered.
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// The names a store's services go by. snix (tvix's continuation) serves
/// the same messages with the same field numbers under the packages
/// `snix.castore.v1` and `snix.store.v1`, so only the request paths differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Wire {
    /// Found out on the first call, then kept for the connection.
    #[default]
    Detect,
    Tvix,
    Snix,
}

impl Wire {
    /// The address parameter that pins it.
    pub fn query(self) -> &'static str {
        match self {
            Wire::Detect => "",
            Wire::Tvix => "?wire=tvix",
            Wire::Snix => "?wire=snix",
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(c: u8) -> Wire {
        match c {
            1 => Wire::Tvix,
            2 => Wire::Snix,
            _ => Wire::Detect,
        }
    }
}

/// The tvix package prefixes, and what snix calls them.
const RENAMES: [(&str, &str); 2] = [
    ("/tvix.castore.v1.", "/snix.castore.v1."),
    ("/tvix.store.v1.", "/snix.store.v1."),
];

/// The snix name of a tvix request path (`None`: not a store service).
pub fn snix_path(path: &str) -> Option<String> {
    RENAMES
        .iter()
        .find_map(|(t, s)| path.strip_prefix(t).map(|rest| format!("{s}{rest}")))
}

/// The tvix name of a snix request path (`None`: not a snix service).
pub fn tvix_path(path: &str) -> Option<String> {
    RENAMES
        .iter()
        .find_map(|(t, s)| path.strip_prefix(s).map(|rest| format!("{t}{rest}")))
}

/// A channel that sends the store services' calls under the family the
/// server offers: pinned by the address, or found out by the first call and
/// kept for as long as the channel lives. A first call with one request
/// message is sent under tvix's name and, on UNIMPLEMENTED, again under
/// snix's (its message kept for that); an upload stream, which cannot be
/// sent twice, is preceded by a harmless lookup of the all-zero digest.
#[derive(Clone)]
pub struct WireChannel {
    inner: Channel,
    wire: Arc<AtomicU8>,
}

type Response = http::Response<tonic::body::Body>;

impl WireChannel {
    pub fn new(inner: Channel, wire: Wire) -> Self {
        Self {
            inner,
            wire: Arc::new(AtomicU8::new(wire.code())),
        }
    }

    /// The family in use (`Detect` until a call found out).
    pub fn wire(&self) -> Wire {
        Wire::from_code(self.wire.load(Ordering::Acquire))
    }

    fn learn(&self, w: Wire) {
        if self.wire() != w {
            tracing::debug!("the store speaks {w:?}");
            self.wire.store(w.code(), Ordering::Release);
        }
    }

    fn pinned(&self, wire: Wire) -> Self {
        Self::new(self.inner.clone(), wire)
    }

    async fn send(
        &self,
        mut req: http::Request<tonic::body::Body>,
        wire: Wire,
    ) -> std::result::Result<Response, StdError> {
        if wire == Wire::Snix {
            if let Some(p) = snix_path(req.uri().path()) {
                let mut parts = req.uri().clone().into_parts();
                parts.path_and_query = Some(p.parse()?);
                *req.uri_mut() = http::Uri::from_parts(parts)?;
            }
        }
        use tower::{Service, ServiceExt};
        let mut ch = self.inner.clone();
        Ok(ch.ready().await?.call(req).await?)
    }

    /// A store call while the family is unknown.
    async fn detect(
        &self,
        req: http::Request<tonic::body::Body>,
    ) -> std::result::Result<Response, StdError> {
        let path = req.uri().path().to_string();
        if path.ends_with("Service/Put") && !path.contains("PathInfoService") {
            // an upload: ask first, with a lookup that changes nothing
            match probe(self.pinned(Wire::Tvix), &path).await {
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    if !matches!(probe(self.pinned(Wire::Snix), &path).await,
                        Err(s) if s.code() == tonic::Code::Unimplemented)
                    {
                        self.learn(Wire::Snix);
                        return self.send(req, Wire::Snix).await;
                    }
                }
                Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) => {}
                _ => self.learn(Wire::Tvix),
            }
            return self.send(req, Wire::Tvix).await;
        }
        // one request message: kept, to be sent again under snix's name
        let (parts, body) = req.into_parts();
        let bytes = http_body_util::BodyExt::collect(body).await?.to_bytes();
        let again = |b: bytes::Bytes| {
            http::Request::from_parts(
                parts.clone(),
                tonic::body::Body::new(http_body_util::Full::new(b)),
            )
        };
        let first = self.send(again(bytes.clone()), Wire::Tvix).await?;
        if !unimplemented(&first) {
            self.learn(Wire::Tvix);
            return Ok(first);
        }
        let second = self.send(again(bytes), Wire::Snix).await?;
        if unimplemented(&second) {
            return Ok(first); // neither: the caller sees tvix's answer
        }
        self.learn(Wire::Snix);
        Ok(second)
    }
}

type StdError = Box<dyn std::error::Error + Send + Sync>;

/// Whether a response is gRPC's UNIMPLEMENTED (a trailers-only answer:
/// the status is in the headers).
fn unimplemented(r: &Response) -> bool {
    r.headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"12")
}

/// A harmless call to the service `path` belongs to: a lookup of the
/// all-zero digest.
async fn probe(ch: WireChannel, path: &str) -> std::result::Result<(), tonic::Status> {
    use crate::wire::castore as c;
    let zero32 = bytes::Bytes::from_static(&[0; 32]);
    if path.starts_with("/tvix.castore.v1.BlobService/") {
        let req = c::StatBlobRequest {
            digest: zero32,
            ..Default::default()
        };
        c::blob_service_client::BlobServiceClient::new(ch)
            .stat(req)
            .await
            .map(drop)
    } else {
        let req = c::GetDirectoryRequest {
            by_what: Some(c::get_directory_request::ByWhat::Digest(zero32)),
            recursive: false,
        };
        c::directory_service_client::DirectoryServiceClient::new(ch)
            .get(req)
            .await
            .map(drop)
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for WireChannel {
    type Response = Response;
    type Error = StdError;
    type Future = BoxFuture<'static, std::result::Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if snix_path(req.uri().path()).is_none() {
                // our own services (the host cache's) keep their names
                return this.send(req, Wire::Tvix).await;
            }
            match this.wire() {
                Wire::Detect => this.detect(req).await,
                w => this.send(req, w).await,
            }
        })
    }
}

/// Connects lazily, so commands start before the daemon does and reconnect after it restarts.
pub fn connect_tcp(host_port: &str, wire: Wire) -> Result<WireChannel> {
    connect_tcp_pinged(host_port, wire, None)
}

/// As [`connect_tcp`]; with `ping`, while a call is open the peer is
/// pinged once it has sent nothing for `ping`, and a peer that does not
/// answer within `ping` more (a frozen process) has its connection closed,
/// failing its calls (writes included, which no timer can bound).
pub fn connect_tcp_pinged(
    host_port: &str,
    wire: Wire,
    ping: Option<std::time::Duration>,
) -> Result<WireChannel> {
    let ep = Endpoint::from_shared(format!("http://{host_port}"))
        .map_err(|e| Error::InvalidAddress(host_port.into(), e.to_string()))?;
    Ok(WireChannel::new(configure(ep, ping).connect_lazy(), wire))
}

pub fn connect_unix(path: PathBuf, wire: Wire) -> Result<WireChannel> {
    connect_unix_pinged(path, wire, None)
}

/// As [`connect_unix`], pinging as [`connect_tcp_pinged`] does.
pub fn connect_unix_pinged(
    path: PathBuf,
    wire: Wire,
    ping: Option<std::time::Duration>,
) -> Result<WireChannel> {
    // The URI is only a placeholder: the connector below dials the socket.
    let ep = Endpoint::from_static("http://localhost");
    let ch = configure(ep, ping).connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
        }
    }));
    Ok(WireChannel::new(ch, wire))
}

fn configure(ep: Endpoint, ping: Option<std::time::Duration>) -> Endpoint {
    let ep = ep
        .connect_timeout(std::time::Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_adaptive_window(true);
    match ping {
        Some(p) => ep.http2_keep_alive_interval(p).keep_alive_timeout(p),
        None => ep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_renamed_both_ways() {
        let t = "/tvix.castore.v1.BlobService/Read";
        let s = snix_path(t).unwrap();
        assert_eq!(s, "/snix.castore.v1.BlobService/Read");
        assert_eq!(tvix_path(&s).unwrap(), t);
        assert_eq!(
            snix_path("/tvix.store.v1.PathInfoService/Get").unwrap(),
            "/snix.store.v1.PathInfoService/Get"
        );
        assert!(snix_path("/tvix_virtiofsd.cache.v1.CacheService/Fill").is_none());
        assert!(tvix_path("/grpc.health.v1.Health/Check").is_none());
    }
}
