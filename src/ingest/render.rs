//! Renders a castore tree as a NAR, fetching the directory tree in one
//! recursive call and streaming each blob. Blobs are opened a few ahead of
//! the writer, so a remote store's per-blob round trips overlap.
use crate::castore::{B3Digest, Directory, Node};
use crate::nar::writer::{NarHasher, NarWriter};
use crate::store::blob::BlobReader;
use crate::store::{directory::get_tree, Error, Result, Store};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::HashMap;

/// Blobs opened ahead of the one being written.
const PREFETCH: usize = 16;

type Opened = (B3Digest, Result<Option<Box<dyn BlobReader>>>);
use tokio::io::{AsyncReadExt, AsyncWrite, BufWriter};

/// Writes the NAR of `node` to `w`.
pub async fn write_nar<W: AsyncWrite + Unpin + Send>(
    w: W,
    node: &Node,
    store: &Store,
) -> Result<()> {
    let tree = match node {
        Node::Directory { digest, .. } => {
            let tree = get_tree(store.directory.as_ref(), *digest).await?;
            check_budget(digest, &tree)?;
            tree
        }
        _ => HashMap::new(),
    };
    let order = FilesInNarOrder(Walk::new(&tree, node));
    let mut blobs: BoxStream<'_, Opened> = futures::stream::iter(order)
        .map(|d| async move { (d, store.blob.open_read(&d).await) })
        .buffered(PREFETCH)
        .boxed();
    let mut nar = NarWriter::new(BufWriter::with_capacity(1 << 20, w)).await?;
    write_node(&mut nar, node, &tree, &mut blobs).await?;
    nar.finish().await?;
    Ok(())
}

/// Refuses a tree whose documented size passes `MAX_NODES` before any of
/// it is walked: the graph checks make every directory's declared size at
/// least its entries plus its children's sizes, so the root's bounds the
/// whole expanded tree.
fn check_budget(root: &B3Digest, tree: &HashMap<B3Digest, Directory>) -> Result<()> {
    let size = tree
        .get(root)
        .ok_or_else(|| Error::NotFound(format!("directory {root}")))?
        .documented_size();
    if size > MAX_NODES {
        return Err(Error::InvalidRequest(format!(
            "the tree expands to more than {MAX_NODES} nodes (its size is {size}): not rendered"
        )));
    }
    Ok(())
}

/// NAR size and SHA-256 of `node`, computed without keeping the NAR.
pub async fn calculate_nar(node: &Node, store: &Store) -> Result<(u64, [u8; 32])> {
    let mut hasher = NarHasher::default();
    write_nar(&mut hasher, node, store).await?;
    Ok(hasher.finish())
}

/// Deepest nesting rendered, as accepted on the way in.
const MAX_DEPTH: usize = super::nar::MAX_DEPTH;
/// Most nodes one NAR may hold, counted as the walk expands the tree: a
/// store's directories may share children (a graph of 60 directories, each
/// naming the next twice, expands to 2^60 entries), so the walk stops here
/// instead of running for ever.
pub const MAX_NODES: u64 = 1 << 26;

type Entries<'t> = std::collections::btree_map::Iter<'t, bytes::Bytes, Node>;

/// The tree walked in NAR order without recursion (a deep chain of
/// directories would otherwise exhaust the stack), within `MAX_DEPTH` and
/// `MAX_NODES`, one step at a time: memory follows the depth, not the
/// size.
struct Walk<'t> {
    tree: &'t HashMap<B3Digest, Directory>,
    root: Option<&'t Node>,
    stack: Vec<Entries<'t>>,
    /// Steps decided but not handed out yet (at most three).
    ready: std::collections::VecDeque<Step<'t>>,
    nodes: u64,
}

