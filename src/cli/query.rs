//! `nar` and `path-info`: reading store paths back out.
use crate::nix::hash::{HashAlgo, NixHash};
use crate::pathinfo::PathInfo;
use crate::services::Store;
use anyhow::{anyhow, bail};
use clap::Args;
use data_encoding::BASE64;

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
    let sp = super::parse_store_path(s)?;
    match store.path_info.get(sp.digest()).await? {
        Some(i) if i.store_path == sp => Ok(i),
        _ => bail!("{sp} is not in the store"),
    }
}

pub async fn nar(store: Store, args: NarArgs) -> anyhow::Result<()> {
    let info = lookup(&store, &args.store_path).await?;
    crate::nar::write_nar(tokio::io::stdout(), &info.node, &store).await?;
    Ok(())
}

fn nar_hash(info: &PathInfo) -> anyhow::Result<NixHash> {
    NixHash::new(HashAlgo::Sha256, info.nar_sha256.to_vec()).map_err(|e| anyhow!("{e}"))
}

pub async fn path_info(store: Store, args: PathInfoArgs) -> anyhow::Result<()> {
    let mut infos = Vec::new();
    for p in &args.paths {
        infos.push(lookup(&store, p).await?);
    }
    if args.json {
        let mut out = Vec::new();
        for i in &infos {
            let mut refs: Vec<String> = i.references.iter().map(|r| r.to_absolute_path()).collect();
            refs.sort();
            out.push(serde_json::json!({
                "path": i.store_path.to_absolute_path(),
                "narHash": nar_hash(i)?.to_sri(),
                "narSize": i.nar_size,
                "references": refs,
                "deriver": i.deriver.as_ref().map(|d| d.to_absolute_path()),
                "ca": i.ca.as_ref().map(|c| c.to_nix_string()),
                "signatures": i.signatures.iter().map(|s| format!("{}:{}", s.name, BASE64.encode(&s.data))).collect::<Vec<_>>(),
            }));
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for i in &infos {
            let h = nar_hash(i)?;
            println!("{}", i.store_path);
            println!("  nar-hash: {} ({})", h.to_sri(), h.to_nix32());
            println!("  nar-size: {}", i.nar_size);
            for r in &i.references {
                println!("  reference: {r}");
            }
            if let Some(ca) = &i.ca {
                println!("  ca: {}", ca.to_nix_string());
            }
        }
    }
    Ok(())
}
