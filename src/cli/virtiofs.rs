//! `virtiofs`: the vhost-user virtio-fs daemon, one per microVM. It serves
//! the store view to the one VMM that connects, and exits 0 when the VMM
//! disconnects or on SIGTERM/SIGINT, removing the socket it created.
use super::StoreArgs;
use crate::socket::{self, SocketFile};
use crate::vhost_user::{self, DeviceConfig, MAX_REQUEST_QUEUES};
use anyhow::{anyhow, bail, Context};
use clap::Args;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct VirtiofsArgs {
    /// vhost-user socket to create and listen on; a stale socket there is
    /// replaced, and removed again on exit.
    #[arg(long, conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Serve an already listening vhost-user unix socket inherited as this
    /// file descriptor instead (without either option: the socket passed
    /// by systemd socket activation).
    #[arg(long)]
    pub fd: Option<RawFd>,

    /// Tag the guest mounts the file system by (at most 36 bytes).
    #[arg(long, default_value = "nix-store", value_parser = parse_tag)]
    pub tag: String,

    /// Worker threads serving requests, so one slow store fetch does not
    /// stall the others.
    #[arg(long, default_value_t = default_pool_size(), value_parser = clap::value_parser!(u16).range(1..))]
    pub thread_pool_size: u16,

    /// Request queues offered besides the high-priority queue (the VMM
    /// may use fewer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=MAX_REQUEST_QUEUES as i64))]
    pub request_queues: u8,

    /// Group (name or gid) given access to the socket created by
    /// --socket-path: mode 0660 instead of 0600.
    #[arg(long, requires = "socket_path")]
    pub socket_group: Option<String>,

    /// Print the backend's capabilities as JSON (vhost-user backend
    /// conventions, for libvirt) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    #[command(flatten)]
    pub view: super::ViewArgs,
}

fn default_pool_size() -> u16 {
    std::thread::available_parallelism()
        .map(|n| u16::try_from(n.get()).unwrap_or(u16::MAX).max(2))
        .unwrap_or(2)
}

fn parse_tag(s: &str) -> Result<String, String> {
    vhost_user::check_tag(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

/// The listening socket, and the socket file to remove if we created it.
fn listener(args: &VirtiofsArgs) -> anyhow::Result<(UnixListener, Option<SocketFile>)> {
    if let Some(fd) = args.fd {
        return Ok((socket::listener_from_fd(fd)?, None));
    }
    if let Some(path) = &args.socket_path {
        let group = args
            .socket_group
            .as_deref()
            .map(socket::group_id)
            .transpose()?;
        let (l, f) = socket::bind_socket(path, group)?;
        return Ok((l, Some(f)));
    }
    match socket::systemd_listener()? {
        Some(l) => Ok((l, None)),
        None => bail!("give --socket-path or --fd (or start under systemd socket activation)"),
    }
}

pub async fn run(store_args: &StoreArgs, args: VirtiofsArgs) -> anyhow::Result<()> {
    if args.print_capabilities {
        println!("{}", vhost_user::CAPABILITIES_JSON);
        return Ok(());
    }
    // Before anything that takes time: a signal from here on is a clean exit.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;

    let (listener, socket_file) = listener(&args)?;
    let fs = args.view.open(store_args)?;
    let config = DeviceConfig {
        tag: args.tag,
        request_queues: usize::from(args.request_queues),
        threads: usize::from(args.thread_pool_size),
    };
    match &socket_file {
        Some(f) => tracing::info!("waiting for the VMM on {}", f.path().display()),
        None => tracing::info!("waiting for the VMM on the inherited socket"),
    }

    // The vhost-user daemon blocks: it runs on its own thread (not the
    // blocking pool, which would hold up the runtime's shutdown), and this
    // task waits for it or for a signal.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || {
            let _ = tx.send(vhost_user::serve_one(fs, config, listener));
        })
        .context("starting the vhost-user thread")?;
    let result = tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM: shutting down");
            Ok(())
        }
        _ = int.recv() => {
            tracing::info!("SIGINT: shutting down");
            Ok(())
        }
        r = rx => match r {
            Ok(r) => r.context("vhost-user"),
            Err(_) => Err(anyhow!("the vhost-user thread died")),
        },
    };
    drop(socket_file);
    result
}
