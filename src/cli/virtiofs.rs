//! `virtiofs`: the vhost-user virtio-fs daemon, one per microVM. It serves
//! the store view to the one VMM that connects, and exits 0 when the VMM
//! disconnects or on SIGTERM/SIGINT, removing the socket it created.
//!
//! Order matters: the socket is opened, the sandbox entered (a fork: no
//! thread may exist yet), the rlimit set, capabilities dropped, seccomp
//! installed, and only then the runtime and the worker threads start.
use super::args::StoreArgs;
use crate::host::privileges;
use crate::host::sandbox::{self, Needs, Place, Places, Role, SandboxMode};
use crate::host::seccomp::{self, SeccompAction};
use crate::host::socket::{self, SocketFile};
use crate::serve::vhost_user::{self, DeviceConfig, MAX_REQUEST_QUEUES};
use crate::store::cache::{self, CacheOptions};
use crate::store::{Addr, Store, StoreOptions};
use anyhow::{anyhow, bail, Context};
use clap::Args;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct VirtiofsArgs {
    /// vhost-user socket to create and listen on; a stale socket there is
    /// replaced, and removed again on exit.
    #[arg(long, conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Serve an already listening vhost-user unix socket inherited as this
    /// file descriptor instead (without either option: the socket passed
    /// by systemd socket activation).
    #[arg(long)]
    pub fd: Option<RawFd>,

    /// Tag the guest mounts the file system by (at most 36 bytes).
    #[arg(long, default_value = "nix-store", value_parser = parse_tag)]
    pub tag: String,

    /// Most worker threads serving requests that wait for the store, so one
    /// slow fetch does not stall the others (started as needed, idle ones
    /// exit).
    #[arg(long, default_value_t = default_pool_size(), value_parser = clap::value_parser!(u16).range(1..))]
    pub thread_pool_size: u16,

    /// Longest a request queue's thread looks for the guest's next request
    /// before sleeping, in microseconds (adaptive: only while requests come
    /// one at a time and follow each other closely; 0: never poll).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub poll_max_us: u32,

    /// Request queues offered besides the high-priority queue (the VMM
    /// may use fewer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=MAX_REQUEST_QUEUES as i64))]
    pub request_queues: u8,

    /// Group (name or gid) given access to the socket created by
    /// --socket-path: mode 0660 instead of 0600.
    #[arg(long, requires = "socket_path")]
    pub socket_group: Option<String>,

    /// Serve Prometheus metrics (GET /metrics) on this unix socket, made
    /// 0600 before the sandbox closes: FUSE requests by opcode with
    /// latency, errors by errno, bytes read, store calls, the host cache.
    #[arg(long, value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,

    /// Print the backend's capabilities as JSON (vhost-user backend
    /// conventions, for libvirt) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Confinement of the serving process: namespace (new namespaces and an
    /// empty read-only root), chroot (no namespaces), or none (debugging).
    #[arg(long, value_enum, env = "TVIX_VIRTIOFSD_SANDBOX", default_value_t = SandboxMode::Namespace)]
    pub sandbox: SandboxMode,

    /// What a system call outside the seccomp policy does: kill the
    /// process, log it, trap (SIGSYS), or none (no filter).
    #[arg(long, value_enum, env = "TVIX_VIRTIOFSD_SECCOMP", default_value_t = SeccompAction::Kill)]
    pub seccomp: SeccompAction,

    /// Maximum number of open files [default: raise the soft limit to the
    /// hard limit].
    #[arg(long)]
    pub rlimit_nofile: Option<u64>,

    /// Make a forbidden system call once confined (tests the policy).
    #[arg(long, hide = true)]
    pub selftest_seccomp: bool,

    #[command(flatten)]
    pub view: super::args::ViewArgs,
}

/// Workers wait for the store (a remote's round trips), not for CPUs: 16,
/// or twice the CPUs on bigger hosts. Only as many as are busy exist.
fn default_pool_size() -> u16 {
    std::thread::available_parallelism()
        .map(|n| {
            u16::try_from(n.get().saturating_mul(2))
                .unwrap_or(u16::MAX)
                .max(16)
        })
        .unwrap_or(16)
}

