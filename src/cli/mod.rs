//! Command line: one file per command group, the arguments they share in
//! [`args`], and starting and stopping in [`lifecycle`].
use anyhow::Context;
pub use args::{StoreArgs, ViewArgs};
use clap::{CommandFactory, Parser, Subcommand};

pub mod args;
pub mod closure_file;
pub mod daemon;
pub mod docs;
pub mod import;
pub mod lifecycle;
pub mod mount;
pub mod query;
pub mod virtiofs;

/// `--version`: what this build speaks and serves, for bug reports and
/// for fleets checking what they deployed.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nwire: tvix.castore.v1 and snix.castore.v1 (BlobService, DirectoryService), tvix.store.v1 and snix.store.v1 (PathInfoService), tvix_virtiofsd.cache.v1",
    "\nstores: local://, memory://, grpc+unix://, grpc+http://, a list of gRPC daemons (failover), s3://, Nix binary caches (nix+http://, nix+https://, nix+file://, nix+s3://); host cache directory (--cache-dir)",
    "\nserves: vhost-user virtio-fs (virtiofs), FUSE (mount), gRPC (daemon)",
    "\nsandbox: namespaces, chroot, seccomp, capabilities",
    "\nbuild: ",
    env!("TVIX_VIRTIOFSD_BUILD"),
);

/// A tvix-store compatible content-addressed store that serves a read-only
/// /nix/store to microVMs.
#[derive(Parser, Debug)]
#[command(name = "tvix-virtiofsd", version, long_version = LONG_VERSION, about)]
pub struct Cli {
    #[command(flatten)]
    pub store: StoreArgs,

    /// Log level: error, warn, info, debug or trace (or a tracing filter).
    #[arg(
        long,
        global = true,
        help_heading = "Common options",
        env = "TVIX_VIRTIOFSD_LOG",
        default_value = "info"
    )]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the store's BlobService, DirectoryService and PathInfoService over gRPC.
    Daemon(daemon::DaemonArgs),
    /// Add files or directories as store paths, exactly as `nix-store --add` does.
    Import(import::ImportArgs),
    /// Copy store paths and their closure from this host's /nix/store.
    Copy(import::CopyArgs),
    /// Add store paths from NAR files, checked against Nix's path info.
    ImportNar(import::ImportNarArgs),
    /// Mount the store read-only as a /nix/store view through FUSE.
    Mount(mount::MountArgs),
    /// Write the NAR of a store path to stdout.
    Nar(query::NarArgs),
    /// Show name, NAR hash, NAR size and references of store paths.
    PathInfo(query::PathInfoArgs),
    /// Serve the store read-only to a microVM as a vhost-user virtio-fs device.
    Virtiofs(virtiofs::VirtiofsArgs),
    /// Print a shell completion script for this command.
    Completions(docs::CompletionsArgs),
    /// Write manual pages for this command and each subcommand into a directory.
    Man(docs::ManArgs),
}

/// Runs a parsed command line. `virtiofs` sets up its sandbox before any
/// thread exists, so it starts its own runtime; the others share one.
pub fn main(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    if let Command::Virtiofs(a) = cli.command {
        return virtiofs::main(&cli.store, a);
    }
    if matches!(cli.command, Command::Daemon(_) | Command::Mount(_)) {
        crate::host::memory::configure();
        crate::host::memory::spawn_trimmer();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(cli))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs a parsed command line on the current runtime.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon(a) => daemon::run(&cli.store, a).await,
        Command::Import(a) => import::import(a.sign.wrap(cli.store.open()?)?, a).await,
        Command::Copy(a) => import::copy(a.sign.wrap(cli.store.open()?)?, a).await,
        Command::ImportNar(a) => import::import_nar(a.sign.wrap(cli.store.open()?)?, a).await,
        Command::Mount(a) => mount::run(&cli.store, a).await,
        Command::Nar(a) => query::nar(cli.store.open()?, a).await,
        Command::PathInfo(a) => query::path_info(cli.store.open()?, a).await,
        Command::Virtiofs(_) => anyhow::bail!("virtiofs runs through cli::main"),
        Command::Completions(a) => docs::completions(a, Cli::command()),
        Command::Man(a) => docs::man(a, Cli::command()),
    }
}

/// Whether a command failed only because its reader went away (`... |
/// head`): Unix tools then end quietly, as by SIGPIPE.
pub fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let io = c
            .downcast_ref::<std::io::Error>()
            .or(match c.downcast_ref() {
                Some(crate::store::Error::Io(io)) => Some(io),
                _ => None,
            });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
