//! Nix's HTTP binary cache protocol over the store, a transport edge like
//! the gRPC server: `nix copy --to http://...` fills the store, and Nix
//! substitutes from it. NARs are rendered from the castore as they are
//! sent (bounded memory) and ingested as they arrive; a narinfo is accepted
//! only for a NAR already received whose hash and size it names, whose
//! references exist, and (with trusted keys) that a trusted key signed.
//! What a client can make it hold is bounded before any signature is
//! looked at: connections ([`crate::serve::http_conn`]), uploads and renders at
//! once, each upload's decoder memory, NAR size and directory listings
//! (refused with 413 and the limit named), and the files held for blob
//! uploads in flight (one budget for all uploads together).
use crate::ingest::Ingested;
use crate::nix::narinfo::NarInfo;
use crate::nix::path_info::PathInfo;
use crate::nix::path_info_json::NixPathInfo;
use crate::nix::signing::{fingerprint, SecretKey};
use crate::store::{Error, Store};
use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// NARs received and not yet named by a narinfo: at most this many, for
/// at most an hour.
const MAX_PENDING: usize = 1024;
const PENDING_FOR: Duration = Duration::from_secs(3600);
/// Largest narinfo accepted.
const MAX_NARINFO: usize = 1 << 20;
/// NAR uploads ingested at once; more wait for a turn. Each may hold a
/// decoder (at most 128 MiB) and directory listings (~150 MiB at most),
/// so four stay within the daemon unit's 2 GiB; their blob uploads in
/// flight share one budget (`ingest::uploads`, 64 MiB of files together).
const MAX_UPLOADS: usize = 4;
/// Longest wait for a turn (an upload, a render) before the request is
/// refused with 503 and Retry-After: below the connection's idle timeout.
const TURN_WAIT: Duration = Duration::from_secs(10);
/// Bytes a compressed upload may carry beyond the largest NAR: framing
/// of a stream that does not compress (xz and zstd add well under 1%).
const COMPRESSED_SLACK: u64 = 1 << 20;
/// The default of `--max-nar-size`: the largest NARs in nixpkgs (CUDA,
/// TeX Live) are a few GiB.
pub const DEFAULT_MAX_NAR_SIZE: u64 = 16 << 30;
/// The default of `--max-nar-renders`.
pub const DEFAULT_NAR_RENDERS: usize = 4;
/// The default of `--http-max-connections`: Nix opens 25 per client.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

type Body = BoxBody<Bytes, std::io::Error>;

/// What the binary cache answers with and accepts.
pub struct Options {
    pub writable: bool,
    /// Signs every narinfo served.
    pub signer: Option<SecretKey>,
    /// The store's write policy (the store given is already behind it):
    /// told of the NARs an upload hashed, so it need not render them again.
    pub policy: Arc<crate::ingest::write_policy::WritePolicy>,
    /// `Priority:` in nix-cache-info (lower is preferred; cache.nixos.org
    /// has 40).
    pub priority: u32,
    /// Uploads are refused while this directory's disk has less room.
    pub min_free: Option<(std::path::PathBuf, u64)>,
    /// Where the NAR URLs of accepted narinfos are kept across restarts
    /// (in memory when `None`): see [`crate::serve::nar_urls`].
    pub nar_urls: Option<std::path::PathBuf>,
    pub limits: Limits,
}

/// What clients may make the binary cache hold at once.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once (more are answered 503 and closed).
    pub max_connections: usize,
    /// Largest NAR (uncompressed) an upload may carry.
    pub max_nar_size: u64,
    /// Turns to render a NAR (GET /nar), shared with the gRPC server's
    /// CalculateNAR: each walk may hold a tree of up to 512 MiB.
    pub renders: Arc<tokio::sync::Semaphore>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_nar_size: DEFAULT_MAX_NAR_SIZE,
            renders: Arc::new(tokio::sync::Semaphore::new(DEFAULT_NAR_RENDERS)),
        }
    }
}

