//! A NAR stream on its way in, with a check on every read: uploads and
//! imports stop a stream that outgrows what it declared or the disk's
//! room while it flows, not only before it starts.
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// Passes `inner` through, telling `check` how many bytes each read
/// brought; an error from `check` ends the stream with that error.
pub struct Metered<R, F> {
    inner: R,
    check: F,
}

impl<R, F> Metered<R, F>
where
    R: AsyncRead + Unpin,
    F: FnMut(u64) -> std::io::Result<()> + Unpin,
{
    pub fn new(inner: R, check: F) -> Self {
        Self { inner, check }
    }
}

impl<R, F> AsyncRead for Metered<R, F>
where
    R: AsyncRead + Unpin,
    F: FnMut(u64) -> std::io::Result<()> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let n = (buf.filled().len() - before) as u64;
            (self.check)(n)?;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_failed_check_ends_the_stream() {
        let data = vec![7u8; 1000];
        let mut seen = 0u64;
        let mut m = Metered::new(&data[..], |n| {
            seen += n;
            if seen > 600 {
                return Err(std::io::Error::other("too long"));
            }
            Ok(())
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        let err = loop {
            match m.read(&mut buf).await {
                Ok(0) => panic!("read to the end"),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(err.to_string(), "too long");
        assert!(out.len() <= 768, "{}", out.len());
        let mut all = Vec::new();
        Metered::new(&data[..], |_| Ok(()))
            .read_to_end(&mut all)
            .await
            .unwrap();
        assert_eq!(all, data);
    }
}
