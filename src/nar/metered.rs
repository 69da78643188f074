//! A NAR stream on its way in, with a check on every read: ingest hashes
//! and counts it, uploads and imports stop one that outgrows what it
//! declared or the disk's room while it flows, not only before it starts.
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// What looks at the bytes as they pass: a size limit, a room check, a
/// hash. An error ends the stream with that error.
pub trait Check {
    fn saw(&mut self, bytes: &[u8]) -> std::io::Result<()>;
}

impl<F: FnMut(&[u8]) -> std::io::Result<()>> Check for F {
    fn saw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self(bytes)
    }
}

/// Passes `inner` through, showing `check` what each read brought.
pub struct Metered<R, C> {
    inner: R,
    check: C,
}

impl<R: AsyncRead + Unpin, C: Check + Unpin> Metered<R, C> {
    pub fn new(inner: R, check: C) -> Self {
        Self { inner, check }
    }

    /// The check, with what it gathered (a hash, a count).
    pub fn into_check(self) -> C {
        self.check
    }
}

impl<R: AsyncRead + Unpin, C: Check + Unpin> AsyncRead for Metered<R, C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            this.check.saw(&buf.filled()[before..])?;
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
        let mut m = Metered::new(&data[..], |b: &[u8]| {
            seen += b.len() as u64;
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
        Metered::new(&data[..], |_: &[u8]| Ok(()))
            .read_to_end(&mut all)
            .await
            .unwrap();
        assert_eq!(all, data);
    }
}
