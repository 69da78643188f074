//! Giving up power once setup is done: the file-descriptor limit is set
//! while it still may be raised, then every capability set is emptied,
//! securebits are locked so uid 0 cannot regain any, and no_new_privs is
//! set. Serving a read-only store needs no capability at all.
use caps::CapSet;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--rlimit-nofile {want}: {err}")]
    Rlimit { want: u64, err: io::Error },
    #[error("dropping capabilities: {0}")]
    Caps(String),
    #[error("setting {what}: {err}")]
    Prctl { what: &'static str, err: io::Error },
}

/// Sets RLIMIT_NOFILE to `want` (soft and hard), or raises the soft limit
/// to the hard one when `want` is None, as virtiofsd does.
pub fn set_rlimit_nofile(want: Option<u64>) -> Result<(), PrivilegeError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let err = |want, err| PrivilegeError::Rlimit { want, err };
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(err(want.unwrap_or(0), io::Error::last_os_error()));
    }
    match want {
        Some(n) => {
            lim.rlim_cur = n;
            lim.rlim_max = n;
        }
        None => lim.rlim_cur = lim.rlim_max,
    }
    // SAFETY: `lim` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(err(lim.rlim_cur, io::Error::last_os_error()));
    }
    Ok(())
}

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;

fn prctl(what: &'static str, op: libc::c_int, arg: libc::c_ulong) -> Result<(), PrivilegeError> {
    // SAFETY: the prctl operations used here take integer arguments only.
    if unsafe { libc::prctl(op, arg, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::Prctl {
            what,
            err: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Empties the bounding, ambient, inheritable, effective and permitted
/// sets and sets no_new_privs. Without CAP_SETPCAP (an unprivileged user
/// outside a user namespace) the bounding set cannot be emptied: that is an
/// error unless `best_effort`, which only warns (`--sandbox none`).
pub fn drop_all(best_effort: bool) -> Result<(), PrivilegeError> {
    let caps_err = |e: caps::errors::CapsError| PrivilegeError::Caps(e.to_string());
    let can_setpcap =
        caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).map_err(caps_err)?;
    if can_setpcap {
        prctl(
            "securebits",
            libc::PR_SET_SECUREBITS,
            SECBIT_NOROOT
                | SECBIT_NOROOT_LOCKED
                | SECBIT_NO_SETUID_FIXUP
                | SECBIT_NO_SETUID_FIXUP_LOCKED
                | SECBIT_KEEP_CAPS_LOCKED
                | SECBIT_NO_CAP_AMBIENT_RAISE
                | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED,
        )?;
        // Every index the kernel knows, including ones newer than the caps
        // crate: PR_CAPBSET_DROP fails with EINVAL past the last one.
        for cap in 0..64 {
            // SAFETY: integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(PrivilegeError::Caps(format!("bounding set: {e}")));
            }
        }
    } else if !caps::read(None, CapSet::Bounding)
        .map_err(caps_err)?
        .is_empty()
    {
        let msg = "no CAP_SETPCAP: the bounding set stays as inherited";
        if !best_effort {
            return Err(PrivilegeError::Caps(msg.into()));
        }
        tracing::warn!("{msg}");
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err)?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err)?;
    caps::clear(None, CapSet::Effective).map_err(caps_err)?;
    caps::clear(None, CapSet::Permitted).map_err(caps_err)?;
    prctl("no_new_privs", libc::PR_SET_NO_NEW_PRIVS, 1)?;
    Ok(())
}