/// One step of the walk.
enum Step<'t> {
    Leaf(&'t Node),
    /// A directory starts (its entries follow).
    DirStart,
    /// An entry of the current directory starts; its node follows.
    Entry(&'t bytes::Bytes),
    /// The entry just written ends (after its node, leaf or directory).
    EntryEnd,
    DirEnd,
}

impl<'t> Walk<'t> {
    fn new(tree: &'t HashMap<B3Digest, Directory>, root: &'t Node) -> Self {
        Self {
            tree,
            root: Some(root),
            stack: Vec::new(),
            ready: Default::default(),
            nodes: 0,
        }
    }

    /// Enters `node`: a leaf is returned for writing, a directory pushed.
    fn enter(&mut self, node: &'t Node) -> Result<Step<'t>> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(Error::InvalidRequest(format!(
                "the tree expands to more than {MAX_NODES} nodes (directories shared many times?): not rendered"
            )));
        }
        match node {
            Node::Directory { digest, .. } => {
                if self.stack.len() >= MAX_DEPTH {
                    return Err(Error::InvalidRequest(format!(
                        "the tree is nested deeper than {MAX_DEPTH} directories: not rendered"
                    )));
                }
                let dir = self
                    .tree
                    .get(digest)
                    .ok_or_else(|| Error::NotFound(format!("directory {digest}")))?;
                self.stack.push(dir.entries_map().iter());
                Ok(Step::DirStart)
            }
            leaf => Ok(Step::Leaf(leaf)),
        }
    }

    fn advance(&mut self) -> Result<()> {
        if let Some(root) = self.root.take() {
            let s = self.enter(root)?;
            self.ready.push_back(s);
            return Ok(());
        }
        let Some(top) = self.stack.last_mut() else {
            return Ok(());
        };
        match top.next() {
            Some((name, child)) => {
                self.ready.push_back(Step::Entry(name));
                match self.enter(child)? {
                    Step::Leaf(n) => {
                        self.ready.push_back(Step::Leaf(n));
                        self.ready.push_back(Step::EntryEnd);
                    }
                    s => self.ready.push_back(s),
                }
            }
            None => {
                // An entry whose node was a directory ends with it.
                self.stack.pop();
                self.ready.push_back(Step::DirEnd);
                if !self.stack.is_empty() {
                    self.ready.push_back(Step::EntryEnd);
                }
            }
        }
        Ok(())
    }

    fn next_step(&mut self) -> Option<Result<Step<'t>>> {
        if self.ready.is_empty() {
            if let Err(e) = self.advance() {
                self.stack.clear();
                return Some(Err(e));
            }
        }
        self.ready.pop_front().map(Ok)
    }
}

/// The file digests in the order the NAR will need them, walked lazily
/// beside the writer's own walk (which meets any error first).
struct FilesInNarOrder<'t>(Walk<'t>);

impl Iterator for FilesInNarOrder<'_> {
    type Item = B3Digest;

    fn next(&mut self) -> Option<B3Digest> {
        loop {
            match self.0.next_step()? {
                Ok(Step::Leaf(Node::File { digest, .. })) => return Some(*digest),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

async fn write_node<W: AsyncWrite + Unpin + Send>(
    nar: &mut NarWriter<W>,
    node: &Node,
    tree: &HashMap<B3Digest, Directory>,
    blobs: &mut BoxStream<'_, Opened>,
) -> Result<()> {
    let mut walk = Walk::new(tree, node);
    while let Some(step) = walk.next_step() {
        match step? {
            Step::DirStart => nar.dir_start().await?,
            Step::DirEnd => nar.dir_end().await?,
            Step::Entry(name) => nar.entry_start(name).await?,
            Step::EntryEnd => nar.entry_end().await?,
            Step::Leaf(Node::Symlink { target }) => nar.symlink(target).await?,
            Step::Leaf(Node::File {
                digest,
                size,
                executable,
            }) => write_file(nar, blobs, digest, *size, *executable).await?,
            Step::Leaf(Node::Directory { .. }) => {
                return Err(Error::InvalidRequest("a directory as a leaf".into()))
            }
        }
    }
    Ok(())
}

async fn write_file<W: AsyncWrite + Unpin + Send>(
    nar: &mut NarWriter<W>,
    blobs: &mut BoxStream<'_, Opened>,
    digest: &B3Digest,
    size: u64,
    executable: bool,
) -> Result<()> {
    let (opened, r) = blobs
        .next()
        .await
        .ok_or_else(|| Error::NotFound(format!("blob {digest}")))?;
    debug_assert_eq!(opened, *digest);
    let mut r = r?.ok_or_else(|| Error::NotFound(format!("blob {digest}")))?;
    nar.file_start(executable, size).await?;
    let mut left = size;
    let mut buf = vec![0u8; size.min(1 << 17) as usize];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(Error::SizeMismatch {
                digest: *digest,
                expected: size,
                actual: size - left,
            });
        }
        nar.file_data(&buf[..n]).await?;
        left -= n as u64;
    }
    if r.read(&mut [0u8; 1]).await? != 0 {
        return Err(Error::SizeMismatch {
            digest: *digest,
            expected: size,
            actual: size + 1,
        });
    }
    nar.file_end(size).await?;
    Ok(())
}
