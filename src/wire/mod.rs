//! What goes over the wire: the generated tvix wire types and gRPC stubs
//! (`protos/`), nested as their protobuf packages so cross-package
//! references resolve, and Prometheus' text format ([`prometheus`]).
pub mod prometheus;

#[allow(clippy::all, missing_docs)]
pub mod tvix {
    pub mod castore {
        pub mod v1 {
            tonic::include_proto!("tvix.castore.v1");
        }
    }
    pub mod store {
        pub mod v1 {
            tonic::include_proto!("tvix.store.v1");
        }
    }
}

/// Our own services (the host cache's), beside tvix's.
#[allow(clippy::all, missing_docs)]
pub mod tvix_virtiofsd {
    pub mod cache {
        pub mod v1 {
            tonic::include_proto!("tvix_virtiofsd.cache.v1");
        }
    }
}

pub use tvix::castore::v1 as castore;
pub use tvix::store::v1 as store;
pub use tvix_virtiofsd::cache::v1 as cache;

/// Encoded descriptors of all services, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tvix_descriptor");
