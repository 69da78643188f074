//! `daemon`: serves the store over gRPC (tvix-store protocol, health,
//! reflection) on TCP, a unix socket, or a socket handed over by systemd.
use super::args::{parse_size, StoreArgs};
use crate::host::socket::SocketFile;
use crate::serve::grpc::StoreServer;
use crate::wire::{castore, store, FILE_DESCRIPTOR_SET};
use anyhow::{bail, Context};
use clap::Args;
use std::path::Path;
use tokio_stream::wrappers::TcpListenerStream;

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Wire families to answer, for tests: tvix, snix or tvix,snix.
    #[arg(long, hide = true, default_value = "tvix,snix")]
    pub wire_families: String,

    /// Address to serve on: HOST:PORT or unix:PATH (none: only the
    /// --http-listen binary cache). Ignored when systemd passes a listening
    /// socket (LISTEN_FDS).
    #[arg(long, env = "TVIX_VIRTIOFSD_LISTEN", default_value = "[::1]:8000")]
    pub listen: String,

    /// Refuse every Put: serve the store read-only (the default on TCP).
    #[arg(long, conflicts_with = "writable")]
    pub read_only: bool,

    /// Accept gRPC Puts on a TCP listener too (not binary cache uploads:
    /// see --http-writable). Anyone who can connect can then add store
    /// paths (with --trusted-public-keys, only signed ones): put it behind
    /// a firewall or on loopback only.
    #[arg(long)]
    pub writable: bool,

    /// Group (name or gid) given access to the unix socket created by
    /// --listen unix:PATH: mode 0660 instead of 0600.
    #[arg(long)]
    pub socket_group: Option<String>,

    /// Size bound of --cache-dir in bytes (K, M, G, T: powers of 1024); the
    /// least recently used objects are evicted to stay within it.
    #[arg(long, env = "TVIX_VIRTIOFSD_CACHE_SIZE", default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,

    /// What --cache-dir fetches ahead of VMs: `closure` (a store path's
    /// tree and files, then its references', once it is first looked up
    /// on this host, up to half the cache unread), `recorded` (as closure,
    /// and a tenant's closure first in the order its last VM opened its
    /// files) or `none`.
    #[arg(long, default_value = "recorded")]
    pub prefetch: crate::store::cache::prefetch::Mode,

    /// Where --prefetch recorded keeps the order in which each tenant
    /// closure's blobs were first opened (default: CACHE_DIR/orders).
    #[arg(long)]
    pub prefetch_orders: Option<std::path::PathBuf>,

    /// Seconds a fetch from the remote store may go without progress.
    #[arg(long, default_value_t = 30)]
    pub store_timeout: u64,

    /// Refuse uploads while the embedded store's disk has less room than
    /// this (K, M, G, T).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub min_free_space: u64,

    /// gRPC clients connected at once; past it new connections are closed
    /// as soon as they are accepted.
    #[arg(long, default_value_t = crate::serve::grpc::bounds::DEFAULT_CONNECTIONS)]
    pub max_connections: usize,

    /// Largest NAR (uncompressed, K, M, G, T) a binary cache upload may
    /// carry; a larger one is refused with 413 as it arrives.
    #[arg(long, default_value = "16G", value_parser = parse_size)]
    pub max_nar_size: u64,

    /// Connections the binary cache (--http-listen) holds at once; more
    /// are answered 503 and closed.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub http_max_connections: u32,

    /// NARs rendered at once (GET /nar, CalculateNAR), each walk holding up
    /// to 512 MiB of tree; more wait up to 10 s, then are refused.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_nar_renders: u32,

    /// Serve Prometheus metrics (GET /metrics) on HOST:PORT or unix:PATH.
    #[arg(long, env = "TVIX_VIRTIOFSD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Also serve the store as a Nix HTTP binary cache on HOST:PORT (e.g.
    /// 127.0.0.1:5000): Nix substitutes from it, and with --writable
    /// `nix copy --to http://HOST:PORT` uploads into it.
    #[arg(long, value_name = "HOST:PORT")]
    pub http_listen: Option<String>,

    /// Accept uploads on the binary cache (`nix copy --to http://...`);
    /// not gRPC Puts (see --writable).
    #[arg(long, requires = "http_listen")]
    pub http_writable: bool,

    /// Sign the binary cache's narinfos with this Nix secret key file
    /// (`nix-store --generate-binary-cache-key` writes one).
    #[arg(long, value_name = "FILE", requires = "http_listen")]
    pub signing_key: Option<std::path::PathBuf>,

    /// Add a store path, whatever way it comes in (gRPC Put, binary cache
    /// upload), only when one of these keys (NAME:BASE64, space-separated,
    /// as Nix's trusted-public-keys) signed it and its tree hashes to the
    /// NAR it signed; a Nix binary cache --store trusts them too.
    #[arg(long, value_name = "KEYS")]
    pub trusted_public_keys: Option<String>,

    /// With --signing-key and no --trusted-public-keys, sign what others
    /// upload unchecked (through --writable TCP, --http-writable or a
    /// --socket-group socket); refused without this flag.
    #[arg(long, requires = "signing_key")]
    pub sign_unverified_uploads: bool,

    /// The binary cache's Priority (lower is preferred; cache.nixos.org
    /// says 40).
    #[arg(long, default_value_t = 30, requires = "http_listen")]
    pub http_priority: u32,
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    /// The socket file is removed on shutdown when we created it.
    Unix(tokio::net::UnixListener, Option<SocketFile>),
}

