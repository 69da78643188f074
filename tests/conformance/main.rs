//! One conformance suite, run against every store backend: a new backend
//! is one more file here that calls `conformance_suite!`.
#[path = "../common/mod.rs"]
mod common;
#[macro_use]
mod suite;

mod cached;
mod failover;
mod grpc_tcp;
mod grpc_unix;
mod local;
mod memory;
mod s3;
