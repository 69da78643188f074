//! One store path from a Nix binary cache into the host cache: narinfo,
//! signature, NAR, and the checks that decide whether any of it is kept.
use super::NixCache;
use crate::ingest::nar::Limits;
use crate::nar::decode::{decoder, Compression, TooLarge};
use crate::nix::narinfo::NarInfo;
use crate::nix::nixbase32;
use crate::nix::path_info::PathInfo;
use crate::nix::signing::fingerprint;
use crate::store::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Largest narinfo read (Nix's own uploads are a few hundred bytes; a
/// path with thousands of references a few hundred KiB).
const MAX_NARINFO: usize = 1 << 20;

/// What a compressed NAR may carry beyond its NarSize: framing, and the
/// little incompressible data grows by.
fn max_carried(nar_size: u64, c: Compression) -> u64 {
    match c {
        Compression::None => nar_size,
        _ => nar_size.saturating_add(nar_size / 64 + (1 << 20)),
    }
}

/// Whether a read error is the decompressor's or the NAR reader's
/// verdict on the bytes (rather than the transfer's failure).
fn is_decoding(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
    ) || e.get_ref().is_some_and(|i| {
        let m = i.to_string().to_ascii_lowercase();
        m.contains("corrupt") || m.contains("format") || m.contains("decompress")
    })
}

/// Most characters of a cache's own text shown in a log line or error.
const MAX_SHOWN: usize = 300;

/// `e` with its message cut to [`MAX_SHOWN`] characters (a narinfo's
/// bad line may be a megabyte).
fn clip(e: Error) -> Error {
    let cut = |m: String| -> String {
        match m.char_indices().nth(MAX_SHOWN) {
            Some((i, _)) => format!("{}...", &m[..i]),
            None => m,
        }
    };
    match e {
        Error::Protocol(m) => Error::Protocol(cut(m)),
        Error::Untrusted(m) => Error::Untrusted(cut(m)),
        Error::Fetch(m) => Error::Fetch(cut(m)),
        Error::Timeout(m) => Error::Timeout(cut(m)),
        Error::ResourceExhausted(m) => Error::ResourceExhausted(cut(m)),
        e => e,
    }
}

/// Slowest a NAR may arrive on average before it is given up (besides
/// the store timeout between any two bytes): 64 KiB/s.
const MIN_RATE: u64 = 64 << 10;

impl NixCache {
    /// A refusal: logged once, here, for the operator, and answered as
    /// `e` (the guest sees the lookup fail).
    /// The path is remembered as refused for a while, and what the cache
    /// wrote is cut to [`MAX_SHOWN`] characters.
    fn refuse(&self, hash: &[u8; 20], path: &str, e: Error) -> Error {
        let e = clip(e);
        tracing::warn!("{}: {path}: refused: {e}", self.what);
        if let Ok(c) = self.cache() {
            c.stats().upstream_refused.fetch_add(1, Relaxed);
        }
        self.remember_refused(*hash, e.to_string());
        e
    }

    /// A fetch that failed (the cache is down, slow or cut the transfer),
    /// logged for the operator.
    fn fail(&self, path: &str, e: Error) -> Error {
        let e = clip(e);
        tracing::warn!("{}: {path}: fetch failed: {e}", self.what);
        e
    }

