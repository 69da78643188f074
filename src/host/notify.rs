//! systemd's readiness protocol (sd_notify): `READY=1` once the socket
//! listens and the store has answered, `STOPPING=1` on the way out, and a
//! `STATUS=` line for `systemctl status`. A datagram to `$NOTIFY_SOCKET`;
//! nothing at all when it is unset (not started by systemd, or not
//! `Type=notify`).
use std::io;
use std::os::unix::net::UnixDatagram;

/// Whether the service manager listens for notifications.
pub fn wanted() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends `state` (newline-separated `KEY=value` lines); `Ok(false)` when
/// there is no one to tell.
pub fn send(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        // an abstract socket: '@' stands for the leading NUL
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), &path)?;
        }
    }
    Ok(true)
}

/// [`send`], with a failure logged rather than returned: readiness is a
/// courtesy to the service manager, never a reason to stop serving.
pub fn tell(state: &str) {
    match send(state) {
        Ok(true) => tracing::debug!("told systemd: {}", state.replace('\n', "; ")),
        Ok(false) => {}
        Err(e) => tracing::warn!("telling systemd {state:?}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_reaches_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        // SAFETY (of the test): no other thread of this test binary reads
        // NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(send("READY=1\nSTATUS=serving").unwrap());
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        assert!(!send("READY=1").unwrap(), "no socket, nothing sent");
    }
}
