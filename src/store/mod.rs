//! The store: three services behind their traits ([`BlobService`],
//! [`DirectoryService`], [`PathInfoService`]), a backend folder for each
//! (memory, the embedded on-disk store, the gRPC client, and a failover
//! client over several gRPC daemons of one store, their health in
//! [`endpoints`]), the addresses that pick one ([`addr`], [`open`]), the
//! on-disk layout the embedded store and the host cache share ([`disk`]),
//! the host cache in front of a remote ([`cache`]), closures of store
//! paths ([`closure`]), and the address of a Nix binary cache upstream
//! ([`nix_cache_addr`], opened by `crate::ingest::nix_cache`).
pub mod addr;
pub mod blob;
pub mod bucket;
pub mod cache;
pub mod channel;
pub mod closure;
pub mod directory;
pub mod disk;
pub mod endpoints;
mod error;
pub mod nix_cache_addr;
pub mod open;
pub mod pathinfo;

pub use addr::Addr;
pub use blob::BlobService;
pub use channel::Wire;
pub use directory::DirectoryService;
pub use error::{Error, Result};
pub use open::StoreOptions;
pub use pathinfo::PathInfoService;

use std::sync::Arc;

/// The three services a store is made of.
#[derive(Clone)]
pub struct Store {
    pub blob: Arc<dyn BlobService>,
    pub directory: Arc<dyn DirectoryService>,
    pub path_info: Arc<dyn PathInfoService>,
}
