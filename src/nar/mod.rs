//! Nix archives: rendering castore trees as NARs and reading NARs in.
pub mod decode;
pub mod ingest;
pub mod metered;
pub mod render;
pub mod writer;

pub use decode::{Compression, TooLarge};
pub use ingest::{ingest_nar, ingest_nar_within, Ingested};
pub use metered::Metered;
pub use render::{calculate_nar, write_nar};
pub use writer::{NarHasher, NarWriter};