pub struct BinaryCache {
    store: Store,
    opts: Options,
    pending: Mutex<HashMap<String, (Ingested, Instant)>>,
    /// NAR URLs that clients chose, by the name after `nar/`.
    nar_urls: crate::serve::nar_urls::NarUrls,
    uploads: tokio::sync::Semaphore,
    /// Blob uploads in flight of every NAR upload together.
    blob_uploads: crate::ingest::uploads::UploadBudget,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.into()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

fn refuse(status: StatusCode, why: impl std::fmt::Display) -> Response<Body> {
    tracing::info!("binary cache: {status}: {why}");
    text(status, format!("{why}\n"))
}

/// 503 with a Retry-After: every turn for `what` is taken.
fn busy(what: &str) -> Response<Body> {
    let mut r = refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "every turn to {what} is taken and none came free within {} s: retry later",
            TURN_WAIT.as_secs()
        ),
    );
    r.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from_static("10"),
    );
    r
}

/// A turn from `turns`, waited for at most [`TURN_WAIT`].
async fn turn<T>(turns: T) -> Option<T::Output>
where
    T: std::future::IntoFuture,
{
    tokio::time::timeout(TURN_WAIT, turns).await.ok()
}

/// The store path hash of `<hash>.narinfo` or `nar/<hash>.nar...`.
fn hash_part(s: &str) -> Option<[u8; 20]> {
    if s.len() != 32 {
        return None;
    }
    crate::nix::nixbase32::decode_fixed::<20>(s.as_bytes()).ok()
}

impl BinaryCache {
    pub fn new(store: Store, opts: Options) -> Self {
        Self {
            nar_urls: crate::serve::nar_urls::NarUrls::new(opts.nar_urls.clone()),
            store,
            opts,
            pending: Mutex::new(HashMap::new()),
            uploads: tokio::sync::Semaphore::new(MAX_UPLOADS),
            blob_uploads: Default::default(),
        }
    }

    pub async fn handle(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let head = req.method() == Method::HEAD;
        let r = match (req.method().clone(), path.as_str()) {
            (Method::GET | Method::HEAD, "/nix-cache-info") => Ok(text(
                StatusCode::OK,
                format!(
                    "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
                    crate::nix::STORE_DIR,
                    self.opts.priority
                ),
            )),
            (Method::GET | Method::HEAD, p) if p.ends_with(".narinfo") => self.narinfo(p).await,
            (Method::GET | Method::HEAD, p) if p.starts_with("/nar/") => self.nar(p, head).await,
            (Method::PUT, _) if !self.opts.writable => Ok(refuse(
                StatusCode::FORBIDDEN,
                "read-only binary cache (daemon --http-writable accepts uploads)",
            )),
            (Method::PUT, "/nix-cache-info") => Ok(text(StatusCode::OK, "")),
            (Method::PUT, p) if p.starts_with("/nar/") => self.put_nar(p, req).await,
            (Method::PUT, p) if p.ends_with(".narinfo") => self.put_narinfo(p, req).await,
            (Method::GET | Method::HEAD | Method::PUT, _) => {
                Ok(text(StatusCode::NOT_FOUND, "not found\n"))
            }
            _ => Ok(text(StatusCode::METHOD_NOT_ALLOWED, "")),
        };
        let mut r = r.unwrap_or_else(|e| {
            tracing::error!("binary cache {path}: {e}");
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        });
        if head {
            *r.body_mut() = Full::new(Bytes::new()).map_err(|e| match e {}).boxed();
        }
        r
    }

    async fn info(&self, hash: &str) -> Result<Option<PathInfo>, Error> {
        let Some(digest) = hash_part(hash) else {
            return Ok(None);
        };
        self.store.path_info.get(&digest).await
    }

