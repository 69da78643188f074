//! A unix stream that carries open file descriptors beside its bytes
//! (SCM_RIGHTS), under an HTTP/2 (gRPC) connection that knows nothing of
//! them.
//!
//! Why: a per-VM daemon scoped to its tenant's closure must not see the
//! shared cache directory, yet a hit should still be read straight from
//! the cache's file. The host daemon checks the request against the
//! tenant's scope, opens the blob file read-only and queues the descriptor
//! on the connection ([`Outbox::push`] answers its sequence number, which
//! goes in the gRPC answer); the next bytes written on the socket carry it.
//! The reader collects descriptors as they arrive ([`Inbox`]) and takes
//! the one the answer names. Descriptors travel in the order they were
//! queued and arrive with (or before) the bytes of the answer naming them,
//! so the answer never finds its descriptor missing.
use crate::lock;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Most descriptors sent with one write (the kernel's limit, SCM_MAX_FD,
/// is 253); also what one read makes room for, so none is cut off.
const FDS_PER_MESSAGE: usize = 64;
/// Most descriptors queued on a connection and not yet sent: a reader
/// that stops reading makes the host refuse further blobs, not hold
/// ever more open files.
pub const MAX_OUTBOX: usize = 256;
/// Most descriptors received and not yet claimed (an answer the reader
/// gave up waiting for leaves its descriptor behind): the oldest are
/// closed past it.
pub const MAX_INBOX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum FdPassError {
    #[error("{MAX_OUTBOX} descriptors wait to be sent on this connection: its reader takes none")]
    OutboxFull,
    #[error("descriptor {0} was named but never received (or already taken)")]
    NotReceived(u64),
}

/// Descriptors to send, numbered from 1 in the order they are queued.
#[derive(Default)]
pub struct Outbox {
    inner: Mutex<(u64, VecDeque<OwnedFd>)>,
}

impl Outbox {
    /// Queues `fd`; answers the number the reader will know it by.
    pub fn push(&self, fd: OwnedFd) -> Result<u64, FdPassError> {
        let mut g = lock(&self.inner);
        if g.1.len() >= MAX_OUTBOX {
            return Err(FdPassError::OutboxFull);
        }
        g.0 += 1;
        g.1.push_back(fd);
        Ok(g.0)
    }

    fn take(&self) -> Vec<OwnedFd> {
        let mut g = lock(&self.inner);
        let n = g.1.len().min(FDS_PER_MESSAGE);
        g.1.drain(..n).collect()
    }

    /// Puts back descriptors a write did not send, in front.
    fn put_back(&self, fds: Vec<OwnedFd>) {
        let mut g = lock(&self.inner);
        for fd in fds.into_iter().rev() {
            g.1.push_front(fd);
        }
    }
}

/// Descriptors received, numbered from 1 in arrival order.
#[derive(Default)]
pub struct Inbox {
    inner: Mutex<(u64, VecDeque<(u64, OwnedFd)>)>,
}

impl Inbox {
    fn add(&self, fds: Vec<OwnedFd>) {
        let mut g = lock(&self.inner);
        for fd in fds {
            g.0 += 1;
            let n = g.0;
            g.1.push_back((n, fd));
            if g.1.len() > MAX_INBOX {
                g.1.pop_front();
            }
        }
    }

    /// The descriptor numbered `seq`.
    pub fn take(&self, seq: u64) -> Result<OwnedFd, FdPassError> {
        let mut g = lock(&self.inner);
        let i =
            g.1.iter()
                .position(|(n, _)| *n == seq)
                .ok_or(FdPassError::NotReceived(seq))?;
        g.1.remove(i)
            .map(|(_, fd)| fd)
            .ok_or(FdPassError::NotReceived(seq))
    }

    pub fn len(&self) -> usize {
        lock(&self.inner).1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connected unix stream socket that sends what its [`Outbox`] holds
/// with its writes and puts what its reads bring into its [`Inbox`].
pub struct FdStream {
    io: tokio::net::UnixStream,
    outbox: Arc<Outbox>,
    inbox: Arc<Inbox>,
}

impl FdStream {
    pub fn new(io: tokio::net::UnixStream) -> Self {
        Self {
            io,
            outbox: Arc::default(),
            inbox: Arc::default(),
        }
    }

    /// From a connected std socket (made non-blocking here); needs a runtime.
    pub fn from_std(s: std::os::unix::net::UnixStream) -> io::Result<Self> {
        s.set_nonblocking(true)?;
        Ok(Self::new(tokio::net::UnixStream::from_std(s)?))
    }

    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    pub fn inbox(&self) -> Arc<Inbox> {
        self.inbox.clone()
    }
}

/// sendmsg with `fds` attached (none: a plain send).
fn send_with_fds(sock: RawFd, buf: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64s: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; the fields set below are all it needs.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one cmsghdr with room for the
        // descriptors (CMSG_SPACE above); the pointers stay inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// recvmsg into `buf`; descriptors that came with the bytes are returned
/// (close-on-exec), however many the sender attached up to
/// [`FDS_PER_MESSAGE`] (more are closed by the kernel, and the stream
/// reports it: a peer breaking the rule is an error, not a silent loss).
fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let payload = FDS_PER_MESSAGE * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; the fields set below are all it needs.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled the control buffer; CMSG_FIRSTHDR and
    // CMSG_NXTHDR walk it within msg_controllen, and every descriptor in
    // an SCM_RIGHTS message is new and ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                let count = len / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(
            "the peer sent more descriptors at once than allowed",
        ));
    }
    Ok((n as usize, fds))
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.io.poll_read_ready(cx))?;
            let fd = this.io.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            match this
                .io
                .try_io(Interest::READABLE, || recv_with_fds(fd, unfilled))
            {
                Ok((n, fds)) => {
                    this.inbox.add(fds);
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            ready!(this.io.poll_write_ready(cx))?;
            let fd = this.io.as_raw_fd();
            let fds = this.outbox.take();
            match this
                .io
                .try_io(Interest::WRITABLE, || send_with_fds(fd, buf, &fds))
            {
                // sent: our copies of the descriptors close here
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) => {
                    this.outbox.put_back(fds);
                    if e.kind() == io::ErrorKind::WouldBlock {
                        continue;
                    }
                    return Poll::Ready(Err(e));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for FdStream {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn descriptors_arrive_with_the_bytes_in_order() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut a, mut b) = (FdStream::new(a), FdStream::new(b));
        let mut seqs = Vec::new();
        for i in 0..3u8 {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&[i; 4]).unwrap();
            seqs.push(a.outbox().push(OwnedFd::from(f)).unwrap());
        }
        assert_eq!(seqs, [1, 2, 3]);
        a.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 6];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");
        for (i, seq) in seqs.into_iter().enumerate().rev() {
            let mut f = std::fs::File::from(b.inbox().take(seq).unwrap());
            f.rewind().unwrap();
            let mut v = Vec::new();
            f.read_to_end(&mut v).unwrap();
            assert_eq!(v, [i as u8; 4]);
        }
        assert!(matches!(
            b.inbox().take(1),
            Err(FdPassError::NotReceived(1))
        ));
    }

    #[test]
    fn queues_are_bounded() {
        let out = Outbox::default();
        for _ in 0..MAX_OUTBOX {
            out.push(OwnedFd::from(tempfile::tempfile().unwrap()))
                .unwrap();
        }
        assert!(matches!(
            out.push(OwnedFd::from(tempfile::tempfile().unwrap())),
            Err(FdPassError::OutboxFull)
        ));
        let inbox = Inbox::default();
        inbox.add(
            (0..MAX_INBOX + 10)
                .map(|_| OwnedFd::from(tempfile::tempfile().unwrap()))
                .collect(),
        );
        assert_eq!(inbox.len(), MAX_INBOX);
        assert!(inbox.take(1).is_err(), "the oldest were closed");
        assert!(inbox.take((MAX_INBOX + 10) as u64).is_ok());
    }
}
