//! gRPC channels to a remote store over loopback/remote TCP or a unix socket.
use crate::services::{Error, Result};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use tonic::transport::{Channel, Endpoint, Uri};

/// Largest message accepted from a remote store (a Directory of a few
/// hundred thousand entries); bigger ones are refused, not buffered.
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Connects lazily, so commands start before the daemon does and reconnect after it restarts.
pub fn connect_tcp(host_port: &str) -> Result<Channel> {
    let ep = Endpoint::from_shared(format!("http://{host_port}"))
        .map_err(|e| Error::InvalidAddress(host_port.into(), e.to_string()))?;
    Ok(configure(ep).connect_lazy())
}

pub fn connect_unix(path: PathBuf) -> Result<Channel> {
    // The URI is only a placeholder: the connector below dials the socket.
    let ep = Endpoint::from_static("http://localhost");
    Ok(
        configure(ep).connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        })),
    )
}

fn configure(ep: Endpoint) -> Endpoint {
    ep.connect_timeout(std::time::Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_adaptive_window(true)
}
