//! The content-addressed data model: digests, nodes, directories and the
//! rules for streaming directory graphs.
pub mod digest;
pub mod directory;
pub mod graph;
pub mod leaves;
pub mod node;
pub mod pack;

pub use digest::B3Digest;
pub use directory::{Directory, DirectoryError};
pub use graph::{GraphError, LeavesFirst, RootFirst, ValidatedGraph};
pub use leaves::{LeafHasher, Leaves, LeavesError, LEAF};
pub use node::{Node, NodeError};
