//! Every way the store and its view leave the process: the view to guests
//! over vhost-user and to the host over /dev/fuse, the store over gRPC
//! and Nix's binary cache protocol, and the counters over HTTP.
pub mod binary_cache;
pub mod fuse;
pub mod grpc;
pub mod http_conn;
pub mod metrics;
pub mod nar_urls;
pub mod vhost_user;