    async fn narinfo(&self, p: &str) -> Result<Response<Body>, Error> {
        let hash = p.trim_start_matches('/').trim_end_matches(".narinfo");
        let Some(info) = self.info(hash).await? else {
            return Ok(text(StatusCode::NOT_FOUND, "no such store path\n"));
        };
        let n = nix_info(&info)?;
        let mut sigs: Vec<String> = n
            .signatures
            .iter()
            .map(|(k, v)| format!("{k}:{}", data_encoding::BASE64.encode(v)))
            .collect();
        if let Some(s) = &self.opts.signer {
            let fp = fingerprint(&n.path, &info.nar_sha256, n.nar_size, &n.references);
            sigs.retain(|x| !x.starts_with(&format!("{}:", s.name)));
            sigs.push(s.sign(&fp));
        }
        let body = NarInfo {
            info: n,
            url: format!("nar/{hash}.nar"),
            compression: "none".into(),
            sigs,
        }
        .render();
        let mut r = text(StatusCode::OK, body);
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/x-nix-narinfo"),
        );
        Ok(r)
    }

    async fn nar(&self, p: &str, head: bool) -> Result<Response<Body>, Error> {
        let name = p.trim_start_matches("/nar/");
        let (hash, compression) = match name.split_once(".nar") {
            Some((h, "")) => (h, None),
            Some((h, ".zst")) => (h, Some("zst")),
            Some((h, ".xz")) => (h, Some("xz")),
            _ => return Ok(text(StatusCode::NOT_FOUND, "not found\n")),
        };
        // A name a client chose for its upload (Nix keeps its narinfo and
        // asks for that name again) serves the path it was accepted for.
        let chosen = match hash_part(hash) {
            Some(_) => None,
            None => self.nar_urls.get(name).await,
        };
        let hash = chosen.as_deref().unwrap_or(hash);
        let Some(info) = self.info(hash).await? else {
            return Ok(text(StatusCode::NOT_FOUND, "no such store path\n"));
        };
        if head {
            return Ok(text(StatusCode::OK, ""));
        }
        let Some(Ok(permit)) = turn(self.opts.limits.renders.clone().acquire_owned()).await else {
            return Ok(busy("render a NAR"));
        };
        // Rendered into a pipe as the client reads: memory stays at the
        // pipe's size, whatever the NAR's.
        let (w, r) = tokio::io::duplex(256 << 10);
        let store = self.store.clone();
        let path = info.store_path.clone();
        tokio::spawn(async move {
            // the turn ends with the render, not with the handler
            let _permit = permit;
            let done = match compression {
                None => render(w, &info, &store).await,
                Some("zst") => {
                    render(
                        async_compression::tokio::write::ZstdEncoder::new(w),
                        &info,
                        &store,
                    )
                    .await
                }
                Some(_) => {
                    // preset 3 (4 MiB dictionary, ~32 MiB to compress) rather
                    // than the default 6 (~94 MiB) for every reader at once
                    render(
                        async_compression::tokio::write::XzEncoder::with_quality(
                            w,
                            async_compression::Level::Precise(3),
                        ),
                        &info,
                        &store,
                    )
                    .await
                }
            };
            if let Err(e) = done {
                // the client sees a cut NAR, which fails its hash check
                tracing::error!("binary cache: NAR of {path}: {e}");
            }
        });
        let stream = tokio_util::io::ReaderStream::with_capacity(r, 64 << 10)
            .map_ok(hyper::body::Frame::data);
        let mut resp = Response::new(http_body_util::StreamBody::new(stream).boxed());
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-nix-nar"),
        );
        Ok(resp)
    }

    fn check_room(&self) -> Option<Response<Body>> {
        let (dir, min) = self.opts.min_free.as_ref()?;
        match crate::host::free_space::free_bytes(dir) {
            Ok(free) if free < *min => Some(refuse(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "the store's disk has {} MiB free, below the {} MiB kept free",
                    free >> 20,
                    min >> 20
                ),
            )),
            Ok(_) => None,
            Err(e) => Some(refuse(StatusCode::INTERNAL_SERVER_ERROR, e)),
        }
    }

    /// A NAR, compressed as its name says, ingested as it arrives; kept
    /// aside until a narinfo names it.
    async fn put_nar(
        &self,
        p: &str,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, Error> {
        if let Some(r) = self.check_room() {
            return Ok(r);
        }
        let url = p.trim_start_matches('/').to_string();
        use crate::nar::decode::{Compression, TooLarge};
        let named = [".nar", ".nar.xz", ".nar.zst"]
            .iter()
            .any(|e| url.ends_with(e));
        let compression = match Compression::from_name(&url) {
            Some(c) if named => c,
            _ => {
                return Ok(refuse(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("{url}: a NAR is .nar, .nar.xz or .nar.zst"),
                ))
            }
        };
        let max_nar = self.opts.limits.max_nar_size;
        // what may arrive: the NAR, or its compressed form with framing
        let max_body = match compression {
            Compression::None => max_nar,
            _ => max_nar.saturating_add(max_nar / 64 + COMPRESSED_SLACK),
        };
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body) {
            return Ok(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{url}: {} bytes, over the {max_body} bytes a NAR upload may carry \
                     (--max-nar-size {max_nar})",
                    declared.unwrap_or_default()
                ),
            ));
        }
        let Some(Ok(_turn)) = turn(self.uploads.acquire()).await else {
            return Ok(busy("upload a NAR"));
        };
        let body = http_body_util::BodyStream::new(req.into_body())
            .try_filter_map(|f| futures::future::ready(Ok(f.into_data().ok())))
            .map_err(std::io::Error::other);
        let mut carried = 0u64;
        let raw = crate::nar::Metered::new(
            tokio_util::io::StreamReader::new(body),
            move |got: &[u8]| {
                carried += got.len() as u64;
                if carried > max_body {
                    return Err(TooLarge::io(format!(
                        "the upload carries more than {max_body} bytes (--max-nar-size {max_nar})"
                    )));
                }
                Ok(())
            },
        );
        let full = Arc::new(AtomicBool::new(false));
        let input = crate::nar::Metered::new(
            crate::nar::decode::decoder(compression, tokio::io::BufReader::new(raw)),
            room_check(self.opts.min_free.clone(), full.clone()),
        );
        let limits = crate::ingest::nar::Limits {
            nar_size: max_nar,
            uploads: self.blob_uploads.clone(),
            ..Default::default()
        };
        let ingested = crate::ingest::ingest_nar_within(input, &self.store, &limits).await;
        let ingested = match ingested {
            Ok(i) => i,
            Err(e) if full.load(Ordering::Relaxed) => {
                return Ok(refuse(
                    StatusCode::INSUFFICIENT_STORAGE,
                    format!("{url}: {e}"),
                ))
            }
            Err(Error::ResourceExhausted(why)) => {
                return Ok(refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("{url}: refused: {why}"),
                ))
            }
            Err(e) => return Ok(refuse(StatusCode::BAD_REQUEST, format!("{url}: {e}"))),
        };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, (_, at)| at.elapsed() < PENDING_FOR);
        while pending.len() >= MAX_PENDING {
            let oldest = pending
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => pending.remove(&k),
                None => break,
            };
        }
        pending.insert(url, (ingested, Instant::now()));
        Ok(text(StatusCode::OK, ""))
    }

    /// A narinfo for a NAR received before: checked against it, its
    /// references and the trusted keys, then the store path is added.
    async fn put_narinfo(
        &self,
        p: &str,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, Error> {
        let hash = p
            .trim_start_matches('/')
            .trim_end_matches(".narinfo")
            .to_string();
        let body = match http_body_util::Limited::new(req.into_body(), MAX_NARINFO)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => return Ok(refuse(StatusCode::BAD_REQUEST, format!("narinfo: {e}"))),
        };
        let Ok(text_body) = std::str::from_utf8(&body) else {
            return Ok(refuse(StatusCode::BAD_REQUEST, "narinfo: not UTF-8"));
        };
        let n = match NarInfo::parse(text_body) {
            Ok(n) => n,
            Err(e) => return Ok(refuse(StatusCode::BAD_REQUEST, format!("narinfo: {e}"))),
        };
        let path = n.info.path.clone();
        if path.to_basename().get(..32) != Some(hash.as_str()) {
            return Ok(refuse(
                StatusCode::BAD_REQUEST,
                format!("{hash}.narinfo describes {path}"),
            ));
        }
        // Refused before its NAR is taken: the write policy checks again
        // (and alone decides) when the path info is put.
        if !self.opts.policy.is_open() {
            let Some(h) = nar_sha256(&n.info) else {
                return Ok(refuse(StatusCode::BAD_REQUEST, "NarHash is not SHA-256"));
            };
            let sigs = &mut n
                .info
                .signatures
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()));
            let signer =
                (self.opts.policy).signer_of(&path, &h, n.info.nar_size, &n.info.references, sigs);
            if signer.is_none() {
                return Ok(refuse(
                    StatusCode::FORBIDDEN,
                    format!("{path}: no signature by a trusted key (--trusted-public-keys)"),
                ));
            }
        }
        for r in &n.info.references {
            if *r == path {
                continue;
            }
            let there = self.store.path_info.get(r.digest()).await?;
            if there.is_none_or(|i| i.store_path != *r) {
                return Ok(refuse(
                    StatusCode::BAD_REQUEST,
                    format!("{path}: its reference {r} is not in the store (upload it first)"),
                ));
            }
        }
        let url = n.url.trim_start_matches('/').to_string();
        let ingested = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&url);
        let Some((ingested, _)) = ingested else {
            return Ok(refuse(
                StatusCode::BAD_REQUEST,
                format!("{path}: its NAR {url} was not uploaded (PUT it first)"),
            ));
        };
        let info = match PathInfo::from_nix(&n.info, ingested) {
            Ok(i) => i,
            Err(e) => return Ok(refuse(StatusCode::BAD_REQUEST, e)),
        };
        // Hashed here as it was ingested and checked against the narinfo.
        self.opts
            .policy
            .vouch(&info.node, info.nar_size, info.nar_sha256);
        match self.store.path_info.put(info).await {
            Ok(_) => {
                tracing::info!("binary cache: added {path}");
                if let Some(name) = url.strip_prefix("nar/") {
                    self.nar_urls.put(name, &hash).await;
                }
                Ok(text(StatusCode::OK, ""))
            }
            Err(Error::Conflict(m)) => Ok(refuse(StatusCode::CONFLICT, m)),
            Err(Error::Untrusted(m)) => Ok(refuse(StatusCode::FORBIDDEN, m)),
            Err(e) => Err(e),
        }
    }
}

