//! Confinement of the serving process (as virtiofsd's `--sandbox`).
//!
//! The process forks before any thread exists. The child serves: in
//! `namespace` mode it gets fresh mount, PID, IPC, UTS and (unless the store
//! is reached over TCP) network namespaces, plus a user namespace when not
//! started as root, and its root becomes an empty read-only tmpfs holding
//! only what the store needs, bind-mounted read-only at the same paths. In
//! `chroot` mode it is chrooted without namespaces; in `none` it is only a
//! child. The parent stays
//! outside, forwards SIGTERM/SIGINT/SIGHUP, keeps the socket file it
//! created (the child cannot see it) and exits with the child's status.
use std::ffi::CString;
use std::io;
use std::net::ToSocketAddrs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// New namespaces and an empty read-only root (default).
    Namespace,
    /// chroot without namespaces, for hosts that lack them.
    Chroot,
    /// No confinement: for debugging only.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox: {what}: {err}")]
    Sys { what: String, err: io::Error },
    #[error("sandbox: {0}")]
    Setup(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> SandboxError {
    let what = what.into();
    move |err| SandboxError::Sys { what, err }
}

/// Turns a libc return value into a result, with errno as the error.
fn check(rc: libc::c_int, what: impl Into<String>) -> Result<libc::c_int, SandboxError> {
    if rc < 0 {
        Err(sys(what)(io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

fn cstr(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| SandboxError::Setup(format!("{} contains a NUL byte", p.display())))
}

/// A host path the serving process needs, at the same absolute path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposed {
    pub path: PathBuf,
    pub is_dir: bool,
}

/// What the store needs from the host once the sandbox is up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Embedded store directories and unix sockets of remote stores.
    pub paths: Vec<Exposed>,
    /// A store reached over TCP keeps the host's network namespace.
    pub network: bool,
}

/// Something the serving process reaches on the host, as the sandbox
/// sees a store address: the commands map each address to one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// Nothing outside the process (a store in memory).
    Nowhere,
    /// A directory (an embedded store).
    Dir(PathBuf),
    /// A unix socket to connect to (a store daemon on this host).
    Socket(PathBuf),
    /// `HOST:PORT` to connect to over TCP (a store daemon elsewhere).
    Host(String),
    /// All of these (several daemons of one store): each is exposed.
    Several(Vec<Place>),
}

/// What the serving process reaches on the host: its three stores' places
/// and the cache directory it reads. Paths in it are valid inside the
/// sandbox once [`enter`] has rewritten them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Places {
    pub addrs: [Place; 3],
    pub cache_dir: Option<PathBuf>,
}

/// A store socket's directory when it holds nothing but the socket: bound
/// instead of the file, a store daemon restarted with a new socket there is
/// reached again. Otherwise only the file (and a restarted daemon is not).
fn socket_exposure(socket: &Path) -> Exposed {
    let alone = socket.parent().and_then(|dir| {
        let mut entries = std::fs::read_dir(dir).ok()?;
        let only = entries.next()?.ok()?;
        (only.path() == socket && entries.next().is_none()).then(|| dir.to_path_buf())
    });
    match alone {
        Some(dir) => Exposed {
            path: dir,
            is_dir: true,
        },
        None => {
            tracing::warn!(
                "{} shares its directory with other files: only the socket is exposed, so a \
                 store daemon that recreates it is not reached again until restart; give the \
                 socket a directory of its own (e.g. /run/tvix-store/daemon.sock)",
                socket.display()
            );
            Exposed {
                path: socket.to_path_buf(),
                is_dir: false,
            }
        }
    }
}

impl Needs {
    /// What serving from `places` needs, and the places to use inside the
    /// sandbox: paths made canonical (bind mounts follow no symlinks),
    /// host names resolved (no resolver files inside).
    pub fn of_store(places: &Places) -> Result<(Needs, Places), SandboxError> {
        let mut needs = Needs::default();
        let mut out = places.clone();
        for a in out.addrs.iter_mut() {
            needs.place(a)?;
        }
        if let Some(dir) = &mut out.cache_dir {
            *dir = canonical(dir, "cache directory")?;
            needs.expose(Exposed {
                path: dir.clone(),
                is_dir: true,
            });
        }
        Ok((needs, out))
    }

