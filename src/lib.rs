//! tvix-virtiofsd: a tvix-store compatible content-addressed store and the
//! pieces that serve it to microVMs as a read-only /nix/store.
//!
//! Data flows wire → castore model → store services → NAR/import → CLI.
pub mod binary_cache;
pub mod bounded_set;
pub mod castore;
pub mod cli;
pub mod fd_pass;
pub mod fs;
pub mod fuse;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
pub mod grpc_bounds;
pub mod grpc_server;
pub mod http_conn;
pub mod import;
pub mod memory;
pub mod metrics;
pub mod nar;
pub mod nix;
pub mod notify;
pub mod pathinfo;
pub mod privileges;
pub mod queue_poll;
pub mod sandbox;
pub mod seccomp;
pub mod services;
pub mod socket;
pub mod vhost_user;
pub mod wire;
pub mod write_policy;
