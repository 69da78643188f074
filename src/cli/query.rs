//! `nar` and `path-info`: reading store paths back out.
use crate::nix::hash::{HashAlgo, NixHash};
use crate::nix::path_info::PathInfo;
use crate::store::Store;
use anyhow::{anyhow, bail};
use clap::Args;
use data_encoding::BASE64;
use std::io::Write;

#[derive(Args, Debug)]
pub struct NarArgs {
    /// Store path (absolute or basename) whose NAR to write.
    pub store_path: String,
}

#[derive(Args, Debug)]
pub struct PathInfoArgs {
    /// Print JSON in the shape of `nix path-info --json` (a list).
    #[arg(long)]
    pub json: bool,

    /// Store paths (absolute or basenames).
    #[arg(required = true)]
    pub paths: Vec<String>,
}

async fn lookup(store: &Store, s: &str) -> anyhow::Result<PathInfo> {
    let sp = super::args::parse_store_path(s)?;
    match store.path_info.get(sp.digest()).await? {
        Some(i) if i.store_path == sp => Ok(i),
        _ => bail!("{sp} is not in the store"),
    }
}

pub async fn nar(store: Store, args: NarArgs) -> anyhow::Result<()> {
    let info = lookup(&store, &args.store_path).await?;
    crate::ingest::write_nar(tokio::io::stdout(), &info.node, &store).await?;
    Ok(())
}

fn nar_hash(info: &PathInfo) -> anyhow::Result<NixHash> {
    NixHash::new(HashAlgo::Sha256, info.nar_sha256.to_vec()).map_err(|e| anyhow!("{e}"))
}

/// One entry of `nix path-info --json` as Nix 2.8 writes it: the same keys
/// in the same order, optional ones left out rather than null. Nix's
/// `registrationTime` and `ultimate` describe a local Nix database, which
/// a content-addressed store does not keep.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct NixJson {
    path: String,
    nar_hash: String,
    nar_size: u64,
    references: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deriver: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    signatures: Vec<String>,
}

fn nix_json(i: &PathInfo) -> anyhow::Result<NixJson> {
    let mut references: Vec<String> = i.references.iter().map(|r| r.to_absolute_path()).collect();
    references.sort();
    Ok(NixJson {
        path: i.store_path.to_absolute_path(),
        nar_hash: nar_hash(i)?.to_sri(),
        nar_size: i.nar_size,
        references,
        deriver: i.deriver.as_ref().map(|d| d.to_absolute_path()),
        ca: i.ca.as_ref().map(|c| c.to_nix_string()),
        signatures: i
            .signatures
            .iter()
            .map(|s| format!("{}:{}", s.name, BASE64.encode(&s.data)))
            .collect(),
    })
}

pub async fn path_info(store: Store, args: PathInfoArgs) -> anyhow::Result<()> {
    let mut infos = Vec::new();
    for p in &args.paths {
        infos.push(lookup(&store, p).await?);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.json {
        let list = infos
            .iter()
            .map(nix_json)
            .collect::<anyhow::Result<Vec<_>>>()?;
        serde_json::to_writer(&mut out, &list).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        for i in &infos {
            let h = nar_hash(i)?;
            writeln!(out, "{}", i.store_path)?;
            writeln!(out, "  nar-hash: {} ({})", h.to_sri(), h.to_nix32())?;
            writeln!(out, "  nar-size: {}", i.nar_size)?;
            for r in &i.references {
                writeln!(out, "  reference: {r}")?;
            }
            if let Some(ca) = &i.ca {
                writeln!(out, "  ca: {}", ca.to_nix_string())?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
