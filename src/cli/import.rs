//! `import`, `copy` and `import-nar`: the ways store paths get into the store.
use crate::ingest::uploads::UploadBudget;
use crate::ingest::Ingested;
use crate::nix::path_info::{ContentAddress, PathInfo};
use crate::nix::path_info_json::{parse_path_info_json, NixPathInfo};
use crate::nix::store_path::{make_source_path, StorePath};
use crate::store::Store;
use crate::wire::store::nar_info::ca::Hash as CaKind;
use anyhow::{anyhow, bail, Context};
use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Files or directories to add; each becomes /nix/store/<hash>-<basename>.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,

    #[command(flatten)]
    pub sign: SignArgs,
}

/// How the commands that add store paths sign them.
#[derive(Args, Debug, Default)]
pub struct SignArgs {
    /// Sign the store paths added with this Nix secret key file (for a
    /// daemon that admits only signed ones: `daemon --trusted-public-keys`).
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
}

impl SignArgs {
    /// `store`, its path info Puts signed when a key was given.
    pub fn wrap(&self, store: Store) -> anyhow::Result<Store> {
        let Some(f) = &self.signing_key else {
            return Ok(store);
        };
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let key = crate::nix::signing::SecretKey::parse(&text)
            .with_context(|| format!("signing key {}", f.display()))?;
        Ok(crate::ingest::write_policy::signing(store, key))
    }
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// Output of `nix path-info --json --recursive` for the paths (Nix 2.8
    /// list form or newer map form); without it, `nix path-info` is run.
    #[arg(long)]
    pub path_info: Option<PathBuf>,

    /// Store paths to copy from this host's /nix/store, with their closure.
    #[arg(required = true)]
    pub paths: Vec<String>,

    /// Store paths imported in parallel.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,

    #[command(flatten)]
    pub sign: SignArgs,
}

#[derive(Args, Debug)]
pub struct ImportNarArgs {
    /// Output of `nix path-info --json` describing the store paths (name,
    /// references, NAR hash and size).
    #[arg(long)]
    pub path_info: PathBuf,

    /// STORE_PATH=NAR_FILE pairs; NAR_FILE `-` reads stdin; `.xz` and
    /// `.zst` files are decompressed.
    #[arg(required = true)]
    pub nars: Vec<String>,

    #[command(flatten)]
    pub sign: SignArgs,
}

fn progress(msg: &str) -> ProgressBar {
    // Hidden when stderr is not a terminal.
    let pb = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {bytes} ({bytes_per_sec})") {
        pb.set_style(style);
    }
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// `nix-store --add`: a "source" path named after the file, no references.
pub async fn import(store: Store, args: ImportArgs) -> anyhow::Result<()> {
    for path in &args.paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{}: no usable file name", path.display()))?;
        let pb = progress(name);
        let inc = |n: u64| pb.inc(n);
        let ing = crate::ingest::tree::ingest_path(path, &store, &inc)
            .await
            .with_context(|| format!("importing {}", path.display()))?;
        pb.finish_and_clear();
        let store_path = make_source_path(name, &ing.nar_sha256, &[])
            .with_context(|| format!("{}: cannot name a store path after it", path.display()))?;
        let info = PathInfo {
            store_path,
            node: ing.node,
            references: vec![],
            nar_size: ing.nar_size,
            nar_sha256: ing.nar_sha256,
            signatures: vec![],
            deriver: None,
            ca: Some(ContentAddress {
                kind: CaKind::NarSha256,
                digest: bytes::Bytes::copy_from_slice(&ing.nar_sha256),
            }),
        };
        let info = store.path_info.put(info).await?;
        writeln!(std::io::stdout(), "{}", info.store_path)?;
    }
    Ok(())
}

fn read_path_infos(file: &Path) -> anyhow::Result<Vec<NixPathInfo>> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    parse_path_info_json(&bytes).with_context(|| format!("parsing {}", file.display()))
}

/// Asks the host's Nix for the closure of `paths`.
async fn nix_path_info(paths: &[StorePath]) -> anyhow::Result<Vec<NixPathInfo>> {
    let out = tokio::process::Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            "--recursive",
        ])
        .args(paths.iter().map(|p| p.to_absolute_path()))
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .context("running `nix path-info` (pass --path-info FILE where Nix is not installed)")?;
    if !out.status.success() {
        bail!("`nix path-info` failed: {}", out.status);
    }
    parse_path_info_json(&out.stdout).context("parsing the output of `nix path-info`")
}

/// The closure of `roots` within `infos`, every member described.
fn closure(roots: &[StorePath], infos: Vec<NixPathInfo>) -> anyhow::Result<Vec<NixPathInfo>> {
    let mut by_path: BTreeMap<StorePath, NixPathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut out = Vec::new();
    let mut todo: VecDeque<StorePath> = roots.iter().cloned().collect();
    while let Some(p) = todo.pop_front() {
        let Some(info) = by_path.remove(&p) else {
            if out.iter().any(|i: &NixPathInfo| i.path == p) || todo.contains(&p) {
                continue;
            }
            bail!("{p} is not described by the path info (is the JSON from --recursive?)");
        };
        todo.extend(info.references.iter().filter(|r| **r != p).cloned());
        out.push(info);
    }
    Ok(out)
}

fn to_path_info(n: &NixPathInfo, ing: Ingested) -> anyhow::Result<PathInfo> {
    Ok(PathInfo::from_nix(n, ing)?)
}

/// Whether the store already holds `n` with the same NAR hash.
async fn present(store: &Store, n: &NixPathInfo) -> anyhow::Result<bool> {
    Ok(store
        .path_info
        .get(n.path.digest())
        .await?
        .is_some_and(|i| i.nar_sha256[..] == *n.nar_hash.digest() && i.store_path == n.path))
}