fn parse_tag(s: &str) -> Result<String, String> {
    vhost_user::check_tag(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

/// The listening socket, and the socket file to remove if we created it.
fn listener(args: &VirtiofsArgs) -> anyhow::Result<(UnixListener, Option<SocketFile>)> {
    if let Some(fd) = args.fd {
        return Ok((socket::listener_from_fd(fd)?, None));
    }
    if let Some(path) = &args.socket_path {
        let group = args
            .socket_group
            .as_deref()
            .map(socket::group_id)
            .transpose()?;
        let (l, f) = socket::bind_socket(path, group)?;
        return Ok((l, Some(f)));
    }
    match socket::systemd_listener()? {
        Some(l) => Ok((l, None)),
        None => bail!("give --socket-path or --fd (or start under systemd socket activation)"),
    }
}

/// A pipe (read, write), both ends close-on-exec.
fn readiness_pipe() -> anyhow::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: pipe2 returned two open descriptors that nothing else owns.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// With `--closure`/`--closure-file` and `--cache-dir`, the connection to
/// the host daemon, scoped to the closure (see
/// `services::cache::scope`); `None` otherwise (single-tenant hosts keep
/// reading the cache directory directly).
fn tenant_connection(
    store_args: &StoreArgs,
    args: &VirtiofsArgs,
    addrs: &[Addr; 3],
) -> anyhow::Result<Option<std::os::unix::net::UnixStream>> {
    let view = &args.view;
    if store_args.cache_dir.is_none() || (view.closure.is_empty() && view.closure_file.is_none()) {
        return Ok(None);
    }
    let socket = match addrs {
        [Addr::GrpcUnix(a, _), Addr::GrpcUnix(b, _), Addr::GrpcUnix(c, _)] if a == b && b == c => a,
        _ => bail!(
            "a closure served from a host cache (--closure with --cache-dir) is scoped on the \
             host daemon's unix socket: give --store grpc+unix://SOCKET for all three services"
        ),
    };
    let mut roots = view
        .closure
        .iter()
        .map(|s| super::args::parse_store_path(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(f) = &view.closure_file {
        roots.extend(crate::store::closure::read_roots(f)?);
    }
    let timeout = std::time::Duration::from_secs(view.store_timeout);
    let conn = cache::tenant::connect(socket, &roots, timeout)?;
    tracing::info!(
        "connection to {} scoped to the closure of {} roots",
        socket.display(),
        roots.len()
    );
    Ok(Some(conn))
}

/// Runs the command; the exit code is the serving process's.
pub fn main(store_args: &StoreArgs, mut args: VirtiofsArgs) -> anyhow::Result<ExitCode> {
    if args.print_capabilities {
        println!("{}", vhost_user::CAPABILITIES_JSON);
        return Ok(ExitCode::SUCCESS);
    }
    sandbox::hold_signals();
    let (listener, socket_file) = listener(&args)?;
    // Bound now: inside the sandbox no socket file can be made.
    let metrics = match &args.metrics_socket {
        Some(p) => {
            let (l, f) = socket::bind_socket(p, None)
                .with_context(|| format!("metrics socket {}", p.display()))?;
            l.set_nonblocking(true)?;
            tracing::info!("metrics on unix:{}", f.path().display());
            Some((l, f))
        }
        None => None,
    };
    let (metrics, metrics_file) = match metrics {
        Some((l, f)) => (Some(l), Some(f)),
        None => (None, None),
    };
    match &socket_file {
        Some(f) => tracing::info!("listening for the VMM on {}", f.path().display()),
        None => tracing::info!("listening for the VMM on the inherited socket"),
    }
    let addrs = store_args.addrs()?;
    // A closure with a host cache: this daemon serves one tenant, and its
    // connection to the host daemon is scoped to the closure now, while
    // it is still the operator's process.
    let tenant = tenant_connection(store_args, &args, &addrs)?;
    // An embedded store is created (and tidied) here, while we may write:
    // the sandbox only ever sees it read-only.
    let local = |a: &Addr| match a {
        Addr::Local(_) => a.clone(),
        _ => Addr::Memory,
    };
    Store::open(&local(&addrs[0]), &local(&addrs[1]), &local(&addrs[2]))
        .context("opening the embedded store")?;
    // So is the cache directory: the daemon that fills it may not have run yet.
    if let Some(dir) = &store_args.cache_dir {
        crate::store::cache::create_dir(dir)
            .with_context(|| format!("creating cache directory {}", dir.display()))?;
    }
    // A tenant's serving process sees neither the cache directory nor the
    // host daemon's socket: it keeps only its scoped connection.
    let (needs, places) = Needs::of_store(&match tenant {
        Some(_) => Places {
            addrs: [Place::Nowhere, Place::Nowhere, Place::Nowhere],
            cache_dir: None,
        },
        None => Places {
            addrs: addrs.clone().map(|a| place(&a)),
            cache_dir: store_args.cache_dir.clone(),
        },
    })?;
    // The closure file is not exposed (its directory would show all of
    // it): the supervisor opens it, now and on each SIGHUP, and hands the
    // serving process the descriptor.
    let closure_sender = match &args.view.closure_file {
        Some(f) => {
            let (tx, rx) = super::closure_file::channel(f).context("closure file channel")?;
            tx.send()?;
            args.view.closure_source = Some(std::sync::Arc::new(rx));
            Some(tx)
        }
        None => None,
    };
    // Under Type=notify the serving process says when the store answered
    // (through this pipe: it may not reach systemd's socket); the
    // supervisor, systemd's main process, passes it on.
    let ready = crate::host::notify::wanted()
        .then(readiness_pipe)
        .transpose()?;
    let status = format!(
        "STATUS=serving {} to the VMM on {}, tag {}",
        addrs[0],
        socket_file
            .as_ref()
            .map_or("the inherited socket".into(), |f| f
                .path()
                .display()
                .to_string()),
        args.tag
    );
    let (role, places) = sandbox::enter(args.sandbox, &needs, places)?;
    if let Role::Supervisor(mut sup) = role {
        // The child serves; we only wait, holding nothing but the socket
        // file to remove at the end (and the closure file's path).
        drop(listener);
        drop(metrics);
        args.view.closure_source = None;
        if let Some(tx) = closure_sender {
            sup.on_hangup(Box::new(move || match tx.send() {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("SIGHUP: keeping the closure served: {e}");
                    false
                }
            }));
        }
        drop(tenant);
        if let Err(e) = privileges::drop_all(true) {
            tracing::warn!("supervisor: {e}");
        }
        let on_ready = ready.map(|(r, w)| {
            drop(w);
            let tell: Box<dyn FnOnce()> =
                Box::new(move || crate::host::notify::tell(&format!("READY=1\n{status}")));
            (r, tell)
        });
        tracing::debug!("serving process {}", sup.child_pid());
        let code = sup.wait(on_ready);
        crate::host::notify::tell("STOPPING=1");
        drop(socket_file);
        drop(metrics_file);
        return Ok(ExitCode::from(code));
    }
    let ready = ready.map(|(r, w)| {
        drop(r);
        w
    });
    drop(closure_sender);
    // The serving process may not see the socket file, nor unlink it under
    // seccomp: its supervisor removes it.
    std::mem::forget(socket_file);
    std::mem::forget(metrics_file);
    // Nothing inherited but the listener and the standard streams reaches
    // the serving process (a VMM or unit may leave other descriptors open).
    {
        use std::os::fd::AsRawFd;
        let mut keep = vec![listener.as_raw_fd()];
        keep.extend(ready.as_ref().map(|w| w.as_raw_fd()));
        keep.extend(metrics.as_ref().map(|l| l.as_raw_fd()));
        keep.extend(args.view.closure_source.as_ref().map(|r| r.as_raw_fd()));
        keep.extend(tenant.as_ref().map(|c| c.as_raw_fd()));
        sandbox::close_inherited(&keep)?;
    }
    privileges::set_rlimit_nofile(args.rlimit_nofile)?;
    let fd_limit = cache::tenant::descriptor_limit();
    privileges::drop_all(args.sandbox == SandboxMode::None)?;
    seccomp::install(args.seccomp)?;
    if args.selftest_seccomp {
        seccomp::selftest();
    }
    crate::host::memory::configure();
    crate::host::memory::spawn_trimmer();
    // Blocking tasks are store file reads for misses: a few dozen threads
    // at most (tokio's default allows 512), well inside the unit's TasksMax.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(32)
        .build()
        .context("starting the async runtime")?;
    let opts = StoreOptions {
        sandboxed: true,
        idle_timeout: std::time::Duration::from_secs(args.view.store_timeout),
        cache: places.cache_dir.map(|dir| CacheOptions {
            dir,
            max_bytes: 0,
            role: cache::Role::Reader,
        }),
        upstream_keys: Vec::new(),
    };
    // gRPC channels start their tasks on the runtime they are opened in
    let (store, cache) = {
        let _rt = rt.enter();
        match tenant {
            Some(conn) => (
                cache::tenant::open_store(conn, opts.idle_timeout, fd_limit)
                    .context("opening the scoped store")?,
                None,
            ),
            None => Store::open_with(&placed(addrs, &places.addrs), &opts)
                .context("opening the store")?,
        }
    };
    if let Some(w) = ready {
        let (store, timeout) = (store.clone(), opts.idle_timeout);
        rt.spawn(async move {
            super::lifecycle::store_answers(&store, timeout).await;
            let mut w = std::fs::File::from(w);
            if let Err(e) = std::io::Write::write_all(&mut w, b"R") {
                tracing::warn!("telling the supervisor the store answered: {e}");
            }
        });
    }
    let served = rt.block_on(serve(store, cache.clone(), args, listener, metrics));
    if let Some(c) = cache {
        rt.block_on(c.report_touches());
        tracing::info!("cache {}: {}", c.dir().display(), c.stats().summary());
    }
    served?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    store: Store,
    cache: Option<std::sync::Arc<cache::Cache>>,
    args: VirtiofsArgs,
    listener: UnixListener,
    metrics: Option<UnixListener>,
) -> anyhow::Result<()> {
    // Before anything that takes time: a signal from here on is a clean exit.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    // SIGHUP re-reads --closure-file (the view listens for it); without one
    // it ends the process, as it always did.
    let _hup = match &args.view.closure_file {
        Some(_) => Some(signal(SignalKind::hangup()).context("installing a SIGHUP handler")?),
        None => None,
    };
    sandbox::release_signals();

    let fs = args.view.view(store).await?;
    if let Some(l) = metrics {
        let fs = fs.clone();
        let render: crate::serve::metrics::Render = std::sync::Arc::new(move || {
            let mut out = String::new();
            crate::wire::prometheus::up(&mut out);
            out.push_str(&fs.render_metrics());
            if let Some(c) = &cache {
                out.push_str(&c.stats().prometheus());
            }
            out
        });
        crate::serve::metrics::serve_bound(l, render)?;
    }
    let config = DeviceConfig {
        tag: args.tag,
        request_queues: usize::from(args.request_queues),
        threads: usize::from(args.thread_pool_size),
        poll_max: std::time::Duration::from_micros(u64::from(args.poll_max_us)),
    };
    // The vhost-user daemon blocks: it runs on its own thread (not the
    // blocking pool, which would hold up the runtime's shutdown), and this
    // task waits for it or for a signal.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || {
            let _ = tx.send(vhost_user::serve_one(fs, config, listener));
        })
        .context("starting the vhost-user thread")?;
    let result = tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM: shutting down");
            Ok(())
        }
        _ = int.recv() => {
            tracing::info!("SIGINT: shutting down");
            Ok(())
        }
        r = rx => match r {
            Ok(r) => r.context("vhost-user"),
            Err(_) => Err(anyhow!("the vhost-user thread died")),
        },
    };
    result
}

