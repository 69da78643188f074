//! Host mount of the store view through /dev/fuse with a pool of worker
//! threads (fuse-backend-rs's fusedev transport). The same `StoreFs` is
//! what the virtio-fs daemon serves to guests.
use crate::view::StoreFs;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::FuseSession;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("FUSE session: {0}")]
    Session(String),
    #[error("cannot start a FUSE worker thread: {0}")]
    Thread(std::io::Error),
}

/// A mounted store; `unmount` (or dropping it) takes it down.
pub struct FuseMount {
    session: FuseSession,
    workers: Vec<JoinHandle<()>>,
}

impl FuseMount {
    /// Mounts `fs` read-only at `mountpoint`, served by `threads` workers.
    pub fn mount(
        fs: Arc<StoreFs>,
        mountpoint: &Path,
        threads: usize,
        allow_other: bool,
    ) -> Result<Self, MountError> {
        let mut session = FuseSession::new(mountpoint, "tvix-store", "", true)
            .map_err(|e| MountError::Session(e.to_string()))?;
        session.set_allow_other(allow_other);
        session
            .mount()
            .map_err(|e| MountError::Session(e.to_string()))?;
        let server = Arc::new(Server::new(fs));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let mut ch = session
                .new_channel()
                .map_err(|e| MountError::Session(e.to_string()))?;
            let server = server.clone();
            let worker = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || loop {
                    match ch.get_request() {
                        Ok(Some((reader, writer))) => {
                            // A failed reply (e.g. to an interrupted request)
                            // concerns one request: keep serving. A panic
                            // would be a bug; it must not take the worker down.
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                server.handle_message(reader, writer.into(), None, None)
                            }));
                            match r {
                                Ok(Ok(_)) => {}
                                Ok(Err(e)) => tracing::debug!("FUSE request: {e}"),
                                Err(_) => tracing::error!("BUG: a FUSE request handler panicked"),
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            // also how an unmount ends the channels
                            tracing::debug!("FUSE channel closed: {e}");
                            break;
                        }
                    }
                })
                .map_err(MountError::Thread)?;
            workers.push(worker);
        }
        Ok(Self { session, workers })
    }

    /// Whether every worker has stopped (the mount was taken away).
    pub fn finished(&self) -> bool {
        self.workers.iter().all(|w| w.is_finished())
    }

    /// Unmounts and waits for the workers.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.session
            .umount()
            .map_err(|e| MountError::Session(e.to_string()))?;
        self.session
            .wake()
            .map_err(|e| MountError::Session(e.to_string()))?;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        Ok(())
    }
}