/// The SHA-256 digest of a narinfo's NarHash.
fn nar_sha256(n: &NixPathInfo) -> Option<[u8; 32]> {
    (n.nar_hash.algo() == crate::nix::hash::HashAlgo::Sha256)
        .then(|| n.nar_hash.digest().try_into().ok())
        .flatten()
}

async fn render<W: tokio::io::AsyncWrite + Unpin + Send>(
    mut w: W,
    info: &PathInfo,
    store: &Store,
) -> Result<(), Error> {
    use tokio::io::AsyncWriteExt;
    crate::ingest::write_nar(&mut w, &info.node, store).await?;
    w.shutdown().await?;
    Ok(())
}

/// A stored path info as Nix describes it.
fn nix_info(i: &PathInfo) -> Result<NixPathInfo, Error> {
    use crate::nix::hash::{ContentAddress, HashAlgo, NixHash};
    let bad = |e: crate::nix::hash::HashError| Error::Protocol(format!("{}: {e}", i.store_path));
    Ok(NixPathInfo {
        path: i.store_path.clone(),
        nar_hash: NixHash::new(HashAlgo::Sha256, i.nar_sha256.to_vec()).map_err(bad)?,
        nar_size: i.nar_size,
        references: i.references.clone(),
        deriver: i.deriver.clone(),
        ca: i
            .ca
            .as_ref()
            .map(|c| ContentAddress::parse(&c.to_nix_string()))
            .transpose()
            .map_err(bad)?,
        signatures: i
            .signatures
            .iter()
            .map(|s| (s.name.clone(), s.data.to_vec()))
            .collect(),
    })
}