    /// Adds what reaching `a` needs, and rewrites it as the sandbox sees it.
    fn place(&mut self, a: &mut Place) -> Result<(), SandboxError> {
        match a {
            Place::Nowhere => {}
            Place::Dir(p) => {
                *p = canonical(p, "store directory")?;
                self.expose(Exposed {
                    path: p.clone(),
                    is_dir: true,
                });
            }
            Place::Socket(p) => {
                *p = canonical(p, "store socket (start the store daemon first)")?;
                self.expose(socket_exposure(p));
            }
            Place::Host(hp) => {
                self.network = true;
                let sa = hp
                    .to_socket_addrs()
                    .map_err(|e| SandboxError::Setup(format!("resolving {hp}: {e}")))?
                    .next()
                    .ok_or_else(|| SandboxError::Setup(format!("{hp} has no address")))?;
                let resolved = sa.to_string();
                if resolved != *hp {
                    tracing::info!("store {hp} resolved to {resolved} before sandboxing");
                    *hp = resolved;
                }
            }
            Place::Several(all) => {
                for a in all {
                    match a {
                        Place::Socket(p) if std::fs::symlink_metadata(&*p).is_err() => {
                            self.absent_socket(p)
                        }
                        a => self.place(a)?,
                    }
                }
            }
        }
        Ok(())
    }

    /// A socket of several that is not there (its daemon is down): the
    /// others serve meanwhile. Its directory is exposed when it holds
    /// nothing else, so the daemon is reached once it is back there;
    /// otherwise it stays out of reach until a restart.
    fn absent_socket(&mut self, p: &mut PathBuf) {
        let empty_dir = p
            .parent()
            .and_then(|d| std::fs::canonicalize(d).ok())
            .filter(|d| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_none()));
        match (empty_dir, p.file_name()) {
            (Some(dir), Some(name)) => {
                tracing::warn!(
                    "store socket {} is absent (its daemon is down?): its directory is \
                     exposed, to reach it once it is back",
                    p.display()
                );
                *p = dir.join(name);
                self.expose(Exposed {
                    path: dir,
                    is_dir: true,
                });
            }
            _ => tracing::warn!(
                "store socket {} is absent and its directory is not empty (or missing): \
                 that daemon is out of reach until restart, the others serve",
                p.display()
            ),
        }
    }

    fn expose(&mut self, e: Exposed) {
        if !self.paths.contains(&e) {
            self.paths.push(e);
        }
    }
}

fn canonical(p: &Path, what: &str) -> Result<PathBuf, SandboxError> {
    std::fs::canonicalize(p)
        .map_err(|e| SandboxError::Setup(format!("{what} {}: {e}", p.display())))
}

/// Which side of the fork this process is on.
pub enum Role {
    /// Serve, confined.
    Serving,
    /// Wait for the serving child.
    Supervisor(Supervisor),
}

/// Enters the sandbox. Must be called while the process has one thread.
/// Returns the role and the store addresses valid inside the sandbox.
pub fn enter(
    mode: SandboxMode,
    needs: &Needs,
    places: Places,
) -> Result<(Role, Places), SandboxError> {
    match mode {
        SandboxMode::None => {
            tracing::warn!("--sandbox none: serving without confinement (for debugging only)");
            // still a child: the filtered process cannot remove the socket
            ensure_single_threaded()?;
            match fork()? {
                Some(sup) => Ok((Role::Supervisor(sup), places)),
                None => Ok((Role::Serving, places)),
            }
        }
        SandboxMode::Namespace => {
            if needs.network {
                tracing::info!("keeping the host network namespace: the store is reached over TCP");
            }
            ensure_single_threaded()?;
            // SAFETY: geteuid/getegid have no preconditions.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            let userns = uid != 0;
            let mut flags = libc::CLONE_NEWPID;
            if userns {
                flags |= libc::CLONE_NEWUSER;
            }
            // SAFETY: unshare only changes this (single-threaded) process's namespaces.
            check(unsafe { libc::unshare(flags) }, "unshare(PID, user)")?;
            if userns {
                map_own_ids(uid, gid)?;
            }
            match fork()? {
                Some(sup) => Ok((Role::Supervisor(sup), places)),
                None => {
                    namespace_child(needs)?;
                    Ok((Role::Serving, places))
                }
            }
        }
        SandboxMode::Chroot => {
            ensure_single_threaded()?;
            let (root, places) = chroot_root(needs, places)?;
            match fork()? {
                Some(sup) => Ok((Role::Supervisor(sup), places)),
                None => {
                    chroot_child(root.as_deref())?;
                    Ok((Role::Serving, places))
                }
            }
        }
    }
}

