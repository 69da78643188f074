//! The one error type the store services return, whatever the backend.
use crate::castore::{B3Digest, DirectoryError, GraphError, NodeError};
use crate::nix::path_info::{hex_short, PathInfo, PathInfoError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    #[error("invalid directory: {0}")]
    Directory(DirectoryError),
    #[error("invalid node: {0}")]
    Node(NodeError),
    #[error("invalid directory graph: {0}")]
    Graph(GraphError),
    #[error("invalid path info: {0}")]
    PathInfo(PathInfoError),
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        expected: B3Digest,
        actual: B3Digest,
    },
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: B3Digest,
        expected: u64,
        actual: u64,
    },
    #[error("malformed NAR: {0}")]
    Nar(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the store is read-only")]
    ReadOnly,
    #[error("invalid store address {0:?}: {1}")]
    InvalidAddress(String, String),
    #[error("remote store: {}: {}{}", .0.code(), .0.message(), unimplemented_hint(.0))]
    Remote(Box<tonic::Status>),
    #[error("remote store transport: {0}")]
    Transport(tonic::transport::Error),
    #[error("remote store protocol violation: {0}")]
    Protocol(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("fetching from the remote store: {0}")]
    Fetch(String),
    /// A request to an object storage bucket failed.
    #[error("object storage: {0}")]
    Bucket(String),
    #[error("out of room: {0}")]
    ResourceExhausted(String),
    #[error("refused: {0}")]
    Conflict(String),
    /// The write policy refused a path info (see `write_policy`).
    #[error("not trusted: {0}")]
    Untrusted(String),
    /// Outside what this client may read (a tenant's closure).
    #[error("denied: {0}")]
    Denied(String),
}

impl Error {
    /// The refusal of a Put that would change an existing store path.
    pub fn conflict(offered: &PathInfo, existing: &PathInfo) -> Error {
        Error::Conflict(format!(
            "{} exists with other contents (NAR sha256 {} here, {} offered); a store path never changes",
            offered.store_path,
            hex_short(&existing.nar_sha256),
            hex_short(&offered.nar_sha256),
        ))
    }

    /// Whether the store took too long (the guest sees ETIMEDOUT, not EIO).
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::Timeout(_) => true,
            Error::Remote(s) => s.code() == tonic::Code::DeadlineExceeded,
            _ => false,
        }
    }

    /// Whether a Put was refused because it would change what exists.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Conflict(_) => true,
            Error::Remote(s) => s.code() == tonic::Code::AlreadyExists,
            _ => false,
        }
    }
}

// Written out instead of `#[from]`, which would also make the inner error the
// `source()` and print it twice in `{:#}` chains.
macro_rules! wrap {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Error::$variant(e)
            }
        }
    )*};
}
wrap!(
    Io(std::io::Error),
    Directory(DirectoryError),
    Node(NodeError),
    Graph(GraphError),
    PathInfo(PathInfoError),
    Transport(tonic::transport::Error)
);

fn unimplemented_hint(s: &tonic::Status) -> &'static str {
    match s.code() {
        tonic::Code::Unimplemented => {
            " (the store does not offer this service under the names asked: \
             a ?wire=tvix or ?wire=snix on the address pins the other family)"
        }
        _ => "",
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Remote(Box::new(s))
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match e {
            Error::NotFound(m) => Status::not_found(m),
            Error::ReadOnly => Status::permission_denied(e.to_string()),
            Error::Conflict(m) => Status::already_exists(m),
            Error::Untrusted(m) | Error::Denied(m) => Status::permission_denied(m),
            Error::Remote(s) if s.code() == tonic::Code::AlreadyExists => {
                Status::already_exists(format!("upstream: {}", s.message()))
            }
            Error::Remote(s) if s.code() == tonic::Code::PermissionDenied => {
                Status::permission_denied(format!("upstream: {}", s.message()))
            }
            Error::Remote(s) if s.code() == tonic::Code::NotFound => {
                Status::not_found(format!("upstream: {}", s.message()))
            }
            Error::Remote(s) => Status::unavailable(format!("upstream: {}", s.message())),
            Error::Timeout(m) => Status::deadline_exceeded(m),
            Error::Fetch(m) | Error::Bucket(m) => Status::unavailable(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Directory(_)
            | Error::Node(_)
            | Error::Graph(_)
            | Error::PathInfo(_)
            | Error::DigestMismatch { .. }
            | Error::SizeMismatch { .. }
            | Error::Nar(_)
            | Error::InvalidRequest(_) => Status::invalid_argument(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