/// Serves the binary cache on `listener` until the runtime ends, within
/// its connection limit.
pub fn serve(listener: tokio::net::TcpListener, cache: Arc<BinaryCache>) {
    let gate =
        crate::serve::http_conn::Gate::new("binary cache", cache.opts.limits.max_connections);
    tokio::spawn(async move {
        loop {
            let (s, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("binary cache: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = s.set_nodelay(true);
            let cache = cache.clone();
            gate.serve(s, move |req| cache.clone().handle(req));
        }
    });
}

/// The check on a NAR upload as it unpacks: stopped once the store's disk
/// is down to the room kept free (looked at every [`FREE_CHECK_EVERY`]
/// bytes), `full` set; the check at the start alone let one endless upload
/// fill the disk.
///
/// [`FREE_CHECK_EVERY`]: crate::host::free_space::FREE_CHECK_EVERY
fn room_check(
    min_free: Option<(std::path::PathBuf, u64)>,
    full: Arc<AtomicBool>,
) -> impl FnMut(&[u8]) -> std::io::Result<()> + Unpin {
    let mut since_check = 0u64;
    move |got: &[u8]| {
        since_check += got.len() as u64;
        if since_check < crate::host::free_space::FREE_CHECK_EVERY {
            return Ok(());
        }
        since_check = 0;
        let Some((dir, min)) = &min_free else {
            return Ok(());
        };
        let free = crate::host::free_space::free_bytes(dir)?;
        if free < *min {
            full.store(true, Ordering::Relaxed);
            return Err(std::io::Error::other(format!(
                "the store's disk has {} MiB free, below the {} MiB kept free",
                free >> 20,
                min >> 20
            )));
        }
        Ok(())
    }
}
