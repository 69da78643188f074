//! NAR framing: the token stream of Nix's archive format. Callers walk the
//! tree in NAR order (entries sorted by name) and stream file contents in.
use tokio::io::{AsyncWrite, AsyncWriteExt};

pub(crate) const MAGIC: &[u8] = b"nix-archive-1";

/// Zero bytes that pad a string of `len` bytes to a multiple of 8.
pub(crate) fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

pub struct NarWriter<W> {
    w: W,
}

impl<W: AsyncWrite + Unpin> NarWriter<W> {
    /// Starts an archive; the root node follows.
    pub async fn new(mut w: W) -> std::io::Result<Self> {
        write_str(&mut w, MAGIC).await?;
        Ok(Self { w })
    }

    pub async fn symlink(&mut self, target: &[u8]) -> std::io::Result<()> {
        for t in [&b"("[..], b"type", b"symlink", b"target", target, b")"] {
            write_str(&mut self.w, t).await?;
        }
        Ok(())
    }

    /// Opens a regular file of `size` bytes; exactly `size` bytes of
    /// `file_data` and then `file_end` follow.
    pub async fn file_start(&mut self, executable: bool, size: u64) -> std::io::Result<()> {
        for t in [&b"("[..], b"type", b"regular"] {
            write_str(&mut self.w, t).await?;
        }
        if executable {
            write_str(&mut self.w, b"executable").await?;
            write_str(&mut self.w, b"").await?;
        }
        write_str(&mut self.w, b"contents").await?;
        self.w.write_all(&size.to_le_bytes()).await
    }

    pub async fn file_data(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.w.write_all(data).await
    }

    pub async fn file_end(&mut self, size: u64) -> std::io::Result<()> {
        self.w.write_all(&[0u8; 8][..padding(size)]).await?;
        write_str(&mut self.w, b")").await
    }

    pub async fn dir_start(&mut self) -> std::io::Result<()> {
        for t in [&b"("[..], b"type", b"directory"] {
            write_str(&mut self.w, t).await?;
        }
        Ok(())
    }

    /// Opens an entry; its node follows, then `entry_end`.
    pub async fn entry_start(&mut self, name: &[u8]) -> std::io::Result<()> {
        for t in [&b"entry"[..], b"(", b"name", name, b"node"] {
            write_str(&mut self.w, t).await?;
        }
        Ok(())
    }

    pub async fn entry_end(&mut self) -> std::io::Result<()> {
        write_str(&mut self.w, b")").await
    }

    pub async fn dir_end(&mut self) -> std::io::Result<()> {
        write_str(&mut self.w, b")").await
    }

    /// Flushes and returns the sink.
    pub async fn finish(mut self) -> std::io::Result<W> {
        self.w.flush().await?;
        Ok(self.w)
    }
}

async fn write_str<W: AsyncWrite + Unpin>(w: &mut W, s: &[u8]) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes()).await?;
    w.write_all(s).await?;
    w.write_all(&[0u8; 8][..padding(s.len() as u64)]).await
}

/// A sink that only counts and hashes what passes through: NAR size and
/// SHA-256 without materialising the NAR.
#[derive(Default)]
pub struct NarHasher {
    sha: sha2::Sha256,
    len: u64,
}

impl NarHasher {
    pub fn finish(self) -> (u64, [u8; 32]) {
        use sha2::Digest;
        (self.len, self.sha.finalize().into())
    }
}

impl AsyncWrite for NarHasher {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use sha2::Digest;
        self.sha.update(buf);
        self.len += buf.len() as u64;
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
