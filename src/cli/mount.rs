//! `mount`: the store view on a host directory through FUSE.
use super::StoreArgs;
use crate::fs::{FsConfig, StoreFs};
use crate::fuse::FuseMount;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Directory to mount the store on.
    pub mountpoint: PathBuf,

    /// List every store path in the root directory (off: the root lists
    /// nothing, but any store path can be looked up by name).
    #[arg(long)]
    pub list_root: bool,

    /// Let users other than the one mounting access the mount.
    #[arg(long)]
    pub allow_other: bool,

    /// FUSE worker threads.
    #[arg(long, default_value_t = default_threads())]
    pub threads: usize,

    /// Seconds one store request may take before the reader gets ETIMEDOUT.
    #[arg(long, default_value_t = 30)]
    pub store_timeout: u64,
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().max(4))
        .unwrap_or(4)
}

pub async fn run(store_args: &StoreArgs, args: MountArgs) -> anyhow::Result<()> {
    let store = store_args.open()?;
    let fs = Arc::new(StoreFs::new(
        store,
        tokio::runtime::Handle::current(),
        FsConfig {
            list_root: args.list_root,
            store_timeout: Duration::from_secs(args.store_timeout),
        },
    ));
    let mount = FuseMount::mount(fs, &args.mountpoint, args.threads, args.allow_other)
        .with_context(|| format!("mounting {}", args.mountpoint.display()))?;
    tracing::info!("mounted on {}", args.mountpoint.display());
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    tokio::select! {
        _ = super::daemon::shutdown_signal() => {}
        _ = async { loop { poll.tick().await; if mount.finished() { break } } } => {
            tracing::info!("unmounted from outside");
        }
    }
    tokio::task::spawn_blocking(move || mount.unmount())
        .await
        .context("unmount task")??;
    Ok(())
}
