//! The store services behind their traits, and the addresses that pick a backend:
//! `memory://`, `local:///PATH`, `grpc+unix:///PATH`, `grpc+http://HOST:PORT`.
pub mod blob;
pub mod cache;
pub mod channel;
pub mod directory;
mod error;
mod local_tmp;
pub mod pathinfo;
pub mod store_dir;

pub use blob::BlobService;
pub use directory::DirectoryService;
pub use error::{Error, Result};
pub use pathinfo::PathInfoService;

use crate::services::channel::WireChannel;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// A parsed store address. A gRPC one may pin the wire family
/// (`?wire=tvix` or `?wire=snix`); by default it is found out.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Addr {
    Memory,
    Local(PathBuf),
    GrpcUnix(PathBuf, Wire),
    GrpcHttp(String, Wire),
}

pub use channel::Wire;

/// As it is written on the command line.
impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Memory => write!(f, "memory://"),
            Addr::Local(p) => write!(f, "local://{}", p.display()),
            Addr::GrpcUnix(p, w) => write!(f, "grpc+unix://{}{}", p.display(), w.query()),
            Addr::GrpcHttp(h, w) => write!(f, "grpc+http://{h}{}", w.query()),
        }
    }
}

impl std::str::FromStr for Addr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::InvalidAddress(s.into(), why.into());
        let abs = |p: &str| -> Result<PathBuf> {
            if p.starts_with('/') {
                Ok(PathBuf::from(p))
            } else {
                Err(bad("needs an absolute path, as in local:///var/lib/store"))
            }
        };
        let (s, wire) = match s.split_once('?') {
            None => (s, Wire::Detect),
            Some((rest, q)) if rest.starts_with("grpc+") => match q {
                "wire=tvix" => (rest, Wire::Tvix),
                "wire=snix" => (rest, Wire::Snix),
                _ => return Err(bad("the one parameter is wire=tvix or wire=snix")),
            },
            Some(_) => return Err(bad("only grpc+ addresses take parameters")),
        };
        if s == "memory://" {
            Ok(Addr::Memory)
        } else if let Some(p) = s.strip_prefix("local://") {
            abs(p).map(Addr::Local)
        } else if let Some(p) = s.strip_prefix("grpc+unix://") {
            abs(p).map(|p| Addr::GrpcUnix(p, wire))
        } else if let Some(hp) = s.strip_prefix("grpc+http://") {
            let hp = hp.trim_end_matches('/');
            if hp.is_empty() || hp.contains('/') {
                Err(bad("expected grpc+http://HOST:PORT"))
            } else {
                Ok(Addr::GrpcHttp(hp.into(), wire))
            }
        } else {
            Err(bad(
                "unknown scheme (memory://, local:///PATH, grpc+unix:///PATH, grpc+http://HOST:PORT)",
            ))
        }
    }
}

/// The three services a store is made of.
#[derive(Clone)]
pub struct Store {
    pub blob: Arc<dyn BlobService>,
    pub directory: Arc<dyn DirectoryService>,
    pub path_info: Arc<dyn PathInfoService>,
}

impl Store {
    /// A throwaway store in memory.
    pub fn memory() -> Self {
        Self {
            blob: Arc::new(blob::memory::MemoryBlobService::default()),
            directory: Arc::new(directory::memory::MemoryDirectoryService::default()),
            path_info: Arc::new(pathinfo::memory::MemoryPathInfoService::default()),
        }
    }

    /// Opens each service at its own address; services at the same remote
    /// address share one connection, and `memory://` ones one store.
    pub fn open(blob: &Addr, directory: &Addr, path_info: &Addr) -> Result<Self> {
        Ok(Self::open_with(
            &[blob.clone(), directory.clone(), path_info.clone()],
            &StoreOptions::default(),
        )?
        .0)
    }

    /// As `open`, for the sandboxed view, which only reads and has no
    /// writable directory: an embedded store is neither created nor
    /// tidied, and large remote blobs are spooled into memory files.
    pub fn open_sandboxed(blob: &Addr, directory: &Addr, path_info: &Addr) -> Result<Self> {
        let opts = StoreOptions {
            sandboxed: true,
            ..Default::default()
        };
        Ok(Self::open_with(&[blob.clone(), directory.clone(), path_info.clone()], &opts)?.0)
    }

