//! `daemon`: serves the store over gRPC (tvix-store protocol, health,
//! reflection) on TCP, a unix socket, or a socket handed over by systemd.
use super::StoreArgs;
use crate::services::server::StoreServer;
use crate::wire::{castore, store, FILE_DESCRIPTOR_SET};
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Address to serve on: HOST:PORT or unix:PATH. Ignored when systemd
    /// passes a listening socket (LISTEN_FDS).
    #[arg(long, env = "TVIX_VIRTIOFSD_LISTEN", default_value = "[::1]:8000")]
    pub listen: String,

    /// Refuse every Put: serve the store read-only.
    #[arg(long)]
    pub read_only: bool,
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    /// The socket file is removed on shutdown when we created it.
    Unix(tokio::net::UnixListener, Option<PathBuf>),
}

/// The first socket passed by systemd socket activation, if any.
fn systemd_listener() -> anyhow::Result<Option<Listener>> {
    let Some(fd) = crate::socket::systemd_fd() else {
        return Ok(None);
    };
    Ok(Some(match crate::socket::inherited_from_fd(fd)? {
        crate::socket::Inherited::Unix(l) => {
            l.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(l)?, None)
        }
        crate::socket::Inherited::Tcp(l) => {
            l.set_nonblocking(true)?;
            Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
        }
    }))
}

async fn bind(listen: &str) -> anyhow::Result<Listener> {
    if let Some(path) = listen.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                bail!("{} exists and is not a socket", path.display());
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let l = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("binding {}", path.display()))?;
        Ok(Listener::Unix(l, Some(path)))
    } else {
        let l = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        Ok(Listener::Tcp(l))
    }
}

/// Disables Nagle on accepted connections: without it every small request
/// waits for the peer's delayed ACK (~40 ms), which dominates per-blob reads.
pub fn nodelay(
    s: TcpListenerStream,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    s.map(|r| {
        r.inspect(|c| {
            if let Err(e) = c.set_nodelay(true) {
                tracing::warn!("cannot set TCP_NODELAY: {e}");
            }
        })
    })
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

pub async fn run(store_args: &StoreArgs, args: DaemonArgs) -> anyhow::Result<()> {
    let store = store_args.open()?;
    let server = StoreServer::new(store, args.read_only);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<castore::blob_service_server::BlobServiceServer<StoreServer>>()
        .await;
    health_reporter
        .set_serving::<castore::directory_service_server::DirectoryServiceServer<StoreServer>>()
        .await;
    health_reporter
        .set_serving::<store::path_info_service_server::PathInfoServiceServer<StoreServer>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;

    let max = crate::services::channel::MAX_MESSAGE_SIZE;
    let router = Server::builder()
        .layer(tower::util::MapRequestLayer::new(
            crate::services::server::reset_is_error,
        ))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            castore::blob_service_server::BlobServiceServer::new(server.clone())
                .max_decoding_message_size(max),
        )
        .add_service(
            castore::directory_service_server::DirectoryServiceServer::new(server.clone())
                .max_decoding_message_size(max),
        )
        .add_service(
            store::path_info_service_server::PathInfoServiceServer::new(server)
                .max_decoding_message_size(max),
        );

    let listener = match systemd_listener()? {
        Some(l) => {
            tracing::info!("serving on the socket passed by systemd");
            l
        }
        None => bind(&args.listen).await?,
    };
    let ro = if args.read_only { " (read-only)" } else { "" };
    match listener {
        Listener::Tcp(l) => {
            tracing::info!("listening on {}{ro}", l.local_addr()?);
            router
                .serve_with_incoming_shutdown(nodelay(TcpListenerStream::new(l)), shutdown_signal())
                .await?;
        }
        Listener::Unix(l, path) => {
            if let Some(p) = &path {
                tracing::info!("listening on unix:{}{ro}", p.display());
            }
            let r = router
                .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown_signal())
                .await;
            if let Some(p) = path {
                let _ = std::fs::remove_file(p);
            }
            r?;
        }
    }
    Ok(())
}
