//! Starting and stopping the long-running commands: readiness is told to
//! systemd only once the store answers, and SIGTERM or SIGINT stop the
//! command (telling systemd it is stopping).
use crate::store::Store;
use std::time::Duration;

/// Waits for SIGTERM or SIGINT, then tells systemd the command is stopping.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    crate::host::notify::tell("STOPPING=1");
}

/// Waits until the store answers a query (an absent path info is an
/// answer), asking again every second while it does not.
pub async fn store_answers(store: &Store, timeout: Duration) {
    let mut first = true;
    loop {
        let asked = tokio::time::timeout(timeout, store.path_info.get(&[0u8; 20])).await;
        match asked {
            Ok(Ok(_)) => return,
            Ok(Err(e)) if first => tracing::warn!("the store does not answer yet: {e}"),
            Err(_) if first => tracing::warn!("the store does not answer yet (timed out)"),
            _ => {}
        }
        first = false;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