/// Copies one path unless the store already has it, its blob uploads
/// within `budget`.
async fn copy_one(
    store: &Store,
    n: &NixPathInfo,
    pb: &ProgressBar,
    budget: &UploadBudget,
) -> anyhow::Result<()> {
    if present(store, n).await? {
        return Ok(());
    }
    let src = PathBuf::from(n.path.to_absolute_path());
    let inc = |b: u64| pb.inc(b);
    let ing = crate::ingest::tree::ingest_path_within(&src, store, &inc, budget)
        .await
        .with_context(|| format!("{}", n.path))?;
    store.path_info.put(to_path_info(n, ing)?).await?;
    pb.println(format!("copied {}", n.path));
    Ok(())
}

/// Copies in dependency order, `jobs` at a time: a path is stored only after
/// all its references are, so a failure never leaves a partial closure.
/// The paths copied at once share one budget of blob uploads in flight, so
/// `--jobs` adds no memory and no more requests at once than one import.
async fn copy_in_order(
    store: &Store,
    todo: Vec<NixPathInfo>,
    jobs: usize,
    pb: &ProgressBar,
) -> anyhow::Result<()> {
    let mut pending: BTreeMap<StorePath, NixPathInfo> =
        todo.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut done = HashSet::new();
    let mut failed = HashSet::new();
    let mut errors = Vec::new();
    let budget = UploadBudget::default();
    while !pending.is_empty() {
        let mut ready = Vec::new();
        let mut progressed = false;
        for (p, n) in &pending {
            let refs = n.references.iter().filter(|r| *r != p);
            if let Some(r) = refs.clone().find(|r| failed.contains(*r)) {
                errors.push(anyhow!("{p}: not copied because its reference {r} failed"));
                failed.insert(p.clone());
                progressed = true;
            } else if refs.clone().all(|r| done.contains(r)) {
                ready.push(n.clone());
            }
        }
        pending.retain(|p, _| !failed.contains(p));
        if ready.is_empty() {
            if progressed {
                continue;
            }
            bail!("reference cycle among {} store paths", pending.len());
        }
        let results: Vec<(StorePath, anyhow::Result<()>)> = futures::stream::iter(ready)
            .map(|n| {
                let budget = &budget;
                async move { (n.path.clone(), copy_one(store, &n, pb, budget).await) }
            })
            .buffer_unordered(jobs.max(1))
            .collect()
            .await;
        for (p, r) in results {
            pending.remove(&p);
            match r {
                Ok(()) => {
                    done.insert(p);
                }
                Err(e) => {
                    errors.push(e);
                    failed.insert(p);
                }
            }
        }
    }
    for e in &errors {
        pb.suspend(|| eprintln!("error: {e:#}"));
    }
    if !errors.is_empty() {
        bail!("{} store path(s) were not copied", errors.len());
    }
    Ok(())
}

pub async fn copy(store: Store, args: CopyArgs) -> anyhow::Result<()> {
    let roots = args
        .paths
        .iter()
        .map(|p| super::args::parse_store_path(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let infos = match &args.path_info {
        Some(f) => read_path_infos(f)?,
        None => nix_path_info(&roots).await?,
    };
    let todo = closure(&roots, infos)?;
    let pb = progress(&format!("copying {} store paths", todo.len()));
    let r = copy_in_order(&store, todo, args.jobs, &pb).await;
    pb.finish_and_clear();
    r?;
    for p in &roots {
        writeln!(std::io::stdout(), "{p}")?;
    }
    Ok(())
}

/// Decompresses `.nar.xz` and `.nar.zst` (binary cache formats) on the
/// fly, each decoder's memory bounded whatever the file declares.
fn decompressed(name: &str, f: tokio::fs::File) -> Box<dyn tokio::io::AsyncRead + Unpin + Send> {
    use crate::nar::Compression;
    let buf = tokio::io::BufReader::with_capacity(1 << 17, f);
    let c = match Compression::from_name(name) {
        Some(c @ (Compression::Xz | Compression::Zstd)) => c,
        _ => Compression::None,
    };
    Box::new(crate::nar::decode::decoder(c, buf))
}

pub async fn import_nar(store: Store, args: ImportNarArgs) -> anyhow::Result<()> {
    let infos = read_path_infos(&args.path_info)?;
    for pair in &args.nars {
        let (sp, file) = pair
            .split_once('=')
            .ok_or_else(|| anyhow!("{pair:?}: expected STORE_PATH=NAR_FILE"))?;
        let sp = super::args::parse_store_path(sp)?;
        let n = infos
            .iter()
            .find(|i| i.path == sp)
            .ok_or_else(|| anyhow!("{sp} is not described by {}", args.path_info.display()))?;
        let input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if file == "-" {
            Box::new(tokio::io::stdin())
        } else {
            let f = tokio::fs::File::open(file)
                .await
                .with_context(|| format!("opening {file}"))?;
            decompressed(file, f)
        };
        // Stopped once past its declared size: a compressed NAR that
        // expands without end (or a wrong description) is refused before
        // it fills the store.
        let (mut left, declared) = (n.nar_size, n.nar_size);
        let input = crate::nar::Metered::new(input, move |got: &[u8]| {
            left = left.checked_sub(got.len() as u64).ok_or_else(|| {
                std::io::Error::other(format!(
                    "the NAR is longer than its narSize ({declared} bytes)"
                ))
            })?;
            Ok(())
        });
        let ing = crate::ingest::ingest_nar(input, &store)
            .await
            .with_context(|| format!("{sp}: reading NAR {file}"))?;
        let info = to_path_info(n, ing)?;
        store.path_info.put(info).await?;
        writeln!(std::io::stdout(), "{sp}")?;
    }
    Ok(())
}
