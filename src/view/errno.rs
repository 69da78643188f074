//! The errno a FUSE request fails with, as the `io::Error` fuse-backend-rs
//! answers the guest with.
use std::io;

/// An errno as the `io::Error` FUSE answers with.
pub(super) fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}