/// fork() is only sound here with one thread: count them.
fn ensure_single_threaded() -> Result<(), SandboxError> {
    let n = std::fs::read_dir("/proc/self/task")
        .map_err(sys("reading /proc/self/task"))?
        .count();
    if n != 1 {
        return Err(SandboxError::Setup(format!(
            "{n} threads exist before the fork (internal error)"
        )));
    }
    Ok(())
}

/// In a fresh user namespace: keep our own uid and gid (so the store's
/// files keep their owners), nothing else.
fn map_own_ids(uid: libc::uid_t, gid: libc::gid_t) -> Result<(), SandboxError> {
    std::fs::write("/proc/self/setgroups", "deny").map_err(sys("writing setgroups"))?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))
        .map_err(sys("writing uid_map"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))
        .map_err(sys("writing gid_map"))?;
    Ok(())
}

const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn signal_set(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Forks with the forwarded signals and SIGCHLD blocked, so the parent
/// can take them with sigwaitinfo; the child unblocks them at once.
/// Returns the supervisor in the parent, None in the child.
fn fork() -> Result<Option<Supervisor>, SandboxError> {
    let mut sigs = FORWARDED.to_vec();
    sigs.push(libc::SIGCHLD);
    let set = signal_set(&sigs);
    // SAFETY: sigset_t is plain data, filled in by sigprocmask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are valid for the call.
    check(
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) },
        "blocking signals",
    )?;
    // The supervisor holds the write end of this pipe as long as it lives;
    // the child sees it closed if the supervisor died before the child's
    // PR_SET_PDEATHSIG was in place (getppid cannot tell: in a new PID
    // namespace it answers 0 either way).
    let mut alive = [-1 as libc::c_int; 2];
    // SAFETY: `alive` has room for the two descriptors.
    check(
        unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) },
        "pipe2",
    )?;
    // SAFETY: pipe2 returned two open descriptors that nothing else owns.
    let (alive_r, alive_w) = unsafe {
        (
            OwnedFd::from_raw_fd(alive[0]),
            OwnedFd::from_raw_fd(alive[1]),
        )
    };
    // SAFETY: the process has a single thread (checked by the caller), so
    // the child inherits no lock held by another thread.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let err = io::Error::last_os_error();
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        return Err(sys("fork")(err));
    }
    if pid == 0 {
        // The forwarded signals stay blocked until the serving process has
        // its handlers (`release_signals`): as PID 1 of a namespace it would
        // drop one sent earlier, and blocked signals wait instead.
        let mut mask = old;
        // SAFETY: `mask` is a valid sigset_t; the signal numbers are valid.
        unsafe {
            for &s in &FORWARDED {
                libc::sigaddset(&mut mask, s);
            }
        }
        // SAFETY: sets a valid mask; PR_SET_PDEATHSIG takes a signal
        // number and has no memory effects.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        // A supervisor that died before the prctl sent no signal: the child
        // must not serve unsupervised.
        drop(alive_w);
        let mut p = libc::pollfd {
            fd: alive_r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n != 0 {
            // SAFETY: _exit ends the process without running anything else.
            unsafe { libc::_exit(1) };
        }
        drop(alive_r);
        return Ok(None);
    }
    drop(alive_r);
    Ok(Some(Supervisor {
        child: pid,
        set,
        _alive: alive_w,
        on_hangup: None,
    }))
}

