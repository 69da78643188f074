//! Contents into the store and back out as Nix sees them: a local tree
//! ([`tree`]) or a NAR ([`nar`]) becomes blobs, directories and a path
//! info; a tree becomes a NAR again ([`render`]), which is also how the
//! [`write_policy`] checks that a signed upload's tree is the signed NAR.
//! Both importers overlap their blob uploads within a bound ([`uploads`]),
//! and write packs of small blobs where the store keeps them (`packs`).
//! A Nix binary cache upstream ([`nix_cache`]) is a store whose path
//! infos are NARs read into the host cache as they are looked up.
pub mod nar;
pub mod nix_cache;
mod packs;
pub mod path_info;
pub mod render;
pub mod tree;
pub mod uploads;
pub mod write_policy;

pub use nar::{ingest_nar, ingest_nar_within, Ingested};
pub use render::{calculate_nar, write_nar};
