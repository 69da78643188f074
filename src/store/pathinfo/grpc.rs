//! PathInfo client for a remote tvix-store; answers are validated and must
//! be for the store path asked about.
use super::PathInfoService;
use crate::castore::Node;
use crate::nix::path_info::PathInfo;
use crate::store::channel::WireChannel;
use crate::store::channel::MAX_MESSAGE_SIZE;
use crate::store::{Error, Result};
use crate::wire::store as pb;
use crate::wire::store::path_info_service_client::PathInfoServiceClient;
use async_trait::async_trait;
use futures::stream::BoxStream;
use tonic::Code;

#[derive(Clone)]
pub struct GrpcPathInfoService {
    client: PathInfoServiceClient<WireChannel>,
}

impl GrpcPathInfoService {
    pub fn new(channel: WireChannel) -> Self {
        Self {
            client: PathInfoServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        }
    }

    /// Asks the remote to compute NAR size and SHA-256 of a tree.
    pub async fn calculate_nar(&self, node: &Node) -> Result<(u64, [u8; 32])> {
        let resp = self
            .client
            .clone()
            .calculate_nar(node.to_proto(bytes::Bytes::new()))
            .await?
            .into_inner();
        let sha = <[u8; 32]>::try_from(&resp.nar_sha256[..]).map_err(|_| {
            Error::Protocol(format!(
                "CalculateNAR answered {} bytes of SHA-256",
                resp.nar_sha256.len()
            ))
        })?;
        Ok((resp.nar_size, sha))
    }
}

#[async_trait]
impl PathInfoService for GrpcPathInfoService {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>> {
        let req = pb::GetPathInfoRequest {
            by_what: Some(pb::get_path_info_request::ByWhat::ByOutputHash(
                bytes::Bytes::copy_from_slice(digest),
            )),
        };
        let msg = match self.client.clone().get(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(s.into()),
        };
        let info = PathInfo::try_from(msg)?;
        if info.store_path.digest() != digest {
            return Err(Error::Protocol(format!(
                "asked for hash {}, got {}",
                crate::nix::nixbase32::encode(digest),
                info.store_path
            )));
        }
        Ok(Some(info))
    }

    async fn put(&self, info: PathInfo) -> Result<PathInfo> {
        let resp = self.client.clone().put(info.to_proto()).await?.into_inner();
        let back = PathInfo::try_from(resp)?;
        if back.store_path != info.store_path || back.nar_sha256 != info.nar_sha256 {
            return Err(Error::Protocol(format!(
                "Put of {} answered {}",
                info.store_path, back.store_path
            )));
        }
        Ok(back)
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        Box::pin(async_stream::try_stream! {
            let mut s = self.client.clone().list(pb::ListPathInfoRequest {}).await?.into_inner();
            while let Some(msg) = s.message().await? {
                yield PathInfo::try_from(msg)?;
            }
        })
    }
}
