//! Plain HTTP servers for tests that need an upstream which is not ours:
//! [`StaticServer`], a static file server over a directory that honours
//! `Range: bytes=…` (as S3, nginx and most CDNs do, and as Python's
//! `http.server` does not) and logs every request's path, range and the
//! bytes it sent; and [`BlackHole`], a TCP listener that accepts and never
//! answers (a hung server).
//!
//! Standard library only, one thread per connection, HTTP/1.1 keep-alive.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One request as [`StaticServer`] logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    /// The request target's path, percent-decoded, without the query.
    pub path: String,
    /// The `Range` header as sent (`bytes=0-99`), if any.
    pub range: Option<String>,
    /// The byte range served, first and last inclusive (206 answers only).
    pub served: Option<(u64, u64)>,
    pub status: u16,
    /// Body bytes sent (0 for HEAD).
    pub bytes: u64,
}

/// How a [`StaticServer`] answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Whole files (200) are sent with `Transfer-Encoding: chunked` and no
    /// `Content-Length`, as servers that stream NARs (ours, harmonia,
    /// nix-serve) send them; ranges (206) still carry a length.
    pub chunked: bool,
}

struct Shared {
    root: PathBuf,
    opts: Options,
    log: Mutex<std::fs::File>,
    stop: AtomicBool,
    /// Open connections by number, shut down when the server stops.
    conns: Mutex<std::collections::HashMap<usize, TcpStream>>,
    next: AtomicUsize,
}

/// A static file server over `root` on 127.0.0.1 (a port of its own). Its
/// log file has one line per request:
/// `GET /nar/x.nar range=bytes=0-99 served=0-99 status=206 bytes=100`
/// (`range=-`, `served=-` when there are none). Stops, closing every
/// connection, on drop.
pub struct StaticServer {
    /// HOST:PORT
    pub addr: String,
    pub log: PathBuf,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl StaticServer {
    /// Serves the files under `root`, logging to `log` (created anew).
    pub fn start(root: &Path, log: &Path) -> StaticServer {
        Self::start_with(root, log, Options::default())
    }

    /// As [`StaticServer::start`], answering as `opts` say.
    pub fn start_with(root: &Path, log: &Path, opts: Options) -> StaticServer {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the static server");
        let addr = l.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            opts,
            log: Mutex::new(std::fs::File::create(log).expect("create the server log")),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Default::default()),
            next: AtomicUsize::new(0),
        });
        let acceptor = std::thread::spawn({
            let shared = shared.clone();
            move || {
                for c in l.incoming() {
                    if shared.stop.load(SeqCst) {
                        return;
                    }
                    let Ok(c) = c else { continue };
                    let id = shared.next.fetch_add(1, SeqCst);
                    if let Ok(clone) = c.try_clone() {
                        shared.conns.lock().unwrap().insert(id, clone);
                    }
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let _ = serve_requests(&shared, c);
                        // the copy in `conns` would hold it open
                        if let Some(c) = shared.conns.lock().unwrap().remove(&id) {
                            let _ = c.shutdown(Shutdown::Both);
                        }
                    });
                }
            }
        });
        StaticServer {
            addr,
            log: log.to_path_buf(),
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://HOST:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request logged so far, in order.
    pub fn requests(&self) -> Vec<Logged> {
        parse_log(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        // wake the acceptor
        let _ = TcpStream::connect(&self.addr);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for (_, c) in self.shared.conns.lock().unwrap().drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// The lines of a [`StaticServer`] log.
pub fn parse_log(text: &str) -> Vec<Logged> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut it = l.split(' ');
            let method = it.next().unwrap().to_string();
            let path = it.next().unwrap().replace("%20", " ");
            let mut range = None;
            let mut served = None;
            let mut status = 0;
            let mut bytes = 0;
            for f in it {
                let (k, v) = f.split_once('=').unwrap();
                match k {
                    "range" if v != "-" => range = Some(v.replace("%20", " ")),
                    "served" if v != "-" => {
                        let (a, b) = v.split_once('-').unwrap();
                        served = Some((a.parse().unwrap(), b.parse().unwrap()));
                    }
                    "status" => status = v.parse().unwrap(),
                    "bytes" => bytes = v.parse().unwrap(),
                    _ => {}
                }
            }
            Logged {
                method,
                path,
                range,
                served,
                status,
                bytes,
            }
        })
        .collect()
}

/// `%XX` escapes decoded; anything malformed kept as it is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The inclusive byte range a `Range` value asks of a `len`-byte file:
/// `Ok(None)` to serve it whole (no range, several ranges, or a unit other
/// than bytes: a server may ignore those), `Err(())` when unsatisfiable.
fn pick_range(value: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = value else { return Ok(None) };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (first, last) = if a.is_empty() {
        // the last N bytes
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 || len == 0 {
            return Err(());
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let first: u64 = a.parse().map_err(|_| ())?;
        let last = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().map_err(|_| ())?.min(len.saturating_sub(1))
        };
        (first, last)
    };
    if first >= len || last < first {
        return Err(());
    }
    Ok(Some((first, last)))
}

