//! The on-disk layout the embedded store (`local://`) and the host cache
//! share: one directory per area (`blobs`, `directories`, `pathinfo`), a
//! staging directory `tmp`, and objects written to a temporary file and
//! renamed into place, so a reader never sees half an object. Both open
//! their directory through [`store_dir`], which refuses one others may
//! write.
pub mod staging;
pub mod store_dir;

pub use staging::{staged_temp, temp_beside, TEMP_PREFIX};