    /// The path info of `hash`, its NAR read into the host cache;
    /// `None` when the cache has no narinfo for it.
    pub(super) async fn fetch(
        &self,
        hash: &[u8; 20],
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Option<PathInfo>> {
        let name = nixbase32::encode(hash);
        let Some(text) = self
            .source
            .small(&format!("{name}.narinfo"), MAX_NARINFO)
            .await
            .map_err(|e| match e {
                e @ Error::ResourceExhausted(_) => self.refuse(hash, &name, e),
                e => self.fail(&name, e),
            })?
        else {
            if let Ok(c) = self.cache() {
                c.stats().upstream_absent.fetch_add(1, Relaxed);
            }
            return Ok(None);
        };
        let text = std::str::from_utf8(&text).map_err(|_| {
            self.refuse(
                hash,
                &name,
                Error::Protocol("its narinfo is not UTF-8".into()),
            )
        })?;
        let n = NarInfo::parse(text)
            .map_err(|e| self.refuse(hash, &name, Error::Protocol(format!("its narinfo: {e}"))))?;
        let path = n.info.path.to_absolute_path();
        if n.info.path.digest() != hash {
            return Err(self.refuse(
                hash,
                &name,
                Error::Protocol(format!("{name}.narinfo describes {path}")),
            ));
        }
        let sha: [u8; 32] = (n.info.nar_hash.algo() == crate::nix::hash::HashAlgo::Sha256)
            .then(|| n.info.nar_hash.digest().try_into().ok())
            .flatten()
            .ok_or_else(|| {
                self.refuse(
                    hash,
                    &path,
                    Error::Protocol("its NarHash is not SHA-256".into()),
                )
            })?;
        if self.check_signatures {
            let fp = fingerprint(&n.info.path, &sha, n.info.nar_size, &n.info.references);
            let signed = self.trusted.iter().any(|k| {
                n.info
                    .signatures
                    .iter()
                    .take(crate::ingest::write_policy::MAX_SIGNATURES)
                    .any(|(name, sig)| k.verifies_raw(&fp, name, sig))
            });
            if !signed {
                let names: Vec<&str> = self.trusted.iter().map(|k| k.name.as_str()).collect();
                return Err(self.refuse(
                    hash,
                    &path,
                    Error::Untrusted(format!(
                        "its narinfo has no valid signature by a trusted key ({}) over its \
                         NarHash, NarSize and references",
                        names.join(", ")
                    )),
                ));
            }
        }
        let Some(compression) = Compression::from_narinfo(&n.compression) else {
            return Err(self.refuse(
                hash,
                &path,
                Error::Protocol(format!(
                    "Compression: {:?} (none, xz, zstd or bzip2)",
                    n.compression
                )),
            ));
        };
        let cache = self.cache()?;
        let room = cache.max_bytes();
        if n.info.nar_size > room {
            return Err(self.refuse(
                hash,
                &path,
                Error::ResourceExhausted(format!(
                    "its NAR is {} bytes, more than the whole cache ({room} bytes)",
                    n.info.nar_size
                )),
            ));
        }
        // a place among the NARs read in at once
        let _turn = tokio::time::timeout(self.idle, self.ingests.acquire())
            .await
            .map_err(|_| {
                self.fail(
                    &path,
                    Error::Timeout(format!(
                        "{} NARs were being read in for {:?}",
                        super::NAR_INGESTS,
                        self.idle
                    )),
                )
            })?
            .map_err(|_| Error::Fetch("shutting down".into()))?;
        let Some(body) = self.source.stream(&n.url).await.map_err(|e| match e {
            e @ Error::Protocol(_) => self.refuse(hash, &path, e),
            e => e,
        })?
        else {
            return Err(self.refuse(
                hash,
                &path,
                Error::Protocol(format!("its NAR {} is not in the cache", n.url)),
            ));
        };
        let stage = cache.stage()?;
        let max = max_carried(n.info.nar_size, compression);
        let carried = Arc::new(AtomicU64::new(0));
        let seen = carried.clone();
        let raw = crate::nar::Metered::new(
            tokio_util::io::StreamReader::new(body),
            move |got: &[u8]| {
                let now = seen.fetch_add(got.len() as u64, Relaxed) + got.len() as u64;
                if now > max {
                    return Err(TooLarge::io(format!(
                        "the NAR file carries more than {max} bytes"
                    )));
                }
                Ok(())
            },
        );
        // the bytes carried so far, told to those waiting for this path
        let (staged, limits) = (
            stage.store(),
            Limits {
                nar_size: n.info.nar_size,
                uploads: self.uploads.clone(),
                ..Default::default()
            },
        );
        let ingest = crate::ingest::ingest_nar_within(
            decoder(compression, tokio::io::BufReader::new(raw)),
            &staged,
            &limits,
        );
        tokio::pin!(ingest);
        // progress (bytes arrived since the last look) is told to those
        // waiting for this path; the whole NAR has a deadline besides
        let tick = self.idle / 4;
        let deadline = tokio::time::Instant::now()
            + self.idle
            + Duration::from_secs(n.info.nar_size / MIN_RATE);
        let mut told = 0;
        let ingested = loop {
            match tokio::time::timeout(tick, &mut ingest).await {
                Ok(r) => break r,
                Err(_) => {
                    let now = carried.load(Relaxed);
                    if now != told {
                        told = now;
                        progress(now);
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(self.fail(
                            &path,
                            Error::Timeout(format!(
                                "its NAR {} did not arrive at {} KiB/s ({now} of {} bytes so far)",
                                n.url,
                                MIN_RATE >> 10,
                                n.info.nar_size
                            )),
                        ));
                    }
                }
            }
        };
        let ingested = ingested.map_err(|e| match e {
            // the transfer failed: nothing is said about the NAR
            Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                self.fail(&path, Error::Timeout(io.to_string()))
            }
            Error::Io(io) if TooLarge::of(&io).is_none() && !is_decoding(&io) => {
                self.fail(&path, Error::Fetch(format!("its NAR {}: {io}", n.url)))
            }
            e @ (Error::Timeout(_) | Error::Fetch(_)) => self.fail(&path, e),
            Error::Io(io) => self.refuse(
                hash,
                &path,
                Error::Protocol(format!("its NAR {}: {io}", n.url)),
            ),
            e => self.refuse(hash, &path, e),
        })?;
        let info = PathInfo::from_nix(&n.info, ingested)
            .map_err(|e| self.refuse(hash, &path, Error::Protocol(e.to_string())))?;
        let moved = stage.commit().await?;
        let (blobs, dirs) = (moved.blobs.len(), moved.directories.len());
        let stats = cache.stats();
        stats.upstream_paths.fetch_add(1, Relaxed);
        stats
            .upstream_carried_bytes
            .fetch_add(carried.load(Relaxed), Relaxed);
        self.record_origins(*hash, moved).await;
        tracing::info!(
            "{}: fetched {path}: {} NAR bytes, {} bytes carried, {} new blobs, {} new directories",
            self.what,
            info.nar_size,
            carried.load(Relaxed),
            blobs,
            dirs
        );
        Ok(Some(info))
    }
}