/// Where the sandbox finds a store address.
fn place(a: &Addr) -> Place {
    match a {
        Addr::Memory => Place::Nowhere,
        Addr::Local(p) => Place::Dir(p.clone()),
        Addr::GrpcUnix(p, _) => Place::Socket(p.clone()),
        Addr::GrpcHttp(hp, _) => Place::Host(hp.clone()),
        Addr::List(v) => Place::Several(v.iter().map(place).collect()),
        // The endpoint is reached over the network (AWS itself: port 443
        // of a name resolved once, before the sandbox closes).
        Addr::S3(b) => b
            .endpoint_host()
            .map_or(Place::Host("s3.amazonaws.com:443".into()), Place::Host),
        // Refused when the store is opened: a per-VM daemon reads a Nix
        // cache through the host daemon.
        Addr::Nix(_) => Place::Nowhere,
    }
}

/// The addresses as the sandbox rewrote their places (paths made
/// canonical or relative to a chroot, host names resolved).
fn placed(addrs: [Addr; 3], places: &[Place; 3]) -> [Addr; 3] {
    let mut i = 0;
    addrs.map(|a| {
        i += 1;
        placed_one(a, &places[i - 1])
    })
}

fn placed_one(a: Addr, p: &Place) -> Addr {
    match (a, p) {
        (Addr::Local(_), Place::Dir(p)) => Addr::Local(p.clone()),
        (Addr::GrpcUnix(_, w), Place::Socket(p)) => Addr::GrpcUnix(p.clone(), w),
        (Addr::GrpcHttp(_, w), Place::Host(h)) => Addr::GrpcHttp(h.clone(), w),
        // Only an explicit endpoint is rewritten: AWS's own names carry
        // the bucket and region, and requests are signed for them.
        (Addr::S3(b), Place::Host(h)) if b.endpoint.is_some() => Addr::S3(b.with_endpoint_host(h)),
        (Addr::List(v), Place::Several(ps)) if v.len() == ps.len() => Addr::List(
            v.into_iter()
                .zip(ps)
                .map(|(a, p)| placed_one(a, p))
                .collect(),
        ),
        (a, _) => a,
    }
}