/// From the start, before the socket is bound: SIGTERM, SIGINT and SIGHUP
/// wait (blocked) instead of killing a daemon that is still setting up;
/// the supervisor then forwards them and the serving process handles them
/// once its handlers are in (`release_signals`). A VMM or test that sends
/// SIGTERM as soon as the socket appears gets a clean exit.
pub fn hold_signals() {
    let set = signal_set(&FORWARDED);
    // SAFETY: `set` is a valid signal set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// In the serving process, once its signal handlers are installed: lets
/// the forwarded signals in, on the calling thread (threads started before
/// keep them blocked, so the handlers run on this one).
pub fn release_signals() {
    let set = signal_set(&FORWARDED);
    // SAFETY: `set` is a valid signal set.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// The parent side: forwards signals to the serving child and reaps it.
pub struct Supervisor {
    child: libc::pid_t,
    set: libc::sigset_t,
    /// Closed only when the supervisor ends (see `fork`).
    _alive: OwnedFd,
    /// Runs on SIGHUP before it is forwarded; `false` keeps it back.
    on_hangup: Option<Box<dyn FnMut() -> bool>>,
}

impl Supervisor {
    pub fn child_pid(&self) -> libc::pid_t {
        self.child
    }

    /// Work the supervisor does on SIGHUP, outside the sandbox, before it
    /// forwards the signal (not forwarded when `f` answers false).
    pub fn on_hangup(&mut self, f: Box<dyn FnMut() -> bool>) {
        self.on_hangup = Some(f);
    }

    /// Waits for the child; returns the exit status to exit with (128 +
    /// signal number when it was killed, as a shell reports it). Calls
    /// `on_ready` once the child writes a byte to `ready` (the supervisor
    /// cannot start a thread to wait for it: a process that unshared its
    /// PID namespace may not).
    pub fn wait(mut self, mut ready: Option<(OwnedFd, Box<dyn FnOnce()>)>) -> u8 {
        loop {
            if let Some(code) = self.reap() {
                return code;
            }
            if let Some((fd, _)) = &ready {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; signals stay blocked, so they
                // wait for the sigtimedwait below.
                if unsafe { libc::poll(&mut p, 1, 100) } > 0 {
                    let mut b = [0u8; 1];
                    // SAFETY: reads at most one byte into `b`.
                    let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
                    if let Some((_, on_ready)) = ready.take() {
                        if n == 1 {
                            on_ready();
                        }
                    }
                }
                let none = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: valid set and timeout; a null info is allowed.
                let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &none) };
                self.forward(sig);
                continue;
            }
            // SAFETY: `set` is a valid signal set; a null info is allowed.
            let sig = unsafe { libc::sigwaitinfo(&self.set, std::ptr::null_mut()) };
            self.forward(sig);
        }
    }

    fn forward(&mut self, sig: libc::c_int) {
        if sig == libc::SIGHUP && self.on_hangup.as_mut().is_some_and(|f| !f()) {
            return;
        }
        if sig > 0 && FORWARDED.contains(&sig) {
            tracing::debug!("forwarding signal {sig} to the serving process");
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(self.child, sig) };
        }
    }

    fn reap(&self) -> Option<u8> {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let rc = unsafe { libc::waitpid(self.child, &mut status, libc::WNOHANG) };
        if rc == 0 {
            return None;
        }
        if rc < 0 {
            tracing::error!(
                "waiting for the serving process: {}",
                io::Error::last_os_error()
            );
            return Some(1);
        }
        if libc::WIFEXITED(status) {
            return Some(u8::try_from(libc::WEXITSTATUS(status)).unwrap_or(1));
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            if sig == libc::SIGSYS {
                tracing::error!(
                    "the serving process was killed by SIGSYS: it made a system call \
                     outside the seccomp policy (rerun with --seccomp log to find it)"
                );
            } else {
                tracing::error!("the serving process was killed by signal {sig}");
            }
            return Some(128u8.saturating_add(u8::try_from(sig).unwrap_or(127)));
        }
        None
    }
}

