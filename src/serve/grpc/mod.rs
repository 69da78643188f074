//! gRPC servers that expose any backend as the tvix-store protocol.
//!
//! - [`store`]: the three store services, and the [`Limits`] a client is
//!   held to;
//! - [`cache`]: the host cache's fill and touch service;
//! - [`fill_blobs`]: many small fills in one call;
//! - [`reset`]: request bodies that fail when a client breaks them off;
//! - [`routes`]: tvix's and snix's wire names to the same services;
//! - [`call_metrics`]: calls by method, counted by a tower layer;
//! - [`bounds`]: what one listener's clients can make the daemon hold;
//! - [`tenants`]: scoped tenant connections on the host cache's socket.
pub mod bounds;
pub mod cache;
pub mod call_metrics;
pub mod fill_blobs;
pub mod read_blobs;
pub mod reset;
pub mod routes;
pub mod store;
pub mod tenants;

pub use cache::{BlobsOnlyServer, CacheServer};
pub use call_metrics::{CallMetrics, CountLayer, Counted};
pub use reset::{reset_is_error, ResetIsError};
pub use routes::{wire_names, Families};
pub use store::{Limits, StoreServer, StoreServices};
