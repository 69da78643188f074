//! Renders a castore tree as a NAR, fetching the directory tree in one
//! recursive call and streaming each blob. Blobs are opened a few ahead of
//! the writer, so a remote store's per-blob round trips overlap.
use super::writer::{NarHasher, NarWriter};
use crate::castore::{B3Digest, Directory, Node};
use crate::services::blob::BlobReader;
use crate::services::{directory::get_tree, Error, Result, Store};
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
        Node::Directory { digest, .. } => get_tree(store.directory.as_ref(), *digest).await?,
        _ => HashMap::new(),
    };
    let mut order = Vec::new();
    files_in_nar_order(node, &tree, &mut order)?;
    let mut blobs: BoxStream<'_, Opened> = futures::stream::iter(order)
        .map(|d| async move { (d, store.blob.open_read(&d).await) })
        .buffered(PREFETCH)
        .boxed();
    let mut nar = NarWriter::new(BufWriter::with_capacity(1 << 20, w)).await?;
    write_node(&mut nar, node, &tree, &mut blobs).await?;
    nar.finish().await?;
    Ok(())
}

/// NAR size and SHA-256 of `node`, computed without keeping the NAR.
pub async fn calculate_nar(node: &Node, store: &Store) -> Result<(u64, [u8; 32])> {
    let mut hasher = NarHasher::default();
    write_nar(&mut hasher, node, store).await?;
    Ok(hasher.finish())
}

/// The file digests in the order the NAR will need them.
fn files_in_nar_order(
    node: &Node,
    tree: &HashMap<B3Digest, Directory>,
    out: &mut Vec<B3Digest>,
) -> Result<()> {
    match node {
        Node::File { digest, .. } => out.push(*digest),
        Node::Symlink { .. } => {}
        Node::Directory { digest, .. } => {
            let dir = tree
                .get(digest)
                .ok_or_else(|| Error::NotFound(format!("directory {digest}")))?;
            for (_, child) in dir.entries() {
                files_in_nar_order(child, tree, out)?;
            }
        }
    }
    Ok(())
}

fn write_node<'a, 'b: 'a, W: AsyncWrite + Unpin + Send>(
    nar: &'a mut NarWriter<W>,
    node: &'a Node,
    tree: &'a HashMap<B3Digest, Directory>,
    blobs: &'a mut BoxStream<'b, Opened>,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        match node {
            Node::Symlink { target } => nar.symlink(target).await?,
            Node::File {
                digest,
                size,
                executable,
            } => {
                let (opened, r) = blobs
                    .next()
                    .await
                    .ok_or_else(|| Error::NotFound(format!("blob {digest}")))?;
                debug_assert_eq!(opened, *digest);
                let mut r = r?.ok_or_else(|| Error::NotFound(format!("blob {digest}")))?;
                nar.file_start(*executable, *size).await?;
                let mut left = *size;
                let mut buf = vec![0u8; (*size).min(1 << 17) as usize];
                while left > 0 {
                    let want = left.min(buf.len() as u64) as usize;
                    let n = r.read(&mut buf[..want]).await?;
                    if n == 0 {
                        return Err(Error::SizeMismatch {
                            digest: *digest,
                            expected: *size,
                            actual: *size - left,
                        });
                    }
                    nar.file_data(&buf[..n]).await?;
                    left -= n as u64;
                }
                if r.read(&mut [0u8; 1]).await? != 0 {
                    return Err(Error::SizeMismatch {
                        digest: *digest,
                        expected: *size,
                        actual: *size + 1,
                    });
                }
                nar.file_end(*size).await?;
            }
            Node::Directory { digest, .. } => {
                let dir = tree
                    .get(digest)
                    .ok_or_else(|| Error::NotFound(format!("directory {digest}")))?;
                nar.dir_start().await?;
                for (name, child) in dir.entries() {
                    nar.entry_start(name).await?;
                    write_node(nar, child, tree, blobs).await?;
                    nar.entry_end().await?;
                }
                nar.dir_end().await?;
            }
        }
        Ok(())
    })
}
