//! From addresses to a [`Store`]: each address picks its backend, services
//! at one remote address share a connection, and a cache directory puts
//! the host cache in front. The one place that knows every backend.
use crate::store::addr::Addr;
use crate::store::bucket::{Bucket, BucketAddr};
use crate::store::channel::{self, WireChannel};
use crate::store::endpoints::Endpoints;
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
        if let Some(a) = addrs.iter().find(|a| matches!(a, Addr::Nix(_))) {
            return Err(Error::InvalidAddress(
                a.to_string(),
                "a Nix binary cache is read through a host cache: give it to                  `daemon --cache-dir DIR` as its --store, and the per-VM daemons that daemon"
                    .into(),
            ));
        }
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
        // the services at one list share its daemons' health
        let mut lists: HashMap<Addr, Arc<Endpoints>> = HashMap::new();
        let mut list = |a: &Addr| -> Result<Arc<Endpoints>> {
            if let Some(l) = lists.get(a) {
                return Ok(l.clone());
            }
            let l = endpoints(a, opts.idle_timeout)?;
            lists.insert(a.clone(), l.clone());
            Ok(l)
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
            Addr::List(_) => Arc::new(blob::failover::FailoverBlobService::new(
                list(blob)?,
                grpc_blob,
            )),
            a => Arc::new(grpc_blob(channel(a)?)),
        };
        let directory_svc: Arc<dyn DirectoryService> = match directory {
            Addr::Memory => mem.directory.clone(),
            Addr::S3(b) => Arc::new(directory::s3::S3DirectoryService::new(bucket(b)?)),
            Addr::Local(p) if ro => {
                Arc::new(directory::local::LocalDirectoryService::open_existing(p)?)
            }
            Addr::Local(p) => Arc::new(directory::local::LocalDirectoryService::open(p)?),
            Addr::List(_) => Arc::new(directory::failover::FailoverDirectoryService::new(list(
                directory,
            )?)),
            a => Arc::new(directory::grpc::GrpcDirectoryService::new(channel(a)?)),
        };
        let path_info_svc: Arc<dyn PathInfoService> = match path_info {
            Addr::Memory => mem.path_info.clone(),
            Addr::S3(b) => Arc::new(pathinfo::s3::S3PathInfoService::new(bucket(b)?)),
            Addr::Local(p) if ro => {
                Arc::new(pathinfo::local::LocalPathInfoService::open_existing(p)?)
            }
            Addr::Local(p) => Arc::new(pathinfo::local::LocalPathInfoService::open(p)?),
            Addr::List(_) => Arc::new(pathinfo::failover::FailoverPathInfoService::new(list(
                path_info,
            )?)),
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
        // A filler asks a remote of ours for many small blobs at once.
        let filler = match (c.role, blob) {
            (cache::Role::Filler, Addr::GrpcUnix(..) | Addr::GrpcHttp(..)) => Some(channel(blob)?),
            (cache::Role::Filler, _) => None,
            (cache::Role::Reader, Addr::GrpcUnix(..) | Addr::GrpcHttp(..)) => Some(channel(blob)?),
            (cache::Role::Reader, Addr::List(_)) => {
                return Err(Error::InvalidAddress(
                    blob.to_string(),
                    "a cache directory is read in front of the one `daemon --cache-dir` that \
                     fills it, not a list: give the list to that daemon's --store"
                        .into(),
                ))
            }
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

/// The daemons of a list, their connections pinged (half the stall limit
/// without a byte, then as long for the answer) so that a frozen one fails
/// even the calls no timer bounds (uploads).
fn endpoints(list: &Addr, idle: std::time::Duration) -> Result<Arc<Endpoints>> {
    let Addr::List(v) = list else {
        return Err(Error::InvalidAddress(list.to_string(), "not a list".into()));
    };
    let ping = Some(Endpoints::stall_of(idle, v.len()) / 2);
    let mut channels = Vec::with_capacity(v.len());
    for a in v {
        let c = match a {
            Addr::GrpcUnix(p, w) => channel::connect_unix_pinged(p.clone(), *w, ping)?,
            Addr::GrpcHttp(hp, w) => channel::connect_tcp_pinged(hp, *w, ping)?,
            _ => {
                return Err(Error::InvalidAddress(
                    a.to_string(),
                    "not a gRPC store".into(),
                ))
            }
        };
        channels.push((a.to_string(), c));
    }
    Endpoints::new(channels, idle)
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
    /// Keys trusted to sign what a Nix binary cache upstream answers,
    /// besides those its address names (`daemon --trusted-public-keys`).
    pub upstream_keys: Vec<crate::nix::signing::PublicKey>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            sandboxed: false,
            idle_timeout: std::time::Duration::from_secs(30),
            cache: None,
            upstream_keys: Vec::new(),
        }
    }
}
