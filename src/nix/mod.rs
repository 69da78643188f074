//! Pure, synchronous helpers for Nix data formats (no I/O).

/// Nix hash strings (SRI, nix32, hex, base64) and content addresses.
pub mod hash;
/// Nix's own base32 flavour, used in store paths and `sha256:` hashes.
pub mod nixbase32;
/// Parser for `nix path-info --json --recursive` output (old and new shapes).
pub mod path_info;
pub mod path_info_json;
/// Store path parsing, validation and computation of `nix-store --add` paths.
pub mod store_path;

/// The only store directory supported; it is part of every store path hash.
pub const STORE_DIR: &str = "/nix/store";
pub mod narinfo;
pub mod signing;
