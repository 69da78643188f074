//! Command line: store selection shared by all commands, one file per command group.
use crate::services::{Addr, Store, StoreOptions};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

pub mod closure_file;
pub mod daemon;
pub mod docs;
pub mod import;
pub mod mount;
pub mod query;
pub mod virtiofs;

/// `--version`: what this build speaks and serves, for bug reports and
/// for fleets checking what they deployed.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nwire: tvix.castore.v1 and snix.castore.v1 (BlobService, DirectoryService), tvix.store.v1 and snix.store.v1 (PathInfoService), tvix_virtiofsd.cache.v1",
    "\nstores: local://, memory://, grpc+unix://, grpc+http://; host cache directory (--cache-dir)",
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

/// Which store the command works on.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Store options")]
pub struct StoreArgs {
    /// Store for all three services: local:///PATH, memory://, grpc+unix:///PATH
    /// or grpc+http://HOST:PORT (tvix or snix names, found out; ?wire=tvix or
    /// ?wire=snix pins one) [default: local:// in $TVIX_VIRTIOFSD_STORE,
    /// else /var/lib/tvix-virtiofsd for root, else $XDG_DATA_HOME/tvix-virtiofsd].
    #[arg(long, global = true, env = "TVIX_VIRTIOFSD_STORE_URL")]
    pub store: Option<String>,

    /// Blob service address (overrides --store for blobs).
    #[arg(long, global = true, env = "BLOB_SERVICE_ADDR")]
    pub blob_service_addr: Option<String>,

    /// Directory service address (overrides --store for directories).
    #[arg(long, global = true, env = "DIRECTORY_SERVICE_ADDR")]
    pub directory_service_addr: Option<String>,

    /// Path info service address (overrides --store for path infos).
    #[arg(long, global = true, env = "PATH_INFO_SERVICE_ADDR")]
    pub path_info_service_addr: Option<String>,

    /// Host cache directory in front of a remote --store, shared by the
    /// daemons of one host: `daemon` fills it (one daemon per directory);
    /// the other commands read hits from it and ask their --store, that
    /// daemon, to fill misses.
    #[arg(long, global = true, env = "TVIX_VIRTIOFSD_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// How the /nix/store view behaves, shared by `mount` and `virtiofs`.
#[derive(Args, Debug, Clone)]
pub struct ViewArgs {
    /// List every store path in the root directory (off: the root lists
    /// nothing, but any store path can be looked up by name).
    #[arg(long)]
    pub list_root: bool,

    /// Seconds one store request may take (a blob fetch: without
    /// progress; a directory: one more per 100,000 entries below it, up to
    /// 4 times this more) before the reader gets ETIMEDOUT.
    #[arg(long, default_value_t = 30)]
    pub store_timeout: u64,

    /// Bytes of decoded directories kept in memory (K, M, G suffixes);
    /// others are read again from the store or its cache directory.
    #[arg(long, default_value = "2M", value_parser = daemon::parse_size)]
    pub directory_cache_size: u64,

    /// How many blobs are remembered as checked against their digest (at
    /// most 34 bytes each); a forgotten one is checked again when next
    /// opened.
    #[arg(long, default_value_t = crate::fs::DEFAULT_VERIFIED_BLOBS)]
    pub verified_blobs: usize,

    /// Open files and directories the guest may hold at once; past it
    /// opening answers ENFILE.
    #[arg(long, default_value_t = crate::fs::DEFAULT_MAX_HANDLES)]
    pub max_handles: usize,

    /// What the guest keeps in its page cache: never (direct I/O, so many
    /// guests hold no copies of the store's data), metadata, auto, always.
    #[arg(long, value_enum, default_value_t = crate::fs::CachePolicy::Always)]
    pub cache: crate::fs::CachePolicy,

    /// Files read ahead, at most, while the guest reads a directory's files
    /// in their listed order: from the disk, or a per-VM daemon asks its
    /// host daemon to fill the ones its cache lacks (0: off).
    #[arg(long, default_value_t = crate::fs::DEFAULT_READ_AHEAD_FILES, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub read_ahead_files: u16,

    /// Show only these store paths (absolute or basenames) and what they
    /// reference, transitively; any other name is absent.
    #[arg(long, num_args = 1.., value_name = "STORE_PATH")]
    pub closure: Vec<String>,

    /// As --closure, with the store paths in FILE, one a line (# starts a
    /// comment); read again on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub closure_file: Option<PathBuf>,