impl Listener {
    /// Whether Puts are refused: on TCP unless the operator asked for
    /// writes (any local user, or the network, can reach a TCP port); on a
    /// unix socket (0600 unless a group is given) only when asked.
    fn read_only(&self, args: &DaemonArgs) -> bool {
        match self {
            Listener::Tcp(_) => !args.writable,
            Listener::Unix(..) => args.read_only,
        }
    }
}

/// The first socket passed by systemd socket activation, if any.
fn systemd_listener() -> anyhow::Result<Option<Listener>> {
    let Some(fd) = crate::host::socket::systemd_fd() else {
        return Ok(None);
    };
    Ok(Some(match crate::host::socket::inherited_from_fd(fd)? {
        crate::host::socket::Inherited::Unix(l) => {
            l.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(l)?, None)
        }
        crate::host::socket::Inherited::Tcp(l) => {
            l.set_nonblocking(true)?;
            Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
        }
    }))
}

async fn bind(listen: &str, group: Option<&str>) -> anyhow::Result<Listener> {
    if let Some(path) = listen.strip_prefix("unix:") {
        let group = group.map(crate::host::socket::group_id).transpose()?;
        let (l, file) = crate::host::socket::bind_socket(Path::new(path), group)?;
        l.set_nonblocking(true)?;
        Ok(Listener::Unix(
            tokio::net::UnixListener::from_std(l)?,
            Some(file),
        ))
    } else {
        if group.is_some() {
            bail!("--socket-group is for a unix socket (--listen unix:PATH)");
        }
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

impl DaemonArgs {
    fn families(&self) -> anyhow::Result<crate::serve::grpc::Families> {
        let mut f = crate::serve::grpc::Families {
            tvix: false,
            snix: false,
        };
        for w in self.wire_families.split(',') {
            match w.trim() {
                "tvix" => f.tvix = true,
                "snix" => f.snix = true,
                other => anyhow::bail!("--wire-families: {other:?} is neither tvix nor snix"),
            }
        }
        Ok(f)
    }
}

pub async fn run(store_args: &StoreArgs, args: DaemonArgs) -> anyhow::Result<()> {
    use crate::store::cache::{CacheOptions, Role};
    let cache = store_args.cache_dir.as_ref().map(|dir| CacheOptions {
        dir: dir.clone(),
        max_bytes: args.cache_size,
        role: Role::Filler,
    });
    let trusted = args
        .trusted_public_keys
        .iter()
        .flat_map(|k| k.split_whitespace())
        .map(crate::nix::signing::PublicKey::parse)
        .collect::<Result<Vec<_>, _>>()
        .context("--trusted-public-keys")?;
    let mut opts = store_args.options(false, cache);
    opts.idle_timeout = std::time::Duration::from_secs(args.store_timeout);
    // what uploads must be signed by also vouches for a Nix cache upstream
    opts.upstream_keys = trusted.clone();
    let (store, cache) = store_args.open_with(&opts)?;
    if let Some(c) = &cache {
        c.set_prefetch(args.prefetch, args.prefetch_orders.clone())?;
    }
    // one bound on NAR walks, whichever listener asks for them
    let renders = std::sync::Arc::new(tokio::sync::Semaphore::new(args.max_nar_renders as usize));
    // Metrics first: once the store socket answers, so do they.
    let calls = std::sync::Arc::new(crate::serve::grpc::CallMetrics::default());
    if let Some(listen) = &args.metrics_listen {
        let (c, calls) = (cache.clone(), calls.clone());
        let render: crate::serve::metrics::Render = std::sync::Arc::new(move || {
            let mut out = String::new();
            crate::wire::prometheus::up(&mut out);
            calls.render(&mut out);
            if let Some(c) = &c {
                out.push_str(&c.stats().prometheus());
            }
            out
        });
        crate::serve::metrics::serve(listen, render).await?;
    }
    let (listener, listening_on) = match systemd_listener()? {
        Some(l) => {
            tracing::info!("serving on the socket passed by systemd");
            (Some(l), "the socket passed by systemd".to_string())
        }
        // the binary cache alone
        None if args.listen == "none" => {
            anyhow::ensure!(
                args.http_listen.is_some(),
                "--listen none serves nothing without --http-listen"
            );
            (None, args.http_listen.clone().unwrap_or_default())
        }
        None => (
            Some(bind(&args.listen, args.socket_group.as_deref()).await?),
            args.listen.clone(),
        ),
    };
    let read_only = listener.as_ref().is_none_or(|l| l.read_only(&args));
    // One write policy for every way in; see `write_policy`.
    let policy = crate::ingest::write_policy::WritePolicy::new(trusted);
    let store = policy.guard(store);
    // Who else can add paths: a writable TCP or binary cache listener, or a
    // writable socket shared with a group (or passed by systemd, whose
    // unit says who may connect). A 0600 socket is the operator's own.
    let others_upload = args.http_writable
        || match &listener {
            Some(Listener::Tcp(_)) => !read_only,
            Some(Listener::Unix(_, file)) => {
                !read_only && (file.is_none() || args.socket_group.is_some())
            }
            None => false,
        };
    if args.signing_key.is_some()
        && policy.is_open()
        && others_upload
        && !args.sign_unverified_uploads
    {
        bail!(
            "--signing-key would sign whatever anyone who can upload adds (a writable TCP or \
             binary cache listener, or a shared socket): give --trusted-public-keys (uploads \
             must then carry one of their signatures), make the listeners read-only, or pass \
             --sign-unverified-uploads to accept that"
        );
    }
    // An embedded store (blobs are what fill a disk) keeps room free.
    let min_free = match &store_args.addrs()?[0] {
        crate::store::Addr::Local(dir) => Some((dir.clone(), args.min_free_space)),
        _ => None,
    };
    if crate::host::notify::wanted() {
        let (store, timeout) = (store.clone(), opts.idle_timeout);
        let status = format!(
            "STATUS=serving {} on {}{}",
            store_args.addrs()?[0],
            listening_on,
            if read_only { ", read-only" } else { "" }
        );
        tokio::spawn(async move {
            super::lifecycle::store_answers(&store, timeout).await;
            crate::host::notify::tell(&format!("READY=1\n{status}"));
        });
    }
    if let Some(listen) = &args.http_listen {
        let signer = args
            .signing_key
            .as_ref()
            .map(|f| -> anyhow::Result<_> {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                crate::nix::signing::SecretKey::parse(&text)
                    .with_context(|| format!("signing key {}", f.display()))
            })
            .transpose()?;
        if let Some(s) = &signer {
            tracing::info!("binary cache narinfos signed by {}", s.public());
        }
        let l = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the binary cache on {listen}"))?;
        let writable = args.http_writable;
        tracing::info!(
            "Nix binary cache on http://{}{}",
            l.local_addr()?,
            match (writable, policy.is_open()) {
                (true, true) => "",
                (true, false) => " (uploads signed by a trusted key)",
                (false, _) => " (read-only; --http-writable accepts uploads)",
            }
        );
        let cache = crate::serve::binary_cache::BinaryCache::new(
            store.clone(),
            crate::serve::binary_cache::Options {
                writable,
                signer,
                policy: policy.clone(),
                priority: args.http_priority,
                min_free: min_free.clone(),
                nar_urls: match &store_args.addrs()?[0] {
                    crate::store::Addr::Local(dir) => Some(dir.join("nar-urls")),
                    _ => None,
                },
                limits: crate::serve::binary_cache::Limits {
                    max_connections: args.http_max_connections as usize,
                    max_nar_size: args.max_nar_size,
                    renders: renders.clone(),
                },
            },
        );
        crate::serve::binary_cache::serve(l, std::sync::Arc::new(cache));
    }
    let Some(listener) = listener else {
        super::lifecycle::shutdown_signal().await;
        return Ok(());
    };
    let tenant_store = store.clone();
    let server = StoreServer::new(store, read_only).with_limits(crate::serve::grpc::Limits {
        min_free,
        nar_renders: renders,
        ..Default::default()
    });

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

    let (blobs, directories, path_infos) = server.services();
    let cache_service = cache.as_ref().map(|c| {
        crate::wire::cache::cache_service_server::CacheServiceServer::new(
            crate::serve::grpc::CacheServer::new(c.clone()),
        )
    });
    // Without a cache directory: only ReadBlobs, for host caches.
    let blobs_only = cache.is_none().then(|| {
        crate::wire::cache::cache_service_server::CacheServiceServer::new(
            crate::serve::grpc::BlobsOnlyServer::new(tenant_store.blob.clone()),
        )
    });
    if let Some(c) = &cache {
        tracing::info!(
            "filling cache {} (at most {} MiB) from the store",
            c.dir().display(),
            args.cache_size >> 20
        );
    }
    let bounds = crate::serve::grpc::bounds::GrpcBounds::new(args.max_connections);
    let router = bounds
        .builder()
        .layer(tower::util::MapRequestLayer::new(
            crate::serve::grpc::reset_is_error,
        ))
        .layer(tower::util::MapRequestLayer::new(
            crate::serve::grpc::wire_names(args.families()?),
        ))
        .layer(tower::util::MapRequestLayer::new(bounds.cap_bodies()))
        .layer(calls.layer())
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(blobs)
        .add_service(directories)
        .add_service(path_infos)
        .add_optional_service(cache_service)
        .add_optional_service(blobs_only);

    let ro = match (&listener, read_only) {
        (Listener::Tcp(_), true) => " (read-only; --writable accepts Puts)",
        (_, true) => " (read-only)",
        (_, false) => "",
    };
    match listener {
        Listener::Tcp(l) => {
            tracing::info!("listening on {}{ro}", l.local_addr()?);
            router
                .serve_with_incoming_shutdown(
                    bounds.limit(nodelay(TcpListenerStream::new(l)), "gRPC listener".into()),
                    super::lifecycle::shutdown_signal(),
                )
                .await?;
        }
        Listener::Unix(l, file) => {
            if let Some(f) = &file {
                tracing::info!("listening on unix:{}{ro}", f.path().display());
            }
            // Tenants' per-VM daemons open closure-scoped connections here.
            let tenants = cache.clone().map(|cache| {
                std::sync::Arc::new(crate::serve::grpc::tenants::Tenants {
                    store: tenant_store.clone(),
                    cache,
                    bounds: bounds.clone(),
                })
            });
            let incoming = crate::serve::grpc::tenants::incoming(l, tenants);
            let r = router
                .serve_with_incoming_shutdown(
                    bounds.limit(incoming, "gRPC socket".into()),
                    super::lifecycle::shutdown_signal(),
                )
                .await;
            // the socket file goes now, before the cache's closing report
            drop(file);
            r?;
        }
    }
    if let Some(c) = &cache {
        tracing::info!("cache {}: {}", c.dir().display(), c.stats().summary());
    }
    Ok(())
}