/// Serves requests on `c` until either side closes it.
fn serve_requests(shared: &Shared, c: TcpStream) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = c.try_clone()?;
    let mut r = BufReader::new(c);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || shared.stop.load(SeqCst) {
            return Ok(());
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("/").to_string();
        let version = parts.next().unwrap_or("HTTP/1.0").to_string();
        let mut range = None;
        let mut length = 0u64;
        let mut close = version != "HTTP/1.1";
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((k, v)) = h.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.to_ascii_lowercase().as_str() {
                "range" => range = Some(v.to_string()),
                "content-length" => length = v.parse().unwrap_or(0),
                "connection" => {
                    let v = v.to_ascii_lowercase();
                    if v.contains("close") {
                        close = true;
                    } else if v.contains("keep-alive") {
                        close = false;
                    }
                }
                _ => {}
            }
        }
        // a body nobody asked for is read and dropped
        std::io::copy(&mut (&mut r).take(length), &mut std::io::sink())?;

        let path = percent_decode(target.split('?').next().unwrap_or("/"));
        let file = (!path.split('/').any(|c| c == ".."))
            .then(|| shared.root.join(path.trim_start_matches('/')))
            .filter(|f| f.is_file());
        let head = method == "HEAD";
        let (status, served, sent) = match (method.as_str(), file) {
            ("GET" | "HEAD", Some(f)) => {
                let mut fh = std::fs::File::open(&f)?;
                let len = fh.metadata()?.len();
                match pick_range(range.as_deref(), len) {
                    Ok(None) if shared.opts.chunked => {
                        write!(
                            w,
                            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n{}\r\n",
                            if close { "Connection: close\r\n" } else { "" }
                        )?;
                        let mut n = 0;
                        let mut buf = vec![0; 64 << 10];
                        // the last chunk is the empty one
                        let mut more = !head;
                        while more {
                            let got = fh.read(&mut buf)?;
                            write!(w, "{got:x}\r\n")?;
                            w.write_all(&buf[..got])?;
                            w.write_all(b"\r\n")?;
                            n += got as u64;
                            more = got > 0;
                        }
                        (200, None, n)
                    }
                    Ok(None) => {
                        write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n{}\r\n",
                            if close { "Connection: close\r\n" } else { "" }
                        )?;
                        let n = if head {
                            0
                        } else {
                            std::io::copy(&mut fh, &mut w)?
                        };
                        (200, None, n)
                    }
                    Ok(Some((a, b))) => {
                        use std::io::Seek;
                        let n = b - a + 1;
                        write!(
                            w,
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {n}\r\nContent-Range: bytes {a}-{b}/{len}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n{}\r\n",
                            if close { "Connection: close\r\n" } else { "" }
                        )?;
                        let sent = if head {
                            0
                        } else {
                            fh.seek(std::io::SeekFrom::Start(a))?;
                            std::io::copy(&mut (&mut fh).take(n), &mut w)?
                        };
                        (206, Some((a, b)), sent)
                    }
                    Err(()) => {
                        write!(
                            w,
                            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n{}\r\n",
                            if close { "Connection: close\r\n" } else { "" }
                        )?;
                        (416, None, 0)
                    }
                }
            }
            ("GET" | "HEAD", None) => {
                let body: &[u8] = if head { b"" } else { b"not found\n" };
                write!(
                    w,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nContent-Type: text/plain\r\n{}\r\n",
                    if close { "Connection: close\r\n" } else { "" }
                )?;
                w.write_all(body)?;
                (404, None, body.len() as u64)
            }
            _ => {
                write!(
                    w,
                    "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )?;
                close = true;
                (405, None, 0)
            }
        };
        w.flush()?;
        {
            let served = served.map_or("-".to_string(), |(a, b)| format!("{a}-{b}"));
            let range = range.as_deref().unwrap_or("-").replace(' ', "%20");
            let mut log = shared.log.lock().unwrap();
            writeln!(
                log,
                "{method} {} range={range} served={served} status={status} bytes={sent}",
                path.replace(' ', "%20")
            )?;
            log.flush()?;
        }
        if close {
            return Ok(());
        }
    }
}

/// A TCP listener on 127.0.0.1 that accepts connections and never answers
/// nor closes them (until dropped): a hung server.
pub struct BlackHole {
    /// HOST:PORT
    pub addr: String,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl BlackHole {
    pub fn start() -> BlackHole {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the black hole");
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let acceptor = std::thread::spawn({
            let (accepted, stop, held) = (accepted.clone(), stop.clone(), held.clone());
            move || {
                for c in l.incoming() {
                    if stop.load(SeqCst) {
                        return;
                    }
                    if let Ok(c) = c {
                        accepted.fetch_add(1, SeqCst);
                        held.lock().unwrap().push(c);
                    }
                }
            }
        });
        BlackHole {
            addr,
            accepted,
            stop,
            held,
            acceptor: Some(acceptor),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for c in self.held.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}
