//! The NAR format itself: writing and hashing archives, and decompressing
//! them within bounds. Reading a NAR into the store is `ingest`.
pub mod decode;
pub mod metered;
pub mod writer;

pub use decode::{Compression, TooLarge};
pub use metered::Metered;
pub use writer::{NarHasher, NarWriter};
