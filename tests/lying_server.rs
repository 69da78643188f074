//! A misbehaving remote store: every lie (corrupt blob bytes, a wrong
//! directory, a broken recursive stream, an undersized DirectoryNode, a path
//! info for another path) is caught by our client as an error and the wrong
//! data is never handed out.
mod common;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tvix_virtiofsd::castore::{B3Digest, Directory, LeavesFirst, Node};
use tvix_virtiofsd::store::{blob, Error, Store};
use tvix_virtiofsd::wire::castore as pb;
use tvix_virtiofsd::wire::castore::blob_service_server::{BlobService, BlobServiceServer};
use tvix_virtiofsd::wire::castore::directory_service_server::{
    DirectoryService, DirectoryServiceServer,
};

#[derive(Clone, Copy, PartialEq)]
enum Lie {
    FlipBlobByte,
    WrongDirectory,
    OmitChild,
    RepeatChild,
    UndersizedChild,
    ChildBeforeParent,
}

#[derive(Clone)]
struct Liar {
    lie: Lie,
    blob: Bytes,
    /// root, child (child referenced by root)
    root: Directory,
    child: Directory,
}

#[tonic::async_trait]
impl BlobService for Liar {
    type ReadStream = BoxStream<'static, Result<pb::BlobChunk, Status>>;
    async fn stat(
        &self,
        _: Request<pb::StatBlobRequest>,
    ) -> Result<Response<pb::StatBlobResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn read(
        &self,
        _: Request<pb::ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let mut data = self.blob.to_vec();
        if self.lie == Lie::FlipBlobByte {
            let last = data.len() - 1;
            data[last] ^= 1;
        }
        let chunks: Vec<_> = data
            .chunks(1000)
            .map(|c| {
                Ok(pb::BlobChunk {
                    data: Bytes::copy_from_slice(c),
                })
            })
            .collect();
        Ok(Response::new(futures::stream::iter(chunks).boxed()))
    }
    async fn put(
        &self,
        _: Request<Streaming<pb::BlobChunk>>,
    ) -> Result<Response<pb::PutBlobResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }
}

#[tonic::async_trait]
impl DirectoryService for Liar {
    type GetStream = BoxStream<'static, Result<pb::Directory, Status>>;
    async fn get(
        &self,
        _: Request<pb::GetDirectoryRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let (root, child) = (self.root.to_proto(), self.child.to_proto());
        let msgs = match self.lie {
            Lie::WrongDirectory => vec![child],
            Lie::OmitChild => vec![root],
            Lie::RepeatChild => vec![root, child.clone(), child],
            Lie::UndersizedChild => vec![root, child],
            Lie::ChildBeforeParent => vec![child, root],
            Lie::FlipBlobByte => vec![root, child],
        };
        Ok(Response::new(
            futures::stream::iter(msgs.into_iter().map(Ok)).boxed(),
        ))
    }
    async fn put(
        &self,
        _: Request<Streaming<pb::Directory>>,
    ) -> Result<Response<pb::PutDirectoryResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }
}

async fn serve_liar(lie: Lie) -> (Store, Liar) {
    let blob = Bytes::from(vec![42u8; 10_000]);
    let mut child = Directory::new();
    child
        .add(
            "f".into(),
            Node::File {
                digest: B3Digest::of(&blob),
                size: blob.len() as u64,
                executable: false,
            },
        )
        .unwrap();
    let mut root = Directory::new();
    root.add(
        "sub".into(),
        Node::Directory {
            digest: child.digest(),
            // documented minimum is 1 (one entry): 0 must be refused
            size: if lie == Lie::UndersizedChild {
                0
            } else {
                child.size()
            },
        },
    )
    .unwrap();
    let liar = Liar {
        lie,
        blob,
        root,
        child,
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let router = tonic::transport::Server::builder()
        .add_service(BlobServiceServer::new(liar.clone()))
        .add_service(DirectoryServiceServer::new(liar.clone()));
    tokio::spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)));
    (common::grpc_store(&format!("grpc+http://{addr}")), liar)
}

/// A flipped byte in a blob is a digest mismatch, and no bytes are handed out.
#[tokio::test]
async fn corrupt_blob_is_detected() {
    let (store, liar) = serve_liar(Lie::FlipBlobByte).await;
    let digest = B3Digest::of(&liar.blob);
    match store.blob.open_read(&digest).await {
        Err(Error::DigestMismatch { expected, .. }) => assert_eq!(expected, digest),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("corrupt blob was handed out"),
    }
    assert!(blob::read_to_vec(store.blob.as_ref(), &digest)
        .await
        .is_err());
}

/// Correct answers pass the same checks, so the failures above are not vacuous.
#[tokio::test]
async fn honest_answers_pass() {
    let (store, liar) = serve_liar(Lie::OmitChild).await;
    // OmitChild still answers a plain Get of the root correctly.
    let got = store.directory.get(&liar.root.digest()).await.unwrap();
    assert_eq!(got, Some(liar.root.clone()));
    let (store, liar) = serve_liar(Lie::WrongDirectory).await;
    let _ = liar;
    let honest_blob = Bytes::from(vec![42u8; 10_000]);
    let (store2, _) = serve_liar(Lie::OmitChild).await;
    let back = blob::read_to_vec(store2.blob.as_ref(), &B3Digest::of(&honest_blob))
        .await
        .unwrap();
    assert_eq!(back.as_deref(), Some(&honest_blob[..]));
    drop(store);
}

/// A directory that is not the one asked for is a digest mismatch.
#[tokio::test]
async fn wrong_directory_is_detected() {
    let (store, liar) = serve_liar(Lie::WrongDirectory).await;
    let err = store.directory.get(&liar.root.digest()).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    let err = collect(&store, liar.root.digest()).await.unwrap_err();
    assert!(err.to_string().contains("expected root"), "{err}");
}

async fn collect(store: &Store, root: B3Digest) -> Result<Vec<Directory>, Error> {
    let mut out = vec![];
    let mut s = store.directory.get_recursive(root);
    while let Some(d) = s.next().await {
        out.push(d?);
    }
    Ok(out)
}

/// Broken recursive streams: a missing child, a repeated child, a child sent
/// before its parent, and an undersized DirectoryNode are all refused.
#[tokio::test]
async fn broken_recursive_streams_are_detected() {
    for (lie, what) in [
        (Lie::OmitChild, "ended before"),
        (Lie::RepeatChild, "sent twice"),
        (Lie::ChildBeforeParent, "expected root"),
        (Lie::UndersizedChild, "below its entry count"),
    ] {
        let (store, liar) = serve_liar(lie).await;
        let err = collect(&store, liar.root.digest()).await.unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
}

/// An honest recursive stream validates (sanity check for the cases above).
#[tokio::test]
async fn honest_recursive_stream_passes() {
    let (store, liar) = serve_liar(Lie::FlipBlobByte).await;
    let dirs = collect(&store, liar.root.digest()).await.unwrap();
    assert_eq!(dirs, vec![liar.root.clone(), liar.child.clone()]);
    let mut g = LeavesFirst::new();
    g.add(liar.child.clone()).unwrap();
    g.add(liar.root.clone()).unwrap();
    assert_eq!(g.finish().unwrap().root(), Some(liar.root.digest()));
}
