//! The store services behind their traits, and the addresses that pick a backend:
//! `memory://`, `local:///PATH`, `grpc+unix:///PATH`, `grpc+http://HOST:PORT`.
pub mod blob;
pub mod channel;
pub mod directory;
mod error;
mod local_tmp;
pub mod pathinfo;
pub mod server;

pub use blob::BlobService;
pub use directory::DirectoryService;
pub use error::{Error, Result};
pub use pathinfo::PathInfoService;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tonic::transport::Channel;

/// A parsed store address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Addr {
    Memory,
    Local(PathBuf),
    GrpcUnix(PathBuf),
    GrpcHttp(String),
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
        if s == "memory://" {
            Ok(Addr::Memory)
        } else if let Some(p) = s.strip_prefix("local://") {
            abs(p).map(Addr::Local)
        } else if let Some(p) = s.strip_prefix("grpc+unix://") {
            abs(p).map(Addr::GrpcUnix)
        } else if let Some(hp) = s.strip_prefix("grpc+http://") {
            let hp = hp.trim_end_matches('/');
            if hp.is_empty() || hp.contains('/') {
                Err(bad("expected grpc+http://HOST:PORT"))
            } else {
                Ok(Addr::GrpcHttp(hp.into()))
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
        Self::open_with(blob, directory, path_info, false)
    }

    /// As `open`, for the sandboxed view, which only reads and has no
    /// writable directory: an embedded store is neither created nor
    /// tidied, and large remote blobs are spooled into memory files.
    pub fn open_sandboxed(blob: &Addr, directory: &Addr, path_info: &Addr) -> Result<Self> {
        Self::open_with(blob, directory, path_info, true)
    }

    fn open_with(blob: &Addr, directory: &Addr, path_info: &Addr, ro: bool) -> Result<Self> {
        let mut channels: HashMap<Addr, Channel> = HashMap::new();
        let mut channel = |a: &Addr| -> Result<Channel> {
            if let Some(c) = channels.get(a) {
                return Ok(c.clone());
            }
            let c = match a {
                Addr::GrpcUnix(p) => channel::connect_unix(p.clone())?,
                Addr::GrpcHttp(hp) => channel::connect_tcp(hp)?,
                _ => return Err(Error::InvalidAddress(format!("{a:?}"), "not remote".into())),
            };
            channels.insert(a.clone(), c.clone());
            Ok(c)
        };
        let mem = Self::memory();
        let blob: Arc<dyn BlobService> = match blob {
            Addr::Memory => mem.blob.clone(),
            Addr::Local(p) if ro => Arc::new(blob::local::LocalBlobService::open_existing(p)?),
            Addr::Local(p) => Arc::new(blob::local::LocalBlobService::open(p)?),
            a if ro => Arc::new(blob::grpc::GrpcBlobService::new(channel(a)?).with_memfd_spool()),
            a => Arc::new(blob::grpc::GrpcBlobService::new(channel(a)?)),
        };
        let directory: Arc<dyn DirectoryService> = match directory {
            Addr::Memory => mem.directory.clone(),
            Addr::Local(p) if ro => {
                Arc::new(directory::local::LocalDirectoryService::open_existing(p)?)
            }
            Addr::Local(p) => Arc::new(directory::local::LocalDirectoryService::open(p)?),
            a => Arc::new(directory::grpc::GrpcDirectoryService::new(channel(a)?)),
        };
        let path_info: Arc<dyn PathInfoService> = match path_info {
            Addr::Memory => mem.path_info.clone(),
            Addr::Local(p) if ro => {
                Arc::new(pathinfo::local::LocalPathInfoService::open_existing(p)?)
            }
            Addr::Local(p) => Arc::new(pathinfo::local::LocalPathInfoService::open(p)?),
            a => Arc::new(pathinfo::grpc::GrpcPathInfoService::new(channel(a)?)),
        };
        Ok(Self {
            blob,
            directory,
            path_info,
        })
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
            Addr::GrpcUnix("/run/s.sock".into())
        );
        assert_eq!(
            "grpc+http://[::1]:8000".parse::<Addr>().unwrap(),
            Addr::GrpcHttp("[::1]:8000".into())
        );
        for bad in ["local://rel", "http://x", "grpc+http://", "redb:///x", ""] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
    }
}