    /// Where `virtiofs`'s serving process gets the closure file from: its
    /// supervisor hands it the opened file (it sees no host path).
    #[arg(skip)]
    pub closure_source: Option<std::sync::Arc<closure_file::Receiver>>,
}

impl ViewArgs {
    /// The view over an opened store, on the current tokio runtime.
    /// With `--closure`/`--closure-file`, limited to that closure, and
    /// (with a file) limited anew on each SIGHUP.
    pub async fn view(&self, store: Store) -> anyhow::Result<std::sync::Arc<crate::fs::StoreFs>> {
        let closure = self.closure(&store).await?;
        let fs = std::sync::Arc::new(crate::fs::StoreFs::new(
            store.clone(),
            tokio::runtime::Handle::current(),
            crate::fs::FsConfig {
                list_root: self.list_root,
                store_timeout: std::time::Duration::from_secs(self.store_timeout),
                dir_cache_bytes: self.directory_cache_size,
                verified_blobs: self.verified_blobs,
                max_handles: self.max_handles,
                cache: self.cache,
                read_ahead_files: usize::from(self.read_ahead_files),
            },
        ));
        if let Some(c) = closure {
            tracing::info!("serving a closure of {} store paths", c.len());
            fs.set_closure(Some(c));
        }
        if self.closure_file.is_some() {
            let (args, fs) = (self.clone(), fs.clone());
            use tokio::signal::unix::{signal, SignalKind};
            let mut hup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    match args.closure(&store).await {
                        Ok(c) => {
                            let n = c.as_ref().map_or(0, |c| c.len());
                            fs.set_closure(c);
                            tracing::info!("SIGHUP: now serving a closure of {n} store paths");
                        }
                        Err(e) => tracing::error!("SIGHUP: keeping the closure served: {e:#}"),
                    }
                }
            });
        }
        Ok(fs)
    }

    /// The closure of `--closure` and `--closure-file` together; `None`
    /// when neither is given.
    pub async fn closure(
        &self,
        store: &Store,
    ) -> anyhow::Result<Option<crate::fs::closure::Closure>> {
        if self.closure.is_empty() && self.closure_file.is_none() {
            return Ok(None);
        }
        let mut roots = self
            .closure
            .iter()
            .map(|s| parse_store_path(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(f) = &self.closure_file {
            roots.extend(match &self.closure_source {
                Some(src) => src.read_roots()?,
                None => crate::fs::closure::read_roots(f)?,
            });
        }
        let c = crate::fs::closure::Closure::resolve(store, &roots)
            .await
            .context("resolving the closure")?;
        Ok(Some(c))
    }
}

/// The embedded store's directory when none is given.
pub fn default_store_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("TVIX_VIRTIOFSD_STORE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/lib/tvix-virtiofsd"));
    }
    let data = match std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_DATA_HOME nor HOME is set")?,
        )
        .join(".local/share"),
    };
    Ok(data.join("tvix-virtiofsd"))
}

impl StoreArgs {
    pub fn addrs(&self) -> anyhow::Result<[Addr; 3]> {
        let base = match &self.store {
            Some(s) => s.clone(),
            None => {
                let dir = default_store_dir()?;
                let dir = std::path::absolute(&dir)
                    .with_context(|| format!("store directory {}", dir.display()))?;
                format!("local://{}", dir.display())
            }
        };
        let pick = |o: &Option<String>| -> anyhow::Result<Addr> {
            let s = o.as_deref().unwrap_or(&base);
            Ok(s.parse::<Addr>()?)
        };
        Ok([
            pick(&self.blob_service_addr)?,
            pick(&self.directory_service_addr)?,
            pick(&self.path_info_service_addr)?,
        ])
    }

    /// Opens the store, read through --cache-dir when given.
    pub fn open(&self) -> anyhow::Result<Store> {
        Ok(self.open_with(&self.options(false, None))?.0)
    }

    /// How the store is opened: `sandboxed` for the view's serving process,
    /// `cache` for a filler (`daemon`); other commands read the cache.
    pub fn options(
        &self,
        sandboxed: bool,
        cache: Option<crate::services::cache::CacheOptions>,
    ) -> StoreOptions {
        use crate::services::cache::{CacheOptions, Role, DEFAULT_MAX_BYTES};
        StoreOptions {
            sandboxed,
            cache: cache.or_else(|| {
                self.cache_dir.as_ref().map(|dir| CacheOptions {
                    dir: dir.clone(),
                    max_bytes: DEFAULT_MAX_BYTES,
                    role: Role::Reader,
                })
            }),
            ..Default::default()
        }
    }

    /// Opens the store as `opts` say; answers its cache too.
    pub fn open_with(
        &self,
        opts: &StoreOptions,
    ) -> anyhow::Result<(Store, Option<std::sync::Arc<crate::services::cache::Cache>>)> {
        let addrs = self.addrs()?;
        Store::open_with(&addrs, opts).context("opening the store")
    }
}

/// Runs a parsed command line. `virtiofs` sets up its sandbox before any
/// thread exists, so it starts its own runtime; the others share one.
pub fn main(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    if let Command::Virtiofs(a) = cli.command {
        return virtiofs::main(&cli.store, a);
    }
    if matches!(cli.command, Command::Daemon(_) | Command::Mount(_)) {
        crate::memory::configure();
        crate::memory::spawn_trimmer();
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
        Command::Completions(a) => docs::completions(a),
        Command::Man(a) => docs::man(a),
    }
}

/// Whether a command failed only because its reader went away (`... |
/// head`): Unix tools then end quietly, as by SIGPIPE.
pub fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let io = c
            .downcast_ref::<std::io::Error>()
            .or(match c.downcast_ref() {
                Some(crate::services::Error::Io(io)) => Some(io),
                _ => None,
            });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Parses a store path given absolute or as a basename.
pub fn parse_store_path(s: &str) -> anyhow::Result<crate::nix::store_path::StorePath> {
    use crate::nix::store_path::StorePath;
    let p = if s.starts_with('/') {
        StorePath::from_absolute_path(s.trim_end_matches('/'))
    } else {
        StorePath::from_basename(s)
    };
    p.with_context(|| format!("{s:?} is not a store path"))
}
