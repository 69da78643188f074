//! Directory client for a remote tvix-store. Every received directory is
//! validated, checked against the digest that named it, and (recursively)
//! against the order and size rules of `castore::graph`.
use super::DirectoryService;
use crate::castore::{B3Digest, Directory, RootFirst, ValidatedGraph};
use crate::services::channel::WireChannel;
use crate::services::channel::MAX_MESSAGE_SIZE;
use crate::services::{Error, Result};
use crate::wire::castore as pb;
use crate::wire::castore::directory_service_client::DirectoryServiceClient;
use async_trait::async_trait;
use futures::stream::BoxStream;
use tonic::Code;

#[derive(Clone)]
pub struct GrpcDirectoryService {
    client: DirectoryServiceClient<WireChannel>,
}

impl GrpcDirectoryService {
    pub fn new(channel: WireChannel) -> Self {
        Self {
            client: DirectoryServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        }
    }

    async fn call(
        &self,
        digest: &B3Digest,
        recursive: bool,
    ) -> Result<Option<tonic::Streaming<pb::Directory>>> {
        let req = pb::GetDirectoryRequest {
            by_what: Some(pb::get_directory_request::ByWhat::Digest((*digest).into())),
            recursive,
        };
        match self.client.clone().get(req).await {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }
}

fn not_found_is_none(s: tonic::Status) -> Result<Option<pb::Directory>> {
    if s.code() == Code::NotFound {
        Ok(None)
    } else {
        Err(s.into())
    }
}

#[async_trait]
impl DirectoryService for GrpcDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        let Some(mut stream) = self.call(digest, false).await? else {
            return Ok(None);
        };
        let Some(msg) = stream.message().await.or_else(not_found_is_none)? else {
            return Ok(None); // tvix answers an unknown digest with an empty stream
        };
        // Read to the end (a stream dropped early is reset, and h2 allows
        // only so many resets); a second directory is a protocol violation.
        if stream.message().await?.is_some() {
            return Err(Error::Protocol(format!(
                "Get of directory {digest} (not recursive) answered more than one directory"
            )));
        }
        let dir = Directory::try_from(msg)?;
        let actual = dir.digest();
        if actual != *digest {
            tracing::error!(expected = %digest, %actual, "remote store sent a wrong directory");
            return Err(Error::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        Ok(Some(dir))
    }

    fn get_recursive(&self, root: B3Digest) -> BoxStream<'_, Result<Directory>> {
        Box::pin(async_stream::try_stream! {
            let Some(mut stream) = self.call(&root, true).await? else {
                return;
            };
            let mut order = RootFirst::new(root);
            loop {
                let msg = if order.is_empty() {
                    stream.message().await.or_else(not_found_is_none)?
                } else {
                    stream.message().await?
                };
                let Some(msg) = msg else { break };
                let dir = Directory::try_from(msg)?;
                order.add(&dir).inspect_err(|e| {
                    tracing::error!(%root, "remote store sent a bad directory tree: {e}")
                })?;
                yield dir;
            }
            if !order.is_empty() {
                order.finish()?;
            }
        })
    }

    async fn put_graph(&self, graph: ValidatedGraph) -> Result<B3Digest> {
        let root = graph
            .root()
            .ok_or_else(|| Error::InvalidRequest("empty directory graph".into()))?;
        let msgs: Vec<pb::Directory> = graph.dirs.iter().map(|(_, d)| d.to_proto()).collect();
        let resp = self
            .client
            .clone()
            .put(futures::stream::iter(msgs))
            .await?
            .into_inner();
        let got = B3Digest::try_from(&resp.root_digest[..])
            .map_err(|e| Error::Protocol(format!("Put answered a bad root digest: {e}")))?;
        if got != root {
            return Err(Error::DigestMismatch {
                expected: root,
                actual: got,
            });
        }
        Ok(root)
    }
}
