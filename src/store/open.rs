//! From addresses to a [`Store`]: each address picks its backend, services
//! at one remote address share a connection, and a cache directory puts
//! the host cache in front. The one place that knows every backend.
use crate::store::addr::Addr;
use crate::store::bucket::{Bucket, BucketAddr};
use crate::store::channel::{self, WireChannel};
use crate::store::error::{Error, Result};
use crate::store::{blob, cache, directory, pathinfo, Store};
use crate::store::{BlobService, DirectoryService, PathInfoService};
use std::collections::HashMap;
use std::sync::Arc;

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
        // Services in one bucket share one client (and its connections).
        let mut buckets: HashMap<BucketAddr, Bucket> = HashMap::new();
        let mut bucket = |b: &BucketAddr| -> Result<Bucket> {
            if let Some(c) = buckets.get(b) {
                return Ok(c.clone());
            }
            let c = Bucket::open(b, opts.idle_timeout)?;
            buckets.insert(b.clone(), c.clone());
            Ok(c)
        };
        let blob_svc: Arc<dyn BlobService> = match blob {
            Addr::Memory => mem.blob.clone(),
            Addr::S3(b) if ro => {
                Arc::new(blob::s3::S3BlobService::new(bucket(b)?).with_memfd_spool())
            }
            Addr::S3(b) => Arc::new(blob::s3::S3BlobService::new(bucket(b)?)),
            Addr::Local(p) if ro => Arc::new(blob::local::LocalBlobService::open_existing(p)?),
            Addr::Local(p) => Arc::new(blob::local::LocalBlobService::open(p)?),
            a => Arc::new(grpc_blob(channel(a)?)),
        };
        let directory_svc: Arc<dyn DirectoryService> = match directory {
            Addr::Memory => mem.directory.clone(),
            Addr::S3(b) => Arc::new(directory::s3::S3DirectoryService::new(bucket(b)?)),
            Addr::Local(p) if ro => {
                Arc::new(directory::local::LocalDirectoryService::open_existing(p)?)
            }
            Addr::Local(p) => Arc::new(directory::local::LocalDirectoryService::open(p)?),
            a => Arc::new(directory::grpc::GrpcDirectoryService::new(channel(a)?)),
        };
        let path_info_svc: Arc<dyn PathInfoService> = match path_info {
            Addr::Memory => mem.path_info.clone(),
            Addr::S3(b) => Arc::new(pathinfo::s3::S3PathInfoService::new(bucket(b)?)),
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
