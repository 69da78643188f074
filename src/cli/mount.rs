//! `mount`: the store view on a host directory through FUSE.
use super::args::StoreArgs;
use crate::serve::fuse::FuseMount;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Directory to mount the store on.
    pub mountpoint: PathBuf,

    /// Let users other than the one mounting access the mount.
    #[arg(long)]
    pub allow_other: bool,

    /// FUSE worker threads.
    #[arg(long, default_value_t = default_threads())]
    pub threads: usize,

    #[command(flatten)]
    pub view: super::args::ViewArgs,
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().max(4))
        .unwrap_or(4)
}

pub async fn run(store_args: &StoreArgs, args: MountArgs) -> anyhow::Result<()> {
    let mut opts = store_args.options(false, None);
    opts.idle_timeout = Duration::from_secs(args.view.store_timeout);
    let (store, cache) = store_args.open_with(&opts)?;
    let fs = args.view.view(store).await?;
    let mount = FuseMount::mount(fs, &args.mountpoint, args.threads, args.allow_other)
        .with_context(|| format!("mounting {}", args.mountpoint.display()))?;
    tracing::info!("mounted on {}", args.mountpoint.display());
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    tokio::select! {
        _ = super::lifecycle::shutdown_signal() => {}
        _ = async { loop { poll.tick().await; if mount.finished() { break } } } => {
            tracing::info!("unmounted from outside");
        }
    }
    tokio::task::spawn_blocking(move || mount.unmount())
        .await
        .context("unmount task")??;
    if let Some(c) = cache {
        c.report_touches().await;
        tracing::info!("cache {}: {}", c.dir().display(), c.stats().summary());
    }
    Ok(())
}
