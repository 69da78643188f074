//! Path infos from several daemons of one store (see `store::endpoints`):
//! a gRPC client per daemon, a call moving to the next on a fault. A Put
//! is simply sent again (a path info is put whole, and putting the same
//! one twice changes nothing); a listing that fails midway goes on at the
//! next daemon, skipping the store paths already listed.
use super::grpc::GrpcPathInfoService;
use super::PathInfoService;
use crate::nix::path_info::PathInfo;
use crate::store::endpoints::{is_fault, Endpoints};
use crate::store::Result;
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::Arc;

pub struct FailoverPathInfoService {
    eps: Arc<Endpoints>,
    clients: Vec<GrpcPathInfoService>,
}

impl FailoverPathInfoService {
    pub fn new(eps: Arc<Endpoints>) -> Self {
        let clients = eps.channels().map(GrpcPathInfoService::new).collect();
        Self { eps, clients }
    }
}

#[async_trait]
impl PathInfoService for FailoverPathInfoService {
    async fn get(&self, digest: &[u8; 20]) -> Result<Option<PathInfo>> {
        let what = format!("path info {}", crate::nix::nixbase32::encode(digest));
        self.eps
            .call(|i| self.eps.within(i, &what, self.clients[i].get(digest)))
            .await
    }

    /// No stall limit of its own: a daemon may take long to accept a path
    /// info (checking its signatures and NAR hash); a frozen one is found
    /// out by the connection's pings (see `channel::connect_tcp_pinged`).
    async fn put(&self, info: PathInfo) -> Result<PathInfo> {
        self.eps.call(|i| self.clients[i].put(info.clone())).await
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo>> {
        Box::pin(async_stream::try_stream! {
            let mut listed: HashSet<[u8; 20]> = HashSet::new();
            let mut last = None;
            for i in self.eps.order() {
                let mut s = self.clients[i].list();
                let mut answered = false;
                let fault = loop {
                    let next = tokio::time::timeout(self.eps.stall(), s.next()).await;
                    match next {
                        Err(_) => break self.eps.stalled(i, "listing path infos"),
                        Ok(None) => {
                            self.eps.answered(i);
                            return;
                        }
                        Ok(Some(Err(e))) if is_fault(&e) => break e,
                        Ok(Some(Err(e))) => {
                            self.eps.answered(i);
                            Err(e)?;
                        }
                        Ok(Some(Ok(info))) => {
                            if !answered {
                                self.eps.answered(i);
                                answered = true;
                            }
                            if listed.insert(*info.store_path.digest()) {
                                yield info;
                            }
                        }
                    }
                };
                self.eps.failed(i, &fault);
                last = Some(fault);
            }
            Err(self.eps.all_failed(last))?;
        })
    }
}
