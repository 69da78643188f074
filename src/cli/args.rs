//! What every command shares on its command line: which store it works on
//! ([`StoreArgs`]), how a view is served ([`ViewArgs`]), and store paths
//! as the operator writes them.
use crate::store::{Addr, Store, StoreOptions};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

/// Which store the command works on.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Store options")]
pub struct StoreArgs {
    /// Store for all three services: local:///PATH, memory://, grpc+unix:///PATH
    /// or grpc+http://HOST:PORT (tvix or snix names, found out; ?wire=tvix or
    /// ?wire=snix pins one), or several gRPC daemons of one store separated
    /// by commas (the first that answers, failing over to the next), an S3
    /// bucket s3://BUCKET[/PREFIX]?endpoint=URL&region=R, or a Nix binary
    /// cache read through `daemon --cache-dir`: nix+http(s)://HOST[/PATH],
    /// nix+file:///DIR or nix+s3://BUCKET, with
    /// ?trusted-public-keys=NAME:KEY,... (or check-signatures=false)
    /// [default: local:// in $TVIX_VIRTIOFSD_STORE,
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
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    pub directory_cache_size: u64,

    /// How many blobs are remembered as checked against their digest (at
    /// most 34 bytes each); a forgotten one is checked again when next
    /// opened.
    #[arg(long, default_value_t = crate::view::DEFAULT_VERIFIED_BLOBS)]
    pub verified_blobs: usize,

    /// Open files and directories the guest may hold at once; past it
    /// opening answers ENFILE.
    #[arg(long, default_value_t = crate::view::DEFAULT_MAX_HANDLES)]
    pub max_handles: usize,

    /// What the guest keeps in its page cache: never (direct I/O, so many
    /// guests hold no copies of the store's data), metadata, auto, always.
    #[arg(long, value_enum, default_value_t = crate::view::CachePolicy::Always)]
    pub cache: crate::view::CachePolicy,

    /// Files read ahead, at most, while the guest reads a directory's files
    /// in their listed order: from the disk, or a per-VM daemon asks its
    /// host daemon to fill the ones its cache lacks (0: off).
    #[arg(long, default_value_t = crate::view::DEFAULT_READ_AHEAD_FILES, value_parser = clap::value_parser!(u16).range(0..=256))]
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
    pub closure_source: Option<std::sync::Arc<super::closure_file::Receiver>>,
}

impl ViewArgs {
    /// The view over an opened store, on the current tokio runtime.
    /// With `--closure`/`--closure-file`, limited to that closure, and
    /// (with a file) limited anew on each SIGHUP.
    pub async fn view(&self, store: Store) -> anyhow::Result<std::sync::Arc<crate::view::StoreFs>> {
        let closure = self.closure(&store).await?;
        let fs = std::sync::Arc::new(crate::view::StoreFs::new(
            store.clone(),
            tokio::runtime::Handle::current(),
            crate::view::FsConfig {
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
    ) -> anyhow::Result<Option<crate::store::closure::Closure>> {
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
                None => crate::store::closure::read_roots(f)?,
            });
        }
        let c = crate::store::closure::Closure::resolve(store, &roots)
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
        cache: Option<crate::store::cache::CacheOptions>,
    ) -> StoreOptions {
        use crate::store::cache::{CacheOptions, Role, DEFAULT_MAX_BYTES};
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
    ) -> anyhow::Result<(Store, Option<std::sync::Arc<crate::store::cache::Cache>>)> {
        let addrs = self.addrs()?;
        if let Some(Addr::Nix(n)) = addrs.iter().find(|a| matches!(a, Addr::Nix(_))) {
            anyhow::ensure!(
                addrs.iter().all(|a| a == &addrs[0]),
                "a Nix binary cache serves blobs, directories and path infos together: give it \
                 as --store alone, without --blob-service-addr, --directory-service-addr or \
                 --path-info-service-addr"
            );
            let (store, cache) = crate::ingest::nix_cache::open(n, &opts.upstream_keys, opts)
                .context("opening the store")?;
            return Ok((store, Some(cache)));
        }
        Store::open_with(&addrs, opts).context("opening the store")
    }
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

/// A byte count with an optional binary suffix: 512, 64K, 10G.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown suffix {c:?} (K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size in bytes (e.g. 10G)"))?;
    n.checked_mul(1 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?}: must be between 1 byte and 16 EiB"))
}
