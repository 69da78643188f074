//! Decompressors for NARs from outside (binary cache uploads, `import-nar`)
//! with a stated memory bound each. A compressed stream declares the memory
//! its decoder takes (an xz block header its dictionary, up to 4 GiB; a
//! zstd frame its window, up to 2 GiB), so without a limit a few hundred
//! kilobytes of upload could make the daemon allocate gigabytes before one
//! byte of NAR is checked. A stream over the limit fails with [`TooLarge`].
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

/// Most memory one xz decoder may take, in bytes (its dictionary, almost
/// all of it): `xz -9` and `-9e` use a 64 MiB dictionary (65 MiB to
/// decode), Nix's default preset 6 an 8 MiB one.
pub const XZ_MEMORY: u64 = 128 << 20;

/// Largest zstd window accepted, as a power of two: 2^27 bytes = 128 MiB,
/// zstd's own default limit, which every compression level (including
/// `--ultra -22`) stays within; only `--long=28` and above need more.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// A limit an input outgrew: a decoder's memory, a NAR's size, the
/// directory listings one NAR may hold. Carried inside an `io::Error` by
/// the readers, and turned into a refusal (HTTP 413, gRPC
/// RESOURCE_EXHAUSTED), never into "malformed".
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TooLarge(pub String);

impl TooLarge {
    pub fn io(msg: impl Into<String>) -> std::io::Error {
        std::io::Error::other(TooLarge(msg.into()))
    }

    /// The limit inside `e`, if it carries one.
    pub fn of(e: &std::io::Error) -> Option<&TooLarge> {
        e.get_ref().and_then(|i| i.downcast_ref::<TooLarge>())
    }
}

/// How a NAR file is compressed, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    /// Only from a binary cache's narinfo (`Compression: bzip2`, Nix's
    /// oldest default); never accepted as an upload.
    Bzip2,
}

impl Compression {
    /// `*.nar`, `*.nar.xz`, `*.nar.zst` (and `.xz`, `.zst` for any name);
    /// None for any other compression.
    pub fn from_name(name: &str) -> Option<Self> {
        if name.ends_with(".xz") {
            Some(Self::Xz)
        } else if name.ends_with(".zst") {
            Some(Self::Zstd)
        } else if name.ends_with(".nar") {
            Some(Self::None)
        } else {
            None
        }
    }

    /// From a narinfo's `Compression:` value (absent: none).
    pub fn from_narinfo(value: &str) -> Option<Self> {
        match value {
            "" | "none" => Some(Self::None),
            "xz" => Some(Self::Xz),
            "zstd" => Some(Self::Zstd),
            "bzip2" => Some(Self::Bzip2),
            _ => None,
        }
    }
}

/// `r` decompressed as `c` says, the decoder's memory bounded by
/// [`XZ_MEMORY`] or [`ZSTD_WINDOW_LOG_MAX`].
pub fn decoder<R>(c: Compression, r: R) -> Pin<Box<dyn AsyncRead + Send>>
where
    R: AsyncBufRead + Unpin + Send + 'static,
{
    use async_compression::tokio::bufread::{BzDecoder, XzDecoder, ZstdDecoder};
    match c {
        Compression::None => Box::pin(r),
        // bzip2's blocks are at most 900 kB: its decoder's memory is
        // bounded by the format itself (under 4 MiB).
        Compression::Bzip2 => Box::pin(MemoryLimit {
            inner: BzDecoder::new(r),
            what: "bzip2",
            limit: 4 << 20,
        }),
        Compression::Xz => Box::pin(MemoryLimit {
            inner: XzDecoder::with_mem_limit(r, XZ_MEMORY),
            what: "xz",
            limit: XZ_MEMORY,
        }),
        Compression::Zstd => Box::pin(MemoryLimit {
            inner: ZstdDecoder::with_params(
                r,
                &[async_compression::zstd::DParameter::window_log_max(
                    ZSTD_WINDOW_LOG_MAX,
                )],
            ),
            what: "zstd",
            limit: 1 << ZSTD_WINDOW_LOG_MAX,
        }),
    }
}

/// Turns a decoder's "memory limit reached" into [`TooLarge`]; the
/// libraries report it only as text (liblzma: "memory limit reached";
/// zstd: "Frame requires too much memory for decoding").
struct MemoryLimit<D> {
    inner: D,
    what: &'static str,
    limit: u64,
}

/// Only the libraries' text says so: an `OutOfMemory` kind is what the
/// xz and bzip2 decoders answer when their input stops making progress
/// (liblzma's LZMA_BUF_ERROR: a stream cut short), not a memory limit.
fn is_memory_limit(e: &std::io::Error) -> bool {
    let msg = e.to_string().to_ascii_lowercase();
    msg.contains("memory limit") || msg.contains("too much memory")
}

impl<D: AsyncRead + Unpin> AsyncRead for MemoryLimit<D> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if TooLarge::of(&e).is_none() && is_memory_limit(&e) => {
                Poll::Ready(Err(TooLarge::io(format!(
                    "the {} stream needs more than {} MiB of memory to decode ({e})",
                    self.what,
                    self.limit >> 20
                ))))
            }
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::OutOfMemory => {
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the {} stream ends early or is corrupt", self.what),
                )))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        use async_compression::tokio::write::{BzEncoder, XzEncoder, ZstdEncoder};
        let mut out = Vec::new();
        match c {
            Compression::Xz => {
                let mut w = XzEncoder::new(&mut out);
                w.write_all(data).await.unwrap();
                w.shutdown().await.unwrap();
            }
            Compression::Zstd => {
                let mut w = ZstdEncoder::new(&mut out);
                w.write_all(data).await.unwrap();
                w.shutdown().await.unwrap();
            }
            Compression::Bzip2 => {
                let mut w = BzEncoder::new(&mut out);
                w.write_all(data).await.unwrap();
                w.shutdown().await.unwrap();
            }
            Compression::None => out.extend_from_slice(data),
        }
        out
    }

    #[tokio::test]
    async fn bounded_decoders_read_what_the_encoders_wrote() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for c in [
            Compression::None,
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
        ] {
            let packed = compress(c, &data).await;
            let mut out = Vec::new();
            decoder(c, std::io::Cursor::new(packed))
                .read_to_end(&mut out)
                .await
                .unwrap();
            assert_eq!(out, data, "{c:?}");
        }
    }

    #[tokio::test]
    async fn a_zstd_frame_declaring_a_2_gib_window_is_too_large() {
        let mut packed = compress(Compression::Zstd, &[0u8; 4096]).await;
        // frame header: magic (4), descriptor, then the window descriptor
        // when not single-segment; exponent 21 is a window of 2^31 bytes
        assert_eq!(packed[4] & 0x20, 0, "single-segment frame");
        packed[5] = 21 << 3;
        let err = decoder(Compression::Zstd, std::io::Cursor::new(packed))
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert!(TooLarge::of(&err).is_some(), "{err}");
    }

    #[test]
    fn names_say_the_compression() {
        assert_eq!(Compression::from_name("nar/x.nar"), Some(Compression::None));
        assert_eq!(
            Compression::from_name("nar/x.nar.xz"),
            Some(Compression::Xz)
        );
        assert_eq!(
            Compression::from_name("nar/x.nar.zst"),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::from_name("nar/x.nar.bz2"), None);
    }
}
