//! Directories from several daemons of one store (see `store::endpoints`):
//! a gRPC client per daemon, a call moving to the next on a fault. A tree
//! (`get_recursive`) that fails midway goes on at the next daemon, whose
//! stream is read from the root again and the directories already handed
//! out (by digest) skipped: each still comes after its parent, so the
//! joined stream keeps the order rules its callers check.
use super::grpc::GrpcDirectoryService;
use super::DirectoryService;
use crate::castore::{B3Digest, Directory, ValidatedGraph};
use crate::store::endpoints::{is_fault, Endpoints};
use crate::store::Result;
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a tree's stream is looked at for progress, as a share of the
/// stall limit.
const WATCH_TICKS: u32 = 4;

pub struct FailoverDirectoryService {
    eps: Arc<Endpoints>,
    clients: Vec<GrpcDirectoryService>,
}

impl FailoverDirectoryService {
    pub fn new(eps: Arc<Endpoints>) -> Self {
        let clients = eps.channels().map(GrpcDirectoryService::new).collect();
        Self { eps, clients }
    }

    /// The tree below `root`, counting its bytes into `received`.
    fn recursive(
        &self,
        root: B3Digest,
        received: Arc<AtomicU64>,
    ) -> BoxStream<'_, Result<Directory>> {
        Box::pin(async_stream::try_stream! {
            let mut sent: HashSet<B3Digest> = HashSet::new();
            let mut last = None;
            for i in self.eps.order() {
                let mut s = self.clients[i].get_recursive_watched(root, received.clone());
                let mut answered = false;
                let fault = loop {
                    match next_progressing(&mut s, &received, self.eps.stall()).await {
                        Err(()) => break self.eps.stalled(i, format!("directory tree {root}")),
                        Ok(None) => {
                            self.eps.answered(i);
                            return;
                        }
                        Ok(Some(Err(e))) if is_fault(&e) => break e,
                        Ok(Some(Err(e))) => {
                            self.eps.answered(i);
                            Err(e)?;
                        }
                        Ok(Some(Ok(dir))) => {
                            if !answered {
                                self.eps.answered(i);
                                answered = true;
                            }
                            if sent.insert(dir.digest()) {
                                yield dir;
                            }
                        }
                    }
                };
                self.eps.failed(i, &fault);
                if !sent.is_empty() {
                    tracing::info!(
                        "directory tree {root}: store {} failed after {} directories, going on at the next",
                        self.eps.name(i),
                        sent.len()
                    );
                }
                last = Some(fault);
            }
            Err(self.eps.all_failed(last))?;
        })
    }
}

/// The stream's next item; `Err` when neither an item nor a byte of one
/// (counted into `received`) arrived for `stall`.
async fn next_progressing<S>(
    s: &mut S,
    received: &AtomicU64,
    stall: Duration,
) -> std::result::Result<Option<S::Item>, ()>
where
    S: futures::Stream + Unpin,
{
    let tick = stall / WATCH_TICKS;
    let mut seen = received.load(Ordering::Relaxed);
    let mut since = tokio::time::Instant::now();
    loop {
        if let Ok(item) = tokio::time::timeout(tick, s.next()).await {
            return Ok(item);
        }
        let now = received.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= stall {
            return Err(());
        }
    }
}

#[async_trait]
impl DirectoryService for FailoverDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        let (stall, quiet) = (self.eps.stall(), |_: u64| {});
        self.eps
            .call(|i| self.clients[i].get_watched(digest, stall, &quiet))
            .await
    }

    async fn get_watched(
        &self,
        digest: &B3Digest,
        idle: Duration,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Option<Directory>> {
        let idle = idle.min(self.eps.stall());
        self.eps
            .call(|i| self.clients[i].get_watched(digest, idle, progress))
            .await
    }

    fn get_recursive(&self, root: B3Digest) -> BoxStream<'_, Result<Directory>> {
        self.recursive(root, Arc::default())
    }

    fn get_recursive_watched(
        &self,
        root: B3Digest,
        received: Arc<AtomicU64>,
    ) -> BoxStream<'_, Result<Directory>> {
        self.recursive(root, received)
    }

    async fn put_graph(&self, graph: ValidatedGraph) -> Result<B3Digest> {
        let order = self.eps.order();
        let mut graph = Some(graph);
        let mut last = None;
        for (k, &i) in order.iter().enumerate() {
            // a copy for each daemon but the last to be asked
            let g = match k + 1 == order.len() {
                true => graph.take(),
                false => graph.clone(),
            };
            let Some(g) = g else { break };
            match self.clients[i].put_graph(g).await {
                Err(e) if is_fault(&e) => {
                    self.eps.failed(i, &e);
                    last = Some(e);
                }
                r => {
                    self.eps.answered(i);
                    return r;
                }
            }
        }
        Err(self.eps.all_failed(last))
    }
}