/// The child in namespace mode: private mounts, a tmpfs root with the
/// needed paths bind-mounted read-only, pivot_root into it.
fn namespace_child(needs: &Needs) -> Result<(), SandboxError> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !needs.network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare only changes this process's namespaces.
    check(
        unsafe { libc::unshare(flags) },
        "unshare(mount, IPC, UTS, net)",
    )?;
    // Nothing we mount propagates back to the host, nor the host's to us.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;

    // Open what we expose before the tmpfs could hide it.
    let mut opened = Vec::new();
    for e in &needs.paths {
        let c = cstr(&e.path)?;
        // SAFETY: `c` is a valid C string; O_PATH opens without access.
        let fd = check(
            unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) },
            format!("opening {}", e.path.display()),
        )?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        opened.push((e, unsafe {
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }));
    }

    let new_root = std::env::temp_dir();
    mount(
        Some("tvix-virtiofsd"),
        &new_root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0755,size=1m,nr_inodes=1024"),
    )?;
    for (e, fd) in &opened {
        let rel = e.path.strip_prefix("/").unwrap_or(&e.path);
        let target = new_root.join(rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(sys(format!("creating {}", parent.display())))?;
        }
        if e.is_dir {
            std::fs::create_dir(&target)
        } else {
            std::fs::File::create(&target).map(drop)
        }
        .map_err(sys(format!("creating {}", target.display())))?;
        let src = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        mount(
            Some(&*src.to_string_lossy()),
            &target,
            None,
            libc::MS_BIND,
            None,
        )?;
        remount_read_only(&target)?;
    }
    drop(opened);

    let root = cstr(&new_root)?;
    // SAFETY: valid C strings; pivot_root(".", ".") stacks the old root
    // under the new one, and the detach below removes it.
    unsafe {
        check(libc::chdir(root.as_ptr()), "chdir to the new root")?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            "pivot_root",
        )?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            "detaching the old root",
        )?;
        check(libc::chdir(c"/".as_ptr()), "chdir /")?;
    }
    remount_read_only(Path::new("/"))?;
    Ok(())
}

fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), SandboxError> {
    let c = |s: Option<&str>| s.map(|s| CString::new(s).unwrap_or_default());
    let (src_c, fs_c, data_c) = (c(src), c(fstype), c(data));
    let target_c = cstr(target)?;
    let ptr = |o: &Option<CString>| o.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: all pointers are valid C strings or null, as mount(2) allows.
    let rc = unsafe {
        libc::mount(
            ptr(&src_c),
            target_c.as_ptr(),
            ptr(&fs_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    check(
        rc,
        format!(
            "mount {} on {}",
            src.or(fstype).unwrap_or("(flags)"),
            target.display()
        ),
    )
    .map(drop)
}

/// Makes the mount at `target` read-only, nosuid, nodev, noexec, keeping
/// its atime flags (a user namespace may not change locked ones).
fn remount_read_only(target: &Path) -> Result<(), SandboxError> {
    let c = cstr(target)?;
    // SAFETY: statvfs is plain data filled in by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    check(
        unsafe { libc::statvfs(c.as_ptr(), &mut st) },
        format!("statvfs {}", target.display()),
    )?;
    let mut flags = libc::MS_REMOUNT
        | libc::MS_BIND
        | libc::MS_RDONLY
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC;
    for (st_flag, ms_flag) in [
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    mount(None, target, None, flags, None)
}

/// The chroot directory: the one directory holding what the store needs
/// (the store directory, or the directory of a remote's socket); None for
/// stores that need no path. Places are rewritten relative to it.
fn chroot_root(
    needs: &Needs,
    mut places: Places,
) -> Result<(Option<PathBuf>, Places), SandboxError> {
    let mut root: Option<PathBuf> = None;
    for e in &needs.paths {
        let dir = if e.is_dir {
            e.path.clone()
        } else {
            e.path.parent().unwrap_or(Path::new("/")).to_path_buf()
        };
        match &root {
            Some(r) if *r != dir => {
                return Err(SandboxError::Setup(format!(
                    "--sandbox chroot can expose one directory, but the store needs {} and {}: \
                     use --sandbox namespace",
                    r.display(),
                    dir.display()
                )))
            }
            _ => root = Some(dir),
        }
        if !e.is_dir {
            alone_in_its_directory(&e.path)?;
        }
    }
    if let Some(r) = &root {
        let inside = |p: &mut PathBuf| {
            let rel = p.strip_prefix(r).unwrap_or(Path::new(""));
            *p = Path::new("/").join(rel);
        };
        fn each(a: &mut Place, f: &dyn Fn(&mut PathBuf)) {
            match a {
                Place::Dir(p) | Place::Socket(p) => f(p),
                Place::Several(all) => all.iter_mut().for_each(|a| each(a, f)),
                Place::Nowhere | Place::Host(_) => {}
            }
        }
        for a in places.addrs.iter_mut() {
            each(a, &inside);
        }
        if let Some(p) = &mut places.cache_dir {
            inside(p);
        }
    }
    Ok((root, places))
}

/// Closes every descriptor from 3 up but those in `keep` (close_range:
/// no /proc is needed, which the sandbox may not have).
pub fn close_inherited(keep: &[std::os::fd::RawFd]) -> Result<(), SandboxError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd >= 3)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for k in keep.into_iter().chain([u32::MAX]) {
        if k > first {
            let last = if k == u32::MAX { u32::MAX } else { k - 1 };
            // SAFETY: close_range only closes descriptors; the ones kept
            // and 0-2 are outside every range given.
            let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
            if rc != 0 {
                return Err(sys("close_range")(io::Error::last_os_error()));
            }
        }
        first = k.saturating_add(1);
    }
    Ok(())
}

/// A socket the chroot exposes through its directory: refused unless the
/// directory holds nothing else (`/run` would show other VMs' sockets and
/// the system's to a compromised daemon).
fn alone_in_its_directory(socket: &Path) -> Result<(), SandboxError> {
    let dir = socket.parent().unwrap_or(Path::new("/"));
    let others: Vec<String> = std::fs::read_dir(dir)
        .map_err(sys(format!("listing {}", dir.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| Some(e.file_name().as_os_str()) != socket.file_name())
        .take(3)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(SandboxError::Setup(format!(
        "--sandbox chroot would expose all of {} to the serving process, and it holds more \
         than the store's socket ({}{}): give the socket a directory of its own, or use \
         --sandbox namespace",
        dir.display(),
        others.join(", "),
        if others.len() == 3 { ", ..." } else { "" }
    )))
}

/// The child in chroot mode. Without a directory to expose it is chrooted
/// into an empty directory that is removed first, so nothing can be created
/// in it either.
fn chroot_child(root: Option<&Path>) -> Result<(), SandboxError> {
    let dir = match root {
        Some(r) => r.to_path_buf(),
        None => tempfile::Builder::new()
            .prefix("tvix-virtiofsd-root.")
            .tempdir()
            .map_err(sys("creating an empty root"))?
            .keep(),
    };
    let c = cstr(&dir)?;
    // SAFETY: valid C strings; chdir + chroot(".") keep working on a
    // directory removed in between.
    unsafe {
        check(libc::chdir(c.as_ptr()), format!("chdir {}", dir.display()))?;
        if root.is_none() {
            check(libc::rmdir(c.as_ptr()), "removing the empty root")?;
        }
        check(
            libc::chroot(c".".as_ptr()),
            format!("chroot {}", dir.display()),
        )?;
        check(libc::chdir(c"/".as_ptr()), "chdir /")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_of_stores() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&store, &link).unwrap();
        let a = Place::Dir(link);
        let places = |addrs: [Place; 3]| Places {
            addrs,
            cache_dir: None,
        };
        let (needs, out) =
            Needs::of_store(&places([a.clone(), a.clone(), Place::Nowhere])).unwrap();
        let canon = std::fs::canonicalize(&store).unwrap();
        assert_eq!(needs.paths.len(), 1, "one path exposed once");
        assert_eq!(needs.paths[0].path, canon);
        assert!(!needs.network);
        assert_eq!(out.addrs[0], Place::Dir(canon));

        let t = Place::Host("localhost:1".into());
        let (needs, out) = Needs::of_store(&places([t.clone(), t.clone(), t])).unwrap();
        assert!(needs.network && needs.paths.is_empty());
        assert!(
            matches!(&out.addrs[0], Place::Host(h) if h.ends_with(":1") && !h.starts_with("localhost"))
        );

        // several daemons: every socket exposed, the network kept for TCP
        std::fs::create_dir(tmp.path().join("a")).unwrap();
        let sock = tmp.path().join("a/s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let list = Place::Several(vec![
            Place::Socket(sock.clone()),
            Place::Host("localhost:2".into()),
        ]);
        let (needs, out) = Needs::of_store(&places([list.clone(), list, Place::Nowhere])).unwrap();
        assert!(needs.network);
        let dir = std::fs::canonicalize(tmp.path().join("a")).unwrap();
        assert_eq!(needs.paths.len(), 1, "{:?}", needs.paths);
        assert_eq!(needs.paths[0].path, dir, "the socket's own directory");
        let Place::Several(out) = &out.addrs[1] else {
            panic!("{:?}", out.addrs[1])
        };
        assert_eq!(out[0], Place::Socket(dir.join("s.sock")));
        assert!(matches!(&out[1], Place::Host(h) if !h.starts_with("localhost")));
        // a socket of a list that is absent does not stop the others:
        // its empty directory is exposed, or (not empty) nothing
        std::fs::create_dir(tmp.path().join("down")).unwrap();
        let down = tmp.path().join("down/s.sock");
        let gone = tmp.path().join("a/gone.sock");
        let list = Place::Several(vec![
            Place::Socket(down),
            Place::Socket(gone),
            Place::Socket(sock.clone()),
        ]);
        let (needs, _) = Needs::of_store(&places([list.clone(), list, Place::Nowhere])).unwrap();
        let down_dir = std::fs::canonicalize(tmp.path().join("down")).unwrap();
        assert_eq!(needs.paths.len(), 2, "{:?}", needs.paths);
        assert!(needs.paths.iter().any(|e| e.path == down_dir && e.is_dir));

        let missing = Place::Socket(tmp.path().join("nope.sock"));
        let err = Needs::of_store(&places([missing.clone(), missing.clone(), missing]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("start the store daemon first"), "{err}");
    }

    #[test]
    fn chroot_rewrites_paths_under_one_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        std::fs::create_dir(&dir).unwrap();
        let sock = dir.join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let needs = Needs {
            paths: vec![Exposed {
                path: sock.clone(),
                is_dir: false,
            }],
            network: false,
        };
        let a = Place::Socket(sock.clone());
        let places = |addrs: [Place; 3]| Places {
            addrs,
            cache_dir: None,
        };
        let (root, out) =
            chroot_root(&needs, places([a.clone(), a.clone(), Place::Nowhere])).unwrap();
        assert_eq!(root.as_deref(), Some(dir.as_path()));
        assert_eq!(out.addrs[0], Place::Socket("/s.sock".into()));

        // a socket among other files (e.g. in /run) is not exposed
        std::fs::write(dir.join("other-vm.sock"), b"").unwrap();
        let err = chroot_root(&needs, places([a.clone(), a, Place::Nowhere]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("other-vm.sock"), "{err}");
        assert!(err.contains("a directory of its own"), "{err}");

        let two = Needs {
            paths: vec![
                Exposed {
                    path: "/a".into(),
                    is_dir: true,
                },
                Exposed {
                    path: "/b".into(),
                    is_dir: true,
                },
            ],
            network: false,
        };
        let err = chroot_root(
            &two,
            places([Place::Nowhere, Place::Nowhere, Place::Nowhere]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("use --sandbox namespace"));
    }
}