    /// Opens the services at `addrs` (blob, directory, path info), behind
    /// a cache directory when `opts.cache` says so; answers the cache too.
    pub fn open_with(
        addrs: &[Addr; 3],
        opts: &StoreOptions,
    ) -> Result<(Self, Option<Arc<cache::Cache>>)> {
        let ro = opts.sandboxed;
        let mut channels: HashMap<Addr, WireChannel> = HashMap::new();
        let mut channel = |a: &Addr| -> Result<WireChannel> {
            if let Some(c) = channels.get(a) {
                return Ok(c.clone());
            }
            let c = match a {
                Addr::GrpcUnix(p, w) => channel::connect_unix(p.clone(), *w)?,
                Addr::GrpcHttp(hp, w) => channel::connect_tcp(hp, *w)?,
                _ => return Err(Error::InvalidAddress(format!("{a:?}"), "not remote".into())),
            };
            channels.insert(a.clone(), c.clone());
            Ok(c)
        };
        let [blob, directory, path_info] = addrs;
        let mem = Self::memory();
        let grpc_blob = |c: WireChannel| {
            let g = blob::grpc::GrpcBlobService::new(c).with_idle_timeout(opts.idle_timeout);
            if ro {
                g.with_memfd_spool()
            } else {
                g
            }
        };
        let blob_svc: Arc<dyn BlobService> = match blob {
            Addr::Memory => mem.blob.clone(),
            Addr::Local(p) if ro => Arc::new(blob::local::LocalBlobService::open_existing(p)?),
            Addr::Local(p) => Arc::new(blob::local::LocalBlobService::open(p)?),
            a => Arc::new(grpc_blob(channel(a)?)),
        };
        let directory_svc: Arc<dyn DirectoryService> = match directory {
            Addr::Memory => mem.directory.clone(),
            Addr::Local(p) if ro => {
                Arc::new(directory::local::LocalDirectoryService::open_existing(p)?)
            }
            Addr::Local(p) => Arc::new(directory::local::LocalDirectoryService::open(p)?),
            a => Arc::new(directory::grpc::GrpcDirectoryService::new(channel(a)?)),
        };
        let path_info_svc: Arc<dyn PathInfoService> = match path_info {
            Addr::Memory => mem.path_info.clone(),
            Addr::Local(p) if ro => {
                Arc::new(pathinfo::local::LocalPathInfoService::open_existing(p)?)
            }
            Addr::Local(p) => Arc::new(pathinfo::local::LocalPathInfoService::open(p)?),
            a => Arc::new(pathinfo::grpc::GrpcPathInfoService::new(channel(a)?)),
        };
        let store = Self {
            blob: blob_svc,
            directory: directory_svc,
            path_info: path_info_svc,
        };
        let Some(c) = &opts.cache else {
            return Ok((store, None));
        };
        // A reader asks the store that serves its blobs to fill them.
        let filler = match (c.role, blob) {
            (cache::Role::Filler, _) => None,
            (cache::Role::Reader, Addr::GrpcUnix(..) | Addr::GrpcHttp(..)) => Some(channel(blob)?),
            (cache::Role::Reader, a) => {
                return Err(Error::InvalidAddress(
                    format!("{a:?}"),
                    "a cache directory is read in front of a remote store (grpc+unix:// or \
                     grpc+http://), the `daemon --cache-dir` that fills it"
                        .into(),
                ))
            }
        };
        let cache = cache::Cache::open(c, store, filler, opts.idle_timeout)?;
        Ok((cache.store(), Some(cache)))
    }
}

/// How [`Store::open_with`] opens a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Read-only use inside the sandbox: an embedded store is neither
    /// created nor tidied, large remote blobs are spooled into memory files.
    pub sandboxed: bool,
    /// How long a remote transfer may make no progress.
    pub idle_timeout: std::time::Duration,
    /// A cache directory in front of the store.
    pub cache: Option<cache::CacheOptions>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            sandboxed: false,
            idle_timeout: std::time::Duration::from_secs(30),
            cache: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!("memory://".parse::<Addr>().unwrap(), Addr::Memory);
        assert_eq!(
            "local:///var/x".parse::<Addr>().unwrap(),
            Addr::Local("/var/x".into())
        );
        assert_eq!(
            "grpc+unix:///run/s.sock".parse::<Addr>().unwrap(),
            Addr::GrpcUnix("/run/s.sock".into(), Wire::Detect)
        );
        assert_eq!(
            "grpc+http://[::1]:8000".parse::<Addr>().unwrap(),
            Addr::GrpcHttp("[::1]:8000".into(), Wire::Detect)
        );
        let pinned = "grpc+unix:///run/s.sock?wire=snix";
        assert_eq!(
            pinned.parse::<Addr>().unwrap(),
            Addr::GrpcUnix("/run/s.sock".into(), Wire::Snix)
        );
        assert_eq!(pinned.parse::<Addr>().unwrap().to_string(), pinned);
        assert!("grpc+http://h:1?wire=other".parse::<Addr>().is_err());
        assert!("local:///x?wire=snix".parse::<Addr>().is_err());
        for bad in ["local://rel", "http://x", "grpc+http://", "redb:///x", ""] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
    }
}
